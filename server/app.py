"""Server assembly: engine start, gRPC server with health and reflection, shutdown."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from sae_runtime.errors import SAEFormatError, UnsupportedModelError
from sae_runtime.hw import LOW_PRECISION, cpu_info
from sae_runtime.labels.store import FeatureLabels, load_beside
from sae_runtime.loading import load_sae_config
from sae_runtime.loading.vectors import build_banks
from sae_runtime.saes.base import SAEConfig
from sae_runtime.spec.guardrails import MAX_GUARDRAILS
from sae_runtime.spec.vectors import BANK_PREFIX, VectorIndex, bank_id, is_bank
from sae_runtime.step.config import placement
from sae_runtime.vllm.families import block_of, family_of, supported
from server import convert, nodes
from server.auth import BearerAuth, load_tokens
from server.config import ServerConfig
from server.metrics import Metrics
from server.reads import ReadRouter, RecordLimits, min_message_bytes
from server.startup import (
    ExpectedHook,
    HookPlacementError,
    apply_cpu_env_defaults,
    check_hooks,
    node_lines,
)
from steering.v1 import steering_pb2 as pb

if TYPE_CHECKING:  # the servicer imports vLLM: every check before the engine runs without it
    from server.service import SteeringServicer

log = logging.getLogger("steerd")
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["SteeringService"].full_name


def load_sae_configs(cfg: ServerConfig) -> dict[str, SAEConfig]:
    """Read and check every SAE's config, and its fit to the model, before the engine starts.

    Steering vectors (``--vector``) join the list as one bank per layer
    (``sae_runtime.loading.vectors``), after the SAEs: hooks like any other, checked the same way."""
    saes = {s.id: load_sae_config(s.path, s.hook_name) for s in cfg.saes}
    for sid in saes:
        if is_bank(sid):
            raise SAEFormatError(f"--sae {sid}: SAE ids may not start with {BANK_PREFIX!r}")
    for bank in vector_banks(cfg):
        saes[bank.id] = bank.config()
    if saes:
        check_model_fit(cfg, saes)
    return saes


def vector_banks(cfg: ServerConfig) -> list:
    """The steering-vector banks of ``--vector`` and ``--inline-vectors`` (checked against
    the model), by layer; none without either."""
    if not cfg.vectors and not cfg.inline_vectors:
        return []
    d_model, n_layers = model_dims(cfg)
    return build_banks([(v.name, v.path) for v in cfg.vectors], d_model=d_model,
                       n_layers=n_layers, inline_layers=cfg.inline_vector_layers(n_layers))


def model_dims(cfg: ServerConfig) -> tuple[int, int]:
    """(hidden size, number of blocks) of the served model."""
    from transformers import AutoConfig

    try:
        hf = AutoConfig.from_pretrained(cfg.model, local_files_only=True)
    except (OSError, ValueError) as e:
        raise UnsupportedModelError(f"{cfg.model}: cannot read the model config: {e}") from None
    hf = getattr(hf, "text_config", hf)
    return hf.hidden_size, hf.num_hidden_layers


def engine_sae_entries(cfg: ServerConfig, saes: dict[str, SAEConfig]) -> list[dict]:
    """What the workers load, in hook order: SAE directories, then vector banks."""
    src = {s.id: s for s in cfg.saes}
    files = [(v.name, str(v.path)) for v in cfg.vectors]
    inline = ({bank_id(layer) for layer in cfg.inline_vector_layers(model_dims(cfg)[1])}
              if cfg.inline_vectors else set())
    return [{"id": sid, "path": "", "vectors": files, "layer": c.layer, "inline": sid in inline,
             "placement": placement(c)}
            if is_bank(sid) else
            {"id": sid, "path": str(src[sid].path), "hook_name": src[sid].hook_name,
             "placement": placement(c)}
            for sid, c in saes.items()]


def load_labels(cfg: ServerConfig, saes: dict[str, SAEConfig]) -> dict[str, FeatureLabels]:
    """Feature labels of every SAE that has a feature_labels.json beside it."""
    out = {}
    for s in cfg.saes:
        lab = load_beside(s.path, s.id, saes[s.id].d_sae) if s.path.is_dir() else None
        if lab is not None:
            out[s.id] = lab
    return out


def load_chat_template(path) -> str | None:
    """The --chat-template file's text, compiled once so a syntax error fails at startup."""
    if path is None:
        return None
    from jinja2 import Environment, TemplateError

    try:
        text = Path(path).read_text()
        Environment().parse(text)
    except (OSError, UnicodeDecodeError, TemplateError) as e:
        raise SAEFormatError(f"--chat-template {path}: cannot use it as a chat template: {e}") from None
    return text


