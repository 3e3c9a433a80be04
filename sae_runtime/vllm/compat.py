"""The vLLM imports and version-specific calls of the glue, in one place (pinned to vllm
0.32.x).

An upgrade that moves or renames one of these breaks here first; the module paths inside
decoder layers that the hooks wrap are in ``families.py``, and the model-family e2e tests
fail if a hook stops landing. ``symbols.py`` lists every vLLM symbol the glue touches (these
imports and the attributes the runner adapters read), checked against the CUDA wheel by
``make check-cuda-wheel``.
"""

from __future__ import annotations

from vllm import SamplingParams  # noqa: F401
from vllm.config.compilation import CompilationConfig, CompilationMode
from vllm.engine.arg_utils import AsyncEngineArgs  # noqa: F401
from vllm.inputs import TokensPrompt  # noqa: F401
from vllm.sampling_params import RequestOutputKind  # noqa: F401
from vllm.utils.torch_utils import direct_register_custom_op  # noqa: F401
from vllm.v1.engine.async_llm import AsyncLLM  # noqa: F401


def model_runner_classes() -> list[type]:
    """V1 model runner classes whose ``load_model`` / ``_model_forward`` we wrap (V2:
    ``v2_runner_class``)."""
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    classes: list[type] = [GPUModelRunner]
    try:
        from vllm.v1.worker.cpu_model_runner import CPUModelRunner

        classes.append(CPUModelRunner)
    except ImportError:
        pass
    return classes


def v2_runner_class() -> type:
    """Model Runner V2 (vLLM's CUDA default; its CPU runner is a subclass). Same class name
    as V1's runner, another module."""
    from vllm.v1.worker.gpu.model_runner import GPUModelRunner

    return GPUModelRunner


def is_v2_runner(runner) -> bool:
    return isinstance(runner, v2_runner_class())


def gpu_sync_allowed():
    """vLLM's permission for a deliberate device sync inside ``execute_model`` (checked
    only under ``VLLM_GPU_SYNC_CHECK``; a no-op context otherwise)."""
    from vllm.utils.gpu_sync_debug import gpu_sync_allowed as allowed

    return allowed()


def cudagraph_mode(runner) -> str:
    """The runner's CUDA graph mode name (``NONE``, ``PIECEWISE``, ``FULL_AND_PIECEWISE``,
    ...): vLLM resolves it in place when it sets up the KV cache, so it is final after
    startup."""
    mode = runner.vllm_config.compilation_config.cudagraph_mode
    return "NONE" if mode is None else mode.name


HOOK_OP = "sae_steer::sae_hook"
ACT_OP = "sae_steer::act_read"  # a raw activation read's copy (a host row count, like reads)
SPLIT_OPS = (HOOK_OP, ACT_OP)  # split points of piecewise graphs: they run eagerly there


def is_full_graph(batch_desc) -> bool:
    """Whether V2 runs this step (its ``BatchExecutionDescriptor``) as a FULL graph replay."""
    from vllm.config.compilation import CUDAGraphMode

    return batch_desc.cg_mode == CUDAGraphMode.FULL


def graph_refusals(mode: str, runner_kind: str, splitting_ops=None) -> list[str]:
    """Why the SAE ops cannot run correctly under CUDA graph mode ``mode`` with this model
    runner (``"v1"`` / ``"v2"``) and these ``splitting_ops`` (empty list: they can).

    A full graph replays the ops as captured, without their Python: edits are captured
    whole (fixed-shape tables at fixed addresses, filled before the replay), but a step
    with reads (SAE reads, raw activation reads: row counts known only on the host) must
    not replay one. Per mode:

    - ``NONE``: every op runs eagerly: fine.
    - ``PIECEWISE``: fine when both ops are split points (they run eagerly between the
      captured pieces); a piece that contained them would freeze them.
    - ``FULL_AND_PIECEWISE`` / ``FULL_DECODE_ONLY``: decode steps replay full graphs, the
      others run piecewise / eagerly. Under V2 a step with reads is routed out of the full
      graph (the worker's ``gather_batch_req_state`` wrapper, ``runner_v2.leaves_full_graph``);
      V1 has no such route, so under V1 these modes are refused (``build_engine`` passes
      PIECEWISE when ``VLLM_USE_V2_MODEL_RUNNER=0``).
    - ``FULL``: mixed and prefill steps replay full graphs too, so a step with reads has
      nowhere to go: refused under both runners.

    Breakable CUDA graphs ignore ``splitting_ops`` and capture the ops into a segment.
    """
    from vllm import envs
    from vllm.config.compilation import CUDAGraphMode

    why = []
    m = CUDAGraphMode[mode]
    if m.mixed_mode() == CUDAGraphMode.FULL:
        why.append(f"CUDA graph mode {mode} replays full graphs for mixed and prefill steps "
                   "too, so a step with SAE or activation reads could not leave them; use "
                   "FULL_AND_PIECEWISE (vLLM's default) or PIECEWISE")
    elif m.has_full_cudagraphs() and runner_kind != "v2":
        why.append(f"CUDA graph mode {mode} replays full graphs for decode steps, and only "
                   "Model Runner V2 routes steps with reads out of them; under V1 "
                   "(VLLM_USE_V2_MODEL_RUNNER=0, with which steerd passes PIECEWISE) use "
                   "cudagraph_mode PIECEWISE")
    if m.has_piecewise_cudagraphs():
        if envs.VLLM_USE_BREAKABLE_CUDAGRAPH:
            why.append("VLLM_USE_BREAKABLE_CUDAGRAPH=1 captures the SAE hook into graph "
                       "segments (it ignores splitting_ops); set it to 0")
        missing = [op for op in SPLIT_OPS if op not in (splitting_ops or ())]
        if missing:
            why.append(f"piecewise CUDA graphs would capture {', '.join(missing)} into a "
                       "piece (not in splitting_ops; compat.cuda_compilation_config adds them)")
    return why


