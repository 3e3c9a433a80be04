"""Worker -> server transport for feature reads (ZMQ PUSH/PULL over an IPC socket).

One message per engine step that has reads: a msgpack list of ``payloads.ReadRecord`` (the
schema both ends import; ``server/core/reads.py`` decodes it). PUSH/PULL is ordered and
loss-free; the send blocks when the server falls ``SNDHWM`` messages behind (backpressure instead of loss or unbounded memory).
"""

from __future__ import annotations

import zmq

from sae_runtime.step.records import READ_ENCODER, ReadRecord

SNDHWM = 1024


class ReadPublisher:
    def __init__(self, addr: str) -> None:
        self.addr = addr
        self._sock: zmq.Socket | None = None

    def send(self, records: list[ReadRecord]) -> None:
        if self._sock is None:
            self._sock = zmq.Context.instance().socket(zmq.PUSH)
            self._sock.setsockopt(zmq.SNDHWM, SNDHWM)
            self._sock.setsockopt(zmq.LINGER, 1000)
            self._sock.connect(self.addr)
        self._sock.send(READ_ENCODER.encode(records), copy=False)
