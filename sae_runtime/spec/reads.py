"""Per-request feature reads: spec, validation, and their part of the worker payload."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import IntEnum

from sae_runtime.errors import InvalidRequestError, UnknownSAEError
from sae_runtime.saes.base import SAEConfig
from sae_runtime.spec.payloads import ReadPayload
from sae_runtime.spec.selectors import ALL, GENERATION, PROMPT, Selector, check_scope_or_positions


class ReadScope(IntEnum):
    """Numbers match ``steering.v1.ReadScope``; sugar for a position selector."""

    ALL = 1
    PROMPT = 2  # positions < prompt_len
    GENERATION = 3  # positions >= prompt_len

    @property
    def selector(self) -> Selector:
        return {ReadScope.PROMPT: PROMPT, ReadScope.GENERATION: GENERATION}.get(self, ALL)


@dataclass(frozen=True)
class Read:
    sae: str
    top_k: int = 0
    watch: tuple[int, ...] = ()
    scope: ReadScope | None = None  # None: unset (every position, unless ``positions``)
    positions: Selector | None = None  # set or ``scope``, not both (``ReadSpec.validate``)

    @property
    def selector(self) -> Selector:
        """The positions this read reports (``positions``, else the scope's selector)."""
        if self.positions is not None:
            return self.positions
        return (self.scope or ReadScope.ALL).selector

    def covers(self, position: int, prompt_len: int, token_id: int | None = None) -> bool:
        """Whether ``position`` is reported (the server waits for exactly these)."""
        return self.selector.covers(position, prompt_len, token_id)


@dataclass(frozen=True)
class ReadSpec:
    """The reads of one request; ``pooled`` asks the worker for per-sequence sums and maxima."""

    reads: tuple[Read, ...] = ()
    pooled: bool = False

    @property
    def wants_prompt(self) -> bool:
        return any(r.selector.may_select_prompt for r in self.reads)

    def validate(self, saes: Mapping[str, SAEConfig], *, max_top_k: int, max_watch: int,
                 prefix: str = "reads", vocab_size: int = 2**31) -> None:
        seen: dict[str, int] = {}
        for j, r in enumerate(self.reads):
            field = f"{prefix}[{j}]"
            check_scope_or_positions(field, r.scope, r.positions)
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
            if r.positions is not None:
                # The worker computes a read over the hull of its windows; the server keeps
                # the positions the selector picks, token ids included (server.core.feed).
                r.positions.validate(f"{field}.positions", vocab_size)

    def to_payload(self, sae_index: Mapping[str, int]) -> tuple[ReadPayload, ...]:
        """The reads as ``RequestPayload.reads`` (``pooled`` travels beside them)."""
        return tuple(ReadPayload(sae_index[r.sae], r.top_k, tuple(r.watch), r.selector)
                     for r in self.reads)
