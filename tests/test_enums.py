"""Every enum of the API is defined once: the proto's. The Python enums (which
``sae_runtime`` keeps, since it must not import the proto) must match the generated module
name for name and number, and the HTTP door's names are the enums' member names."""

from __future__ import annotations

import pytest

from sae_runtime.ops import Cond, Mode
from sae_runtime.saes.base import Site
from sae_runtime.spec.activations import ActDtype, ActPool
from sae_runtime.spec.interventions import Scope
from sae_runtime.spec.reads import ReadScope
from sae_runtime.spec.selectors import Frame
from sae_runtime.training.vectors_fit import Method
from server.core.types import FinishReason, TrainPosition
from server.http import names
from steering.v1 import steering_pb2 as pb

# (Python enum, proto enum, the proto's value prefix, Python member standing for UNSPECIFIED)
PAIRS = [
    (Mode, "InterventionMode", "INTERVENTION_MODE_", "NONE"),
    (Scope, "Scope", "SCOPE_", None),
    (Cond, "Comparison", "COMPARISON_", "NONE"),
    (Frame, "PositionFrame", "POSITION_FRAME_", None),
    (ReadScope, "ReadScope", "READ_SCOPE_", None),
    (FinishReason, "FinishReason", "FINISH_REASON_", None),
    (Site, "HookSite", "HOOK_SITE_", None),
    (ActPool, "ActivationPool", "ACTIVATION_POOL_", None),
    (ActDtype, "ActivationDtype", "ACTIVATION_DTYPE_", None),
    (Method, "VectorMethod", "VECTOR_METHOD_", None),
    (TrainPosition, "TrainPosition", "TRAIN_POSITION_", None),
]


@pytest.mark.parametrize("py, proto, prefix, unset", PAIRS, ids=[p[1] for p in PAIRS])
def test_python_enum_matches_the_proto(py, proto, prefix, unset):
    desc = pb.DESCRIPTOR.enum_types_by_name[proto]
    want = {v.name.removeprefix(prefix): v.number for v in desc.values}
    assert want.pop("UNSPECIFIED") == 0
    got = {m.name: int(m) for m in py}
    if unset is not None:
        assert got.pop(unset) == 0, f"{py.__name__}.{unset} stands for UNSPECIFIED (0)"
    assert got == want, f"{py.__name__} differs from steering.v1.{proto}"


def test_every_proto_enum_has_its_python_enum():
    assert {p[1] for p in PAIRS} == set(pb.DESCRIPTOR.enum_types_by_name)


def test_http_names_are_the_member_names():
    assert names.MODES == {"clamp": Mode.CLAMP, "ablate": Mode.ABLATE, "scale": Mode.SCALE,
                           "add": Mode.ADD}
    for table, enum in ((names.SCOPES, Scope), (names.READ_SCOPES, ReadScope),
                        (names.FRAMES, Frame), (names.SITES, Site)):
        assert {k: v for k, v in table.items()} == {m.name.lower(): m for m in enum}
    assert names.ACT_POOLS == {m.name.lower(): m for m in ActPool}
    assert names.ACT_DTYPES == {"float32": ActDtype.FLOAT32, "float16": ActDtype.FLOAT16,
                                "bfloat16": ActDtype.BFLOAT16}
    assert names.OPS == {"gt": Cond.GT, "lt": Cond.LT, ">": Cond.GT, "<": Cond.LT}
    # OpenAI's name for a guardrail's stop; the rest are the members' names
    assert names.FINISH == {FinishReason.LENGTH: "length", FinishReason.STOP: "stop",
                            FinishReason.ABORT: "abort", FinishReason.FEATURE: "content_filter"}
