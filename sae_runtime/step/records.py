"""What a worker sends back, worker -> server over the ZMQ side channel (a msgpack list of
records per step): ``ReadRecord``, one request's reads of one SAE over consecutive positions
in one step, and ``ActRecord``, one request's raw activations at one declared site."""

from __future__ import annotations

import msgspec


class ReadRecord(msgspec.Struct, frozen=True, omit_defaults=True, tag="r"):
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


class ActRecord(msgspec.Struct, frozen=True, tag="a"):
    """Raw activations of ``n`` consecutive positions from ``pos0`` of one request's
    activation read ``read`` (its index in ``RequestPayload.acts``) at declared site
    ``site``: ``data`` is little-endian float32 ``[n, d]``, row-major."""

    rid: str
    read: int
    site: int
    pos0: int
    n: int
    d: int
    data: bytes


Record = ReadRecord | ActRecord
"""One entry of a step's message (tagged: ``type`` is "r" or "a")."""

READ_ENCODER = msgspec.msgpack.Encoder()
READ_DECODER = msgspec.msgpack.Decoder(list[Record])
