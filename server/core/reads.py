"""Server side of feature reads: receive worker records, route them by request id.

``ReadRouter.register(rid)`` returns a ``RequestReads`` buffer for one request; records for
unregistered ids (a cancelled request's late steps) are dropped, so memory is bounded by the
requests in flight. Records are de-duplicated by position (a preempted request recomputes
positions it already reported). Positions already sent are forgotten (``forget_below``), so
a buffer holds only reads not yet handed to the client.
"""

from __future__ import annotations

import asyncio
import logging
import os
import tempfile
import uuid
from dataclasses import dataclass, field

import numpy as np
import zmq
import zmq.asyncio

from sae_runtime.step.records import READ_DECODER, ReadRecord

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


class RequestReads:
    """Reads of one request: position -> read index (``ReadRecord.read``) -> PositionRead."""

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


class ReadRouter:
    """Owns the PULL socket; one asyncio task routes records to registered requests."""

    def __init__(self, addr: str | None = None) -> None:
        """Bind ``addr`` (``tcp://HOST:PORT`` with an address of this host that every worker
        can reach, for executors spanning nodes), or a fresh ``ipc://`` socket (one node)."""
        self.addr = addr or (
            f"ipc://{tempfile.gettempdir()}/steerd-reads-{os.getpid()}-{uuid.uuid4().hex[:8]}.sock")
        self._ctx = zmq.asyncio.Context.instance()
        self._sock = self._ctx.socket(zmq.PULL)
        self._sock.setsockopt(zmq.RCVHWM, 0)
        self._sock.bind(self.addr)
        self._requests: dict[str, RequestReads] = {}
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while True:
            try:
                raw = await self._sock.recv(copy=False)
                for rec in READ_DECODER.decode(raw.buffer):
                    buf = self._requests.get(rec.rid)
                    if buf is not None:  # else: a finished/cancelled request's late step
                        buf.add(rec)
            except asyncio.CancelledError:
                raise
            except Exception:  # a malformed record must not stop routing for everyone
                log.exception("dropping a malformed read message")

    def register(self, rid: str) -> RequestReads:
        buf = self._requests[rid] = RequestReads()
        return buf

    def unregister(self, rid: str) -> None:
        self._requests.pop(rid, None)

    @property
    def in_flight(self) -> int:
        return len(self._requests)

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        self._sock.close(linger=0)
        path = self.addr.removeprefix("ipc://")
        if self.addr.startswith("ipc://") and os.path.exists(path):
            os.unlink(path)