async def start_http(cfg: ServerConfig, servicer: SteeringServicer) -> Any:
    """The OpenAI-compatible HTTP server on --http-port (same engine, auth, caps, metrics)."""
    from server.openai_api import HttpServer, build_app, ssl_options

    app = build_app(servicer, model=cfg.model, tokens=load_tokens(cfg.auth_tokens_file),
                    max_body_bytes=cfg.max_message_bytes)
    http = HttpServer(app, cfg.host, cfg.http_port, grace_s=cfg.grace_period_s,
                      ssl=ssl_options(cfg.tls_cert, cfg.tls_key, cfg.tls_client_ca))
    await http.start()
    return http


def check_model_fit(cfg: ServerConfig, saes: dict[str, SAEConfig]) -> None:
    """The model family has hook support, and each SAE's layer and width fit the model."""
    from transformers import AutoConfig

    try:
        hf = AutoConfig.from_pretrained(cfg.model, local_files_only=True)
    except (OSError, ValueError) as e:
        raise UnsupportedModelError(f"{cfg.model}: cannot read the model config: {e}") from None
    archs = getattr(hf, "architectures", None)
    if family_of(archs) is None:
        raise UnsupportedModelError(
            f"{cfg.model}: architecture {archs} has no SAE hook support; supported: {supported()}")
    hf = getattr(hf, "text_config", hf)
    n_layers, hidden = hf.num_hidden_layers, hf.hidden_size
    heads = hf.num_attention_heads
    head_dim = getattr(hf, "head_dim", None) or hidden // heads
    src = {s.id: s.path for s in cfg.saes} | {b: "--vector" for b in saes if is_bank(b)}
    for sid, c in saes.items():
        block = block_of(c.layer, c.site)
        if not 0 <= block < n_layers:
            raise SAEFormatError(
                f"{src[sid]}: SAE {sid!r} hooks {c.hook_name}, but the model has blocks "
                f"0..{n_layers - 1}")
        want = heads * head_dim if c.site == "z" else hidden
        if c.d_in != want:
            what = f"n_heads*head_dim ({heads}*{head_dim})" if c.site == "z" else "hidden size"
            raise SAEFormatError(
                f"{src[sid]}: SAE {sid!r} has d_in={c.d_in}, but the model's {what} at "
                f"{c.hook_name} is {want}")


