"""The three messages that cross a process boundary, each defined once (``msgspec.Struct``).

- ``RequestPayload``: one request's edits and reads, server -> worker, in
  ``SamplingParams.extra_args[EXTRA_ARGS_KEY]`` as msgpack bytes (``encode_request`` /
  ``decode_request``; vLLM serialises ``extra_args`` itself, and bytes are msgpack-able).
  SAEs are named by their *index* in the server's SAE list (== the worker's hook id).
- ``WorkerConfig``: the SAE list and table budgets, server -> every worker, once, in
  ``VllmConfig.additional_config[CONFIG_KEY]`` as plain builtins (``AdditionalConfig`` /
  ``worker_config``; vLLM keys its compile cache on ``AdditionalConfig.compute_hash``).
- ``ReadRecord``: one request's reads of one SAE over consecutive positions in one step,
  worker -> server over the ZMQ side channel (a msgpack list of records per step).

Both ends import these classes; nothing else describes the layouts.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping

import msgspec

from sae_runtime.errors import SAEFormatError
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
    # where the server found this SAE hooks (``placement``; "" unchecked). It is part of the
    # compile-cache key, and a worker that loads the SAE elsewhere refuses to start.
    placement: str = ""


def placement(c) -> str:
    """Where an SAE (an ``SAEConfig``) sits in the compiled graph: its site and block, and a
    transcoder's input site, e.g. ``resid_post@1`` or ``mlp_out@0<mlp_in``."""
    return f"{c.site}@{c.layer}" + (f"<{c.input_site}" if c.input_site else "")


def check_placement(entry: SAEEntry, c) -> None:
    """Refuse an SAE a worker loads elsewhere than the server found it (its files changed in
    between): the compiled graph, cached under the server's placement, would hook the old
    place."""
    if entry.placement and entry.placement != placement(c):
        raise SAEFormatError(
            f"{entry.path}: SAE {entry.id!r} hooks {placement(c)} in the worker but "
            f"{entry.placement} when the server read it; did its files change during startup?")


class WorkerConfig(msgspec.Struct, frozen=True):
    saes: tuple[SAEEntry, ...]  # in server order: index == hook id
    max_interventions: int  # edits per request (the tables' slot width)
    max_watch: int = 0
    reads_addr: str | None = None  # ZMQ address the worker pushes reads to
    sae_dtype: str = "auto"


class AdditionalConfig(Mapping):
    """``VllmConfig.additional_config`` of a steered engine: ``{CONFIG_KEY: WorkerConfig as
    builtins}``, with the ``compute_hash`` vLLM keys its compile cache on (vLLM takes a
    ``SupportsHash`` object here).

    The hash is that of the JSON, less ``reads_addr``: the reads socket is a fresh ``ipc://``
    path every start, and in the hash it made every start a cache miss (compiling again,
    about 20 s of a tiny model's start on 2 cores). Everything that shapes the graph stays
    in: the SAE list with each one's ``placement``, the table budgets, the SAE dtype.
    """

    def __init__(self, cfg: WorkerConfig) -> None:
        self._d = {CONFIG_KEY: msgspec.to_builtins(cfg)}

    def __getitem__(self, key: str):
        return self._d[key]

    def __iter__(self):
        return iter(self._d)

    def __len__(self) -> int:
        return len(self._d)

    def compute_hash(self) -> str:
        keyed = {**self._d[CONFIG_KEY], "reads_addr": None}
        return hashlib.sha256(json.dumps(keyed, sort_keys=True).encode()).hexdigest()


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
