"""Steering vectors loaded while the server runs (``LoadVector`` / ``UnloadVector``): which
preallocated bank rows each one holds, and who is using it.

The rows exist from engine start (``steerd serve --runtime-vectors``,
``--max-runtime-vectors``; ``sae_runtime.loading.vectors.Bank.runtime_rows``), so a load
only writes decoder rows on every rank; nothing is recompiled and no table grows. This
module is the server's bookkeeping, with no engine in it:

- ``reserve`` takes free rows for a load (refusing name clashes, unknown layers and full
  layers), ``commit`` publishes the vector once every rank wrote it (``Core.load_vector``),
  ``cancel`` gives the rows back when the write failed;
- ``acquire`` is called at the door, in the same tick as the request's check, and counts
  the request as a user of each runtime vector it names until its stream ends;
- ``unload`` removes the name at once (new requests get "unknown steering vector") but
  frees its rows only when its last user ends, so no row a running request reads is
  written again while it runs: unloading never changes a running request's output.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np

from sae_runtime.errors import InvalidRequestError, ResourceLimitError, UnknownVectorError
from sae_runtime.spec.vectors import VectorIndex, is_bank

MAX_NAME_LEN = 128
MAX_METADATA = 32  # metadata entries of one loaded vector
MAX_METADATA_LEN = 1024  # characters of one metadata key or value


@dataclass
class Loaded:
    """One runtime-loaded vector: its row at each layer, its tag (a digest of its values,
    in the cache salt), its metadata, how many in-flight requests use it, and whether it
    was unloaded (then its rows are freed when ``users`` reaches 0)."""

    name: str
    rows: dict[int, int]  # layer -> bank row
    tag: str
    metadata: dict[str, str] = field(default_factory=dict)
    values: dict[int, np.ndarray] = field(default_factory=dict)  # layer -> [d_model] float32
    users: int = 0
    gone: bool = False


def tag_of(values: Mapping[int, np.ndarray]) -> str:
    """A digest of a vector's values by layer (float32 little-endian)."""
    h = hashlib.sha256()
    for layer in sorted(values):
        h.update(int(layer).to_bytes(4, "little"))
        h.update(np.asarray(values[layer], dtype="<f4").tobytes())
    return h.hexdigest()[:32]


class RuntimeVectors:
    """The runtime rows of every bank, the vectors in them, and their users (module doc).

    ``index`` is always the ``VectorIndex`` requests are checked against: the startup
    vectors plus the committed, not unloaded runtime vectors."""

    def __init__(self, base: VectorIndex, per_layer: int) -> None:
        self.base = base
        self.per_layer = per_layer
        self.free: dict[int, list[int]] = {k: list(rows) for k, (_, rows) in base.runtime.items()}
        self.live: dict[str, Loaded] = {}  # name -> committed, not unloaded
        self.draining: list[Loaded] = []  # unloaded, still used by running requests
        self.pending: set[str] = set()  # names being loaded
        self.index = base

    @property
    def layers(self) -> tuple[int, ...]:
        """The blocks that take runtime vectors."""
        return tuple(sorted(self.base.runtime))

    def _publish(self) -> None:
        self.index = self.base.with_runtime({n: (v.rows, v.tag) for n, v in self.live.items()})

    def check_name(self, name: str, field: str = "name") -> None:
        """Refuse a name a load may not take: empty, too long, a bank id, a startup
        vector's, a loaded one's, or one being loaded."""
        if not name or len(name) > MAX_NAME_LEN or not name.isprintable():
            raise InvalidRequestError(field, f"give the vector a printable name of 1 to "
                                      f"{MAX_NAME_LEN} characters")
        if is_bank(name):
            raise InvalidRequestError(field, f"{name!r}: names may not start with 'vectors@'")
        if name in self.base.rows:
            raise InvalidRequestError(field, f"{name!r} is a startup vector (steerd serve "
                                      "--vector); it cannot be replaced at run time")
        if name in self.live:
            raise InvalidRequestError(field, f"a vector named {name!r} is loaded; unload it "
                                      "first")
        if name in self.pending:
            raise InvalidRequestError(field, f"a vector named {name!r} is being loaded")

    def reserve(self, name: str, layers: Iterable[int], field: str = "layers") -> dict[int, int]:
        """Take one free row at each of ``layers`` for ``name`` (module doc); errors name
        ``field`` (``layers[j].layer`` when it is ``layers``). The rows are the caller's
        until ``commit`` or ``cancel``."""
        self.check_name(name)
        layers = list(layers)

        def at(j: int) -> str:
            return f"{field}[{j}].layer" if field == "layers" else field

        if not self.free:
            raise InvalidRequestError(field, "this server keeps no rows for vectors loaded at "
                                      "run time (steerd serve --runtime-vectors)")
        for j, layer in enumerate(layers):
            if layer not in self.free:
                raise InvalidRequestError(at(j), f"block {layer} takes no runtime "
                                          f"vectors; blocks that do: {list(self.layers)} "
                                          "(steerd serve --runtime-vectors)")
        for j, layer in enumerate(layers):
            if not self.free[layer]:
                raise ResourceLimitError(
                    f"{at(j)}: all {self.per_layer} runtime vector rows of block "
                    f"{layer} are taken (steerd serve --max-runtime-vectors); unload a vector "
                    "(an unloaded one frees its rows when its last request ends)")
        rows = {layer: self.free[layer].pop(0) for layer in layers}
        self.pending.add(name)
        return rows

    def cancel(self, name: str, rows: Mapping[int, int]) -> None:
        """Give back the rows of a load that failed."""
        self.pending.discard(name)
        self._give_back(rows)

    def commit(self, name: str, rows: Mapping[int, int], tag: str,
               metadata: Mapping[str, str] | None = None,
               values: Mapping[int, np.ndarray] | None = None) -> Loaded:
        """Publish a reserved, written vector: requests may name it from now on."""
        self.pending.discard(name)
        v = Loaded(name, dict(rows), tag, dict(metadata or {}), dict(values or {}))
        self.live[name] = v
        self._publish()
        return v

    def unload(self, name: str, field: str = "name") -> Loaded:
        """Remove ``name`` from what requests may name; its rows are freed now if no running
        request uses it, else when the last one ends."""
        v = self.live.get(name)
        if v is None:
            if name in self.base.rows:
                raise InvalidRequestError(field, f"{name!r} is a startup vector (steerd serve "
                                          "--vector); it cannot be unloaded")
            known = ", ".join(sorted(self.live)) or "none"
            raise UnknownVectorError(field, f"no runtime vector named {name!r}; loaded at run "
                                     f"time: {known}")
        del self.live[name]
        v.gone = True
        self._publish()
        if v.users:
            self.draining.append(v)
        else:
            self._give_back(v.rows)
        return v

    def acquire(self, names: Iterable[str]) -> Callable[[], None]:
        """Count the caller as a user of each runtime vector among ``names`` (names already
        checked against ``index`` in the same tick); returns the release (idempotent)."""
        held = [self.live[n] for n in dict.fromkeys(names) if n in self.live]
        for v in held:
            v.users += 1

        def release() -> None:
            while held:
                v = held.pop()
                v.users -= 1
                if v.gone and not v.users:
                    self.draining.remove(v)
                    self._give_back(v.rows)

        return release

    def _give_back(self, rows: Mapping[int, int]) -> None:
        for layer, row in rows.items():
            self.free[layer].append(row)
            self.free[layer].sort()

    def free_rows(self) -> dict[int, int]:
        """Free runtime rows by block."""
        return {k: len(v) for k, v in sorted(self.free.items())}
