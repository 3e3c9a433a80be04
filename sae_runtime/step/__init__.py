"""What a worker does each engine step, with no vLLM in it: the edit record, the step
planner, the per-hook tables and their computation, tensor-parallel read splits, the
worker's start-up config and the read records it sends back."""
