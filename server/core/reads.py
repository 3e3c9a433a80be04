"""Server side of feature reads: receive worker records, route them by request id.

``ReadRouter.register(rid)`` returns a ``RequestReads`` buffer for one request; records for
unregistered ids (a cancelled request's late steps) are dropped, so memory is bounded by the
requests in flight. Records are de-duplicated by position (a preempted request recomputes
positions it already reported). Positions already sent are forgotten (``forget_below``), so
a buffer holds only reads not yet handed to the client.

The socket is the only door into the server that is not gRPC or HTTP, so it fails closed:

- ``ipc://`` (one node): the socket lives in a directory only this user can enter (0700),
  made at start and removed at exit.
- ``tcp://`` (engine nodes elsewhere): ZMQ CURVE with keys made at every start
  (``ReadsKeys``); a ZAP handler admits the one client key the workers were given, so a peer
  without the keys cannot deliver a record (its handshake fails: counted ``unauthenticated``).
- Every message is capped (``max_message_bytes``; libzmq refuses to buffer one over twice
  that, ``zmq.MAXMSGSIZE``, and drops its connection) and every record is checked
  (``check_record``) before it touches a buffer. A bad one is dropped and counted by reason
  (``dropped``, and ``steerd_reads_dropped_total``); the loop goes on with the next.
"""

from __future__ import annotations

import asyncio
import atexit
import ipaddress
import logging
import os
import shutil
import socket
import stat
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from sae_runtime.step.config import DEFAULT_READS_MAX_MESSAGE_BYTES, ReadsKeys
from sae_runtime.step.records import READ_DECODER, ActRecord, ReadRecord

log = logging.getLogger("steerd.reads")


@dataclass
class PositionRead:
    indices: np.ndarray  # [k] int32, value-descending
    values: np.ndarray  # [k] float32
    watch: np.ndarray  # [w] float32


@dataclass
class Pooled:
    total: np.ndarray
    maximum: np.ndarray
    ranges: set[tuple[int, int]] = field(default_factory=set)


def act_key(read: int) -> int:
    """The ``RequestReads.by_pos`` key of activation read ``read``: keys below 0 are raw
    activation rows (``ActRecord.read`` j is ``-1 - j``), the others feature reads."""
    return -1 - read


class RequestReads:
    """Reads of one request: position -> read index (``ReadRecord.read``) -> PositionRead,
    and raw activation rows under ``act_key`` (a float32 ``[d]`` array)."""

    def __init__(self) -> None:
        self.by_pos: dict[int, dict[int, PositionRead]] = {}
        self.pooled: dict[int, Pooled] = {}
        self.changed = asyncio.Event()
        self.floor = 0  # positions below were sent and forgotten; late copies are ignored

    def add(self, rec: ReadRecord) -> None:
        n, k, w, sae = rec.n, rec.k, rec.w, rec.read
        idx = np.frombuffer(rec.idx, dtype=np.int32).reshape(n, k)
        val = np.frombuffer(rec.val, dtype=np.float32).reshape(n, k)
        wv = np.frombuffer(rec.wv, dtype=np.float32).reshape(n, w)
        for j in range(max(self.floor - rec.pos0, 0), n):
            slot = self.by_pos.setdefault(rec.pos0 + j, {})
            slot.setdefault(sae, PositionRead(idx[j], val[j], wv[j]))  # first one wins
        if rec.psum is not None and rec.pmax is not None:
            rng = (rec.pos0, n)
            psum = np.frombuffer(rec.psum, dtype=np.float32)
            pmax = np.frombuffer(rec.pmax, dtype=np.float32)
            p = self.pooled.get(sae)
            if p is None:
                self.pooled[sae] = Pooled(psum.astype(np.float64), pmax.copy(), {rng})
            elif rng not in p.ranges:  # a recomputed chunk is not counted twice
                p.ranges.add(rng)
                p.total += psum
                np.maximum(p.maximum, pmax, out=p.maximum)
        self.changed.set()

    def add_act(self, rec: ActRecord) -> None:
        rows = np.frombuffer(rec.data, dtype="<f4").reshape(rec.n, rec.d)
        key = act_key(rec.read)
        for j in range(max(self.floor - rec.pos0, 0), rec.n):
            self.by_pos.setdefault(rec.pos0 + j, {}).setdefault(key, rows[j])  # first one wins
        self.changed.set()

    def forget_below(self, pos: int) -> None:
        """Drop the reads of positions < ``pos`` (sent); later records for them are ignored."""
        for p in range(self.floor, pos):
            self.by_pos.pop(p, None)
        self.floor = max(self.floor, pos)

    def complete(self, positions: dict[int, set[int]]) -> bool:
        """Every (position, read index) pair in ``positions`` has arrived."""
        return all(saes <= self.by_pos.get(p, {}).keys() for p, saes in positions.items())

    async def wait_for(self, positions: dict[int, set[int]], timeout: float) -> bool:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not self.complete(positions):
            left = deadline - loop.time()
            if left <= 0:
                return False
            self.changed.clear()
            try:
                await asyncio.wait_for(self.changed.wait(), left)
            except TimeoutError:
                return self.complete(positions)
        return True


