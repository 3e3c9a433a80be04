"""Every vLLM symbol this project touches, in one place (pinned to vllm 0.32.x).

An upgrade that moves or renames one of these breaks here first; the module paths inside
decoder layers that the hooks wrap are in ``families.py``, and the model-family e2e tests
fail if a hook stops landing.
"""

from __future__ import annotations

from vllm import SamplingParams  # noqa: F401
from vllm.engine.arg_utils import AsyncEngineArgs  # noqa: F401
from vllm.inputs import TokensPrompt  # noqa: F401
from vllm.sampling_params import RequestOutputKind  # noqa: F401
from vllm.utils.torch_utils import direct_register_custom_op  # noqa: F401
from vllm.v1.engine.async_llm import AsyncLLM  # noqa: F401


def model_runner_classes() -> list[type]:
    """Model runner classes whose ``load_model`` / ``_model_forward`` we wrap."""
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    classes: list[type] = [GPUModelRunner]
    try:
        from vllm.v1.worker.cpu_model_runner import CPUModelRunner

        classes.append(CPUModelRunner)
    except ImportError:
        pass
    return classes
