"""What a request can name of the steering vectors: the vector banks' ids and where each
named vector (and each layer's inline row) lives (``VectorIndex``). The files and the banks
themselves are ``sae_runtime.loading.vectors``."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sae_runtime.loading.vectors import Bank

BANK_PREFIX = "vectors@"
"""Bank ids are ``vectors@L{layer}``: in the server's SAE list, never named by requests."""



def is_bank(sae_id: str) -> bool:
    return sae_id.startswith(BANK_PREFIX)


def bank_id(layer: int) -> str:
    return f"{BANK_PREFIX}L{layer}"


@dataclass(frozen=True)
class VectorIndex:
    """Where each named vector lives: name -> {layer: (bank id, row)}; and the layers that
    take inline vectors: layer -> (bank id, inline row)."""

    rows: Mapping[str, Mapping[int, tuple[str, int]]]
    inline: Mapping[int, tuple[str, int]] = dataclasses.field(default_factory=dict)

    @staticmethod
    def of(banks: Sequence[Bank]) -> VectorIndex:
        rows: dict[str, dict[int, tuple[str, int]]] = {}
        for b in banks:
            for i, name in enumerate(b.names):
                rows.setdefault(name, {})[b.layer] = (b.id, i)
        return VectorIndex(rows, {b.layer: (b.id, b.inline_row) for b in banks if b.inline})
