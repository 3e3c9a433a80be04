"""One real `steerd serve` subprocess (real vLLM, compiled mode) shared by the e2e tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from clients.client import SteeringClient

SAE_IDS = ("resid_l1", "jr", "tk")  # server order: hooks on one block run in this order
SAE_DIRS = {"resid_l1": "resid_l1", "jr": "jumprelu_l2pre", "tk": "topk_l0"}
MAX_MODEL_LEN = 256
MAX_BATCHED_TOKENS = 64  # small, so long prompts are chunked over several steps
MAX_INTERVENTIONS = 8


@dataclass
class Server:
    target: str
    proc: subprocess.Popen
    log: Path
    model_dir: Path
    sae_dirs: dict[str, Path]
    started_s: float

    def client(self, timeout: float = 120.0) -> SteeringClient:
        return SteeringClient(self.target, timeout=timeout)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _steerd() -> str:
    return str(Path(sys.executable).with_name("steerd"))


@pytest.fixture(scope="session")
def server(tiny_dir, tmp_path_factory):
    port = _free_port()
    sae_dirs = {sid: tiny_dir / "saes" / d for sid, d in SAE_DIRS.items()}
    cmd = [_steerd(), "serve", "--model", str(tiny_dir / "tiny-llama"), "--dtype", "float32",
           "--port", str(port), "--max-model-len", str(MAX_MODEL_LEN),
           "--max-num-batched-tokens", str(MAX_BATCHED_TOKENS), "--max-num-seqs", "32",
           "--max-interventions", str(MAX_INTERVENTIONS), "--grace-period-s", "5"]
    for sid in SAE_IDS:
        cmd += ["--sae", f"{sid}={sae_dirs[sid]}"]
    log = tmp_path_factory.mktemp("server") / "steerd.log"
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE=os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"))
    t0 = time.monotonic()
    with open(log, "wb") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env)
    srv = Server(f"127.0.0.1:{port}", proc, log, tiny_dir / "tiny-llama", sae_dirs, 0.0)
    try:
        _wait_healthy(srv, deadline=t0 + 400)
    except BaseException:
        proc.kill()
        raise
    srv.started_s = time.monotonic() - t0
    print(f"\nsteerd ready in {srv.started_s:.1f}s", file=sys.stderr)
    yield srv
    proc.send_signal(signal.SIGTERM)
    try:
        rc = proc.wait(timeout=90)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError("steerd did not stop within 90s of SIGTERM") from None
    assert rc == 0, f"steerd exited with {rc} after SIGTERM; log: {log}"


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
