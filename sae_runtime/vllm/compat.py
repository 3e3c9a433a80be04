"""Every vLLM symbol this project touches, in one place (pinned to vllm 0.32.x).

An upgrade that moves or renames one of these breaks here first, and the
``test_hooks_land`` smoke test tells which layers stopped being hooked.
"""

from __future__ import annotations

import importlib

from vllm import SamplingParams  # noqa: F401
from vllm.engine.arg_utils import AsyncEngineArgs  # noqa: F401
from vllm.inputs import TokensPrompt  # noqa: F401
from vllm.model_executor.models.utils import extract_layer_index  # noqa: F401
from vllm.sampling_params import RequestOutputKind  # noqa: F401
from vllm.utils.torch_utils import direct_register_custom_op  # noqa: F401
from vllm.v1.engine.async_llm import AsyncLLM  # noqa: F401

VLLM_VERSION_RANGE = (">=0.32.0", "<0.33")

# Decoder layers whose forward returns ``(hidden_states, residual)`` with the residual add
# deferred to the next layer's fused add+norm: the true residual stream after the block is
# ``hidden_states + residual``. Values: the HF architectures that use them.
RESIDUAL_TUPLE_LAYERS: dict[str, tuple[str, ...]] = {
    "vllm.model_executor.models.llama:LlamaDecoderLayer": ("LlamaForCausalLM",),
    "vllm.model_executor.models.mistral:MistralDecoderLayer": ("MistralForCausalLM",),
    "vllm.model_executor.models.qwen2:Qwen2DecoderLayer": ("Qwen2ForCausalLM",),
    "vllm.model_executor.models.qwen3:Qwen3DecoderLayer": ("Qwen3ForCausalLM",),
}


def residual_tuple_layer_classes() -> list[type]:
    """The decoder layer classes above that exist in the installed vLLM."""
    out = []
    for qual in RESIDUAL_TUPLE_LAYERS:
        mod, _, name = qual.partition(":")
        try:
            out.append(getattr(importlib.import_module(mod), name))
        except (ImportError, AttributeError):
            continue
    return out


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
