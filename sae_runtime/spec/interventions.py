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
from sae_runtime.ops import Cond, Mode
from sae_runtime.saes.base import SAEConfig
from sae_runtime.spec.payloads import CondPayload, EditPayload
from sae_runtime.spec.selectors import ALL as _ALL
from sae_runtime.spec.selectors import GENERATION as _GENERATION
from sae_runtime.spec.selectors import Selector, check_scope_or_positions


class Scope(IntEnum):
    """Positions an intervention applies to; numbers match ``steering.v1.Scope``.

    Sugar for a position selector (``Intervention.selector``)."""

    ALL = 1
    GENERATION_ONLY = 2  # positions >= prompt_len

    @property
    def selector(self) -> Selector:
        return _GENERATION if self == Scope.GENERATION_ONLY else _ALL


def check_sae_feature(field: str, sae: str, feature: int, saes: Mapping[str, SAEConfig]) -> None:
    """``{field}.sae`` names a loaded SAE and ``{field}.feature`` is one of its features."""
    if not sae:
        raise InvalidRequestError(f"{field}.sae", "must name a loaded SAE")
    if sae not in saes:
        raise UnknownSAEError(f"{field}.sae", sae, list(saes))
    d_sae = saes[sae].d_sae
    if not 0 <= feature < d_sae:
        raise InvalidRequestError(
            f"{field}.feature",
            f"feature {feature} is out of range for SAE {sae!r} (valid: 0..{d_sae - 1})")


@dataclass(frozen=True)
class Condition:
    """``f(x) > threshold`` (Cond.GT) or ``< threshold`` (Cond.LT) for feature ``feature``
    of SAE ``sae`` at a position; used by conditional edits and guardrails."""

    sae: str
    feature: int
    op: Cond
    threshold: float

    def validate(self, field: str, saes: Mapping[str, SAEConfig]) -> None:
        if self.op not in (Cond.GT, Cond.LT):
            raise InvalidRequestError(f"{field}.op", "must be set (GT or LT)")
        check_sae_feature(field, self.sae, self.feature, saes)
        if not math.isfinite(self.threshold):
            raise InvalidRequestError(f"{field}.threshold",
                                      f"must be finite, got {self.threshold}")

    def holds(self, value: float) -> bool:
        return value > self.threshold if self.op == Cond.GT else value < self.threshold

    def canonical(self) -> list:
        return [self.sae, int(self.feature), int(self.op), float(self.threshold)]


@dataclass(frozen=True)
class Intervention:
    sae: str
    feature: int
    mode: Mode
    value: float = 0.0
    scope: Scope | None = None  # None: unset (every position, unless ``positions``)
    positions: Selector | None = None  # set or ``scope``, not both (``SteeringSpec.validate``)
    when: Condition | None = None  # a conditional edit (the condition reads the same SAE)
    latch: bool = False  # with ``when``: stays on once the condition has held
    vector: bytes | None = None  # an inline vector (float32 little-endian [d_model]) on a
    # vector bank's inline row: the ADD edit adds value * vector (``sae_runtime.loading.vectors``)
    tag: str | None = None  # a runtime-loaded vector's digest (``VectorIndex.tags``): its row
    # holds other values after an unload and a new load, so the cache salt must tell them apart

    @property
    def selector(self) -> Selector:
        """The positions this intervention edits (``positions``, else the scope's selector)."""
        if self.positions is not None:
            return self.positions
        return (self.scope or Scope.ALL).selector

    @property
    def edit_value(self) -> float:
        """The value the edit record carries: ``value``, but 0 for ABLATE (which clamps to 0
        whatever ``value`` says), so equal edits salt and plan alike."""
        return 0.0 if self.mode == Mode.ABLATE else float(self.value)


