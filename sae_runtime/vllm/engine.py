"""Server-side engine construction: ``AsyncLLM`` with the worker extension, and requests."""

from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass
from typing import Any

from sae_runtime.spec.interventions import SteeringSpec
from sae_runtime.spec.payloads import EXTRA_ARGS_KEY, ActPayload, RequestPayload, encode_request
from sae_runtime.spec.reads import ReadSpec
from sae_runtime.step.config import (
    DEFAULT_READS_MAX_MESSAGE_BYTES,
    AdditionalConfig,
    ReadsKeys,
    SAEEntry,
    WorkerConfig,
)
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
    reads_keys: ReadsKeys | None = None  # CURVE keys of a tcp:// reads channel
    reads_max_message_bytes: int = DEFAULT_READS_MAX_MESSAGE_BYTES
    dtype: str = "auto"
    max_model_len: int | None = None
    max_num_seqs: int = 64
    max_num_batched_tokens: int | None = None
    enforce_eager: bool = False
    enable_prefix_caching: bool = True
    seed: int = 0
    max_logprobs: int = 20  # largest logprobs / prompt_logprobs a request may ask for
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    data_parallel_size: int = 1
    distributed_executor_backend: str | None = None  # None: vLLM's choice; "mp" or "ray"
    # engines across nodes (vLLM's names and meanings)
    nnodes: int = 1
    node_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = 29501
    data_parallel_size_local: int | None = None
    data_parallel_address: str | None = None
    data_parallel_rpc_port: int | None = None
    data_parallel_start_rank: int | None = None
    # engine nodes: how long a worker outlives an unreachable API node (None: no watch)
    reads_lost_after_s: float | None = None
    act_sites: tuple[str, ...] = ()  # raw activation read sites (--activation-hooks), resolved
    act_twins: tuple[int, ...] = ()  # of those, the sites with a before-edits twin


def worker_config_of(s: EngineSettings) -> WorkerConfig:
    """What every worker of this engine is told (``additional_config``)."""
    return WorkerConfig(
        saes=tuple(SAEEntry(**e) for e in s.saes), max_interventions=s.max_interventions,
        max_watch=s.max_watch, reads_addr=s.reads_addr, sae_dtype=s.sae_dtype,
        reads_keys=s.reads_keys, reads_max_message_bytes=s.reads_max_message_bytes,
        reads_lost_after_s=s.reads_lost_after_s, act_sites=tuple(s.act_sites),
        act_twins=tuple(s.act_twins))


def engine_args(s: EngineSettings) -> Any:
    """``AsyncEngineArgs`` with the SAE worker extension and its ``AdditionalConfig``: the
    API node's engine and every engine node's are built here alike.

    On CUDA (compiled) with hooks, the SAE ops are split points of vLLM's piecewise graphs
    (``compat.cuda_compilation_config``). Model Runner V2 (the CUDA default) keeps vLLM's
    default FULL_AND_PIECEWISE: decode steps that only edit replay full graphs with the ops
    captured, steps with reads are routed to the piecewise graph (``runner_v2``). V1
    (``VLLM_USE_V2_MODEL_RUNNER=0``) cannot route a step, so it gets PIECEWISE. Without
    hooks vLLM keeps its default. On CPU vLLM builds V1 and captures no graphs.
    """
    extra: dict[str, Any] = {}
    if (s.saes or s.act_sites) and not s.enforce_eager and compat.on_cuda():
        extra["compilation_config"] = compat.cuda_compilation_config(compat.v2_runner_expected())
    return compat.AsyncEngineArgs(
        model=s.model,
        tokenizer=s.model,
        dtype=s.dtype,
        max_model_len=s.max_model_len,
        max_num_seqs=s.max_num_seqs,
        max_num_batched_tokens=s.max_num_batched_tokens,
        enforce_eager=s.enforce_eager,
        enable_prefix_caching=s.enable_prefix_caching,
        seed=s.seed,
        max_logprobs=s.max_logprobs,
        tensor_parallel_size=s.tensor_parallel_size,
        pipeline_parallel_size=s.pipeline_parallel_size,
        data_parallel_size=s.data_parallel_size,
        distributed_executor_backend=s.distributed_executor_backend,
        nnodes=s.nnodes,
        node_rank=s.node_rank,
        master_addr=s.master_addr,
        master_port=s.master_port,
        data_parallel_size_local=s.data_parallel_size_local,
        data_parallel_address=s.data_parallel_address,
        data_parallel_rpc_port=s.data_parallel_rpc_port,
        data_parallel_start_rank=s.data_parallel_start_rank,
        worker_extension_cls=WORKER_EXTENSION,
        additional_config=AdditionalConfig(worker_config_of(s)),
        disable_log_stats=True,
        **extra,
    )


def build_engine(s: EngineSettings) -> Any:
    """Start an AsyncLLM (engine core in its own process) with the SAE worker extension."""
    return compat.AsyncLLM.from_engine_args(engine_args(s))


def node_config(s: EngineSettings) -> Any:
    """The ``VllmConfig`` of an engine node (``steerd node``): ``compat.run_headless`` runs
    it; ``compat.node_role`` says whether it holds workers or whole engines."""
    return compat.headless_config(engine_args(s))


async def hook_reports(engine: Any) -> list[dict]:
    """Every worker's ``sae_hook_report`` (ranks, blocks held, hooks installed, runtime),
    from every data-parallel engine; the runtime is kept for ``runtime_info``."""
    reports = await compat.collective_rpc_every_engine(engine, "sae_hook_report")
    _RUNTIME[engine] = RuntimeInfo.of(reports)
    return reports


