"""Feature guardrails (``abort_when``): stop a request when a feature crosses a threshold.

A guardrail is a ``Condition`` (feature of a loaded SAE, GT/LT, threshold) watched at the
positions of a selector (ranges only; default: generated positions). The worker computes
nothing new for it: the server adds one hidden *guard read* per SAE (the guarded features
as a watch list, over the generated positions, or every position when some guardrail
watches prompt positions) to the request's reads, and checks the values as they arrive
(``server.core.feed``), holding back each token until the reads of the positions before it
are in. A trip at position p ends the stream with the tokens at positions <= p: the
activation at p shapes token p + 1, which is never returned. A trip on a prompt position
returns no token at all.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from sae_runtime.errors import InvalidRequestError
from sae_runtime.saes.base import SAEConfig
from sae_runtime.spec.interventions import Condition
from sae_runtime.spec.reads import Read
from sae_runtime.spec.selectors import ALL, GENERATION, Selector

MAX_GUARDRAILS = 8
"""Most guardrails one request may carry (and so the most features one guard read watches)."""


@dataclass(frozen=True)
class Guardrail:
    condition: Condition
    positions: Selector = GENERATION

    def covers(self, position: int, prompt_len: int) -> bool:
        return self.positions.covers(position, prompt_len)


@dataclass(frozen=True)
class GuardSpec:
    """The guardrails of one request, in request order."""

    guards: tuple[Guardrail, ...] = ()

    def validate(self, saes: Mapping[str, SAEConfig], *, max_guardrails: int = MAX_GUARDRAILS,
                 vocab_size: int = 2**31, prefix: str = "abort_when") -> None:
        if len(self.guards) > max_guardrails:
            raise InvalidRequestError(
                prefix, f"{len(self.guards)} guardrails given; the server allows at most "
                f"{max_guardrails} per request")
        for j, g in enumerate(self.guards):
            field = f"{prefix}[{j}]"
            g.condition.validate(f"{field}.condition", saes)
            g.positions.validate(f"{field}.positions", vocab_size)
            if g.positions.token_ids:
                raise InvalidRequestError(f"{field}.positions.token_ids",
                                          "guardrails take position ranges only")

    def reads(self, first_index: int = 0) -> tuple[Read, ...]:
        """The hidden guard reads, one per guarded SAE (in first-mention order)."""
        by_sae: dict[str, list[int]] = {}
        prompt: dict[str, bool] = {}
        for g in self.guards:
            c = g.condition
            feats = by_sae.setdefault(c.sae, [])
            if c.feature not in feats:
                feats.append(c.feature)
            prompt[c.sae] = prompt.get(c.sae, False) or g.positions.may_select_prompt
        return tuple(Read(sae, 0, tuple(f), positions=ALL if prompt[sae] else GENERATION)
                     for sae, f in by_sae.items())

    def first_trip(self, position: int, prompt_len: int, value_of,
                   trip_missing: bool = False) -> tuple[int, float] | None:
        """``(guardrail index, value)`` of the first guardrail that trips at ``position``;
        ``value_of(sae, feature)`` gives the activation there, NaN where it is missing (a
        read that never arrived). A missing value never holds a condition; with
        ``trip_missing`` (fail closed) it trips the guardrail, with value NaN."""
        for j, g in enumerate(self.guards):
            if g.covers(position, prompt_len):
                v = value_of(g.condition.sae, g.condition.feature)
                if g.condition.holds(v) or (trip_missing and math.isnan(v)):
                    return j, v
        return None
