"""The only package that imports vLLM.

- ``compat``: every vLLM import that moves between versions (pinned: vllm 0.32.x).
- ``worker``: the worker extension; importing it patches decoder layers and the model
  runner inside the engine's worker process.
- ``engine``: builds the ``AsyncLLM`` and ``SamplingParams`` on the server side.
"""
