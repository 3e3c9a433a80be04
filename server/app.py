"""Server assembly: checks and port binds before the engine, the engine, the core, both
doors and the metrics port, shutdown.

Order matters: everything that can refuse to start (SAE and model files, labels, the chat
template, the tokens file, TLS files, busy or bad ports) is checked before vLLM is even
imported, so a mistake costs seconds, not an engine start, and is told as one line.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sae_runtime.errors import SAEFormatError, UnsupportedModelError
from sae_runtime.hw import LOW_PRECISION, cpu_info
from sae_runtime.labels.store import FeatureLabels, load_beside
from sae_runtime.loading import load_hook_config
from sae_runtime.loading.vectors import Bank, build_banks
from sae_runtime.saes.base import SAEConfig
from sae_runtime.spec.activations import NO_SITES, DeclaredSites, edit_positions
from sae_runtime.spec.budget import watch_width
from sae_runtime.spec.vectors import VectorIndex
from sae_runtime.step.config import placement
from sae_runtime.vllm.families import block_of, family_of, supported
from server import nodes
from server.auth import Auth, load_admin_tokens, load_tokens
from server.config import ServerConfig
from server.core.metrics import Metrics
from server.core.reads import ReadRouter, RecordLimits, min_message_bytes
from server.core.validate import Limits
from server.grpc.server import GrpcDoor
from server.http.server import ConnectionLimits, HttpServer, ssl_options
from server.startup import (
    ExpectedHook,
    HookPlacementError,
    StartupError,
    apply_cpu_env_defaults,
    check_clt_serving,
    check_hooks,
    load_tls,
    node_lines,
)

log = logging.getLogger("steerd")


@dataclass(frozen=True)
class Hooks:
    """What the workers hook, in hook-id order: the SAEs, then the steering-vector banks
    (hooks of their own kind: never in the SAE list requests name)."""

    saes: dict[str, SAEConfig]
    banks: tuple[Bank, ...] = ()

    @property
    def configs(self) -> dict[str, SAEConfig]:
        """Hook id -> the config its hook is placed by (a bank's is its pseudo-SAE's)."""
        return {**self.saes, **{b.id: b.config() for b in self.banks}}


def load_hooks(cfg: ServerConfig) -> Hooks:
    """Read and check every SAE's config and the vector banks, and their fit to the model,
    before the engine starts."""
    saes = {s.id: load_hook_config(s.path, s.hook_name) for s in cfg.saes}
    banks = tuple(vector_banks(cfg))
    for b in banks:
        if b.id in saes:
            raise SAEFormatError(f"--sae {b.id}: the id is taken by the steering vectors of "
                                 f"layer {b.layer}; name the SAE otherwise")
    hooks = Hooks(saes, banks)
    if saes or banks:
        check_model_fit(cfg, hooks)
    return hooks


def vector_banks(cfg: ServerConfig) -> list[Bank]:
    """The steering-vector banks of ``--vector`` and ``--inline-vectors`` (checked against
    the model), by layer; none without either."""
    if not cfg.vectors and not cfg.inline_vectors and not cfg.runtime_vectors:
        return []
    d_model, n_layers = model_dims(cfg)
    return build_banks([(v.name, v.path) for v in cfg.vectors], d_model=d_model,
                       n_layers=n_layers, inline_layers=cfg.inline_vector_layers(n_layers),
                       runtime_layers=cfg.runtime_vector_layers(n_layers),
                       runtime_rows=cfg.max_runtime_vectors)


def vector_values(banks) -> dict:
    """The startup vectors' values: name -> {block: [d_model] float32}."""
    out: dict = {}
    for b in banks:
        for i, name in enumerate(b.names):
            out.setdefault(name, {})[b.layer] = b.matrix[i]
    return out


def activation_sites(cfg: ServerConfig, hooks: Hooks | None = None) -> DeclaredSites:
    """The sites ``--activation-hooks`` declares in the served model (checked before the
    engine starts: the family must have hook support, every glob must select a site), with
    a before-edits twin at each one where a hook of ``hooks`` edits
    (``spec.activations.edit_positions``; none without ``hooks``)."""
    globs = cfg.activation_globs()
    if not globs:
        return NO_SITES
    hf = _hf_config(cfg)
    archs = getattr(hf, "architectures", None)
    if family_of(archs) is None:
        raise UnsupportedModelError(
            f"{cfg.model}: architecture {archs} has no hook support; supported: {supported()}")
    d_model, n_layers = model_dims(cfg)
    heads, head_dim = attention_dims(hf)
    edits = edit_positions(hooks.configs.values()) if hooks is not None else ()
    return DeclaredSites.of(globs, n_layers, d_model, heads * head_dim, edits)


