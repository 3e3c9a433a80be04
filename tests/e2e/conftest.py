"""One real `steerd serve` subprocess (real vLLM, compiled mode) shared by the e2e tests."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest

from clients.client import SteeringClient

SAE_IDS = ("resid_l1", "jr", "tk")  # server order: hooks on one block run in this order
SAE_DIRS = {"resid_l1": "resid_l1", "jr": "jumprelu_l2pre", "tk": "topk_l0"}
MAX_MODEL_LEN = 256
MAX_BATCHED_TOKENS = 64  # small, so long prompts are chunked over several steps
MAX_INTERVENTIONS = 8
CHAT_TEMPLATE = Path(__file__).with_name("chat_template.jinja")  # the tiny models ship none


@dataclass
class Server:
    target: str
    proc: subprocess.Popen
    log: Path
    model_dir: Path
    sae_dirs: dict[str, Path]
    started_s: float
    metrics_url: str | None = None
    client_kwargs: dict = field(default_factory=dict)  # token / TLS settings for clients
    http_url: str | None = None  # OpenAI-compatible base URL (…/v1) when started with http=True

    def openai(self, **kw):
        """The real OpenAI SDK client pointed at this server's HTTP front end."""
        import openai

        kw.setdefault("api_key", self.client_kwargs.get("token") or "unused")
        return openai.OpenAI(base_url=self.http_url, max_retries=0, timeout=120.0, **kw)

    def client(self, timeout: float = 120.0, **kw) -> SteeringClient:
        return SteeringClient(self.target, timeout=timeout, **{**self.client_kwargs, **kw})

    def metrics(self) -> dict[str, float]:
        """Current Prometheus samples: 'name{labels}' -> value."""
        import urllib.request

        from prometheus_client.parser import text_string_to_metric_families

        text = urllib.request.urlopen(self.metrics_url, timeout=10).read().decode()
        out = {}
        for fam in text_string_to_metric_families(text):
            for smp in fam.samples:
                labels = ",".join(f'{k}="{v}"' for k, v in sorted(smp.labels.items()))
                out[f"{smp.name}{{{labels}}}" if labels else smp.name] = smp.value
        return out


# Steering vectors of the shared server (tests/e2e/test_vectors.py): name -> (layers, seed)
VECTORS = {"happy": ((1, 2), 11), "calm": ((0,), 12)}
INLINE_LAYERS = "1,2"  # --inline-vectors of the shared server
ACT_HOOKS = ("blocks.*.hook_resid_post,blocks.2.hook_resid_pre,blocks.0.hook_mlp_out,"
             "blocks.0.hook_attn_out,blocks.1.attn.hook_z,blocks.1.ln2.hook_normalized")
# --activation-hooks of the shared server
RUNTIME_LAYERS = "1,2"  # --runtime-vectors of the shared server (its banks: no new hook op)
MAX_RUNTIME_VECTORS = 3
ADMIN_TOKEN = "e2e-admin-token"  # the shared server's --admin-tokens-file holds this one