@dataclass(frozen=True)
class RecordLimits:
    """What a worker's record may hold (the server's own caps; ``check_record``)."""

    d_sae: tuple[int, ...]  # width of each hook (index == ``ReadRecord.sae``)
    max_top_k: int
    max_watch: int
    max_positions: int  # the engine's max_model_len: every position is below it
    max_reads: int = 4096  # a request's read index (``ReadRecord.read``) is below it
    # width of each worker activation site (by ``ActRecord.site``): the declared sites, then
    # their before-edits twins (``DeclaredSites.site_widths``)
    act_widths: tuple[int, ...] = ()
    max_act_reads: int = 0  # a request's activation read index is below it


def min_message_bytes(d_sae: tuple[int, ...], max_top_k: int, max_watch: int) -> int:
    """The smallest message cap that still carries one position of the largest read, pooled
    sums included (the publisher splits records by position, never below one)."""
    return 8 * max_top_k + 4 * max_watch + 8 * max(d_sae, default=0) + 4096


def check_act_record(rec: ActRecord, lim: RecordLimits | None) -> str | None:
    """Why an activation record is malformed (None: well formed): bytes that disagree with
    ``n``/``d``, an unknown site, a width other than the sites', positions out of range."""
    if rec.n < 1 or rec.d < 1 or rec.pos0 < 0 or rec.read < 0 or rec.site < 0:
        return f"negative or empty shape (pos0 {rec.pos0}, n {rec.n}, d {rec.d})"
    if len(rec.data) != 4 * rec.n * rec.d:
        return f"{len(rec.data)} bytes disagree with n {rec.n}, d {rec.d}"
    if lim is None:
        return None
    if rec.site >= len(lim.act_widths) or rec.read >= lim.max_act_reads:
        return f"activation site {rec.site} or read {rec.read} over the server's declared sites"
    if rec.d != lim.act_widths[rec.site]:
        return f"activation width {rec.d}, declared site {rec.site} has {lim.act_widths[rec.site]}"
    if rec.pos0 + rec.n > lim.max_positions:
        return f"positions {rec.pos0}..{rec.pos0 + rec.n - 1} beyond max_model_len {lim.max_positions}"
    return None


def check_record(rec: ReadRecord, lim: RecordLimits | None) -> str | None:
    """Why ``rec`` is malformed (None: it is well formed): byte sizes that disagree with
    ``n``/``k``/``w`` and the SAE's width, an unknown SAE, positions out of range, feature
    indices outside the SAE. Without limits (tools that route without an engine) only the
    shapes are checked."""
    n, k, w = rec.n, rec.k, rec.w
    if n < 1 or k < 0 or w < 0 or rec.pos0 < 0 or rec.read < 0 or rec.sae < 0:
        return f"negative or empty shape (pos0 {rec.pos0}, n {n}, k {k}, w {w})"
    if len(rec.idx) != 4 * n * k or len(rec.val) != 4 * n * k or len(rec.wv) != 4 * n * w:
        return f"byte sizes {len(rec.idx)}/{len(rec.val)}/{len(rec.wv)} disagree with n {n}, k {k}, w {w}"
    if (rec.psum is None) != (rec.pmax is None) or (rec.psum is not None and len(rec.psum) != len(rec.pmax)):
        return "pooled sum and max disagree"
    if lim is None:
        return None
    if rec.sae >= len(lim.d_sae):
        return f"SAE {rec.sae} does not exist ({len(lim.d_sae)} hooks)"
    d = lim.d_sae[rec.sae]
    if k > min(lim.max_top_k, d) or w > lim.max_watch or rec.read >= lim.max_reads:
        return f"k {k}, w {w} or read {rec.read} over the server's caps"
    if rec.pos0 + n > lim.max_positions:
        return f"positions {rec.pos0}..{rec.pos0 + n - 1} beyond max_model_len {lim.max_positions}"
    if rec.psum is not None and len(rec.psum) != 4 * d:
        return f"pooled reads of {len(rec.psum) // 4} features, SAE {rec.sae} has {d}"
    if k:
        idx = np.frombuffer(rec.idx, dtype=np.int32)
        if int(idx.min()) < 0 or int(idx.max()) >= d:
            return f"feature index outside SAE {rec.sae} (width {d})"
    return None