def engine_settings(cfg: ServerConfig, reads_addr: str | None,
                    saes: dict[str, SAEConfig] | None = None, reads_keys=None) -> Any:
    """What this server passes to vLLM (``EngineSettings``): ``steerd serve`` and every
    ``steerd node`` build it here, so an engine node cannot drift from the API node."""
    from sae_runtime.vllm.engine import EngineSettings  # imports vLLM

    return EngineSettings(
        model=cfg.model,
        saes=engine_sae_entries(cfg, saes if saes is not None else load_sae_configs(cfg)),
        max_interventions=cfg.max_interventions,
        max_watch=max(cfg.max_watch, MAX_GUARDRAILS),  # a guard read watches <= MAX_GUARDRAILS
        sae_dtype=cfg.sae_dtype,
        reads_addr=reads_addr,
        reads_keys=reads_keys,
        reads_max_message_bytes=cfg.reads_max_message_bytes,
        dtype=cfg.dtype,
        max_model_len=cfg.max_model_len,
        max_num_seqs=cfg.max_num_seqs,
        max_num_batched_tokens=cfg.max_num_batched_tokens,
        enforce_eager=cfg.enforce_eager,
        enable_prefix_caching=cfg.enable_prefix_caching,
        seed=cfg.seed,
        max_logprobs=cfg.max_logprobs,
        tensor_parallel_size=cfg.tensor_parallel_size,
        pipeline_parallel_size=cfg.pipeline_parallel_size,
        data_parallel_size=cfg.data_parallel_size,
        distributed_executor_backend=("mp" if nodes.spans_nodes(cfg) else None)
        if cfg.distributed_executor_backend == "auto" else cfg.distributed_executor_backend,
        nnodes=cfg.nnodes,
        node_rank=cfg.node_rank,
        master_addr=cfg.master_addr,
        master_port=cfg.master_port,
        data_parallel_size_local=cfg.data_parallel_size_local,
        data_parallel_address=cfg.data_parallel_address,
        data_parallel_rpc_port=cfg.data_parallel_rpc_port,
        data_parallel_start_rank=cfg.data_parallel_start_rank,
        reads_lost_after_s=cfg.node_timeout_s if nodes.spans_nodes(cfg) else None,
    )


def start_engine(cfg: ServerConfig, reads_addr: str | None,
                 saes: dict[str, SAEConfig] | None = None, reads_keys=None) -> Any:
    from sae_runtime.vllm.engine import build_engine  # imports vLLM

    return build_engine(engine_settings(cfg, reads_addr, saes, reads_keys))


def check_reads_cap(cfg: ServerConfig, saes: dict[str, SAEConfig]) -> None:
    """--reads-max-message-bytes must carry one position of the largest read."""
    need = min_message_bytes(tuple(c.d_sae for c in saes.values()), cfg.max_read_top_k,
                             max(cfg.max_watch, MAX_GUARDRAILS))
    if saes and cfg.reads_max_message_bytes < need:
        raise ValueError(f"--reads-max-message-bytes {cfg.reads_max_message_bytes}: one position "
                         f"of the widest read needs {need} bytes (pooled sums of the widest "
                         "SAE, --max-read-top-k, --max-watch); raise it")


def read_limits(cfg: ServerConfig, saes: dict[str, SAEConfig], engine: Any) -> RecordLimits:
    """What a worker's read record may hold, from this server's caps and the engine."""
    return RecordLimits(d_sae=tuple(c.d_sae for c in saes.values()),
                        max_top_k=cfg.max_read_top_k, max_watch=max(cfg.max_watch, MAX_GUARDRAILS),
                        max_positions=int(engine.model_config.max_model_len))


def expected_hooks(saes: dict[str, SAEConfig]) -> list[ExpectedHook]:
    return [ExpectedHook(i, sid, c.hook_name, block_of(c.layer, c.site))
            for i, (sid, c) in enumerate(saes.items())]


async def verify_hooks(cfg: ServerConfig, engine: Any, saes: dict[str, SAEConfig],
                       reads_addr: str | None = None) -> dict[str, str]:
    """Ask every worker, on every node, what it installed (``check_hooks``); SAE id ->
    compute dtype. Every worker must have been built from this server's worker config."""
    from sae_runtime.step.config import config_hash
    from sae_runtime.vllm.engine import hook_reports, worker_config_of

    reports = await hook_reports(engine)
    world = cfg.tensor_parallel_size * cfg.pipeline_parallel_size
    expect = config_hash(worker_config_of(engine_settings(cfg, reads_addr, saes)))
    by_index = check_hooks(reports, expected_hooks(saes), world_size=world, reads=bool(saes),
                           config_hash=expect, reads_addr=reads_addr)
    if nodes.spans_nodes(cfg):
        for line in node_lines(reports):
            print(f"steerd: {line}", flush=True)
    ids = list(saes)
    why = {h["sae"]: h["dtype_why"] for r in reports for h in r.get("hooks", ())}
    for i, dt in sorted(by_index.items()):
        owners = sorted({(r["ranks"]["dp_rank"], r["ranks"]["pp_rank"], r["ranks"]["tp_rank"])
                         for r in reports if any(h["sae"] == i for h in r.get("hooks", ()))})
        print(f"steerd: SAE {ids[i]} installed on {len(owners)} rank(s) (dp/pp/tp: "
              f"{', '.join('/'.join(map(str, o)) for o in owners)}); computes in {dt} "
              f"({why[i]})", flush=True)
    return {ids[i]: dt for i, dt in by_index.items()}


