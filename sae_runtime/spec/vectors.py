"""What a request can name of the steering vectors: the vector banks' ids and where each
named vector (and each layer's inline row) lives (``VectorIndex``). The files and the banks
themselves are ``sae_runtime.loading.vectors``.

Banks are hooks of their own kind, not SAEs: the server keeps them apart from its SAE list
(requests cannot name them as SAEs), and only the worker treats a bank as a pseudo-SAE."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sae_runtime.loading.vectors import Bank

BANK_PREFIX = "vectors@"
"""Bank ids are ``vectors@L{layer}``: hook ids, never named by requests."""


def is_bank(sae_id: str) -> bool:
    return sae_id.startswith(BANK_PREFIX)


def bank_id(layer: int) -> str:
    return f"{BANK_PREFIX}L{layer}"


@dataclass(frozen=True)
class VectorIndex:
    """Where each named vector lives: name -> {layer: (bank id, row)}; the layers that
    take inline vectors: layer -> (bank id, inline row); the bank ids in hook order (after
    the SAEs'); the model's hidden size (an inline vector's length); the rows kept for
    vectors loaded at run time: layer -> (bank id, rows); and each runtime-loaded vector's
    tag (a digest of its values, in the cache salt: a row's values change between loads)."""

    rows: Mapping[str, Mapping[int, tuple[str, int]]]
    inline: Mapping[int, tuple[str, int]] = dataclasses.field(default_factory=dict)
    banks: tuple[str, ...] = ()
    d_model: int = 0
    runtime: Mapping[int, tuple[str, range]] = dataclasses.field(default_factory=dict)
    tags: Mapping[str, str] = dataclasses.field(default_factory=dict)

    def with_runtime(self, loaded: Mapping[str, tuple[Mapping[int, int], str]]) -> VectorIndex:
        """This index plus the runtime-loaded vectors ``{name: ({layer: row}, tag)}`` (rows
        of ``runtime``; startup vectors keep theirs)."""
        rows = {n: ls for n, ls in self.rows.items() if n not in self.tags}
        tags = {}
        for name, (layer_rows, tag) in loaded.items():
            rows[name] = {k: (self.runtime[k][0], r) for k, r in layer_rows.items()}
            tags[name] = tag
        return dataclasses.replace(self, rows=rows, tags=tags)

    @staticmethod
    def of(banks: Sequence[Bank]) -> VectorIndex:
        rows: dict[str, dict[int, tuple[str, int]]] = {}
        for b in banks:
            for i, name in enumerate(b.names):
                rows.setdefault(name, {})[b.layer] = (b.id, i)
        return VectorIndex(rows, {b.layer: (b.id, b.inline_row) for b in banks if b.inline},
                           tuple(b.id for b in banks),
                           banks[0].matrix.shape[1] if banks else 0,
                           {b.layer: (b.id, b.runtime_rows) for b in banks if b.runtime})
