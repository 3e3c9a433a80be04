"""Per-request intervention specs: validation, cache salt, and the wire dict for vLLM.

A spec travels to the worker inside ``SamplingParams.extra_args`` (msgpack-able), keyed by
SAE *index* in the server's SAE list so the worker does not need names.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import IntEnum

from sae_runtime.errors import InvalidRequestError, UnknownSAEError
from sae_runtime.ops import Mode
from sae_runtime.saes.base import SAEConfig

EXTRA_ARGS_KEY = "sae_steering"


class Scope(IntEnum):
    """Positions an intervention applies to; numbers match ``steering.v1.Scope``."""

    ALL = 1
    GENERATION_ONLY = 2  # positions >= prompt_len


@dataclass(frozen=True)
class Intervention:
    sae: str
    feature: int
    mode: Mode
    value: float = 0.0
    scope: Scope = Scope.ALL


@dataclass(frozen=True)
class SteeringSpec:
    """The interventions of one request, in request order."""

    interventions: tuple[Intervention, ...] = ()

    def validate(self, saes: Mapping[str, SAEConfig], max_interventions: int) -> None:
        """Raise InvalidRequestError / UnknownSAEError naming the offending field."""
        if len(self.interventions) > max_interventions:
            raise InvalidRequestError(
                "interventions",
                f"{len(self.interventions)} interventions given; the server allows at most "
                f"{max_interventions} per request",
            )
        seen: dict[tuple[str, int], int] = {}
        for j, iv in enumerate(self.interventions):
            field = f"interventions[{j}]"
            if not iv.sae:
                raise InvalidRequestError(f"{field}.sae", "must name a loaded SAE")
            if iv.sae not in saes:
                raise UnknownSAEError(f"{field}.sae", iv.sae, list(saes))
            d_sae = saes[iv.sae].d_sae
            if not 0 <= iv.feature < d_sae:
                raise InvalidRequestError(
                    f"{field}.feature",
                    f"feature {iv.feature} is out of range for SAE {iv.sae!r} "
                    f"(valid: 0..{d_sae - 1})",
                )
            if iv.mode not in (Mode.CLAMP, Mode.ABLATE, Mode.SCALE, Mode.ADD):
                raise InvalidRequestError(
                    f"{field}.mode", "must be one of CLAMP, ABLATE, SCALE, ADD"
                )
            if not math.isfinite(iv.value):
                raise InvalidRequestError(f"{field}.value", f"must be finite, got {iv.value}")
            if iv.scope not in (Scope.ALL, Scope.GENERATION_ONLY):
                raise InvalidRequestError(f"{field}.scope", f"unknown scope {int(iv.scope)}")
            key = (iv.sae, iv.feature)
            if key in seen:
                raise InvalidRequestError(
                    f"{field}.feature",
                    f"feature {iv.feature} of SAE {iv.sae!r} is already edited by "
                    f"interventions[{seen[key]}]; give each feature once",
                )
            seen[key] = j

    def canonical(self) -> list[tuple[str, int, int, float, int]]:
        """Order-free, normalised form: equal specs give equal lists."""
        rows = []
        for iv in self.interventions:
            value = 0.0 if iv.mode == Mode.ABLATE else float(iv.value)
            rows.append((iv.sae, int(iv.feature), int(iv.mode), value, int(iv.scope)))
        return sorted(rows)

    def cache_salt(self) -> str | None:
        """Prefix-cache salt: None for no interventions (shares plain KV), else a spec hash.

        Requests with the same interventions share cached KV; steered KV never reaches a
        request with different (or no) interventions.
        """
        if not self.interventions:
            return None
        blob = json.dumps(self.canonical(), separators=(",", ":")).encode()
        return "sae:" + hashlib.sha256(blob).hexdigest()[:32]

    def to_wire(self, sae_index: Mapping[str, int]) -> dict:
        """msgpack-able dict for ``SamplingParams.extra_args[EXTRA_ARGS_KEY]``."""
        return {
            "iv": [
                [sae_index[iv.sae], int(iv.feature), int(iv.mode),
                 0.0 if iv.mode == Mode.ABLATE else float(iv.value), int(iv.scope)]
                for iv in self.interventions
            ]
        }


@dataclass(frozen=True)
class WireIntervention:
    """One intervention as the worker sees it."""

    sae_index: int
    feature: int
    mode: int
    value: float
    scope: int


def from_wire(payload: Mapping | None) -> list[WireIntervention]:
    """Inverse of ``SteeringSpec.to_wire`` (empty list for no payload)."""
    if not payload:
        return []
    items: Sequence = payload.get("iv", ())
    return [WireIntervention(int(a), int(b), int(c), float(d), int(e)) for a, b, c, d, e in items]
