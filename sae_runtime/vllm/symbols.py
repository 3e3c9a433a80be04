"""Every vLLM module, class, function, method, attribute and keyword the glue touches, in
one list (pure data: no vLLM import).

Two checks read it:

- ``make check-cuda-wheel`` (``sae_runtime.vllm.wheel_check``) finds each entry in the
  Python sources of a vLLM wheel (the CUDA build, which is not installed here), statically:
  the module file, the definition, a class's attribute (its body, ``self.x = ...`` in its
  methods, or a base class's), a function's parameter;
- ``tests/sae_runtime/test_vllm_symbols.py`` walks the glue's sources (``sae_runtime/vllm/``,
  and the server's uses of the engine object) and fails on a vLLM symbol this list does not
  name: every import from ``vllm``, every attribute read (``x.a``, ``getattr(x, "a")``) and
  keyword passed on a vLLM object whose type the walk knows.

The walk knows a value's type from: an import from vLLM (a module, class or function); the
names the glue gives vLLM objects (``ROOTS``: a parameter or variable called ``runner`` is a
model runner, ``input_batch`` a V2 ``InputBatch``, ...; ``CLASS_ROOTS``: ``cls`` is a runner
class); the ``type`` of a listed attribute
or a function's return (``Sym.type``); ``x = <typed expression>`` in the same function; and
calling or indexing a typed class (an instance). A vLLM object reached by other means (a
differently named variable, a container's element) is not followed: keep those names.
Attributes the glue itself sets on vLLM objects are named ``_sae_*`` and are not vLLM's.

Type keys are ``"module:Class"``. ``runner`` marks what one model runner kind needs: ``v1``
(V1 ``GPUModelRunner`` and its CPU subclass), ``v2`` (Model Runner V2, the CUDA default) or
"" (both, or the engine side).
"""

from __future__ import annotations

from dataclasses import dataclass

V1_RUNNER = "vllm.v1.worker.gpu_model_runner:GPUModelRunner"
V1_CPU_RUNNER = "vllm.v1.worker.cpu_model_runner:CPUModelRunner"
V2_RUNNER = "vllm.v1.worker.gpu.model_runner:GPUModelRunner"
V1_BATCH = "vllm.v1.worker.gpu_input_batch:InputBatch"
V2_BATCH = "vllm.v1.worker.gpu.input_batch:InputBatch"
CPU_GPU_BUFFER = "vllm.v1.utils:CpuGpuBuffer"
REQUEST_STATE = "vllm.v1.worker.gpu.states:RequestState"
CACHED_REQUEST = "vllm.v1.worker.gpu_input_batch:CachedRequestState"
NEW_REQUEST = "vllm.v1.core.sched.output:NewRequestData"
SCHED_OUTPUT = "vllm.v1.core.sched.output:SchedulerOutput"
BATCH_DESC = "vllm.v1.worker.gpu.cudagraph_utils:BatchExecutionDescriptor"
BATCH_REQ_STATE = "vllm.v1.worker.gpu.model_runner:BatchReqState"
VLLM_CONFIG = "vllm.config.vllm:VllmConfig"
MODEL_CONFIG = "vllm.config.model:ModelConfig"
SCHED_CONFIG = "vllm.config.scheduler:SchedulerConfig"
PARALLEL_CONFIG = "vllm.config.parallel:ParallelConfig"
COMPILATION_CONFIG = "vllm.config.compilation:CompilationConfig"
COMPILATION_MODE = "vllm.config.compilation:CompilationMode"
GRAPH_MODE = "vllm.config.compilation:CUDAGraphMode"
SAMPLING_PARAMS = "vllm.sampling_params:SamplingParams"
OUTPUT_KIND = "vllm.sampling_params:RequestOutputKind"
TOKENS_PROMPT = "vllm.inputs:TokensPrompt"
ENGINE_ARGS = "vllm.engine.arg_utils:AsyncEngineArgs"
ASYNC_LLM = "vllm.v1.engine.async_llm:AsyncLLM"
CORE_CLIENT = "vllm.v1.engine.core_client:EngineCoreClient"
ASYNC_CORE_CLIENT = "vllm.v1.engine.core_client:AsyncMPClient"
GROUP = "vllm.distributed.parallel_state:GroupCoordinator"
PLATFORM = "vllm.platforms.interface:Platform"
WORKER = "vllm.v1.worker.gpu_worker:Worker"
CPU_WORKER = "vllm.v1.worker.cpu_worker:CPUWorker"
ROW_LINEAR = "vllm.model_executor.layers.linear:RowParallelLinear"
BG_RESOURCES = "vllm.v1.engine.core_client:BackgroundResources"
OUTPUT_PROCESSOR = "vllm.v1.engine.output_processor:OutputProcessor"
USAGE_CONTEXT = "vllm.usage.usage_lib:UsageContext"
MP_EXECUTOR = "vllm.v1.executor.multiproc_executor:MultiprocExecutor"
ENGINE_PROCS = "vllm.v1.engine.utils:CoreEngineProcManager"
EXECUTOR = "vllm.v1.executor.abstract:Executor"

