"""The only package that imports vLLM.

- ``compat``: every vLLM import that moves between versions (pinned: vllm 0.32.x).
- ``worker``: the worker extension; importing it patches decoder layers and the model
  runner inside the engine's worker process.
- ``runner_v1``: the adapter from vLLM's V1 model runner to the step planner
  (``sae_runtime.step.planner``): request ids, token rows, first positions, payloads.
- ``runner_v2``: the same for Model Runner V2 (vLLM's CUDA default), from its per-step
  ``InputBatch``.
- ``symbols`` / ``wheel_check``: the list of every vLLM symbol the glue touches, and its
  static check against a vLLM wheel (``make check-cuda-wheel``; neither imports vLLM).
- ``cpu_rng``: the CPU seeded-generator fix (a vLLM 0.32 CPU bug).
- ``side_channel``: the worker -> server publisher of feature reads.
- ``engine``: builds the ``AsyncLLM`` and ``SamplingParams`` on the server side.
"""
