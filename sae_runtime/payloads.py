"""The three messages that cross a process boundary, each defined once (``msgspec.Struct``).

- ``RequestPayload``: one request's edits and reads, server -> worker, in
  ``SamplingParams.extra_args[EXTRA_ARGS_KEY]`` as msgpack bytes (``encode_request`` /
  ``decode_request``; vLLM serialises ``extra_args`` itself, and bytes are msgpack-able).
  SAEs are named by their *index* in the server's SAE list (== the worker's hook id).
- ``WorkerConfig``: the SAE list and table budgets, server -> every worker, once, in
  ``VllmConfig.additional_config[CONFIG_KEY]`` as plain builtins (``to_builtins`` /
  ``worker_config``; vLLM hashes ``additional_config`` as JSON).
- ``ReadRecord``: one request's reads of one SAE over consecutive positions in one step,
  worker -> server over the ZMQ side channel (a msgpack list of records per step).

Both ends import these classes; nothing else describes the layouts.
"""

from __future__ import annotations

from collections.abc import Mapping

import msgspec

from sae_runtime.selectors import Selector

EXTRA_ARGS_KEY = "sae_steering"  # key in SamplingParams.extra_args
CONFIG_KEY = "sae_steering"  # key in VllmConfig.additional_config


# --------------------------------------------------------------------------- request


class CondPayload(msgspec.Struct, array_like=True, frozen=True):
    """An edit's condition: feature of the edit's SAE, ``edits.Cond``, threshold, latch."""

    feature: int
    op: int
    threshold: float
    latch: bool = False


class EditPayload(msgspec.Struct, array_like=True, frozen=True):
    """One intervention: ``sae`` index, feature, ``ops.Mode``, value, position selector,
    and an optional condition.

    The worker turns it into edit rows (``sae_runtime.edits``), one per window of the
    selector, once it knows the request's prompt length (``planner.compile_request``)."""

    sae: int
    feature: int
    mode: int
    value: float
    positions: Selector = Selector()
    when: CondPayload | None = None
    vector: bytes | None = None  # an inline vector (float32 [d_model]) on a vector bank:
    # the ADD edit adds value * vector instead of value * W_dec[feature]


class ReadPayload(msgspec.Struct, array_like=True, frozen=True):
    """One read: ``sae`` index, top-k, watched features, position selector."""

    sae: int
    top_k: int
    watch: tuple[int, ...]
    positions: Selector = Selector()


class RequestPayload(msgspec.Struct, frozen=True, omit_defaults=True):
    """Everything the worker needs about one request."""

    rid: str = ""  # the server's request id (vLLM rewrites its own): reads are keyed by it
    edits: tuple[EditPayload, ...] = ()
    reads: tuple[ReadPayload, ...] = ()
    pooled: bool = False  # the reads want per-sequence sums and maxima (Encode)


_REQ_ENC = msgspec.msgpack.Encoder()
_REQ_DEC = msgspec.msgpack.Decoder(RequestPayload)


def encode_request(payload: RequestPayload) -> bytes:
    return _REQ_ENC.encode(payload)


def decode_request(extra_args: Mapping | None) -> RequestPayload | None:
    """The payload in a request's ``extra_args`` (None for a plain request)."""
    raw = (extra_args or {}).get(EXTRA_ARGS_KEY)
    return None if raw is None else _REQ_DEC.decode(raw)


# --------------------------------------------------------------------------- worker config


class SAEEntry(msgspec.Struct, frozen=True):
    id: str
    path: str
    hook_name: str | None = None  # overrides the hook name the SAE's files give
    # a steering-vector bank instead of an SAE (``sae_runtime.vectors``): the (name, file)
    # pairs of every --vector, and the layer this bank holds
    vectors: tuple[tuple[str, str], ...] = ()
    layer: int = -1
    inline: bool = False  # the bank also takes inline vectors (``--inline-vectors``)


class WorkerConfig(msgspec.Struct, frozen=True):
    saes: tuple[SAEEntry, ...]  # in server order: index == hook id
    max_interventions: int  # edits per request (the tables' slot width)
    max_watch: int = 0
    reads_addr: str | None = None  # ZMQ address the worker pushes reads to
    sae_dtype: str = "auto"


def to_builtins(cfg: WorkerConfig) -> dict:
    """``cfg`` as the JSON-able dict that goes in ``additional_config[CONFIG_KEY]``."""
    return msgspec.to_builtins(cfg)


def worker_config(additional_config: Mapping | None) -> WorkerConfig | None:
    """The worker config in vLLM's ``additional_config`` (None: no SAEs configured)."""
    raw = (additional_config or {}).get(CONFIG_KEY)
    return None if not raw else msgspec.convert(raw, WorkerConfig)


# --------------------------------------------------------------------------- read record


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
