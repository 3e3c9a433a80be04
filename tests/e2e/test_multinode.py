"""Multi-node serving on vLLM's own mp executor, proven on one machine (``make
test-multinode``, root).

Two "nodes" are two network namespaces joined by a veth pair (``tests/e2e/netns.py``, which
runs this module inside node 0's namespace), each node with private ``/dev/shm``, ``/tmp``
and IPC, so vLLM and steerd can only reach the other node over TCP on ``10.77.0.0/24``.
Node 0 runs ``steerd serve``, node 1 ``steerd node`` with the same flags (its own
``--node-rank`` or ``--data-parallel-start-rank``); ``VLLM_HOST_IP`` and
``GLOO_SOCKET_IFNAME`` are left for steerd to derive. One core per node.

Layouts: TP=2 across the nodes (one rank each) and DP=2 across them (one engine each).
Each is checked with the tests of ``tests/e2e/test_parallel.py`` (imported: the HF +
sae-lens teacher-forced oracle at every site, reads at every site exactly once in order and
equal to the reference, plain requests equal to plain vLLM at the same layout), then:

- the startup lines name both nodes and their ranks, and reads crossed the link (DP: the
  engine on node 1 publishes them over ``tcp://`` with CURVE) exactly once under load;
- throughput and start time, next to a one-node steerd of the same layout;
- TP: node 1 is SIGKILLed mid-load; DP: node 1's link goes down mid-load. Either way every
  stream ends (OK or UNAVAILABLE, nothing hangs) and node 0 exits 1; after the link drop
  node 1 notices node 0 is gone and exits 1 too.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import psutil
import pytest

from tests.e2e.netns import MN_ENV, node_argv

MN = json.loads(os.environ.get(MN_ENV) or "null")
if MN is None:
    pytest.skip("multi-node test: run it with `make test-multinode` (root: network namespaces)",
                allow_module_level=True)

from clients.client import read  # noqa: E402
from tests.e2e.conftest import (  # noqa: E402
    MAX_BATCHED_TOKENS,
    MAX_INTERVENTIONS,
    MAX_MODEL_LEN,
    Server,
    start_server,
    stop_server,
)
from tests.e2e.reference import HFReference  # noqa: E402
from tests.e2e.test_parallel import (  # noqa: E402, F401  (the same checks, on these layouts)
    SITES,
    test_plain_requests_equal_plain_vllm_and_steering_is_per_request,
    test_reads_at_every_site_arrive_once_and_match_reference,
    test_startup_reports_every_rank,
    test_steering_at_site_matches_reference,
)
from tests.fixtures.tiny import make_family_set  # noqa: E402

pytestmark = [pytest.mark.e2e, pytest.mark.multinode]
NODE0, NODE1 = MN["nodes"]
NODE_TIMEOUT_S = 15  # --node-timeout-s: how long a silent node may take to count as gone
PORTS = {"tp2": 0, "dp2": 100}  # per-layout offset: a layout's sockets never meet the last one's
NUMBERS: dict = {}  # measured here, printed at the end of the module
DEPLOYED: dict[str, Deployment] = {}


@dataclass
class Deployment:
    kind: str
    srv: Server  # node 0 (the API node)
    node1: subprocess.Popen
    node1_log: Path
    started_s: float
    gone: bool = False  # a test took a node down


def _node_env(cpu: str) -> dict[str, str]:
    keep = ("PATH", "PYTHONPATH", "HOME", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE",
            "TOKENIZERS_PARALLELISM", "VLLM_LOGGING_LEVEL")
    env = {k: os.environ[k] for k in keep if k in os.environ}
    # one core per node; the smallest KV cache; each node its own compile cache, as on two
    # machines (kept between runs: ~/.cache)
    return {**env, "VLLM_CPU_OMP_THREADS_BIND": cpu, "VLLM_CPU_KVCACHE_SPACE": "1",
            "VLLM_CACHE_ROOT": os.path.expanduser(f"~/.cache/steerd-multinode/{cpu}")}


def _flags(kind: str, model: Path, sae_dirs: dict[str, Path]) -> list[str]:
    """The flags both nodes get."""
    off = PORTS[kind]
    flags = ["--model", str(model), "--dtype", "float32", "--max-model-len", str(MAX_MODEL_LEN),
             "--max-num-batched-tokens", str(MAX_BATCHED_TOKENS), "--max-num-seqs", "32",
             "--max-interventions", str(MAX_INTERVENTIONS), "--grace-period-s", "5",
             "--reads-address", f"tcp://{NODE0['ip']}:{47100 + off}",
             "--node-timeout-s", str(NODE_TIMEOUT_S)]
    for sid, path in sae_dirs.items():
        flags += ["--sae", f"{sid}={path}"]
    if kind == "tp2":
        return flags + ["--tensor-parallel-size", "2", "--nnodes", "2",
                        "--master-addr", NODE0["ip"], "--master-port", str(29501 + off)]
    return flags + ["--data-parallel-size", "2", "--data-parallel-size-local", "1",
                    "--data-parallel-address", NODE0["ip"],
                    "--data-parallel-rpc-port", str(29550 + off)]


def start_nodes(kind: str, model: Path, sae_dirs: dict[str, Path], log_dir: Path) -> Deployment:
    steerd = str(Path(sys.executable).with_name("steerd"))
    flags = _flags(kind, model, sae_dirs)
    off = PORTS[kind]
    port, mport = 50051 + off, 9100 + off
    serve = [steerd, "serve", *flags, "--host", NODE0["ip"], "--port", str(port),
             "--metrics-port", str(mport), "--metrics-host", NODE0["ip"]]  # the test reads it from outside
    node = [steerd, "node", *flags,
            *(["--node-rank", "1"] if kind == "tp2" else ["--data-parallel-start-rank", "1"])]
    log0, log1 = log_dir / "node0.log", log_dir / "node1.log"
    t0 = time.monotonic()
    with open(log0, "wb") as f0, open(log1, "wb") as f1:
        p0 = subprocess.Popen(node_argv(NODE0, serve, _node_env("0")), stdout=f0,
                              stderr=subprocess.STDOUT, start_new_session=True)
        p1 = subprocess.Popen(node_argv(NODE1, node, _node_env("1")), stdout=f1,
                              stderr=subprocess.STDOUT, start_new_session=True)
    srv = Server(f"{NODE0['ip']}:{port}", p0, log0, model, dict(sae_dirs), 0.0,
                 metrics_url=f"http://{NODE0['ip']}:{mport}/metrics")
    dep = Deployment(kind, srv, p1, log1, 0.0)
    try:
        while True:
            for p, log in ((p0, log0), (p1, log1)):
                if p.poll() is not None:
                    raise RuntimeError(f"{log.name} exited with {p.returncode}:\n"
                                       f"{log.read_text()[-4000:]}")
            if time.monotonic() - t0 > 500:
                raise TimeoutError(f"not serving after 500 s:\n{log0.read_text()[-4000:]}")
            try:
                with srv.client(timeout=2) as c:
                    if c.health() == "SERVING":
                        break
            except grpc.RpcError:
                pass
            time.sleep(1.0)
    except BaseException:
        _kill(p0)
        _kill(p1)
        raise
    dep.started_s = srv.started_s = time.monotonic() - t0
    NUMBERS.setdefault(kind, {})["start_s"] = round(dep.started_s, 1)
    return dep


def _kill(p: subprocess.Popen) -> None:
    if p.poll() is None:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        p.wait(30)


def stop_nodes(dep: Deployment) -> None:
    """SIGTERM node 0 (it must drain and exit 0); node 1 then finds node 0 gone by itself
    (it would otherwise wait forever), or gets SIGTERM after its grace."""
    if dep.gone:
        _kill(dep.srv.proc)
        _kill(dep.node1)
        return
    try:
        stop_server(dep.srv)
    finally:
        try:
            dep.node1.send_signal(signal.SIGTERM)
            dep.node1.wait(60)
        finally:
            _kill(dep.node1)


@pytest.fixture(scope="module")
def family_root(tmp_path_factory):
    """The tiny Llama and its SAEs at every site (``test_parallel``'s), under /var/tmp: both
    nodes read them (their /tmp is private)."""
    root = tmp_path_factory.mktemp("parallel")
    return root, make_family_set(root, "llama")


@pytest.fixture(scope="module", params=["tp2", "dp2"])
def layout(request, family_root, tmp_path_factory):
    root, model = family_root
    sae_dirs = {name: root / "saes" / name for name in SITES}
    dep = start_nodes(request.param, model, sae_dirs, tmp_path_factory.mktemp(f"mn-{request.param}"))
    ref = HFReference(model, sae_dirs, SITES)
    DEPLOYED[request.param] = dep
    yield request.param, dep.srv, ref
    stop_nodes(dep)


@pytest.fixture
def deployment(layout) -> Deployment:
    """The processes behind ``layout``."""
    return DEPLOYED[layout[0]]


def _tree_cpu_s(pid: int) -> float:
    root = psutil.Process(pid)
    total = 0.0
    for p in [root, *root.children(recursive=True)]:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.Error:
            pass
    return total


def _load(srv: Server, n: int, max_tokens: int, reads: bool) -> tuple[float, list]:
    """``n`` concurrent greedy streams; (tokens per second, results)."""
    def one(i):
        prompt = [5 + i, 100, 200, 300, 45, 67, 12, 400, 9 + i]
        with srv.client() as c:
            return prompt, c.generate_text(prompt, max_tokens=max_tokens, temperature=0.0,
                                           ignore_eos=True,
                                           reads=[read("resid", top_k=4)] if reads else [])
    t0 = time.monotonic()
    with cf.ThreadPoolExecutor(n) as ex:
        outs = list(ex.map(one, range(n)))
    return sum(len(o.token_ids) for _, o in outs) / (time.monotonic() - t0), outs


def test_both_nodes_hold_ranks_and_reads_cross_the_link_exactly_once(layout, deployment):
    kind, srv, ref = layout
    log0, log1 = srv.log.read_text(), deployment.node1_log.read_text()
    # steerd derived each node's address and gloo interface (nothing set them)
    assert f"VLLM_HOST_IP={NODE0['ip']}" in log0 and f"GLOO_SOCKET_IFNAME={NODE0['iface']}" in log0
    assert f"VLLM_HOST_IP={NODE1['ip']}" in log1 and f"GLOO_SOCKET_IFNAME={NODE1['iface']}" in log1
    held = [ln for ln in log0.splitlines() if " holds rank(s) " in ln]
    assert len(held) == 2, log0[-3000:]
    assert f"node {NODE0['ip']} " in held[0] and f"node {NODE1['ip']} " in held[1], held
    assert held[1].endswith("0/0/1" if kind == "tp2" else "1/0/0"), held
    want = "worker(s) of the engine led from" if kind == "tp2" else "data-parallel engine(s) 1..1"
    assert want in log1, log1[-3000:]
    # under load, every request's reads arrive exactly once, in order, equal to the reference;
    # with DP the engine on node 1 serves part of them and publishes their reads over tcp://
    # node 1's CPU time under the load against the same wall time idle before it (nothing
    # in flight anywhere; right after a load, data-parallel engines still step in vLLM's
    # wave, so the idle baseline comes first, after the previous test's wave has ended). With
    # DP this shows node 1's engine stepping in the waves, which it does whether or not the
    # balancer gave it a request. A step of this tiny model costs a worker well under a
    # millisecond, hence 24 tokens a stream.
    pid1, took = deployment.node1.pid, 1.0
    time.sleep(2.0)
    cpu1 = _tree_cpu_s(pid1)
    time.sleep(took)
    idle1 = _tree_cpu_s(pid1) - cpu1
    cpu1, t0 = _tree_cpu_s(pid1), time.monotonic()
    _, outs = _load(srv, 12, 24, reads=True)
    took, busy1 = time.monotonic() - t0, _tree_cpu_s(pid1) - cpu1
    assert busy1 > idle1 * took + 0.25, (f"node 1 did no work under load: {busy1:.2f} s CPU in "
                                         f"{took:.1f} s, {idle1:.2f} s per idle second")
    NUMBERS[kind]["node1_cpu_s"] = {"load": round(busy1, 2), "idle": round(idle1, 2),
                                    "wall_s": round(took, 1)}
    positions = 0
    for prompt, out in outs:
        full = prompt + out.token_ids
        seen = [f.position for f in out.features]
        assert seen == list(range(len(full) - 1)), seen  # each position once, in order
        dense = ref.latents(full, "resid")
        for f in out.features:
            assert list(f.values) == pytest.approx(dense[f.position].topk(4).values.tolist(), abs=1e-4)
        positions += len(seen)
    dropped = {k: v for k, v in srv.metrics().items() if k.startswith("steerd_reads_dropped_total")}
    assert not any(dropped.values()), dropped
    NUMBERS[kind]["reads_exactly_once"] = f"{positions} positions of {len(outs)} streams, 0 dropped"


def test_throughput_next_to_one_node(layout, family_root, tmp_path_factory):
    kind, srv, _ = layout
    _load(srv, 4, 4, reads=False)  # warm
    multi, _ = _load(srv, 16, 32, reads=False)
    multi_reads, _ = _load(srv, 16, 32, reads=True)
    root, model = family_root
    sae_dirs = {name: root / "saes" / name for name in SITES}
    one = start_server(model, sae_dirs, tmp_path_factory.mktemp(f"one-{kind}"),
                       *(("--tensor-parallel-size", "2") if kind == "tp2" else ("--data-parallel-size", "2")),
                       host=NODE0["ip"])
    try:
        _load(one, 4, 4, reads=False)
        single, _ = _load(one, 16, 32, reads=False)
        single_reads, _ = _load(one, 16, 32, reads=True)
    finally:
        stop_server(one)
    NUMBERS[kind].update(
        one_node_start_s=round(one.started_s, 1), tok_s_two_nodes=round(multi, 1),
        tok_s_one_node=round(single, 1), ratio=round(multi / single, 3),
        tok_s_reads_two_nodes=round(multi_reads, 1), tok_s_reads_one_node=round(single_reads, 1),
        ratio_reads=round(multi_reads / single_reads, 3))


@dataclass
class Stream:
    code: grpc.StatusCode | None = None
    details: str = ""
    messages: int = 0
    first: threading.Event = field(default_factory=threading.Event)
    ended_at: float | None = None


def _stream(srv: Server, s: Stream, i: int) -> None:
    with srv.client(timeout=300) as c:
        try:
            for _ in c.generate([5 + i, 17, 33, 2, 90, 41, 7, 8], max_tokens=200, temperature=0.0,
                                ignore_eos=True, reads=[read("resid", top_k=4)]):
                s.messages += 1
                s.first.set()
            s.code = grpc.StatusCode.OK
        except grpc.RpcError as e:
            s.code, s.details = e.code(), e.details() or ""
        finally:
            s.ended_at = time.monotonic()
            s.first.set()


def test_node_lost_mid_load_ends_streams_unavailable_and_node0_exits_1(layout, deployment):
    """TP: node 1 is SIGKILLed (its rank's sockets close). DP: node 1's link goes down (its
    engine just goes silent). Every stream ends OK or UNAVAILABLE, none hangs; node 0 exits
    1; after the link drop node 1 finds node 0 gone and exits 1 on its own."""
    kind, srv, _ = layout
    streams = [Stream() for _ in range(6)]
    threads = [threading.Thread(target=_stream, args=(srv, s, i), daemon=True)
               for i, s in enumerate(streams)]
    for t in threads:
        t.start()
    assert all(s.first.wait(120) for s in streams)
    deployment.gone = True
    t_cut = time.monotonic()
    if kind == "tp2":
        os.killpg(deployment.node1.pid, signal.SIGKILL)
    else:
        subprocess.run(["ip", "-n", NODE1["ns"], "link", "set", NODE1["iface"], "down"], check=True)
    limit = NODE_TIMEOUT_S + 60
    for t in threads:
        t.join(max(0.0, t_cut + limit - time.monotonic()))
    hung = [s.messages for s in streams if s.ended_at is None]
    assert not hung, f"{len(hung)} stream(s) still open {limit} s after node 1 was lost"
    codes = {s.code for s in streams}
    assert codes <= {grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE}, \
        [(s.code, s.details) for s in streams]
    assert grpc.StatusCode.UNAVAILABLE in codes, "every stream finished: cut earlier or load more"
    try:
        rc = srv.proc.wait(max(1.0, t_cut + limit + 30 - time.monotonic()))
    except subprocess.TimeoutExpired:
        raise AssertionError(f"node 0 still running {limit + 30} s after node 1 was lost:\n"
                             f"{srv.log.read_text()[-3000:]}") from None
    assert rc == 1, srv.log.read_text()[-3000:]
    NUMBERS[kind]["node_lost"] = {
        "how": "SIGKILL" if kind == "tp2" else "link down",
        "streams_ended_s": round(max(s.ended_at for s in streams) - t_cut, 1),
        "node0_exit_s": round(time.monotonic() - t_cut, 1)}
    if kind == "dp2":  # node 1 outlives an unreachable node 0 by --node-timeout-s, no more
        try:
            rc1 = deployment.node1.wait(NODE_TIMEOUT_S + 60)
        except subprocess.TimeoutExpired:
            raise AssertionError("node 1 still running after node 0 became unreachable:\n"
                                 f"{deployment.node1_log.read_text()[-3000:]}") from None
        assert rc1 == 1, deployment.node1_log.read_text()[-3000:]
        NUMBERS[kind]["node_lost"]["node1_exit_s"] = round(time.monotonic() - t_cut, 1)


def teardown_module():
    print("\nmulti-node numbers: " + json.dumps(NUMBERS), file=sys.__stderr__, flush=True)
    out = os.environ.get("MULTINODE_REPORT")
    if out:
        Path(out).write_text(json.dumps(NUMBERS, indent=1) + "\n")
