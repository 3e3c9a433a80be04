"""Engines that span nodes, on vLLM's own ``mp`` executor (no Ray).

Two layouts, with vLLM's option names and meanings:

- **Tensor/pipeline parallel across nodes** (``--nnodes N --node-rank R --master-addr
  --master-port``): node 0 runs ``steerd serve`` (the API, the engine core and its local
  ranks); every other node runs ``steerd node`` with the same flags and its own
  ``--node-rank``: headless workers (vLLM's ``MultiprocExecutor`` follower) that join the
  engine's torch.distributed group.
- **Data parallel across nodes** (``--data-parallel-size D --data-parallel-size-local d
  --data-parallel-address --data-parallel-rpc-port``): node 0 runs ``steerd serve`` with
  its ``d`` engines and the load balancer; other nodes run ``steerd node`` with the same
  flags and ``--data-parallel-start-rank``: whole engines (vLLM's ``CoreEngineProcManager``)
  that handshake with node 0's front end over ``tcp://``.

``steerd node`` builds its engine from the same server-side functions as ``steerd serve``
(``server.app.engine_settings``: the SAE list, vectors, budgets, worker extension), so a
node given the same flags cannot drift; vLLM itself never compares the nodes' configs, so
the API node's startup check does (``startup.check_same_config``) and refuses a node that
differs, naming it.

What vLLM leaves to us: the reads channel (``--reads-address tcp://``, CURVE keys handed to
every worker over vLLM's control channel at startup: ``hand_over_keys``), the per-node
environment (``network_env_defaults``, ``local_ranks`` for the CPU binding), and liveness:
vLLM's engine nodes wait on node 0 forever, and node 0 never notices a remote engine that
went silent. Here the API node pings every engine core (``watch_engines``) and fails the
engine when one stays silent for ``--node-timeout-s``; every worker holds a heartbeat
connection to the API node's read socket and exits when it has been unreachable that long
(``sae_runtime.vllm.side_channel.ReadPublisher``), which ends its ``steerd node``.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import socket
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from sae_runtime.step.config import ReadsKeys
    from server.config import ServerConfig

log = logging.getLogger("steerd.nodes")

HOST_IP_ENV = "VLLM_HOST_IP"  # the address vLLM advertises for its sockets on this node
GLOO_IFNAME_ENV = "GLOO_SOCKET_IFNAME"  # the interface torch's gloo binds


def spans_nodes(cfg: ServerConfig) -> bool:
    """Whether this engine has ranks or engines on other nodes."""
    dpl = cfg.data_parallel_size_local
    return (cfg.nnodes > 1 or (dpl is not None and dpl < cfg.data_parallel_size)
            or bool(cfg.data_parallel_start_rank))


def local_ranks(cfg: ServerConfig) -> int:
    """The worker processes vLLM starts on this node: its share of tensor x pipeline ranks
    times its data-parallel engines (vLLM's ``local_world_size * data_parallel_size_local``,
    ``config/parallel.py`` and ``engine/arg_utils.py``). vLLM's CPU binding wants exactly
    one CPU set per local rank."""
    within_dp = cfg.tensor_parallel_size * cfg.pipeline_parallel_size
    dp, dpl = cfg.data_parallel_size, cfg.data_parallel_size_local
    if cfg.nnodes == 1:
        return within_dp * (dp if dpl is None else dpl)
    if dpl is None:  # vLLM infers it from the node's share of the world
        dpl = max(dp * within_dp // cfg.nnodes // within_dp, 1)
    nnodes_within_dp = max(cfg.nnodes // (dp // max(dpl, 1)), 1)
    return within_dp // nnodes_within_dp * dpl


def node0_address(cfg: ServerConfig) -> str:
    """Node 0's address as the engine nodes reach it: the torch.distributed master for
    tensor/pipeline parallel, the data-parallel address for data parallel."""
    if cfg.nnodes > 1:
        return cfg.master_addr
    return cfg.data_parallel_address or cfg.master_addr


def _loopback(host: str) -> bool:
    """A loopback or unspecified address: no other node reaches it."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return host == "localhost"
    return ip.is_loopback or ip.is_unspecified