@dataclass(frozen=True)
class RuntimeInfo:
    """Where the engine runs, as its workers reported it (``worker.runtime_report``)."""

    device: str = ""  # "cuda (NVIDIA H200)", "cpu"
    model_runner: str = ""  # "v1" / "v2"
    cudagraph_mode: str = ""  # vLLM's resolved mode: NONE, PIECEWISE, FULL_AND_PIECEWISE, ...
    runner_class: str = ""

    @staticmethod
    def of(reports: list[dict]) -> RuntimeInfo:
        """The workers' runtime; fields on which they disagree list every value ("a|b")."""
        def joined(f) -> str:
            return "|".join(sorted({f(r) for r in reports}))

        def device(r) -> str:
            name = r.get("device_name", "")
            return r.get("device", "?") + (f" ({name})" if name and name != "cpu" else "")

        return RuntimeInfo(joined(device), joined(lambda r: r.get("runner_kind", "?")),
                           joined(lambda r: r.get("cudagraph_mode", "?")),
                           joined(lambda r: r.get("runner", "?")))

    def line(self) -> str:
        """The startup line (``steerd: runtime: ...``)."""
        graphs = {"NONE": "none (eager or CPU)",
                  "PIECEWISE": "PIECEWISE (the SAE hook runs eagerly between captured pieces)",
                  "FULL_AND_PIECEWISE": "FULL_AND_PIECEWISE (decode steps that only edit "
                                        "replay full graphs with the SAE hook captured; "
                                        "steps with reads run piecewise)",
                  "FULL_DECODE_ONLY": "FULL_DECODE_ONLY (decode steps that only edit replay "
                                      "full graphs with the SAE hook captured; the others "
                                      "run eagerly)",
                  }.get(self.cudagraph_mode, self.cudagraph_mode)
        return (f"device {self.device}, model runner {self.model_runner} "
                f"({self.runner_class}), CUDA graphs {graphs}")


_RUNTIME: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def runtime_info(engine: Any) -> RuntimeInfo:
    """What the workers reported at startup (``hook_reports``); empty fields before it."""
    try:
        return _RUNTIME.get(engine, RuntimeInfo())
    except TypeError:  # an engine object that takes no weak reference (test fakes)
        return RuntimeInfo()


async def reads_keys_to_every_worker(engine: Any, keys: dict) -> list:
    """``sae_reads_keys(keys)`` on every worker of every engine, on every node."""
    return await compat.collective_rpc_every_engine(engine, "sae_reads_keys", (keys,))


async def write_vectors(engine: Any, writes: list[tuple[int, int, bytes]]) -> list[dict]:
    """``sae_write_vectors(writes)`` on every worker of every engine: runtime-loaded vectors
    into their banks' rows (``worker.write_vector_rows``); one answer per worker."""
    return await compat.collective_rpc_every_engine(engine, "sae_write_vectors", (writes,))


on_cpu = compat.on_cpu
ray_supported = compat.ray_supported
engine_pings = compat.engine_pings
fail_engine = compat.fail_engine


def make_prompt(token_ids: list[int], spec: SteeringSpec, tenant: str | None = None) -> Any:
    """A token prompt; steered requests get a cache salt so their KV is never shared.

    The salt includes the prompt length when the spec's positions depend on it (generation
    windows, positions from the prompt's end): a later prompt that contains this one's
    generation must not reuse KV that was edited as "generated"; and the caller's
    ``tenant`` when given (``SteeringSpec.cache_salt``).
    """
    salt = spec.cache_salt(len(token_ids), tenant)
    if salt is None:
        return compat.TokensPrompt(prompt_token_ids=token_ids)
    return compat.TokensPrompt(prompt_token_ids=token_ids, cache_salt=salt)


def make_sampling_params(
    *, max_tokens: int, temperature: float, top_p: float, top_k: int, seed: int | None,
    stop: list[str], stop_token_ids: list[int], ignore_eos: bool,
    spec: SteeringSpec, sae_index: dict[str, int],
    reads: ReadSpec | None = None, request_id: str = "",
    logprobs: int | None = None, prompt_logprobs: int | None = None,
    acts: tuple[ActPayload, ...] = (),
) -> Any:
    """SamplingParams carrying the request's edits and reads to the worker.

    A request that reads prompt positions skips reading the prefix cache, so every prompt
    position is computed (and reported); it still writes the cache for others (vLLM does the
    same for prompt logprobs). So does a request with a latched conditional edit: its latch
    must see every prompt position, and a raw activation read (``acts``) that may select
    prompt positions. ``logprobs`` / ``prompt_logprobs``: top-n alternatives per
    generated / prompt token (vLLM's raw log-softmax), None for none.
    """
    rd = reads if reads is not None and reads.reads else None
    payload = None
    if spec.interventions or rd is not None or acts:
        payload = RequestPayload(rid=request_id, edits=spec.to_payload(sae_index),
                                 reads=rd.to_payload(sae_index) if rd else (),
                                 pooled=rd.pooled if rd else False, acts=tuple(acts))
    acts_prompt = any(a.positions.may_select_prompt for a in acts)
    return compat.SamplingParams(
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k if top_k > 0 else 0,
        seed=seed,
        stop=stop or None,
        stop_token_ids=stop_token_ids or None,
        ignore_eos=ignore_eos,
        logprobs=logprobs,
        prompt_logprobs=prompt_logprobs,
        output_kind=compat.RequestOutputKind.DELTA,
        extra_args={EXTRA_ARGS_KEY: encode_request(payload)} if payload else None,
        skip_reading_prefix_cache=True if (reads is not None and reads.wants_prompt)
        or spec.latched or acts_prompt else None,
    )


node_role = compat.node_role
run_headless = compat.run_headless