def write_vector_files(d: Path) -> dict[str, Path]:
    """``happy``: a llama.cpp/repeng control-vector GGUF (blocks 1 and 2); ``calm``: a
    ``[n_layers, d_model]`` .npy with block 0 only. Vectors from ``random_directions``."""
    import numpy as np

    from tests.fixtures.tiny import HIDDEN, LAYERS
    from tests.vector_files import random_directions, write_gguf

    (hl, hs), (cl, cs) = VECTORS["happy"], VECTORS["calm"]
    happy = write_gguf(d / "happy.gguf", random_directions(hl, HIDDEN, hs))
    arr = np.zeros((LAYERS, HIDDEN), dtype=np.float32)
    for k, v in random_directions(cl, HIDDEN, cs).items():
        arr[k] = v
    np.save(d / "calm.npy", arr)
    return {"happy": happy, "calm": d / "calm.npy"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _steerd() -> str:
    return str(Path(sys.executable).with_name("steerd"))


def start_server(model_dir: Path, sae_dirs: dict[str, Path], log_dir: Path, *extra: str,
                 client_kwargs: dict | None = None, host: str = "127.0.0.1",
                 http: bool = False) -> Server:
    """Start `steerd serve` (compiled mode, fp32, metrics on) and wait until it reports SERVING.

    With ``http`` the OpenAI-compatible front end listens too (``Server.http_url``).
    """
    port, mport = free_port(), free_port()
    extra = ("--host", host, "--metrics-port", str(mport), *extra)
    hport = free_port() if http else None
    if hport is not None:
        extra = (*extra, "--http-port", str(hport))
    cmd = [_steerd(), "serve", "--model", str(model_dir), "--dtype", "float32",
           "--port", str(port), "--max-model-len", str(MAX_MODEL_LEN),
           "--max-num-batched-tokens", str(MAX_BATCHED_TOKENS), "--max-num-seqs", "32",
           "--max-interventions", str(MAX_INTERVENTIONS), "--grace-period-s", "5", *extra]
    for sid, path in sae_dirs.items():
        cmd += ["--sae", f"{sid}={path}"]
    log = log_dir / "steerd.log"
    env = dict(os.environ)  # VLLM_CPU_KVCACHE_SPACE: tests/conftest.py
    t0 = time.monotonic()
    with open(log, "wb") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env)
    srv = Server(f"{host}:{port}", proc, log, model_dir, dict(sae_dirs), 0.0,
                 metrics_url=f"http://{host}:{mport}/metrics", client_kwargs=client_kwargs or {})
    if hport is not None:
        tls = "--tls-cert" in extra
        srv.http_url = f"{'https' if tls else 'http'}://{host}:{hport}/v1"
    try:
        _wait_healthy(srv, deadline=t0 + 400)
        if srv.http_url is not None:
            _wait_http(srv, deadline=t0 + 400)
    except BaseException:
        proc.kill()
        raise
    srv.started_s = time.monotonic() - t0
    print(f"\nsteerd ready in {srv.started_s:.1f}s ({model_dir.name})", file=sys.stderr)
    return srv


def stop_server(srv: Server, drain_check: bool = False) -> None:
    """SIGTERM, then the server must drain and exit 0.

    With ``drain_check``, a stream still running when the signal arrives must complete (the
    grace period is 5 s; 150 tokens of the tiny model take about a second or two).
    """
    result: dict = {}
    if drain_check:
        client = srv.client()
        stream = client.generate([5, 6, 7], max_tokens=150, temperature=0.0, ignore_eos=True)
        first = next(stream)

        def finish():
            try:
                result["msgs"] = [first, *stream]
            except grpc.RpcError as e:
                result["error"] = e

        t = threading.Thread(target=finish)
        t.start()
        assert t.is_alive(), "the drain check's stream ended before SIGTERM; lengthen it"
    srv.proc.send_signal(signal.SIGTERM)
    try:
        rc = srv.proc.wait(timeout=90)
    except subprocess.TimeoutExpired:
        srv.proc.kill()
        raise AssertionError("steerd did not stop within 90s of SIGTERM") from None
    assert rc == 0, f"steerd exited with {rc} after SIGTERM; log: {srv.log}"
    if drain_check:
        t.join(30)
        client.close()
        assert "error" not in result, f"in-flight stream failed during shutdown: {result.get('error')}"
        assert sum(len(m.token_ids) for m in result["msgs"]) == 150
        assert result["msgs"][-1].finish_reason


# --------------------------------------------------------------------------- early starts
# The servers below start in the background at the session's first test (the unit tests run
# first, ``tests/conftest.py``), so their starts (~100 s each, mostly one core's work:
# spawning, imports, tracing) overlap the unit tests on the other core. An idle server
# costs ~2% of a core. E2E_EARLY=0 starts each one when its first test needs it.
EARLY_BUILDERS: dict[str, Callable] = {}  # fixture name -> builder(request) -> start thunk
_EARLY_POOL = ThreadPoolExecutor(2, thread_name_prefix="early-start")
_EARLY: dict[str, Future] = {}


def early(name: str):
    """Register ``builder(request) -> (() -> Server)`` as the way fixture ``name`` starts its
    server; the builder makes files (in the calling thread), the thunk starts the server."""
    def deco(builder: Callable) -> Callable:
        EARLY_BUILDERS[name] = builder
        return builder
    return deco