def check_layout(cfg: ServerConfig, role: Literal["serve", "node"], has_saes: bool) -> None:
    """Refuse, before anything starts, a multi-node layout that cannot work (``ValueError``
    naming the option)."""
    spans = spans_nodes(cfg)
    if spans and cfg.distributed_executor_backend == "ray":
        raise ValueError("--nnodes / --data-parallel-size-local run engines across nodes on "
                         "vLLM's mp executor; --distributed-executor-backend ray spans nodes "
                         "its own way (a Ray cluster): use one or the other")
    if role == "serve":
        if cfg.node_rank != 0 or cfg.data_parallel_start_rank:
            raise ValueError("steerd serve runs node 0 (the API node): --node-rank 0 and no "
                             "--data-parallel-start-rank; start the other nodes with steerd node")
    elif not ((cfg.nnodes > 1 and cfg.node_rank > 0) or cfg.data_parallel_start_rank):
        raise ValueError("steerd node runs another node's share of an engine led by steerd "
                         "serve on node 0: give --nnodes N with --node-rank R >= 1 (tensor/"
                         "pipeline parallel), or --data-parallel-size-local with "
                         "--data-parallel-start-rank >= 1 (data parallel)")
    if role == "node" and cfg.data_parallel_start_rank and not cfg.data_parallel_size_local:
        raise ValueError("steerd node --data-parallel-start-rank: give "
                         "--data-parallel-size-local (the engines this node runs, >= 1)")
    if not spans:
        return
    addr = node0_address(cfg)
    if _loopback(addr):
        what = "--master-addr" if cfg.nnodes > 1 else "--data-parallel-address"
        raise ValueError(f"{what} {addr}: the other nodes cannot reach a loopback address; "
                         "give node 0's address on the network the nodes share")
    if has_saes:
        ra = cfg.reads_address or ""
        host, _, port = ra.removeprefix("tcp://").rpartition(":")
        if not ra.startswith("tcp://") or port in ("", "0", "*") or _loopback(host.strip("[]")):
            raise ValueError(
                f"--reads-address {cfg.reads_address}: workers on other nodes push feature "
                "reads to node 0; give tcp://NODE0_ADDRESS:PORT (an address of node 0 the "
                "nodes reach, a fixed port), the same on every node")


def check_pp_eager(cfg: ServerConfig, on_cpu: bool) -> None:
    """Refuse ``--enforce-eager`` with pipeline parallel on CPU: vLLM 0.32's CPU worker skips
    its warm-up when eager with a fixed KV cache size (``VLLM_CPU_KVCACHE_SPACE``, which
    steerd always sets), so a later stage never allocates its intermediate-tensor buffer and
    the first step kills the engine (``AssertionError`` in
    ``gpu_model_runner.sync_and_gather_intermediate_tensors``). Compiled PP works."""
    if on_cpu and cfg.pipeline_parallel_size > 1 and cfg.enforce_eager:
        raise ValueError(
            "--enforce-eager with --pipeline-parallel-size > 1 on CPU: vLLM 0.32's CPU worker "
            "skips its warm-up when eager with a fixed KV cache size, so stage 1 has no "
            "intermediate-tensor buffer and the first step fails (AssertionError in "
            "gpu_model_runner.sync_and_gather_intermediate_tensors; a vLLM bug); run "
            "compiled (drop --enforce-eager)")


def route_source(peer: str) -> str:
    """This host's address on the route to ``peer`` (a UDP ``connect`` sends nothing; the
    kernel picks the source). On node 0, where ``peer`` is its own address, that address."""
    family = socket.AF_INET6 if ":" in peer else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        s.connect((peer, 9))
        return s.getsockname()[0]


