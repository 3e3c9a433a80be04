"""What a worker sends back: ``ReadRecord``, one request's reads of one SAE over consecutive
positions in one step, worker -> server over the ZMQ side channel (a msgpack list of records
per step)."""

from __future__ import annotations

import msgspec


class ReadRecord(msgspec.Struct, frozen=True, omit_defaults=True):
    """Reads of ``n`` consecutive positions from ``pos0`` of one request's read ``read``
    (its index in ``RequestPayload.reads``; a request may read one SAE twice, e.g. its own
    read and a guardrail's), at SAE ``sae``.

    Byte fields are little-endian arrays: ``idx`` int32 ``[n, k]`` and ``val`` float32
    ``[n, k]`` (top-k, value-descending), ``wv`` float32 ``[n, w]`` (the watch list, in
    request order), and for pooled reads ``psum`` / ``pmax`` float32 ``[d_sae]``.
    """

    rid: str
    read: int
    sae: int
    pos0: int
    n: int
    k: int
    idx: bytes
    val: bytes
    w: int
    wv: bytes
    psum: bytes | None = None
    pmax: bytes | None = None


READ_ENCODER = msgspec.msgpack.Encoder()
READ_DECODER = msgspec.msgpack.Decoder(list[ReadRecord])