def on_cuda() -> bool:
    """Whether vLLM runs on CUDA here (its platform detection, not ours)."""
    from vllm.platforms import current_platform

    return current_platform.is_cuda()


def on_cpu() -> bool:
    """Whether vLLM runs on its CPU platform here."""
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


def ray_supported() -> bool:
    """Whether vLLM's Ray executor runs on this platform (vLLM 0.32's CPU platform: no)."""
    from vllm.platforms import current_platform

    return bool(current_platform.ray_device_key)


def v2_runner_expected() -> bool:
    """Whether the engine will build Model Runner V2, as far as the engine side knows before
    vLLM's config exists: unless ``VLLM_USE_V2_MODEL_RUNNER=0``. vLLM may still fall back
    to V1 on its own (features V2 lacks); the worker then reports V1 under full graphs and
    the startup check refuses, naming the variable that fixes it."""
    from vllm import envs

    return envs.VLLM_USE_V2_MODEL_RUNNER is not False


def cuda_compilation_config(v2: bool) -> dict:
    """``compilation_config`` for a CUDA engine with SAE hooks (``v2``: Model Runner V2).

    Both ops (``SPLIT_OPS``) join vLLM's own splitting ops (its default list, taken from
    vLLM itself), so wherever vLLM runs piecewise graphs the ops run eagerly between the
    captured pieces and do their host-side work (reads, skips of unsteered work).

    V2 keeps vLLM's default ``cudagraph_mode`` (``FULL_AND_PIECEWISE``): decode steps replay
    full graphs with the ops captured in their fixed-shape form (``tables._capturing``:
    tables at fixed device addresses, filled before the replay; padded and unsteered rows
    a masked no-op), and a step with reads is routed to the piecewise graph
    (``graph_refusals``, ``runner_v2.leaves_full_graph``). V1 cannot route a step, so it
    gets ``PIECEWISE``: every step runs the ops eagerly.
    """
    probe = CompilationConfig(mode=CompilationMode.VLLM_COMPILE)
    probe.set_splitting_ops_for_v1("allgather_reducescatter")
    cfg: dict = {"splitting_ops": [*probe.splitting_ops, *SPLIT_OPS]}
    if not v2:
        cfg["cudagraph_mode"] = "PIECEWISE"
    return cfg


# ---------------------------------------------------------------- parallel state (workers)


def parallel_ranks(vllm_config) -> dict[str, int]:
    """This worker's place: ``tp_rank, tp_size, pp_rank, pp_size, dp_rank``.

    TP and PP from the worker's process groups; DP from the engine's parallel config (each
    data-parallel engine's workers see a DP group of their own, rank 0 in every engine; for
    dense models vLLM even resets ``data_parallel_rank`` to 0 and the size to 1 in each
    engine, while ``data_parallel_index`` keeps the engine's place).
    """
    from vllm.distributed.parallel_state import get_pp_group, get_tp_group

    out = {}
    for name, get in (("tp", get_tp_group), ("pp", get_pp_group)):
        try:
            group = get()
            out[f"{name}_rank"], out[f"{name}_size"] = int(group.rank_in_group), int(group.world_size)
        except (AssertionError, AttributeError):  # group not initialised (single process)
            out[f"{name}_rank"], out[f"{name}_size"] = 0, 1
    pc = vllm_config.parallel_config
    out["dp_rank"] = int(getattr(pc, "data_parallel_index", pc.data_parallel_rank))
    return out


def tp_all_gather(x, dim: int = -1):
    """Concatenate ``x`` over the tensor-parallel group along ``dim`` (rank order)."""
    from vllm.distributed.parallel_state import get_tp_group

    return get_tp_group().all_gather(x, dim)


def is_pp_missing_layer(mod) -> bool:
    """Whether ``mod`` is a placeholder for a layer another pipeline stage holds."""
    from vllm.model_executor.models.utils import PPMissingLayer

    return isinstance(mod, PPMissingLayer)


