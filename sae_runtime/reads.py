"""Per-request feature reads: spec, validation, and their part of the worker payload."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import IntEnum

from sae_runtime.errors import InvalidRequestError, UnknownSAEError
from sae_runtime.payloads import ReadPayload
from sae_runtime.saes.base import SAEConfig


class ReadScope(IntEnum):
    """Numbers match ``steering.v1.ReadScope``."""

    ALL = 1
    PROMPT = 2  # positions < prompt_len
    GENERATION = 3  # positions >= prompt_len


@dataclass(frozen=True)
class Read:
    sae: str
    top_k: int = 0
    watch: tuple[int, ...] = ()
    scope: ReadScope = ReadScope.ALL

    def covers(self, position: int, prompt_len: int) -> bool:
        if self.scope == ReadScope.PROMPT:
            return position < prompt_len
        if self.scope == ReadScope.GENERATION:
            return position >= prompt_len
        return True


@dataclass(frozen=True)
class ReadSpec:
    """The reads of one request; ``pooled`` asks the worker for per-sequence sums and maxima."""

    reads: tuple[Read, ...] = ()
    pooled: bool = False

    @property
    def wants_prompt(self) -> bool:
        return any(r.scope in (ReadScope.ALL, ReadScope.PROMPT) for r in self.reads)

    def validate(self, saes: Mapping[str, SAEConfig], *, max_top_k: int, max_watch: int,
                 prefix: str = "reads") -> None:
        seen: dict[str, int] = {}
        for j, r in enumerate(self.reads):
            field = f"{prefix}[{j}]"
            if r.sae not in saes:
                raise UnknownSAEError(f"{field}.sae", r.sae, list(saes))
            if r.sae in seen:
                raise InvalidRequestError(
                    f"{field}.sae", f"SAE {r.sae!r} is already read by {prefix}[{seen[r.sae]}]; "
                    "merge them into one read")
            seen[r.sae] = j
            d_sae = saes[r.sae].d_sae
            if r.top_k == 0 and not r.watch:
                raise InvalidRequestError(field, "set top_k > 0 or a watch list (or both)")
            if r.top_k > min(max_top_k, d_sae):
                raise InvalidRequestError(
                    f"{field}.top_k", f"top_k {r.top_k} exceeds the limit "
                    f"{min(max_top_k, d_sae)} (server cap {max_top_k}, d_sae {d_sae})")
            if len(r.watch) > max_watch:
                raise InvalidRequestError(
                    f"{field}.watch", f"{len(r.watch)} features watched; the server allows at "
                    f"most {max_watch}")
            seen_w: set[int] = set()
            for i, f in enumerate(r.watch):
                if not 0 <= f < d_sae:
                    raise InvalidRequestError(
                        f"{field}.watch[{i}]", f"feature {f} is out of range for SAE {r.sae!r} "
                        f"(valid: 0..{d_sae - 1})")
                if f in seen_w:
                    raise InvalidRequestError(f"{field}.watch[{i}]", f"feature {f} is listed twice")
                seen_w.add(f)

    def to_payload(self, sae_index: Mapping[str, int]) -> tuple[ReadPayload, ...]:
        """The reads as ``RequestPayload.reads`` (``pooled`` travels beside them)."""
        return tuple(ReadPayload(sae_index[r.sae], r.top_k, tuple(r.watch), int(r.scope))
                     for r in self.reads)