RUNNERS = (V1_RUNNER, V1_CPU_RUNNER, V2_RUNNER)


@dataclass(frozen=True)
class Sym:
    """One vLLM symbol. ``path``: "" (the module itself), ``Name`` (a top-level name),
    ``Class.attr`` (an attribute, method, field or enum member), or ``function.param``
    (with ``kind="param"``: a keyword the glue passes; ``Class.param``: a keyword of its
    constructor)."""

    module: str
    path: str = ""
    kind: str = "attr"  # module | class | function | attr | param
    runner: str = ""  # v1 | v2 | "" (both, or the engine side)
    type: tuple[str, ...] = ()  # what the attribute holds or the function returns

    @property
    def owner(self) -> str:
        """``"module:Class"`` of a ``Class.attr`` entry (or ``"module:function"``)."""
        return f"{self.module}:{self.path.rsplit('.', 1)[0]}"

    def __str__(self) -> str:
        return f"{self.module}:{self.path}" if self.path else self.module


def _mod(module: str, *names: str, kind: str = "attr", runner: str = "") -> list[Sym]:
    return [Sym(module, n, kind, runner) for n in names]


def _attrs(key: str, *names: str, runner: str = "", kind: str = "attr") -> list[Sym]:
    module, cls = key.split(":")
    return [Sym(module, f"{cls}.{n}", kind, runner) for n in names]


def _typed(key: str, name: str, *types: str, runner: str = "") -> Sym:
    module, cls = key.split(":")
    return Sym(module, f"{cls}.{name}", "attr", runner, types)


