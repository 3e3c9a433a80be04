"""Worker -> server transport for feature reads (ZMQ PUSH/PULL over an IPC socket).

One message per engine step that has reads: a msgpack list of records
``{"rid", "sae", "pos0", "n", "k", "idx", "val", "w", "wv"[, "psum", "pmax"]}`` where the
byte fields are little-endian int32/float32 arrays (``[n, k]``, ``[n, k]``, ``[n, w]``,
``[d_sae]``). PUSH/PULL is ordered and loss-free; the send blocks when the server falls
``SNDHWM`` messages behind (backpressure instead of loss or unbounded memory).
"""

from __future__ import annotations

import msgspec
import zmq

SNDHWM = 1024


class ReadPublisher:
    def __init__(self, addr: str) -> None:
        self.addr = addr
        self._sock: zmq.Socket | None = None
        self._enc = msgspec.msgpack.Encoder()

    def send(self, records: list[dict]) -> None:
        if self._sock is None:
            self._sock = zmq.Context.instance().socket(zmq.PUSH)
            self._sock.setsockopt(zmq.SNDHWM, SNDHWM)
            self._sock.setsockopt(zmq.LINGER, 1000)
            self._sock.connect(self.addr)
        self._sock.send(self._enc.encode(records), copy=False)