def _private_ipc(addr: str | None) -> tuple[str, Path | None]:
    """The ``ipc://`` address to bind and the directory to remove at exit (None: keep it).

    Default: a fresh 0700 directory. A given path's directory must be private to this user
    (it is made 0700 when missing); any other user could connect to the socket otherwise."""
    if addr is None:
        d = Path(tempfile.mkdtemp(prefix="steerd-reads-"))  # mkdtemp: mode 0700
        atexit.register(shutil.rmtree, d, True)  # also when close() is never reached
        return f"ipc://{d}/reads.sock", d
    path = Path(addr.removeprefix("ipc://"))
    d = path.parent
    made = None
    if not d.exists():
        d.mkdir(mode=0o700, parents=True)
        made = d
        atexit.register(shutil.rmtree, d, True)
    st = d.stat()
    if st.st_uid != os.getuid() or st.st_mode & 0o077:
        raise ValueError(
            f"--reads-address {addr}: directory {d} is open to other users (mode "
            f"{stat.S_IMODE(st.st_mode):04o}, owner uid {st.st_uid}); give a path in a "
            "directory only this user can enter (0700), or leave it unset")
    return addr, made


def _bindable(addr: str) -> str:
    """``addr`` with a host name resolved to its address (ZMQ binds addresses, not names):
    every node can then be given the same ``tcp://NODE0_NAME:PORT``, e.g. a Kubernetes
    leader's DNS name, which node 0 resolves to its own address."""
    if not addr.startswith("tcp://"):
        return addr
    host, _, port = addr.removeprefix("tcp://").rpartition(":")
    if host in ("*", "") or host.startswith("["):
        return addr
    try:
        ipaddress.ip_address(host)
        return addr
    except ValueError:
        ip = socket.getaddrinfo(host, int(port), socket.AF_INET, socket.SOCK_STREAM)[0][4][0]
        return f"tcp://{ip}:{port}"