@dataclass
class Running:
    server: grpc.aio.Server
    port: int
    health: health.aio.HealthServicer
    servicer: SteeringServicer
    dead: asyncio.Event


async def build_server(cfg: ServerConfig, engine: Any, saes: dict[str, SAEConfig],
                       router: ReadRouter | None = None, metrics: Metrics | None = None,
                       labels: dict[str, FeatureLabels] | None = None,
                       sae_dtypes: dict[str, str] | None = None) -> Running:
    """Create and start the gRPC server around a running engine; returns the bound port."""
    from server.service import SteeringServicer  # imports vLLM

    tokens = load_tokens(cfg.auth_tokens_file)
    server = grpc.aio.server(
        interceptors=[BearerAuth(tokens)] if tokens else [],
        options=[("grpc.max_receive_message_length", cfg.max_message_bytes),
                 ("grpc.max_send_message_length", max(cfg.max_message_bytes, 64 * 1024 * 1024))],
    )
    dead = asyncio.Event()
    health_servicer = health.aio.HealthServicer()

    def on_engine_dead() -> None:
        dead.set()

    limits = convert.Limits(
        max_interventions=cfg.max_interventions, vocab_size=engine.model_config.get_vocab_size(),
        max_read_top_k=cfg.max_read_top_k, max_watch=cfg.max_watch,
        max_encode_inputs=cfg.max_encode_inputs, max_prompt_tokens=cfg.max_prompt_tokens,
        max_new_tokens=cfg.max_new_tokens, max_logprobs=cfg.max_logprobs,
    )
    servicer = SteeringServicer(
        engine, model=cfg.model, saes=saes, limits=limits, compiled=not cfg.enforce_eager,
        router=router, on_engine_dead=on_engine_dead,
        sae_dtypes=sae_dtypes,
        metrics=metrics, max_concurrent_streams=cfg.max_concurrent_streams,
        max_distinct_configs=cfg.max_distinct_configs, labels=labels,
        chat_template=load_chat_template(cfg.chat_template),
        max_stream_buffer_bytes=cfg.max_stream_buffer_bytes,
        vectors=VectorIndex.of(vector_banks(cfg)) if cfg.vectors or cfg.inline_vectors else None,
    )
    add_servicer(servicer, server)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    addr = f"{cfg.host}:{cfg.port}"
    if cfg.tls_cert is not None:
        creds = grpc.ssl_server_credentials(
            [(cfg.tls_key.read_bytes(), cfg.tls_cert.read_bytes())],
            root_certificates=cfg.tls_client_ca.read_bytes() if cfg.tls_client_ca else None,
            require_client_auth=cfg.tls_client_ca is not None,
        )
        port = server.add_secure_port(addr, creds)
    else:
        port = server.add_insecure_port(addr)
    if port == 0:
        raise OSError(f"cannot bind {cfg.host}:{cfg.port}")
    await server.start()
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return Running(server, port, health_servicer, servicer, dead)


