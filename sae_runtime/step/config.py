"""What every worker is told once, at engine start: the SAE list and the tables' budgets.

``WorkerConfig`` travels server -> every worker in ``VllmConfig.additional_config[CONFIG_KEY]``
as plain builtins (``AdditionalConfig`` / ``worker_config``); vLLM keys its compile cache on
``AdditionalConfig.compute_hash``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping

import msgspec

from sae_runtime.errors import SAEFormatError

CONFIG_KEY = "sae_steering"  # key in VllmConfig.additional_config
# Largest reads message a worker sends (``--reads-max-message-bytes``); the publisher splits a
# step's records to fit and the server drops anything larger.
DEFAULT_READS_MAX_MESSAGE_BYTES = 64 * 1024 * 1024


class SAEEntry(msgspec.Struct, frozen=True):
    id: str
    path: str
    hook_name: str | None = None  # overrides the hook name the SAE's files give
    # a steering-vector bank instead of an SAE (``sae_runtime.loading.vectors``): the (name, file)
    # pairs of every --vector, and the layer this bank holds
    vectors: tuple[tuple[str, str], ...] = ()
    layer: int = -1
    inline: bool = False  # the bank also takes inline vectors (``--inline-vectors``)
    runtime: int = 0  # the bank keeps this many zero rows for vectors loaded at run time
    # where the server found this SAE hooks (``placement``; "" unchecked). It is part of the
    # compile-cache key, and a worker that loads the SAE elsewhere refuses to start.
    placement: str = ""


def placement(c) -> str:
    """Where an SAE (an ``SAEConfig``) sits in the compiled graph: its site and block (a
    cross-layer transcoder's blocks), and a transcoder's input site, e.g. ``resid_post@1``,
    ``mlp_out@0<mlp_in`` or ``mlp_out@0,1,2,3<mlp_in``."""
    blocks = ",".join(map(str, getattr(c, "clt_layers", ()))) or str(c.layer)
    return f"{c.site}@{blocks}" + (f"<{c.input_site}" if c.input_site else "")


def check_placement(entry: SAEEntry, c) -> None:
    """Refuse an SAE a worker loads elsewhere than the server found it (its files changed in
    between): the compiled graph, cached under the server's placement, would hook the old
    place."""
    if entry.placement and entry.placement != placement(c):
        raise SAEFormatError(
            f"{entry.path}: SAE {entry.id!r} hooks {placement(c)} in the worker but "
            f"{entry.placement} when the server read it; did its files change during startup?")


class ReadsKeys(msgspec.Struct, frozen=True):
    """ZMQ CURVE keys (Z85 text) of a ``tcp://`` reads channel, made by the server at every
    start: its public key, and the one client keypair it accepts (its ZAP handler admits
    ``client_public`` only). Secrets: never in the compile-cache key, never logged."""

    server_public: str
    client_public: str
    client_secret: str


class WorkerConfig(msgspec.Struct, frozen=True):
    saes: tuple[SAEEntry, ...]  # in server order: index == hook id
    max_interventions: int  # edits per request (the tables' slot width)
    max_watch: int = 0
    reads_addr: str | None = None  # ZMQ address the worker pushes reads to
    sae_dtype: str = "auto"
    # the reads channel's CURVE keys (tcp:// only; None on ipc://, and on an engine node
    # other than the API node, whose server hands them over at startup: ``sae_reads_keys``)
    reads_keys: ReadsKeys | None = None
    reads_max_message_bytes: int = DEFAULT_READS_MAX_MESSAGE_BYTES
    # engines across nodes: a worker exits when the server's tcp:// read socket has been
    # unreachable this long (its API node is gone); None: no watch (one node)
    reads_lost_after_s: float | None = None
    # raw activation reads: the declared sites (SAELens hook names, ``spec.activations``), in
    # server order (index == ``ActPayload.site``); each is one op in the compiled graph
    act_sites: tuple[str, ...] = ()
    # the declared sites (indices into act_sites) with a before-edits twin, decided by the
    # server (``spec.activations.twin_sites``): twin k is site ``len(act_sites) + k``, one
    # more op each, placed before the edit hooks at its site's module
    act_twins: tuple[int, ...] = ()


# How a worker reaches the server's read socket. None of it shapes the compiled graph, and
# the address and keys are fresh every start: kept out of the compile-cache key.
READS_CHANNEL_FIELDS = ("reads_addr", "reads_keys", "reads_max_message_bytes",
                        "reads_lost_after_s")


def config_hash(cfg: WorkerConfig) -> str:
    """What the compiled graph depends on: the JSON of ``cfg`` less the reads channel
    (``READS_CHANNEL_FIELDS``). Also each worker's fingerprint in its hook report, so the
    API node refuses an engine node started with other SAEs or budgets."""
    keyed = {**msgspec.to_builtins(cfg), **dict.fromkeys(READS_CHANNEL_FIELDS)}
    return hashlib.sha256(json.dumps(keyed, sort_keys=True).encode()).hexdigest()


class AdditionalConfig(Mapping):
    """``VllmConfig.additional_config`` of a steered engine: ``{CONFIG_KEY: WorkerConfig as
    builtins}``, with the ``compute_hash`` vLLM keys its compile cache on (vLLM takes a
    ``SupportsHash`` object here).

    The hash is ``config_hash``: the JSON less the reads channel. The reads socket is a
    fresh ``ipc://`` path (or fresh CURVE keys) every start, and in the hash it made every
    start a cache miss (compiling again, about 20 s of a tiny model's start on 2 cores); the
    keys are secrets besides. Everything that shapes the graph stays in: the SAE list with
    each one's ``placement``, the table budgets, the SAE dtype.
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
        return config_hash(msgspec.convert(self._d[CONFIG_KEY], WorkerConfig))


def worker_config(additional_config: Mapping | None) -> WorkerConfig | None:
    """The worker config in vLLM's ``additional_config`` (None: no SAEs configured)."""
    raw = (additional_config or {}).get(CONFIG_KEY)
    return None if not raw else msgspec.convert(raw, WorkerConfig)