class ReadRouter:
    """Owns the PULL socket; one asyncio task routes records to registered requests."""

    ZAP_DOMAIN = "steerd-reads"

    def __init__(self, addr: str | None = None, *,
                 max_message_bytes: int = DEFAULT_READS_MAX_MESSAGE_BYTES,
                 limits: RecordLimits | None = None, dropped_metric: Any = None) -> None:
        """Bind ``addr``: ``tcp://HOST:PORT`` (an address of this host every worker can
        reach; port 0 picks one), ``ipc://PATH``, or None for a fresh private ``ipc://``
        socket. ``dropped_metric``: a Prometheus counter labelled by reason, counted with
        ``dropped``."""
        self.max_message_bytes = max_message_bytes
        self.limits = limits
        self.dropped: Counter[str] = Counter()
        self._dropped_metric = dropped_metric
        self.keys: ReadsKeys | None = None
        self._dir: Path | None = None
        self._auth = None
        self._monitor: zmq.asyncio.Socket | None = None
        self._tasks: list[asyncio.Task] = []
        if addr is not None and addr.startswith("tcp://") and not zmq.has("curve"):
            raise ValueError(
                f"--reads-address {addr}: this pyzmq's libzmq has no CURVE support "
                "(zmq.has('curve') is False), and a tcp:// reads channel must authenticate its "
                "peers; install pyzmq's own wheels (they bundle libsodium)")
        if addr is None or addr.startswith("ipc://"):
            addr, self._dir = _private_ipc(addr)
        self._ctx = zmq.asyncio.Context()
        self._sock = self._ctx.socket(zmq.PULL)
        self._sock.setsockopt(zmq.RCVHWM, 0)
        self._sock.setsockopt(zmq.LINGER, 0)
        # libzmq drops (with its connection) a message over twice the cap before buffering it;
        # one between the cap and that is read and dropped here, counted "oversized"
        self._sock.setsockopt(zmq.MAXMSGSIZE, 2 * max_message_bytes)
        if addr.startswith("tcp://"):
            self._secure()
        self._sock.bind(_bindable(addr))
        self.addr = self._sock.getsockopt_string(zmq.LAST_ENDPOINT) if addr.startswith("tcp://") else addr
        self._requests: dict[str, RequestReads] = {}

    def _secure(self) -> None:
        """CURVE server with fresh keys; a ZAP handler (its own thread, so it answers while
        the event loop is busy) admits only the client key handed to the workers."""
        from zmq.auth.thread import ThreadAuthenticator

        server_public, server_secret = zmq.curve_keypair()
        client_public, client_secret = zmq.curve_keypair()
        self.keys = ReadsKeys(server_public.decode(), client_public.decode(), client_secret.decode())
        self._auth = ThreadAuthenticator(zmq.Context.shadow(self._ctx.underlying), log=log)
        self._auth.start()

        class OnlyOurWorkers:
            def callback(self, domain: str, key: bytes) -> bool:
                return key == client_public

        self._auth.configure_curve_callback(self.ZAP_DOMAIN, OnlyOurWorkers())
        self._sock.curve_server = True
        self._sock.curve_secretkey = server_secret
        self._sock.curve_publickey = server_public
        self._sock.zap_domain = self.ZAP_DOMAIN.encode()
        self._monitor = self._sock.get_monitor_socket(
            zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
            | zmq.EVENT_HANDSHAKE_FAILED_AUTH)

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._run())]
        if self._monitor is not None:
            self._tasks.append(loop.create_task(self._watch_handshakes()))

    def _drop(self, reason: str, detail: str = "") -> None:
        self.dropped[reason] += 1
        if self._dropped_metric is not None:
            self._dropped_metric.labels(reason).inc()
        n = self.dropped[reason]
        if n & (n - 1) == 0:  # the 1st, 2nd, 4th, 8th, ... of each reason
            log.warning("reads channel: dropped %s (%d so far)%s", reason, n,
                        f": {detail}" if detail else "")

    async def _run(self) -> None:
        while True:
            try:
                raw = await self._sock.recv(copy=False)
            except asyncio.CancelledError:
                raise
            except zmq.Again:  # a wake-up with nothing to read
                continue
            except zmq.ZMQError as e:  # the socket's own trouble, not a peer's message
                log.warning("reads channel: receive failed: %s", e)
                await asyncio.sleep(0.1)
                continue
            try:
                self.route(raw.buffer)
            except Exception as e:  # nothing a peer sends may stop routing for everyone
                self._drop("malformed", repr(e))

    def route(self, buf) -> None:
        """Check and route one message (a msgpack list of ``ReadRecord`` / ``ActRecord``)."""
        if len(buf) > self.max_message_bytes:
            self._drop("oversized", f"{len(buf)} bytes > {self.max_message_bytes}")
            return
        try:
            records = READ_DECODER.decode(buf)
        except msgspec.DecodeError as e:
            self._drop("malformed", str(e))
            return
        for rec in records:
            reads = self._requests.get(rec.rid)
            if reads is None:  # a finished/cancelled request's late step, or a made-up id
                self._drop("unknown_request")
                continue
            act = isinstance(rec, ActRecord)
            why = check_act_record(rec, self.limits) if act else check_record(rec, self.limits)
            if why is not None:
                self._drop("malformed", why)
                continue
            if act:
                reads.add_act(rec)
            else:
                reads.add(rec)

    async def _watch_handshakes(self) -> None:
        """Count peers refused at the handshake (no keys, wrong keys, not ZMTP at all)."""
        while True:
            try:
                parse_monitor_message(await self._monitor.recv_multipart())
                self._drop("unauthenticated", "a peer failed the CURVE handshake")
            except asyncio.CancelledError:
                raise
            except Exception:  # a monitor message we cannot parse is not a peer's doing
                log.exception("reads channel: bad monitor event")

    def register(self, rid: str) -> RequestReads:
        buf = self._requests[rid] = RequestReads()
        return buf

    def unregister(self, rid: str) -> None:
        self._requests.pop(rid, None)

    @property
    def in_flight(self) -> int:
        return len(self._requests)

    def close(self) -> None:
        """Stop routing, close the socket, remove the private directory (idempotent)."""
        for t in self._tasks:
            t.cancel()
        self._tasks = []
        if self._auth is not None:
            self._auth.stop()
            self._auth = None
        if not self._ctx.closed:
            self._ctx.destroy(linger=0)
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None
        elif self.addr.startswith("ipc://"):
            Path(self.addr.removeprefix("ipc://")).unlink(missing_ok=True)
