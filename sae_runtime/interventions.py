"""Per-request intervention specs: validation, cache salt, and the payload for the worker.

A spec travels to the worker inside ``SamplingParams.extra_args`` as part of a
``payloads.RequestPayload``, keyed by SAE *index* in the server's SAE list so the worker
does not need names.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from enum import IntEnum

from sae_runtime.errors import InvalidRequestError, UnknownSAEError
from sae_runtime.ops import Mode
from sae_runtime.payloads import EditPayload
from sae_runtime.saes.base import SAEConfig


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
        """Raise InvalidRequestError / UnknownSAEError naming the offending field.

        Modes and scopes are typed (``Mode``, ``Scope``); the proto converter has already
        rejected unset and unknown numbers (``server.convert.spec_from_pb``).
        """
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
            if not math.isfinite(iv.value):
                raise InvalidRequestError(f"{field}.value", f"must be finite, got {iv.value}")
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
        request with different (or no) interventions. Computed once per spec (admission
        and the prompt both ask).
        """
        return self._salt

    @functools.cached_property
    def _salt(self) -> str | None:
        if not self.interventions:
            return None
        blob = json.dumps(self.canonical(), separators=(",", ":")).encode()
        return "sae:" + hashlib.sha256(blob).hexdigest()[:32]

    def to_payload(self, sae_index: Mapping[str, int]) -> tuple[EditPayload, ...]:
        """The edits as ``RequestPayload.edits`` (ABLATE carries value 0)."""
        return tuple(
            EditPayload(sae_index[iv.sae], int(iv.feature), int(iv.mode),
                        0.0 if iv.mode == Mode.ABLATE else float(iv.value), int(iv.scope))
            for iv in self.interventions
        )