def add_servicer(servicer: SteeringServicer, server: grpc.aio.Server) -> None:
    """Register the service like the generated ``add_..._to_server``, but parse requests here.

    gRPC would answer a message it cannot parse (say, invalid UTF-8 in a string field) with
    INTERNAL; parsing it ourselves makes that INVALID_ARGUMENT with the parser's reason.
    """
    handlers = {}
    for m in pb.DESCRIPTOR.services_by_name["SteeringService"].methods:
        req_cls, resp_cls = getattr(pb, m.input_type.name), getattr(pb, m.output_type.name)
        impl = getattr(servicer, m.name)
        make = grpc.unary_stream_rpc_method_handler if m.server_streaming else grpc.unary_unary_rpc_method_handler
        wrapped = _parse_stream(impl, req_cls) if m.server_streaming else _parse_unary(impl, req_cls)
        handlers[m.name] = make(wrapped, response_serializer=resp_cls.SerializeToString)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)


async def _parse(raw: bytes, cls, context):
    try:
        return cls.FromString(raw)
    except DecodeError as e:
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                            f"request is not a valid {cls.DESCRIPTOR.full_name}: {e}")


def _parse_unary(impl, cls):
    async def handler(raw, context):
        return await impl(await _parse(raw, cls, context), context)

    return handler


def _parse_stream(impl, cls):
    async def handler(raw, context):
        async for msg in impl(await _parse(raw, cls, context), context):
            yield msg

    return handler


async def _watch_engine(engine: Any, dead: asyncio.Event) -> None:
    while not dead.is_set():
        if getattr(engine, "errored", False):
            dead.set()
            return
        await asyncio.sleep(1.0)