async def collective_rpc_every_engine(engine, method: str, args: tuple = ()) -> list:
    """``collective_rpc(method, args)`` on the workers of *every* data-parallel engine (on
    every node), flattened.

    ``AsyncLLM.collective_rpc`` asks only the first engine of a data-parallel client; the
    DP clients' ``call_utility_all_async`` reaches each engine.
    """
    core = engine.engine_core
    call_all = getattr(core, "call_utility_all_async", None)
    if call_all is None:  # a single engine
        return list(await engine.collective_rpc(method, args=args))
    per_engine = await call_all("collective_rpc", method, None, args, None)
    return [r for results in per_engine for r in results]


# ---------------------------------------------------------------- engines across nodes


def host_ip() -> str:
    """The address vLLM advertises for this process's sockets (``VLLM_HOST_IP``, else its
    guess from the default route)."""
    from vllm.utils.network_utils import get_ip

    return get_ip()


def node_of(vllm_config) -> dict:
    """Which node this worker runs on: its ``node_rank`` (tensor/pipeline across nodes),
    the address vLLM advertises for it, and the host name."""
    import socket

    return {"node_rank": int(vllm_config.parallel_config.node_rank), "host": host_ip(),
            "hostname": socket.gethostname()}


def engine_pings(engine) -> list:
    """One awaitable per engine core (every data-parallel engine, local or on another node)
    that answers once that core's busy loop is free: a utility call that touches no worker
    (``is_sleeping``), so a core stuck on a dead node's rank does not answer either."""
    core = engine.engine_core
    engines = getattr(core, "core_engines", None)
    if engines is None or not hasattr(core, "_call_utility_async"):
        return [core.call_utility_async("is_sleeping")]
    return [core._call_utility_async("is_sleeping", engine=e) for e in engines]


def fail_engine(engine) -> None:
    """Mark the engine dead as vLLM does when its core dies: ``errored`` turns True and every
    ``generate`` in flight raises ``EngineDeadError`` (``AsyncLLM``'s output handler path)."""
    from vllm.v1.engine.exceptions import EngineDeadError

    engine.engine_core.resources.engine_dead = True
    engine.output_processor.propagate_error(EngineDeadError())


def headless_config(engine_args):
    """The ``VllmConfig`` of an engine node (``vllm serve --headless``'s
    ``create_engine_config(headless=True)``)."""
    from vllm.usage.usage_lib import UsageContext

    return engine_args.create_engine_config(usage_context=UsageContext.OPENAI_API_SERVER,
                                            headless=True)


def node_role(vllm_config) -> str:
    """``"workers"``: this node holds tensor/pipeline ranks of an engine led from another
    node; ``"engines"``: it runs whole data-parallel engines for a front end elsewhere."""
    return "workers" if vllm_config.parallel_config.node_rank_within_dp > 0 else "engines"


def run_headless(vllm_config, log_stats: bool = False) -> None:
    """Run this node's part until its processes end: vLLM's ``run_headless``
    (``vllm/entrypoints/cli/serve.py``) from a config instead of the serve argparse
    namespace. ``workers``: ``MultiprocExecutor(monitor_workers=False)`` and its inline
    worker monitor; ``engines``: ``CoreEngineProcManager`` handshaking with node 0's front
    end over ``tcp://``. A ``SystemExit`` (the caller's SIGTERM handler) shuts them down."""
    pc = vllm_config.parallel_config
    if node_role(vllm_config) == "workers":
        from vllm.v1.executor.multiproc_executor import MultiprocExecutor

        executor = MultiprocExecutor(vllm_config, monitor_workers=False)
        try:
            executor.start_worker_monitor(inline=True)
        finally:
            executor.shutdown()
        return
    from vllm.utils.network_utils import get_tcp_uri
    from vllm.v1.engine.utils import CoreEngineProcManager
    from vllm.v1.executor import Executor

    manager = CoreEngineProcManager(
        local_engine_count=pc.data_parallel_size_local, start_index=pc.data_parallel_rank,
        local_start_index=0, vllm_config=vllm_config, local_client=False,
        handshake_address=get_tcp_uri(pc.data_parallel_master_ip, pc.data_parallel_rpc_port),
        executor_class=Executor.get_class(vllm_config), log_stats=log_stats)
    try:
        manager.monitor_engine_liveness()
    finally:
        manager.shutdown(timeout=vllm_config.shutdown_timeout)


def cpu_dense_gemm(w):
    """``x -> x @ w`` (``w [K, N]``) through vLLM's prepacked oneDNN GEMM, the kernel vLLM's
    own CPU linear layers use; None where vLLM was built without oneDNN.

    At decode sizes it is several times faster than torch's matmul on the same weights
    (``[32, 576] @ [576, 16384]`` fp32, one thread: 13 ms against 50 ms, measured here).
    """
    from vllm import _custom_ops as ops

    if not getattr(ops, "_supports_onednn", False):
        return None
    handler = ops.create_onednn_mm(w, 32)

    def mm(x):
        return ops.onednn_mm(handler, x, None)

    mm.handler = handler  # the primitive lives as long as the function
    return mm