def start_early(request) -> None:
    """Start, in the background, the server of every registered fixture the session uses."""
    wanted = {f for it in request.session.items for f in getattr(it, "fixturenames", ())}
    for name, builder in EARLY_BUILDERS.items():
        if name in wanted and name not in _EARLY:
            _EARLY[name] = _EARLY_POOL.submit(builder(request))


def server_for(name: str, request) -> Server:
    """Fixture ``name``'s server: the one started early, or one started now."""
    fut = _EARLY.pop(name, None)
    return fut.result() if fut is not None else EARLY_BUILDERS[name](request)()


def stop_early_unused() -> None:
    """Servers started early whose tests never ran (a -x stop, a failed dependency)."""
    for fut in _EARLY.values():
        with contextlib.suppress(Exception):
            stop_server(fut.result())  # SIGTERM: steerd stops its engine processes too
    _EARLY.clear()


@early("server")
def _shared_server(request) -> Callable[[], Server]:
    tiny_dir, tmp = request.getfixturevalue("tiny_dir"), request.getfixturevalue("tmp_path_factory")
    sae_dirs = {sid: tiny_dir / "saes" / SAE_DIRS[sid] for sid in SAE_IDS}
    vec = write_vector_files(tmp.mktemp("vectors"))
    log_dir = tmp.mktemp("server")
    admin = log_dir / "admin-tokens"
    admin.write_text(ADMIN_TOKEN + "\n")
    return lambda: start_server(
        tiny_dir / "tiny-llama", sae_dirs, log_dir, "--chat-template", str(CHAT_TEMPLATE),
        *(a for name, path in vec.items() for a in ("--vector", f"{name}={path}")),
        "--inline-vectors", INLINE_LAYERS, "--activation-hooks", ACT_HOOKS,
        "--runtime-vectors", RUNTIME_LAYERS,
        "--max-runtime-vectors", str(MAX_RUNTIME_VECTORS), "--admin-tokens-file", str(admin),
        http=True)


@early("default_server")
def _default_server(request) -> Callable[[], Server]:
    embedded = Path(__file__).resolve().parents[2] / "server" / "embedded"
    log_dir = request.getfixturevalue("tmp_path_factory").mktemp("default")
    saes = {"topics_l1": embedded / "saes" / "topics_l1",
            "topics_clt": embedded / "saes" / "topics_clt"}  # the CLT: tests/e2e/test_clt.py
    return lambda: start_server(embedded / "model", saes, log_dir, http=True)


@pytest.fixture(scope="session")
def server(request):
    srv = server_for("server", request)
    yield srv
    stop_server(srv, drain_check=True)


@pytest.fixture
def admin(server):
    """A client of the shared server whose admin calls carry ``ADMIN_TOKEN``; unloads the
    runtime vectors the test loaded."""
    with server.client(admin_token=ADMIN_TOKEN) as c:
        yield c
        for v in c.list_vectors():
            if v.runtime:
                c.unload_vector(v.name)


@pytest.fixture(scope="session")
def default_server(request):
    """`steerd serve` on the embedded default (server/embedded: the 8-topic model, its
    labelled SAE ``topics_l1`` and its cross-layer transcoder ``topics_clt``), gRPC and
    HTTP, shared by the files that need it."""
    srv = server_for("default_server", request)
    yield srv
    stop_server(srv)


@pytest.fixture(scope="session")
def hf(server):
    """The shared server's model in HF ``transformers``, fp32 (the steering references)."""
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(server.model_dir, dtype=torch.float32).eval()


def _wait_http(srv: Server, deadline: float) -> None:
    """The HTTP front end starts just after gRPC reports SERVING; wait for its listener."""
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(srv.http_url.split("//")[1].split("/")[0].rsplit(":", 1),
                                          timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"steerd's HTTP port never opened:\n{srv.log.read_text()[-4000:]}")


def _wait_healthy(srv: Server, deadline: float) -> None:
    while time.monotonic() < deadline:
        if srv.proc.poll() is not None:
            raise RuntimeError(f"steerd exited with {srv.proc.returncode}:\n{srv.log.read_text()[-4000:]}")
        try:
            with srv.client(timeout=2) as c:
                if c.health() == "SERVING":
                    return
        except grpc.RpcError:
            pass
        time.sleep(1.0)
    raise TimeoutError(f"steerd not healthy in time:\n{srv.log.read_text()[-4000:]}")