SYMBOLS: tuple[Sym, ...] = (
    # ---------------------------------------------------------------- modules
    *[Sym(m, kind="module") for m in (
        "vllm", "vllm.envs", "vllm._custom_ops", "vllm.inputs", "vllm.sampling_params",
        "vllm.engine.arg_utils", "vllm.v1.engine.async_llm", "vllm.v1.engine.core_client",
        "vllm.config.compilation", "vllm.utils.torch_utils", "vllm.utils.gpu_sync_debug",
        "vllm.platforms", "vllm.platforms.interface", "vllm.distributed.parallel_state",
        "vllm.model_executor.models.utils", "vllm.model_executor.layers.linear",
        "vllm.v1.worker.gpu_model_runner", "vllm.v1.worker.cpu_model_runner",
        "vllm.v1.worker.gpu_input_batch", "vllm.v1.worker.gpu.model_runner",
        "vllm.v1.worker.gpu.input_batch", "vllm.v1.worker.gpu.cudagraph_utils",
        "vllm.v1.worker.gpu.states", "vllm.v1.core.sched.output", "vllm.v1.utils",
        "vllm.config.vllm", "vllm.config.model", "vllm.config.scheduler",
        "vllm.config.parallel", "vllm.v1.worker.gpu_worker", "vllm.v1.worker.cpu_worker",
        # engines across nodes (compat: headless nodes, liveness)
        "vllm.utils.network_utils", "vllm.v1.engine.exceptions", "vllm.usage.usage_lib",
        "vllm.v1.executor", "vllm.v1.executor.abstract", "vllm.v1.executor.multiproc_executor",
        "vllm.v1.engine.utils", "vllm.v1.engine.output_processor")],
    # ---------------------------------------------------------------- imports
    # re-exported lazily (vllm/__init__.py); its type names the defining class
    Sym("vllm", "SamplingParams", "class", type=(SAMPLING_PARAMS,)),
    Sym("vllm", "envs", "module"),
    Sym("vllm", "_custom_ops", "module"),
    Sym("vllm.sampling_params", "SamplingParams", "class"),
    Sym("vllm.sampling_params", "RequestOutputKind", "class"),
    Sym("vllm.inputs", "TokensPrompt", "class"),
    Sym("vllm.engine.arg_utils", "AsyncEngineArgs", "class"),
    Sym("vllm.v1.engine.async_llm", "AsyncLLM", "class"),
    Sym("vllm.config.compilation", "CompilationConfig", "class"),
    Sym("vllm.config.compilation", "CompilationMode", "class"),
    Sym("vllm.config.compilation", "CUDAGraphMode", "class"),
    Sym("vllm.utils.torch_utils", "direct_register_custom_op", "function"),
    Sym("vllm.utils.gpu_sync_debug", "gpu_sync_allowed", "function"),
    Sym("vllm.platforms", "current_platform", "attr", type=(PLATFORM,)),
    Sym("vllm.distributed.parallel_state", "get_tp_group", "function", type=(GROUP,)),
    Sym("vllm.distributed.parallel_state", "get_pp_group", "function", type=(GROUP,)),
    Sym("vllm.model_executor.models.utils", "PPMissingLayer", "class"),
    Sym("vllm.v1.worker.gpu_model_runner", "GPUModelRunner", "class", "v1"),
    Sym("vllm.v1.worker.cpu_model_runner", "CPUModelRunner", "class", "v1"),
    Sym("vllm.v1.worker.gpu.model_runner", "GPUModelRunner", "class", "v2"),
    Sym("vllm.utils.network_utils", "get_ip", "function"),
    Sym("vllm.utils.network_utils", "get_tcp_uri", "function"),
    Sym("vllm.v1.engine.exceptions", "EngineDeadError", "class"),
    Sym("vllm.usage.usage_lib", "UsageContext", "class"),
    Sym("vllm.v1.executor.multiproc_executor", "MultiprocExecutor", "class", type=(MP_EXECUTOR,)),
    Sym("vllm.v1.engine.utils", "CoreEngineProcManager", "class", type=(ENGINE_PROCS,)),
    Sym("vllm.v1.executor", "Executor", "class", type=(EXECUTOR,)),
    # ---------------------------------------------------------------- engines across nodes
    *_attrs(ENGINE_ARGS, "nnodes", "node_rank", "master_addr", "master_port",
            "data_parallel_size_local", "data_parallel_address", "data_parallel_rpc_port",
            "data_parallel_start_rank", "create_engine_config"),
    *_mod("vllm.engine.arg_utils", "AsyncEngineArgs.create_engine_config.usage_context",
          "AsyncEngineArgs.create_engine_config.headless", kind="param"),
    *_attrs(USAGE_CONTEXT, "OPENAI_API_SERVER"),
    *_attrs(PARALLEL_CONFIG, "node_rank", "node_rank_within_dp", "data_parallel_size_local",
            "data_parallel_master_ip", "data_parallel_rpc_port"),
    *_attrs(VLLM_CONFIG, "shutdown_timeout"),
    *_attrs(MP_EXECUTOR, "start_worker_monitor", "shutdown"),
    *_mod("vllm.v1.executor.multiproc_executor", "MultiprocExecutor.monitor_workers",
          "MultiprocExecutor.start_worker_monitor.inline", kind="param"),
    *_attrs(ENGINE_PROCS, "monitor_engine_liveness", "shutdown"),
    *_mod("vllm.v1.engine.utils", *(f"CoreEngineProcManager.{k}" for k in (
        "local_engine_count", "start_index", "local_start_index", "vllm_config",
        "local_client", "handshake_address", "executor_class", "log_stats")),
          "CoreEngineProcManager.shutdown.timeout", kind="param"),
    *_attrs(EXECUTOR, "get_class"),
    # liveness: a utility call per engine core that touches no worker, and failing the
    # engine as vLLM does when its core dies
    *_attrs(ASYNC_CORE_CLIENT, "core_engines", "call_utility_async", "_call_utility_async"),
    _typed(ASYNC_CORE_CLIENT, "resources", BG_RESOURCES),
    *_attrs(BG_RESOURCES, "engine_dead"),
    Sym("vllm.v1.engine.core", "EngineCore.is_sleeping"),
    _typed(ASYNC_LLM, "output_processor", OUTPUT_PROCESSOR),
    *_attrs(OUTPUT_PROCESSOR, "propagate_error"),
    # ---------------------------------------------------------------- engine side
    *_attrs(ENGINE_ARGS, "model", "tokenizer", "dtype", "max_model_len", "max_num_seqs",
            "max_num_batched_tokens", "enforce_eager", "enable_prefix_caching", "seed",
            "max_logprobs", "tensor_parallel_size", "pipeline_parallel_size",
            "data_parallel_size", "distributed_executor_backend", "worker_extension_cls",
            "additional_config", "disable_log_stats", "compilation_config"),
    *_attrs(SAMPLING_PARAMS, "max_tokens", "temperature", "top_p", "top_k", "seed", "stop",
            "stop_token_ids", "ignore_eos", "logprobs", "prompt_logprobs", "output_kind",
            "extra_args", "skip_reading_prefix_cache"),
    *_attrs(OUTPUT_KIND, "DELTA"),
    *_attrs(TOKENS_PROMPT, "prompt_token_ids", "cache_salt"),
    *_attrs(ASYNC_LLM, "from_engine_args", "collective_rpc", "generate", "abort",
            "get_num_unfinished_requests", "get_tokenizer", "shutdown", "errored"),
    _typed(ASYNC_LLM, "engine_core", CORE_CLIENT, ASYNC_CORE_CLIENT),
    _typed(ASYNC_LLM, "model_config", MODEL_CONFIG),
    _typed(ASYNC_LLM, "vllm_config", VLLM_CONFIG),
    *_attrs(ASYNC_CORE_CLIENT, "call_utility_all_async"),
    # the engine core method call_utility_all_async("collective_rpc", ...) names
    Sym("vllm.v1.engine.core", "EngineCore.collective_rpc"),
    # compilation_config keys build_engine passes, and the probe's calls
    *_attrs(COMPILATION_CONFIG, "mode", "cudagraph_mode", "splitting_ops",
            "set_splitting_ops_for_v1"),
    *_attrs(COMPILATION_MODE, "VLLM_COMPILE"),
    *_attrs(GRAPH_MODE, "FULL", "has_full_cudagraphs", "has_piecewise_cudagraphs",
            "mixed_mode"),
    *_mod("vllm.utils.torch_utils", "direct_register_custom_op.mutates_args",
          "direct_register_custom_op.fake_impl", "direct_register_custom_op.target_lib",
          kind="param"),
    *_mod("vllm.envs", "VLLM_USE_BREAKABLE_CUDAGRAPH", "VLLM_USE_V2_MODEL_RUNNER"),
    *_mod("vllm._custom_ops", "_supports_onednn", "create_onednn_mm", "onednn_mm"),
    *_attrs(PLATFORM, "is_cuda", "is_cpu", "ray_device_key"),
    *_attrs(GROUP, "rank_in_group", "world_size", "all_gather"),
    # ---------------------------------------------------------------- configs
    _typed(VLLM_CONFIG, "parallel_config", PARALLEL_CONFIG),
    _typed(VLLM_CONFIG, "compilation_config", COMPILATION_CONFIG),
    *_attrs(VLLM_CONFIG, "additional_config", "speculative_config"),
    *_attrs(MODEL_CONFIG, "hf_config", "dtype", "max_model_len", "get_hidden_size",
            "get_vocab_size", "get_total_num_hidden_layers", "model", "enforce_eager", "seed"),
    *_attrs(SCHED_CONFIG, "max_num_batched_tokens", "max_num_seqs"),
    *_attrs(PARALLEL_CONFIG, "data_parallel_index", "data_parallel_rank",
            "tensor_parallel_size", "pipeline_parallel_size", "data_parallel_size",
            "distributed_executor_backend"),
    *_attrs(PARALLEL_CONFIG, "prefill_context_parallel_size", "use_ubatching", runner="v2"),
    *_attrs(ROW_LINEAR, "input_size_per_partition"),
    # ---------------------------------------------------------------- workers
    *[_typed(w, "model_runner", *RUNNERS) for w in (WORKER, CPU_WORKER)],
    # ---------------------------------------------------------------- both runners
    *[s for r in RUNNERS for s in (
        _typed(r, "vllm_config", VLLM_CONFIG, runner="v2" if r == V2_RUNNER else "v1"),
        _typed(r, "model_config", MODEL_CONFIG, runner="v2" if r == V2_RUNNER else "v1"),
        _typed(r, "scheduler_config", SCHED_CONFIG, runner="v2" if r == V2_RUNNER else "v1"),
        *_attrs(r, "model", "device", "load_model",
                runner="v2" if r == V2_RUNNER else "v1"))],
    # ---------------------------------------------------------------- V1 runner
    *_attrs(V1_RUNNER, "_model_forward", "requests", "sample_tokens", "_bookkeeping_sync",
            runner="v1"),
    _typed(V1_RUNNER, "input_batch", V1_BATCH, runner="v1"),
    _typed(V1_RUNNER, "query_start_loc", CPU_GPU_BUFFER, runner="v1"),
    _typed(V1_RUNNER, "input_ids", CPU_GPU_BUFFER, runner="v1"),
    _typed(V1_RUNNER, "discard_request_mask", CPU_GPU_BUFFER, runner="v1"),
    *_attrs(V1_CPU_RUNNER, "load_model", runner="v1"),
    *_attrs(CPU_GPU_BUFFER, "np", "gpu", runner="v1"),
    *_attrs(V1_BATCH, "req_ids", "num_reqs", "num_computed_tokens_cpu", "generators",
            runner="v1"),
    *_attrs(CACHED_REQUEST, "num_prompt_tokens", runner="v1"),
    _typed(CACHED_REQUEST, "sampling_params", SAMPLING_PARAMS, runner="v1"),
    # ---------------------------------------------------------------- V2 runner
    *_attrs(V2_RUNNER, "add_requests", "prepare_inputs", "execute_model",
            "gather_batch_req_state", runner="v2"),
    _typed(V2_RUNNER, "req_states", REQUEST_STATE, runner="v2"),
    *_attrs(REQUEST_STATE, "req_id_to_index", "num_computed_tokens_np", runner="v2"),
    # what gather_batch_req_state returns, read to route a step with reads out of full graphs
    *_attrs(BATCH_REQ_STATE, "req_ids", "num_scheduled_tokens", "idx_mapping_np", runner="v2"),
    *_attrs(V2_BATCH, "req_ids", "num_reqs", "num_tokens", "query_start_loc_np",
            "num_computed_tokens_np", "prefill_len_np", "input_ids", runner="v2"),
    *_attrs(BATCH_DESC, "cg_mode", runner="v2"),
    *_attrs(NEW_REQUEST, "req_id", "prompt_len", "prefill_token_ids", runner="v2"),
    _typed(NEW_REQUEST, "sampling_params", SAMPLING_PARAMS, runner="v2"),
    _typed(SCHED_OUTPUT, "scheduled_new_reqs", runner="v2"),
)