@dataclass(frozen=True)
class SteeringSpec:
    """The interventions of one request, in request order."""

    interventions: tuple[Intervention, ...] = ()

    def validate(self, saes: Mapping[str, SAEConfig], max_interventions: int,
                 vocab_size: int = 2**31) -> None:
        """Raise InvalidRequestError / UnknownSAEError naming the offending field.

        Modes, scopes and frames are typed (``Mode``, ``Scope``, ``selectors.Frame``); a
        front door has already refused numbers or names outside them. An unset mode
        (``Mode.NONE``) is refused here. Whether the request's edit rows fit the worker's
        tables (each window of a selector is one row) is ``sae_runtime.spec.budget``'s check.
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
            if iv.mode == Mode.NONE:
                raise InvalidRequestError(f"{field}.mode", "must be set (CLAMP, ABLATE, SCALE or ADD)")
            check_scope_or_positions(field, iv.scope, iv.positions)
            check_sae_feature(field, iv.sae, iv.feature, saes)
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
            if iv.positions is not None:
                iv.positions.validate(f"{field}.positions", vocab_size)
            if iv.when is not None:
                iv.when.validate(f"{field}.when", saes)
                if iv.when.sae != iv.sae:
                    raise InvalidRequestError(
                        f"{field}.when.sae",
                        f"a condition reads a feature of the edit's own SAE ({iv.sae!r}); "
                        f"got {iv.when.sae!r} (conditions on another hook are not supported)")
                c = saes[iv.sae]
                F = c.features_per_layer
                if c.clt_layers and iv.when.feature // F != iv.feature // F:
                    raise InvalidRequestError(
                        f"{field}.when.feature",
                        f"a condition on a cross-layer transcoder reads a feature of the edited "
                        f"feature's own layer (flat ids {iv.feature // F * F}.."
                        f"{iv.feature // F * F + F - 1}); got {iv.when.feature} (layer "
                        f"{c.clt_layers[iv.when.feature // F]}, edit at layer "
                        f"{c.clt_layers[iv.feature // F]})")
            elif iv.latch:
                raise InvalidRequestError(f"{field}.latch", "latch needs a condition (when)")

    def canonical(self) -> list[list]:
        """Order-free, normalised form: equal specs give equal lists. A scope and the
        selector it is sugar for are the same thing (``Intervention.selector``)."""
        rows = []
        for iv in self.interventions:
            row = [iv.sae, int(iv.feature), int(iv.mode), iv.edit_value, iv.selector.canonical()]
            if iv.when is not None:  # unconditional specs keep the salt they had before
                row.append([*iv.when.canonical(), bool(iv.latch)])
            if iv.vector is not None:
                row.append(["vector", hashlib.sha256(iv.vector).hexdigest()])
            if iv.tag is not None:
                row.append(["tag", iv.tag])
            rows.append(row)
        return sorted(rows)

    @property
    def latched(self) -> bool:
        """Some edit latches: its request must compute every prompt position (no prefix
        cache reads), or a latch could miss a position the cache skipped."""
        return any(iv.when is not None and iv.latch for iv in self.interventions)

    @property
    def prompt_relative(self) -> bool:
        """Whether some edit's positions depend on the prompt length (PROMPT or GENERATION
        ranges, scope GENERATION_ONLY)."""
        return any(iv.selector.prompt_relative for iv in self.interventions)

    def cache_salt(self, prompt_len: int | None = None, tenant: str | None = None) -> str | None:
        """Prefix-cache salt: None for no interventions (shares plain KV), else a spec hash.

        Requests with the same interventions share cached KV; steered KV never reaches a
        request with different (or no) interventions (selectors included). Computed once
        per spec (admission and the prompt both ask). With ``prompt_len``, a spec whose
        positions depend on the prompt length (``prompt_relative``) also salts by it: the
        same tokens at the same positions are edited differently under another prompt
        length (a follow-up prompt that contains an earlier generation, above all). With
        ``tenant`` (a digest of the caller's credentials) every request is salted by it,
        steered or not, so one tenant's cached prompts never show in another's
        ``cached_tokens``.
        """
        salt = self._salt
        if prompt_len is not None and salt is not None and self.prompt_relative:
            salt = f"{salt}:p{int(prompt_len)}"
        if tenant is not None:
            salt = f"t:{tenant}" + (f":{salt}" if salt else "")
        return salt

    @functools.cached_property
    def _salt(self) -> str | None:
        if not self.interventions:
            return None
        blob = json.dumps(self.canonical(), separators=(",", ":")).encode()
        return "sae:" + hashlib.sha256(blob).hexdigest()[:32]

    def to_payload(self, sae_index: Mapping[str, int]) -> tuple[EditPayload, ...]:
        """The edits as ``RequestPayload.edits`` (values as ``Intervention.edit_value``)."""
        return tuple(
            EditPayload(sae_index[iv.sae], int(iv.feature), int(iv.mode), iv.edit_value,
                        iv.selector,
                        None if iv.when is None else CondPayload(
                            int(iv.when.feature), int(iv.when.op), float(iv.when.threshold),
                            bool(iv.latch)), iv.vector)
            for iv in self.interventions
        )
