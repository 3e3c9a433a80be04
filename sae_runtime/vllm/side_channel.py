"""Worker -> server transport for feature reads (ZMQ PUSH/PULL).

One step's reads are a msgpack list of ``ReadRecord`` and ``ActRecord`` (the schema both ends import;
``server/core/reads.py`` decodes it). PUSH/PULL is ordered and loss-free; the send blocks when
the server falls ``SNDHWM`` messages behind (backpressure instead of loss or unbounded
memory).

The channel is ``ipc://`` on one node (a socket in a private directory the server made) or
``tcp://`` when workers run on other nodes. A ``tcp://`` channel is ZMQ CURVE: the worker
knows the server's public key and holds the one client keypair the server admits
(``ReadsKeys``), so a peer without them cannot deliver a record, and reads are encrypted in
transit. No message exceeds ``max_message_bytes`` (the server drops larger ones): ``pack``
splits a step's records over several messages, and a record too large for one message by
positions.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
import time
from collections.abc import Callable

import msgspec
import zmq
from zmq.utils.monitor import parse_monitor_message

from sae_runtime.step.config import DEFAULT_READS_MAX_MESSAGE_BYTES, ReadsKeys
from sae_runtime.step.records import READ_ENCODER, ActRecord, Record

log = logging.getLogger("sae_runtime.side_channel")

SNDHWM = 1024
_ARRAY_HEADER = 5  # the longest msgpack array header (array 32)
_RECORD_SLACK = 64  # msgpack bin headers of a record's byte fields, at most 5 bytes each


def _array_header(n: int) -> bytes:
    if n < 16:
        return bytes([0x90 | n])
    if n < 1 << 16:
        return b"\xdc" + n.to_bytes(2, "big")
    return b"\xdd" + n.to_bytes(4, "big")


def _split(rec: Record, size: int, cap: int) -> list[Record]:
    """``rec`` (encoded ``size`` bytes) as records of consecutive positions that fit ``cap``;
    a pooled read record's sum and max ride on its first piece. [] if one position cannot
    fit (logged: the record is dropped, the step's other records still go)."""
    act = isinstance(rec, ActRecord)
    per_pos = 4 * rec.d if act else 4 * (2 * rec.k + rec.w)  # bytes one position adds
    fixed = size - rec.n * per_pos + _RECORD_SLACK
    m = (cap - _ARRAY_HEADER - fixed) // per_pos if per_pos else rec.n
    if m < 1:
        log.error("%s record of request %s needs %d bytes for one position, over the "
                  "%d-byte message cap; dropped", "an activation" if act else "a read",
                  rec.rid, fixed + per_pos, cap)
        return []
    out = []
    for j in range(0, rec.n, m):
        n = min(m, rec.n - j)
        if act:
            out.append(msgspec.structs.replace(
                rec, pos0=rec.pos0 + j, n=n, data=rec.data[per_pos * j: per_pos * (j + n)]))
            continue
        ik, iw = slice(4 * rec.k * j, 4 * rec.k * (j + n)), slice(4 * rec.w * j, 4 * rec.w * (j + n))
        out.append(msgspec.structs.replace(
            rec, pos0=rec.pos0 + j, n=n, idx=rec.idx[ik], val=rec.val[ik], wv=rec.wv[iw],
            psum=None if j else rec.psum, pmax=None if j else rec.pmax))
    return out


def pack(records: list[Record], cap: int = DEFAULT_READS_MAX_MESSAGE_BYTES) -> list[bytes]:
    """``records`` as msgpack lists of at most ``cap`` bytes each, in order (what
    ``READ_DECODER`` reads back); a record over the cap is split by positions (``_split``)."""
    msgs: list[bytes] = []
    batch: list[bytes] = []
    size = _ARRAY_HEADER

    def flush() -> None:
        nonlocal batch, size
        if batch:
            msgs.append(_array_header(len(batch)) + b"".join(batch))
        batch, size = [], _ARRAY_HEADER

    for rec in records:
        enc = READ_ENCODER.encode(rec)
        pieces = ([enc] if len(enc) + _ARRAY_HEADER <= cap else
                  [READ_ENCODER.encode(p) for p in _split(rec, len(enc), cap)])
        for p in pieces:
            if size + len(p) > cap:
                flush()
            batch.append(p)
            size += len(p)
    flush()
    return msgs


class ReadPublisher:
    """This worker's PUSH socket to the server's read socket.

    On ``tcp://`` it needs the channel's keys (from the engine config, or handed over later
    with ``set_keys``); until then it sends nothing (there are no requests before the
    server has handed them over). With ``on_lost`` it connects at once and watches the
    connection (ZMTP heartbeats): when the server has been unreachable for ``lost_after_s``
    after having been reached, it calls ``on_lost`` once (a node whose API node is gone
    cannot serve).
    """

    def __init__(self, addr: str, keys: ReadsKeys | None = None,
                 max_message_bytes: int = DEFAULT_READS_MAX_MESSAGE_BYTES,
                 on_lost: Callable[[], None] | None = None, lost_after_s: float = 30.0) -> None:
        self.addr = addr
        self.keys = keys
        self.max_message_bytes = max_message_bytes
        self.on_lost = on_lost
        self.lost_after_s = lost_after_s
        self._sock: zmq.Socket | None = None
        self._lock = threading.Lock()
        # its own context, destroyed at exit: a socket left open (or its monitor) would
        # block the context's termination, and with it the worker's exit
        self._ctx = zmq.Context()
        atexit.register(self.close)
        if keys is not None and on_lost is not None:
            self._connect()

    @property
    def needs_keys(self) -> bool:
        return self.addr.startswith("tcp://")

    def set_keys(self, keys: ReadsKeys) -> None:
        """Take the channel's keys (once; the same keys again are a no-op)."""
        with self._lock:
            if self.keys == keys and self._sock is not None:
                return
            if self._sock is not None:
                self._sock.disable_monitor()
                self._sock.close(linger=0)
                self._sock = None
            self.keys = keys
        if self.on_lost is not None:
            self._connect()

    def _connect(self) -> zmq.Socket:
        with self._lock:
            if self._sock is not None:
                return self._sock
            sock = self._ctx.socket(zmq.PUSH)
            sock.setsockopt(zmq.SNDHWM, SNDHWM)
            sock.setsockopt(zmq.LINGER, 1000)
            if self.needs_keys:
                assert self.keys is not None  # callers check needs_keys first
                sock.curve_serverkey = self.keys.server_public.encode()
                sock.curve_publickey = self.keys.client_public.encode()
                sock.curve_secretkey = self.keys.client_secret.encode()
            if self.on_lost is not None:
                sock.setsockopt(zmq.HEARTBEAT_IVL, 1000)
                sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, int(1000 * min(self.lost_after_s, 10.0)))
                threading.Thread(target=self._watch, args=(sock.get_monitor_socket(),),
                                 daemon=True, name="sae-reads-watch").start()
            sock.connect(self.addr)
            self._sock = sock
            return sock

    def _watch(self, mon: zmq.Socket) -> None:
        """Call ``on_lost`` once the server was reached and then stayed unreachable for
        ``lost_after_s`` (reconnects within that time are fine)."""
        up, down_since = False, None
        while True:
            timeout = 1000 if down_since is not None else None
            try:
                ev = (parse_monitor_message(mon.recv_multipart())["event"]
                      if mon.poll(timeout) else None)
            except zmq.ZMQError:  # the socket or its context was closed
                return
            if ev is not None:
                if ev == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                    up, down_since = True, None
                elif ev == zmq.EVENT_DISCONNECTED and up and down_since is None:
                    down_since = time.monotonic()
                    log.warning("lost the connection to the server's read socket %s", self.addr)
                elif ev == zmq.EVENT_MONITOR_STOPPED:
                    return
            if down_since is not None and time.monotonic() - down_since > self.lost_after_s:
                log.error("the server's read socket %s has been unreachable for %.0fs: the API "
                          "node is gone", self.addr, self.lost_after_s)
                self.on_lost()
                return

    def send(self, records: list[Record]) -> None:
        """Push one step's records (as several messages when they exceed the cap). Never
        raises: this runs inside the model's forward, where an exception kills the engine."""
        if self.needs_keys and self.keys is None:
            log.error("reads of %d record(s) dropped: the tcp:// reads channel has no keys yet",
                      len(records))
            return
        try:
            sock = self._connect()
            for msg in pack(records, self.max_message_bytes):
                sock.send(msg, copy=False)
        except zmq.ZMQError as e:
            log.error("reads of %d record(s) not sent: %s", len(records), e)

    def close(self) -> None:
        """Close the socket and its monitor at once (reads not yet sent are dropped)."""
        with self._lock:
            self._sock = None
            if not self._ctx.closed:
                self._ctx.destroy(linger=0)


def pid_exit(code: int = 1) -> Callable[[], None]:
    """An ``on_lost`` that ends this process at once (``os._exit``): the engine node's own
    monitors then see a worker die and stop the node."""
    def stop() -> None:
        logging.shutdown()
        os._exit(code)
    return stop