async def serve(cfg: ServerConfig) -> int:
    """Run until SIGTERM/SIGINT (exit 0) or until the engine dies (exit 1)."""
    saes = load_sae_configs(cfg)
    labels = load_labels(cfg, saes)  # a bad label file fails here, before the engine starts
    load_chat_template(cfg.chat_template)  # so does a bad --chat-template
    nodes.check_layout(cfg, "serve", bool(saes))
    ranks = nodes.local_ranks(cfg)  # the workers on this node (all of them on one node)
    if cfg.distributed_executor_backend == "ray":
        from sae_runtime.vllm.engine import ray_supported

        if not ray_supported():
            raise ValueError(
                "--distributed-executor-backend ray: vLLM's executor for this platform "
                f"({'cpu' if _cpu_platform() else 'this device'}) has no Ray support in this "
                "vLLM version; use mp (one node) or run on GPUs")
    nodes.check_pp_eager(cfg, _cpu_platform())
    for line in nodes.network_env_defaults(cfg):
        print(f"steerd: {line}", flush=True)
    if _cpu_platform():
        for line in apply_cpu_env_defaults(ranks):
            print(f"steerd: {line}", flush=True)
    check_reads_cap(cfg, saes)
    metrics = Metrics()
    # The read socket opens only after every check that can refuse to start has passed.
    router = ReadRouter(cfg.reads_address, max_message_bytes=cfg.reads_max_message_bytes,
                        dropped_metric=metrics.reads_dropped) if saes else None
    if router is not None:
        router.start()
    t0 = time.monotonic()
    # the workers' reads address: across nodes what the user gave (every node was given it)
    reads_addr = (cfg.reads_address if nodes.spans_nodes(cfg) else router.addr) if router else None
    engine = start_engine(cfg, reads_addr, saes, router.keys if router else None)
    started = time.monotonic() - t0
    if router is not None:
        router.limits = read_limits(cfg, saes, engine)
    try:
        if router is not None and router.keys is not None and nodes.spans_nodes(cfg):
            await nodes.hand_over_keys(engine, router.keys)
        sae_dtypes = await verify_hooks(cfg, engine, saes, reads_addr)
    except HookPlacementError as e:
        print(f"steerd: error: {e}", file=sys.stderr, flush=True)
        engine.shutdown()
        if router is not None:
            router.close()
        return 1
    run = await build_server(cfg, engine, saes, router, metrics, labels, sae_dtypes)
    _log_startup(cfg, engine, saes, run.port, started, sae_dtypes)
    if cfg.metrics_port is not None:
        mport = metrics.serve(cfg.metrics_port, cfg.host)
        print(f"steerd: metrics on http://{cfg.host}:{mport}/metrics", flush=True)
    http = await start_http(cfg, run.servicer) if cfg.http_port is not None else None
    if http is not None:
        print(f"steerd: OpenAI-compatible HTTP on {http.scheme}://{cfg.host}:{http.port}/v1",
              flush=True)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    watcher = asyncio.create_task(_watch_engine(engine, run.dead))
    node_watch = (asyncio.create_task(nodes.watch_engines(engine, run.dead, cfg.node_timeout_s))
                  if nodes.spans_nodes(cfg) else None)
    dead_wait = asyncio.create_task(run.dead.wait())
    stop_wait = asyncio.create_task(stop.wait())
    await asyncio.wait({dead_wait, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
    engine_died = run.dead.is_set()
    for t in (watcher, dead_wait, stop_wait, node_watch):
        if t is not None:
            t.cancel()

    if engine_died:
        for name in ("", SERVICE_NAME):
            await run.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    await run.health.enter_graceful_shutdown()
    # After an engine death the in-flight streams have already been told UNAVAILABLE by
    # their handlers; a short grace lets those statuses reach the clients.
    grace = min(2.0, cfg.grace_period_s) if engine_died else cfg.grace_period_s
    log.info("shutting down: draining streams for up to %.1fs", grace)
    await asyncio.gather(run.server.stop(grace), http.stop() if http else asyncio.sleep(0))
    engine.shutdown()
    if router is not None:
        router.close()
    if engine_died:
        log.error("the vLLM engine died; exiting with status 1")
        return 1
    log.info("stopped")
    return 0


def _same_model(sae_model: str, served: str) -> bool:
    """Loose match: the last path component of both names, case-insensitively."""
    last = lambda s: s.rstrip("/").rsplit("/", 1)[-1].lower()  # noqa: E731
    return last(sae_model) == last(served)


def _cpu_platform() -> bool:
    from sae_runtime.vllm.engine import on_cpu  # imports vLLM

    return on_cpu()


def _log_startup(cfg, engine, saes, port, started_s, sae_dtypes) -> None:
    mc = engine.model_config
    device = "cpu" if _cpu_platform() else "gpu"
    par = (f"tp {cfg.tensor_parallel_size}, pp {cfg.pipeline_parallel_size}, "
           f"dp {cfg.data_parallel_size}, executor {cfg.distributed_executor_backend}")
    print(f"steerd: model {cfg.model} ({(mc.hf_config.architectures or ['?'])[0]}, "
          f"dtype {str(mc.dtype).removeprefix('torch.')}, max_model_len {mc.max_model_len}, "
          f"{'eager' if cfg.enforce_eager else 'compiled'}, device {device}, {par}); engine "
          f"started in {started_s:.1f}s", flush=True)
    from sae_runtime.vllm.engine import runtime_info

    print(f"steerd: runtime: {runtime_info(engine).line()}", flush=True)
    if device == "cpu" and str(mc.dtype).removeprefix("torch.") in LOW_PRECISION and \
            str(mc.dtype).removeprefix("torch.") not in cpu_info().native:
        log.warning("the model runs in %s, which this CPU (%s) emulates (matmuls ~100x slower "
                    "than float32); pass --dtype float32 for speed", mc.dtype, cpu_info().describe())
    for sid, c in saes.items():
        print(f"steerd: SAE {sid}: format {c.format}, architecture {c.architecture}, "
              f"site {c.site}, layer {c.layer}, width {c.d_sae}, d_model {c.d_in}, "
              f"dtype {sae_dtypes.get(sid, '?')}" + (f", k {c.k}" if c.k else ""),
              flush=True)
        if c.model_name and not _same_model(c.model_name, cfg.model):
            log.warning("SAE %s was trained on %r, which differs from the served model %s",
                        sid, c.model_name, cfg.model)
    security = ("mTLS" if cfg.tls_client_ca else "TLS") if cfg.tls_cert else "plaintext"
    auth = "bearer-token auth" if load_tokens(cfg.auth_tokens_file) else "no auth"
    print(f"steerd: listening on {cfg.host}:{port} ({security}, {auth})", flush=True)
