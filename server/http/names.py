"""The HTTP door's names for the API's enums: one table, derived from the enums' member
names (lower case), which ``tests/test_enums.py`` ties to the proto's."""

from __future__ import annotations

from enum import IntEnum
from typing import Literal, TypeVar

from sae_runtime.ops import Cond, Mode
from sae_runtime.saes.base import Site
from sae_runtime.spec.activations import ActDtype, ActPool
from sae_runtime.spec.interventions import Scope
from sae_runtime.spec.reads import ReadScope
from sae_runtime.spec.selectors import Frame
from sae_runtime.training.vectors_fit import Method
from server.core.types import FinishReason, TrainPosition

E = TypeVar("E", bound=IntEnum)


def names(enum: type[E], skip: tuple[str, ...] = ("NONE",)) -> dict[str, E]:
    """``{"clamp": Mode.CLAMP, ...}``: every member but ``skip`` by its lower-case name."""
    return {m.name.lower(): m for m in enum if m.name not in skip}


MODES = names(Mode)
SCOPES = names(Scope)
READ_SCOPES = names(ReadScope)
FRAMES = names(Frame)
SITES = names(Site)
ACT_POOLS = names(ActPool, skip=())
ACT_DTYPES = names(ActDtype)
VECTOR_METHODS = names(Method)
TRAIN_POSITIONS = names(TrainPosition)
OPS = {**names(Cond), ">": Cond.GT, "<": Cond.LT}
FINISH = {r: r.name.lower() for r in FinishReason} | {FinishReason.FEATURE: "content_filter"}
"""OpenAI's names; a tripped guardrail is OpenAI's "content was cut by a filter"."""


def literal(table: dict[str, object]):
    """A ``Literal`` of the table's names (a body field's type)."""
    return Literal[tuple(table)]