def attention_dims(hf) -> tuple[int, int]:
    """(attention heads, head size) of an HF config: ``attn.hook_z`` is their product wide."""
    hf = getattr(hf, "text_config", hf)
    heads = int(hf.num_attention_heads)
    return heads, int(getattr(hf, "head_dim", None) or hf.hidden_size // heads)


def model_dims(cfg: ServerConfig) -> tuple[int, int]:
    """(hidden size, number of blocks) of the served model."""
    hf = _hf_config(cfg)
    hf = getattr(hf, "text_config", hf)
    return hf.hidden_size, hf.num_hidden_layers


def _hf_config(cfg: ServerConfig):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(cfg.model, local_files_only=True)
    except (OSError, ValueError) as e:
        raise UnsupportedModelError(f"{cfg.model}: cannot read the model config: {e}") from None


def engine_sae_entries(cfg: ServerConfig, hooks: Hooks) -> list[dict]:
    """What the workers load (``WorkerConfig.saes``), in hook order: SAE directories, then
    vector banks."""
    src = {s.id: s for s in cfg.saes}
    files = [(v.name, str(v.path)) for v in cfg.vectors]
    return ([{"id": sid, "path": str(src[sid].path), "hook_name": src[sid].hook_name,
              "placement": placement(c)} for sid, c in hooks.saes.items()]
            + [{"id": b.id, "path": "", "vectors": files, "layer": b.layer, "inline": b.inline,
                "runtime": b.runtime, "placement": placement(b.config())} for b in hooks.banks])


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


def check_model_fit(cfg: ServerConfig, hooks: Hooks) -> None:
    """The model family has hook support, and each hook's layer and width fit the model."""
    hf = _hf_config(cfg)
    archs = getattr(hf, "architectures", None)
    if family_of(archs) is None:
        raise UnsupportedModelError(
            f"{cfg.model}: architecture {archs} has no SAE hook support; supported: {supported()}")
    hf = getattr(hf, "text_config", hf)
    n_layers, hidden = hf.num_hidden_layers, hf.hidden_size
    heads, head_dim = attention_dims(hf)
    src = {s.id: s.path for s in cfg.saes} | {b.id: "--vector" for b in hooks.banks}
    for sid, c in hooks.configs.items():
        block = block_of(c.layer, c.site)
        if not 0 <= block < n_layers:
            raise SAEFormatError(
                f"{src[sid]}: SAE {sid!r} hooks {c.hook_name}, but the model has blocks "
                f"0..{n_layers - 1}")
        if c.clt_layers and c.clt_layers[-1] >= n_layers:
            raise SAEFormatError(
                f"{src[sid]}: cross-layer transcoder {sid!r} spans blocks "
                f"{c.clt_layers[0]}..{c.clt_layers[-1]}, but the model has blocks "
                f"0..{n_layers - 1}")
        want = heads * head_dim if c.site == "z" else hidden
        if c.d_in != want:
            what = f"n_heads*head_dim ({heads}*{head_dim})" if c.site == "z" else "hidden size"
            raise SAEFormatError(
                f"{src[sid]}: SAE {sid!r} has d_in={c.d_in}, but the model's {what} at "
                f"{c.hook_name} is {want}")


def engine_settings(cfg: ServerConfig, reads_addr: str | None, hooks: Hooks | None = None,
                    reads_keys=None) -> Any:
    """What this server passes to vLLM (``EngineSettings``): ``steerd serve`` and every
    ``steerd node`` build it here, so an engine node cannot drift from the API node."""
    from sae_runtime.vllm.engine import EngineSettings  # imports vLLM

    hooks = hooks if hooks is not None else load_hooks(cfg)
    sites = activation_sites(cfg, hooks)
    return EngineSettings(
        model=cfg.model,
        saes=engine_sae_entries(cfg, hooks),
        max_interventions=cfg.max_interventions,
        max_watch=cfg.max_watch,  # the watch tables' width: sae_runtime.spec.budget.watch_width
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
        act_sites=sites.names,
        act_twins=sites.twins,
    )


def start_engine(cfg: ServerConfig, reads_addr: str | None, hooks: Hooks | None = None,
                 reads_keys=None) -> Any:
    from sae_runtime.vllm.engine import build_engine  # imports vLLM

    return build_engine(engine_settings(cfg, reads_addr, hooks, reads_keys))


def check_reads_cap(cfg: ServerConfig, hooks: Hooks) -> None:
    """--reads-max-message-bytes must carry one position of the largest read."""
    configs = hooks.configs
    need = min_message_bytes(tuple(c.d_sae for c in configs.values()), cfg.max_read_top_k,
                             watch_width(cfg.max_watch))
    if configs and cfg.reads_max_message_bytes < need:
        raise ValueError(f"--reads-max-message-bytes {cfg.reads_max_message_bytes}: one position "
                         f"of the widest read needs {need} bytes (pooled sums of the widest "
                         "SAE, --max-read-top-k, --max-watch); raise it")


def read_limits(cfg: ServerConfig, hooks: Hooks, engine: Any,
                sites: DeclaredSites = NO_SITES) -> RecordLimits:
    """What a worker's read record may hold, from this server's caps and the engine (by
    hook id: the SAEs, then the vector banks; activation records by declared site)."""
    return RecordLimits(d_sae=tuple(c.d_sae for c in hooks.configs.values()),
                        max_top_k=cfg.max_read_top_k, max_watch=watch_width(cfg.max_watch),
                        max_positions=int(engine.model_config.max_model_len),
                        act_widths=sites.site_widths,
                        max_act_reads=cfg.max_activation_reads)


def expected_hooks(hooks: Hooks) -> list[ExpectedHook]:
    return [ExpectedHook(i, sid, c.hook_name, block_of(c.layer, c.site))
            for i, (sid, c) in enumerate(hooks.configs.items())]


async def verify_hooks(cfg: ServerConfig, engine: Any, hooks: Hooks,
                       reads_addr: str | None = None) -> dict[str, str]:
    """Ask every worker, on every node, what it installed (``check_hooks``); hook id ->
    compute dtype. Every worker must have been built from this server's worker config."""
    from sae_runtime.step.config import config_hash
    from sae_runtime.vllm.engine import hook_reports, worker_config_of

    reports = await hook_reports(engine)
    world = cfg.tensor_parallel_size * cfg.pipeline_parallel_size
    expect = config_hash(worker_config_of(engine_settings(cfg, reads_addr, hooks)))
    sites = activation_sites(cfg, hooks)
    by_index = check_hooks(reports, expected_hooks(hooks), world_size=world,
                           reads=bool(hooks.saes or hooks.banks or sites.names),
                           config_hash=expect, reads_addr=reads_addr, act_sites=sites.names,
                           act_widths=sites.widths, act_twins=sites.twins)
    if nodes.spans_nodes(cfg):
        for line in node_lines(reports):
            log.info("%s", line)
    ids = list(hooks.configs)
    why = {h["sae"]: h["dtype_why"] for r in reports for h in r.get("hooks", ())}
    for i, dt in sorted(by_index.items()):
        owners = sorted({(r["ranks"]["dp_rank"], r["ranks"]["pp_rank"], r["ranks"]["tp_rank"])
                         for r in reports if any(h["sae"] == i for h in r.get("hooks", ()))})
        log.info("SAE %s installed on %d rank(s) (dp/pp/tp: %s); computes in %s (%s)", ids[i],
                 len(owners), ", ".join("/".join(map(str, o)) for o in owners), dt, why[i])
    return {ids[i]: dt for i, dt in by_index.items()}


def limits_of(cfg: ServerConfig, vocab_size: int) -> Limits:
    return Limits(
        max_interventions=cfg.max_interventions, vocab_size=vocab_size,
        max_read_top_k=cfg.max_read_top_k, max_watch=cfg.max_watch,
        max_encode_inputs=cfg.max_encode_inputs, max_prompt_tokens=cfg.max_prompt_tokens,
        max_new_tokens=cfg.max_new_tokens, max_logprobs=cfg.max_logprobs,
        max_activation_reads=cfg.max_activation_reads,
        max_activation_positions=cfg.max_activation_positions,
        max_activation_bytes=cfg.max_activation_bytes,
    )


@dataclass
class Ports:
    """Every port the server listens on, bound before the engine starts."""

    grpc: GrpcDoor
    http: HttpServer | None
    metrics: HttpServer | None

    async def close(self) -> None:
        for s in (self.http, self.metrics):
            if s is not None:
                await s.stop()


def bind_ports(cfg: ServerConfig, auth: Auth, metrics: Metrics) -> Ports:
    """Bind the gRPC, HTTP and metrics ports (a busy or bad one refuses to start here)."""
    tls = load_tls(cfg.tls_cert, cfg.tls_key, cfg.tls_client_ca)
    if cfg.metrics_port is not None and cfg.metrics_port != 0 and \
            cfg.metrics_port in (cfg.port, cfg.http_port):
        raise StartupError(f"--metrics-port {cfg.metrics_port}: the same port as --port or "
                           "--http-port")
    grpc_door = GrpcDoor(host=cfg.host, port=cfg.port, auth=auth, metrics=metrics,
                         max_message_bytes=cfg.max_message_bytes, tls=tls)
    ssl = ssl_options(cfg.tls_cert, cfg.tls_key, cfg.tls_client_ca)
    http = mserver = None
    try:
        if cfg.http_port is not None:
            http = HttpServer(cfg.host, cfg.http_port, grace_s=cfg.grace_period_s, ssl=ssl,
                              limits=ConnectionLimits(cfg.http_max_connections,
                                                      cfg.http_header_timeout_s,
                                                      cfg.http_idle_timeout_s))
        if cfg.metrics_port is not None:
            exposed = not _loopback(cfg.metrics_host)
            mserver = HttpServer(cfg.metrics_host, cfg.metrics_port, grace_s=0.1,
                                 ssl=ssl if exposed else None, option="--metrics-port")
    except BaseException:
        if http is not None:
            http._sock.close()
        raise
    return Ports(grpc_door, http, mserver)


def _loopback(host: str) -> bool:
    return host in ("localhost", "::1") or host.startswith("127.")


async def _watch_engine(core, dead: asyncio.Event) -> None:
    while not dead.is_set():
        if core.engine_dead:
            dead.set()
            return
        await asyncio.sleep(1.0)


async def serve(cfg: ServerConfig) -> int:
    """Run until SIGTERM/SIGINT (exit 0) or until the engine dies (exit 1)."""
    from server.core.service import Core  # imports vLLM: after every check that can refuse
    from server.http.app import HttpLimits, build_app, metrics_app

    hooks = load_hooks(cfg)
    labels = load_labels(cfg, hooks.saes)  # a bad label file fails here, before the engine starts
    chat_template = load_chat_template(cfg.chat_template)  # so does a bad --chat-template
    auth = Auth(tuple(load_tokens(cfg.auth_tokens_file)), cfg.cache_salt_per_token,
                admin=tuple(load_admin_tokens(cfg.admin_tokens_file)))
    sites = activation_sites(cfg, hooks)  # a glob that selects nothing fails here
    has_hooks = bool(hooks.saes or hooks.banks or sites.names)
    nodes.check_layout(cfg, "serve", has_hooks)
    ranks = nodes.local_ranks(cfg)  # the workers on this node (all of them on one node)
    if cfg.distributed_executor_backend == "ray":
        from sae_runtime.vllm.engine import ray_supported

        if not ray_supported():
            raise ValueError(
                "--distributed-executor-backend ray: vLLM's executor for this platform "
                f"({'cpu' if _cpu_platform() else 'this device'}) has no Ray support in this "
                "vLLM version; use mp (one node) or run on GPUs")
    nodes.check_pp_eager(cfg, _cpu_platform())
    check_clt_serving(hooks.saes, cpu=_cpu_platform(), pp=cfg.pipeline_parallel_size)
    check_reads_cap(cfg, hooks)
    metrics = Metrics()
    ports = bind_ports(cfg, auth, metrics)
    for line in nodes.network_env_defaults(cfg):
        log.info("%s", line)
    if _cpu_platform():
        for line in apply_cpu_env_defaults(ranks):
            log.info("%s", line)
    # The read socket opens only after every check that can refuse to start has passed.
    router = ReadRouter(cfg.reads_address, max_message_bytes=cfg.reads_max_message_bytes,
                        dropped_metric=metrics.reads_dropped) if has_hooks else None
    if router is not None:
        router.start()
    t0 = time.monotonic()
    # the workers' reads address: across nodes what the user gave (every node was given it)
    reads_addr = (cfg.reads_address if nodes.spans_nodes(cfg) else router.addr) if router else None
    engine = start_engine(cfg, reads_addr, hooks, router.keys if router else None)
    started = time.monotonic() - t0
    if router is not None:
        router.limits = read_limits(cfg, hooks, engine, sites)
    try:
        if router is not None and router.keys is not None and nodes.spans_nodes(cfg):
            await nodes.hand_over_keys(engine, router.keys)
        sae_dtypes = await verify_hooks(cfg, engine, hooks, reads_addr)
    except HookPlacementError as e:
        log.error("error: %s", e)
        engine.shutdown()
        if router is not None:
            router.close()
        await ports.close()
        return 1
    dead = asyncio.Event()
    core = Core(
        engine, model=cfg.model, saes=hooks.saes, labels=labels,
        limits=limits_of(cfg, engine.model_config.get_vocab_size()),
        compiled=not cfg.enforce_eager, router=router, on_engine_dead=dead.set,
        sae_dtypes=sae_dtypes, metrics=metrics, chat_template=chat_template,
        max_concurrent_streams=cfg.max_concurrent_streams,
        max_distinct_configs=cfg.max_distinct_configs,
        max_stream_buffer_bytes=cfg.max_stream_buffer_bytes,
        vectors=VectorIndex.of(hooks.banks), guardrail_missing_read=cfg.guardrail_missing_read,
        sites=sites,
        runtime_vectors=cfg.max_runtime_vectors, vector_values=vector_values(hooks.banks),
        workers=cfg.tensor_parallel_size * cfg.pipeline_parallel_size * cfg.data_parallel_size,
    )
    await ports.grpc.start(core)
    _log_startup(cfg, engine, hooks.configs, ports.grpc.port, started, sae_dtypes, auth)
    if ports.metrics is not None:
        exposed = not _loopback(cfg.metrics_host)
        mport = await ports.metrics.start(metrics_app(metrics, auth if exposed else Auth()))
        log.info("metrics on %s://%s:%d/metrics%s", ports.metrics.scheme, cfg.metrics_host,
                 mport, " (bearer token required)" if exposed and auth.on else "")
    if ports.http is not None:
        app = build_app(core, model=cfg.model, auth=auth, limits=HttpLimits(
            max_body_bytes=cfg.max_message_bytes, body_timeout_s=cfg.http_body_timeout_s,
            allowed_hosts=cfg.allowed_hosts(),
            allowed_origins=tuple(o.strip() for o in cfg.http_allowed_origins.split(",")
                                  if o.strip())))
        hport = await ports.http.start(app, lambda: metrics.rejected.labels("http_connections").inc())
        log.info("OpenAI-compatible HTTP on %s://%s:%d/v1", ports.http.scheme, cfg.host, hport)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    watcher = asyncio.create_task(_watch_engine(core, dead))
    node_watch = (asyncio.create_task(nodes.watch_engines(engine, dead, cfg.node_timeout_s))
                  if nodes.spans_nodes(cfg) else None)
    dead_wait = asyncio.create_task(dead.wait())
    stop_wait = asyncio.create_task(stop.wait())
    await asyncio.wait({dead_wait, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
    engine_died = dead.is_set()
    for t in (watcher, dead_wait, stop_wait, node_watch):
        if t is not None:
            t.cancel()

    if engine_died:
        await ports.grpc.not_serving()
    await ports.grpc.health.enter_graceful_shutdown()
    # After an engine death the in-flight streams have already been told UNAVAILABLE by
    # their handlers; a short grace lets those statuses reach the clients.
    grace = min(2.0, cfg.grace_period_s) if engine_died else cfg.grace_period_s
    log.info("shutting down: draining streams for up to %.1fs", grace)
    await asyncio.gather(ports.grpc.server.stop(grace), ports.close())
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


def _log_startup(cfg, engine, configs, port, started_s, sae_dtypes, auth: Auth) -> None:
    mc = engine.model_config
    device = "cpu" if _cpu_platform() else "gpu"
    par = (f"tp {cfg.tensor_parallel_size}, pp {cfg.pipeline_parallel_size}, "
           f"dp {cfg.data_parallel_size}, executor {cfg.distributed_executor_backend}")
    log.info("model %s (%s, dtype %s, max_model_len %d, %s, device %s, %s); engine started in "
             "%.1fs", cfg.model, (mc.hf_config.architectures or ["?"])[0],
             str(mc.dtype).removeprefix("torch."), mc.max_model_len,
             "eager" if cfg.enforce_eager else "compiled", device, par, started_s)
    from sae_runtime.vllm.engine import runtime_info

    log.info("runtime: %s", runtime_info(engine).line())
    if device == "cpu" and str(mc.dtype).removeprefix("torch.") in LOW_PRECISION and \
            str(mc.dtype).removeprefix("torch.") not in cpu_info().native:
        log.warning("the model runs in %s, which this CPU (%s) emulates (matmuls ~100x slower "
                    "than float32); pass --dtype float32 for speed", mc.dtype, cpu_info().describe())
    for sid, c in configs.items():
        log.info("SAE %s: format %s, architecture %s, site %s, layer %d, width %d, d_model %d, "
                 "dtype %s%s", sid, c.format, c.architecture, c.site, c.layer, c.d_sae, c.d_in,
                 sae_dtypes.get(sid, "?"), (f", k {c.k}" if c.k else "")
                 + (f", cross-layer transcoder over blocks {list(c.clt_layers)} "
                    f"({c.features_per_layer} features each, flat ids)" if c.clt_layers else ""))
        if c.model_name and not _same_model(c.model_name, cfg.model):
            log.warning("SAE %s was trained on %r, which differs from the served model %s",
                        sid, c.model_name, cfg.model)
    security = ("mTLS" if cfg.tls_client_ca else "TLS") if cfg.tls_cert else "plaintext"
    log.info("listening on %s:%d (%s, %s)", cfg.host, port, security,
             "bearer-token auth" if auth.on else "no auth")


def run_node(cfg: ServerConfig) -> int:
    """``steerd node``: this node's share of an engine led by ``steerd serve`` on node 0,
    until its processes end (exit 1: a worker or engine died, or node 0 went away) or
    SIGTERM/SIGINT (exit 0)."""
    hooks = load_hooks(cfg)
    has_hooks = bool(hooks.saes or hooks.banks or activation_sites(cfg).names)
    nodes.check_layout(cfg, "node", has_hooks)
    check_reads_cap(cfg, hooks)
    for line in nodes.network_env_defaults(cfg):
        log.info("node: %s", line)
    on_cpu = _cpu_platform()
    nodes.check_pp_eager(cfg, on_cpu)
    if on_cpu:
        for line in apply_cpu_env_defaults(nodes.local_ranks(cfg)):
            log.info("node: %s", line)
    from sae_runtime.vllm.engine import node_config, node_role, run_headless

    vcfg = node_config(engine_settings(cfg, cfg.reads_address if has_hooks else None, hooks))
    pc = vcfg.parallel_config
    if node_role(vcfg) == "workers":
        log.info("node: node rank %d of %d: %d worker(s) of the engine led from %s:%s",
                 pc.node_rank, pc.nnodes, nodes.local_ranks(cfg), pc.master_addr, pc.master_port)
    else:
        log.info("node: data-parallel engine(s) %d..%d of %d for the front end at %s:%s",
                 pc.data_parallel_rank, pc.data_parallel_rank + pc.data_parallel_size_local - 1,
                 pc.data_parallel_size, pc.data_parallel_master_ip, pc.data_parallel_rpc_port)
    stopping = False

    def stop(signum, frame) -> None:
        nonlocal stopping
        if not stopping:
            stopping = True
            raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        run_headless(vcfg)
    except SystemExit:
        if stopping:
            log.info("node: stopped")
            return 0
        raise
    log.error("node: this node's workers or engines ended (one died, or node 0 is gone); "
              "exiting with status 1")
    return 1
