"""Rank faults: a vLLM process of a running steerd is SIGKILLed under load.

Two starts of the tiny model, one per case: tensor parallel 2 with one TP worker killed,
and one rank with the engine core killed. Reading + steered streams (and Encode calls,
which wait for their reads after the engine request ends) are in flight at the kill. The
checks: every call ends UNAVAILABLE within STREAM_END_S (none hangs waiting for reads
that will never come), health stops answering SERVING, steerd exits 1 within EXIT_S,
and no process of the tree recorded before the kill is left (gone, or a reaped zombie).
"""

from __future__ import annotations

import os
import signal
import threading
import time
from dataclasses import dataclass, field

import grpc
import psutil
import pytest

from clients.client import clamp, read
from tests.e2e.conftest import Server, start_server

pytestmark = pytest.mark.e2e
STREAM_END_S = 20.0
EXIT_S = 60.0
N_STREAMS = 4
N_ENCODERS = 2


@dataclass
class Call:
    kind: str
    first: threading.Event = field(default_factory=threading.Event)
    code: grpc.StatusCode | None = None
    details: str = ""
    messages: int = 0
    ended_at: float | None = None


def _stream(srv: Server, call: Call, i: int) -> None:
    with srv.client(timeout=120) as c:
        try:
            for _ in c.generate([5 + i, 17, 33, 2, 90, 41, 7, 8], max_tokens=240,
                                temperature=0.0, ignore_eos=True,
                                interventions=[clamp("resid_l1", 3 + i, 4.0)],
                                reads=[read("resid_l1", top_k=4, watch=[1, 2])]):
                call.messages += 1
                call.first.set()
            call.code = grpc.StatusCode.OK
        except grpc.RpcError as e:
            call.code, call.details = e.code(), e.details() or ""
        finally:
            call.ended_at = time.monotonic()
            call.first.set()


def _encoder(srv: Server, call: Call, stop: threading.Event) -> None:
    """Encode in a loop until a call fails: each waits for its reads after the engine step."""
    with srv.client(timeout=120) as c:
        try:
            while not stop.is_set():
                c.encode([list(range(1, 120))], [read("resid_l1", top_k=4)])
                call.messages += 1
                call.first.set()
            call.code = grpc.StatusCode.OK
        except grpc.RpcError as e:
            call.code, call.details = e.code(), e.details() or ""
        finally:
            call.ended_at = time.monotonic()
            call.first.set()


def _tree(pid: int) -> list[psutil.Process]:
    root = psutil.Process(pid)
    return [root, *root.children(recursive=True)]


def _cmdline(p: psutil.Process) -> str:
    try:
        return " ".join(p.cmdline())
    except psutil.Error:
        return ""


def _gone(p: psutil.Process) -> bool:
    try:
        return p.status() == psutil.STATUS_ZOMBIE or not p.is_running()
    except psutil.NoSuchProcess:
        return True


def _kill_under_load(srv: Server, pick) -> None:
    """Start the calls, SIGKILL the process ``pick(tree)`` returns, check the aftermath."""
    tree = _tree(srv.proc.pid)
    victim = pick(tree)
    assert victim is not None, "no such process in the tree: " + "; ".join(
        f"{p.pid} {_cmdline(p)[:60]}" for p in tree)
    stop = threading.Event()
    calls = [Call("generate") for _ in range(N_STREAMS)] + [Call("encode") for _ in range(N_ENCODERS)]
    threads = [threading.Thread(target=_stream, args=(srv, calls[i], i), daemon=True)
               for i in range(N_STREAMS)]
    threads += [threading.Thread(target=_encoder, args=(srv, c, stop), daemon=True)
                for c in calls[N_STREAMS:]]
    for t in threads:
        t.start()
    for c in calls:
        assert c.first.wait(120), f"a {c.kind} call never got going"
    assert all(c.ended_at is None for c in calls), \
        [(c.kind, c.code, c.details) for c in calls if c.ended_at is not None]
    tree = _tree(srv.proc.pid)  # all of it, as it is at the kill
    t_kill = time.monotonic()
    os.kill(victim.pid, signal.SIGKILL)

    for t in threads:
        t.join(max(0.0, t_kill + STREAM_END_S - time.monotonic()))
    stop.set()
    late = [(c.kind, c.messages) for c in calls if c.ended_at is None]
    assert not late, f"calls still running {STREAM_END_S:.0f}s after the kill: {late}"
    for c in calls:
        assert c.code == grpc.StatusCode.UNAVAILABLE, (c.kind, c.code, c.details)

    # Health: never SERVING again (NOT_SERVING while it drains, then the port closes).
    seen = []
    while srv.proc.poll() is None and time.monotonic() < t_kill + EXIT_S:
        try:
            with srv.client(timeout=2) as c:
                seen.append(c.health())
        except grpc.RpcError as e:
            seen.append(e.code().name)
        time.sleep(0.2)
    assert "SERVING" not in seen, seen
    try:
        rc = srv.proc.wait(max(1.0, t_kill + EXIT_S - time.monotonic()))
    except Exception:
        srv.proc.kill()
        raise AssertionError(f"steerd still running {EXIT_S:.0f}s after the kill; "
                             f"log: {srv.log}") from None
    assert rc == 1, f"steerd exited {rc}; log tail:\n{srv.log.read_text()[-3000:]}"
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not all(_gone(p) for p in tree):
        time.sleep(0.2)
    left = [f"{p.pid} {_cmdline(p)[:80]}" for p in tree if not _gone(p)]
    for p in tree:
        if not _gone(p):
            p.kill()
    assert not left, f"processes left after steerd exited: {left}"


def _start(tiny_dir, tmp_path, *extra) -> Server:
    # Eager: process supervision does not depend on compilation, and skipping it saves most
    # of each start (the compiled TP=2 start took 98 s on the 2-core test machine).
    return start_server(tiny_dir / "tiny-llama", {"resid_l1": tiny_dir / "saes" / "resid_l1"},
                        tmp_path, "--enforce-eager", *extra)


def test_killing_a_tp_worker_ends_streams_and_the_whole_tree(tiny_dir, tmp_path):
    srv = _start(tiny_dir, tmp_path, "--tensor-parallel-size", "2")
    try:
        def worker_tp1(tree):
            return next((p for p in tree if "Worker_TP1" in _cmdline(p)), None)

        _kill_under_load(srv, worker_tp1)
    finally:
        if srv.proc.poll() is None:
            srv.proc.kill()


def test_killing_the_engine_core_ends_streams_and_the_whole_tree(tiny_dir, tmp_path):
    srv = _start(tiny_dir, tmp_path)
    try:
        def engine_core(tree):
            return next((p for p in tree if "EngineCore" in _cmdline(p)), None)

        _kill_under_load(srv, engine_core)
    finally:
        if srv.proc.poll() is None:
            srv.proc.kill()
