"""What a request asks, on the server side: interventions, position selectors, reads,
guardrails, the steering vectors it names, its capacity budget, and the payload it becomes
for the worker. Never imports ``sae_runtime.step`` (the worker's side)."""