ROOTS: dict[str, tuple[str, ...]] = {
    "runner": RUNNERS,
    "input_batch": (V2_BATCH,),
    "batch_desc": (BATCH_DESC,),
    "batch_req_state": (BATCH_REQ_STATE,),
    "req_states": (REQUEST_STATE,),
    "scheduler_output": (SCHED_OUTPUT,),
    "nrd": (NEW_REQUEST,),
    "req": (CACHED_REQUEST,),  # V1's request state (V2Request mirrors its two fields)
    "vllm_config": (VLLM_CONFIG,),
    "engine": (ASYNC_LLM,),
    "group": (GROUP,),
    "o_proj": (ROW_LINEAR,),
}
"""Names the glue gives vLLM objects (parameters and variables); ``x.engine`` is the engine
too."""

CLASS_ROOTS: dict[str, tuple[str, ...]] = {"cls": RUNNERS}
"""Names the glue gives vLLM classes (the runner classes it patches)."""

SELF_ROOTS: dict[str, tuple[str, ...]] = {"SteeringWorkerExtension": (WORKER, CPU_WORKER)}
"""Classes whose ``self`` is a vLLM object (the worker extension is mixed into the Worker)."""


def by_key() -> dict[str, list[Sym]]:
    """``"module:path"`` -> its entries."""
    out: dict[str, list[Sym]] = {}
    for s in SYMBOLS:
        out.setdefault(str(s), []).append(s)
    return out