def interface_of(ip: str) -> str | None:
    """The network interface that holds ``ip``."""
    import psutil

    for name, addrs in psutil.net_if_addrs().items():
        if any(a.address.split("%")[0] == ip for a in addrs):
            return name
    return None


def network_env_defaults(cfg: ServerConfig, env: dict[str, str] | None = None) -> list[str]:
    """Across nodes, set what vLLM and torch need on every node and the user left unset;
    returns one line each.

    - ``VLLM_HOST_IP``: the address vLLM advertises for the sockets the other nodes connect
      to. Unset, vLLM guesses from the route to 8.8.8.8 (on a host without a default route:
      ``0.0.0.0``, which points the other node at itself). Default: this node's address on
      the route to node 0 (node 0's own address on node 0).
    - ``GLOO_SOCKET_IFNAME``: the interface gloo binds (CPU collectives, and every
      torch.distributed group's setup). Unset, gloo uses the host name's address, often
      127.0.0.1, and the other node's connection is refused. Default: the interface holding
      ``VLLM_HOST_IP``.
    """
    env = os.environ if env is None else env
    if not spans_nodes(cfg):
        return []
    lines = []
    peer = node0_address(cfg)
    if not env.get(HOST_IP_ENV):
        try:
            ip = route_source(peer)
        except OSError as e:
            raise ValueError(f"no route from this node to node 0 at {peer} ({e}); set "
                             f"{HOST_IP_ENV} and {GLOO_IFNAME_ENV} yourself") from None
        env[HOST_IP_ENV] = ip
        lines.append(f"{HOST_IP_ENV}={ip} (this node's address on the route to node 0 at "
                     f"{peer}; set it to override)")
    if not env.get(GLOO_IFNAME_ENV):
        iface = interface_of(env[HOST_IP_ENV])
        if iface is None:
            raise ValueError(f"{HOST_IP_ENV}={env[HOST_IP_ENV]} is on no interface of this "
                             f"node; set {HOST_IP_ENV} and {GLOO_IFNAME_ENV} yourself")
        env[GLOO_IFNAME_ENV] = iface
        lines.append(f"{GLOO_IFNAME_ENV}={iface} (the interface holding {env[HOST_IP_ENV]}; "
                     "set it to override)")
    return lines


async def hand_over_keys(engine: Any, keys: ReadsKeys) -> int:
    """Give every worker on every node the ``tcp://`` reads channel's CURVE keys, through
    vLLM's own control channel (``collective_rpc``): an engine node built its config
    without them. Returns how many workers hold a channel."""
    import msgspec

    from sae_runtime.vllm.engine import reads_keys_to_every_worker

    got = await reads_keys_to_every_worker(engine, msgspec.to_builtins(keys))
    return sum(bool(g) for g in got)


async def watch_engines(engine: Any, dead: asyncio.Event, timeout_s: float) -> None:
    """Ping every engine core; when one has not answered for ``timeout_s`` (its node died,
    its link dropped, or a rank it waits on is gone), fail the engine: every stream in
    flight ends UNAVAILABLE and steerd exits 1 instead of waiting forever."""
    from sae_runtime.vllm.engine import engine_pings, fail_engine

    period = min(5.0, timeout_s / 4)
    while not dead.is_set():
        tasks = [asyncio.ensure_future(p) for p in engine_pings(engine)]
        _, pending = await asyncio.wait(tasks, timeout=timeout_s)
        if pending:
            silent = [i for i, t in enumerate(tasks) if t in pending]
            for t in pending:
                t.cancel()
            log.error("engine core(s) %s did not answer for %.0fs (a node died or its link "
                      "dropped); failing the engine", silent, timeout_s)
            fail_engine(engine)
            dead.set()
            return
        for t in tasks:
            if t.exception() is not None:  # the engine died: the regular watcher sees it
                return
        await asyncio.sleep(period)
