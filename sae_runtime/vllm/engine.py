"""Server-side engine construction: ``AsyncLLM`` with the worker extension, and requests."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from sae_runtime.interventions import EXTRA_ARGS_KEY, SteeringSpec
from sae_runtime.reads import ReadSpec
from sae_runtime.vllm import compat

log = logging.getLogger(__name__)

WORKER_EXTENSION = "sae_runtime.vllm.worker.SteeringWorkerExtension"


@dataclass(frozen=True)
class EngineSettings:
    """What the server passes to vLLM."""

    model: str
    saes: list[dict[str, Any]]  # [{"id", "path", "hook_name"}], in server order
    max_interventions: int
    max_watch: int = 0
    sae_dtype: str = "auto"
    reads_addr: str | None = None  # ZMQ address the worker pushes feature reads to
    dtype: str = "auto"
    max_model_len: int | None = None
    max_num_seqs: int = 64
    max_num_batched_tokens: int | None = None
    enforce_eager: bool = False
    enable_prefix_caching: bool = True
    seed: int = 0


def build_engine(s: EngineSettings) -> Any:
    """Start an AsyncLLM (engine core in its own process) with the SAE worker extension.

    On CUDA (compiled) the hook op runs outside captured graphs
    (``compat.cuda_compilation_config``); on CPU vLLM captures no graphs.
    """
    extra: dict[str, Any] = {}
    if not s.enforce_eager and compat.on_cuda():
        extra["compilation_config"] = compat.cuda_compilation_config()
    args = compat.AsyncEngineArgs(
        model=s.model,
        tokenizer=s.model,
        dtype=s.dtype,
        max_model_len=s.max_model_len,
        max_num_seqs=s.max_num_seqs,
        max_num_batched_tokens=s.max_num_batched_tokens,
        enforce_eager=s.enforce_eager,
        enable_prefix_caching=s.enable_prefix_caching,
        seed=s.seed,
        worker_extension_cls=WORKER_EXTENSION,
        additional_config={
            "sae_steering": {"saes": s.saes, "max_interventions": s.max_interventions,
                             "max_watch": s.max_watch, "reads_addr": s.reads_addr,
                             "sae_dtype": s.sae_dtype}
        },
        disable_log_stats=True,
        **extra,
    )
    return compat.AsyncLLM.from_engine_args(args)


def resolve_sae_dtype(sae_dtype: str, model_dtype: Any) -> str:
    """``auto`` -> the model's dtype name (e.g. ``bfloat16``); explicit names pass through."""
    return str(model_dtype).removeprefix("torch.") if sae_dtype == "auto" else sae_dtype


def make_prompt(token_ids: list[int], spec: SteeringSpec) -> Any:
    """A token prompt; steered requests get a cache salt so their KV is never shared."""
    salt = spec.cache_salt()
    if salt is None:
        return compat.TokensPrompt(prompt_token_ids=token_ids)
    return compat.TokensPrompt(prompt_token_ids=token_ids, cache_salt=salt)


def make_sampling_params(
    *, max_tokens: int, temperature: float, top_p: float, top_k: int, seed: int | None,
    stop: list[str], stop_token_ids: list[int], ignore_eos: bool,
    spec: SteeringSpec, sae_index: dict[str, int],
    reads: ReadSpec | None = None, request_id: str = "",
) -> Any:
    """SamplingParams carrying the request's edits and reads to the worker.

    A request that reads prompt positions skips reading the prefix cache, so every prompt
    position is computed (and reported); it still writes the cache for others.
    """
    payload: dict[str, Any] = {}
    if spec.interventions:
        payload.update(spec.to_wire(sae_index))
    if reads is not None and reads.reads:
        payload.update(reads.to_wire(sae_index))
    if payload:
        payload["rid"] = request_id
    return compat.SamplingParams(
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k if top_k > 0 else 0,
        seed=seed,
        stop=stop or None,
        stop_token_ids=stop_token_ids or None,
        ignore_eos=ignore_eos,
        output_kind=compat.RequestOutputKind.DELTA,
        extra_args={EXTRA_ARGS_KEY: payload} if payload else None,
        skip_reading_prefix_cache=True if reads is not None and reads.wants_prompt else None,
    )
