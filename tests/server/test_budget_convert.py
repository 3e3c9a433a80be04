"""The capacity budget at the doors' shared check: ``server.core.validate.generation`` runs
``sae_runtime.spec.budget.check_request`` over the whole request, vectors and inline
vectors included (they are appended after the interventions' own validation)."""

from __future__ import annotations

import pytest

from clients.client import (
    SteeringClient,
    absolute_range,
    inline_vector,
    positions,
    read,
    vector,
    when,
)
from sae_runtime.errors import InvalidRequestError
from sae_runtime.saes.base import SAEConfig
from sae_runtime.spec.vectors import VectorIndex
from server.core import validate
from server.grpc import convert

SAES = {"s": SAEConfig("standard", 8, 100, "blocks.1.hook_resid_post", 1, "resid_post"),
        "vectors@L1": SAEConfig("standard", 8, 2, "blocks.1.hook_resid_post", 1, "resid_post")}
INDEX = VectorIndex({"happy": {1: ("vectors@L1", 0)}}, inline={1: ("vectors@L1", 1)}, d_model=8)
LIMITS = validate.Limits(max_interventions=3, vocab_size=512, max_read_top_k=10, max_watch=4)
build = SteeringClient.build_request


def conv(**kw):
    return validate.generation(convert.generate_request(build([1, 2, 3], **kw)), saes=SAES,
                               limits=LIMITS, vectors=INDEX)


def spread(n: int):
    return positions(*[absolute_range(2 * i, 2 * i + 1) for i in range(n)])


def test_named_and_inline_vectors_on_one_bank_count_together():
    conv(vectors=[vector("happy", 1.0, at=spread(2))], inline_vectors=[inline_vector([0.5] * 8, 1)])
    with pytest.raises(InvalidRequestError) as ei:
        conv(vectors=[vector("happy", 1.0, at=spread(3))],
             inline_vectors=[inline_vector([0.5] * 8, 1)])
    assert ei.value.field == "inline_vectors[0]"
    assert "4 edit rows" in str(ei.value) and "at most 3" in str(ei.value)
    with pytest.raises(InvalidRequestError) as ei:
        conv(vectors=[vector("happy", 1.0, at=spread(4))])
    assert ei.value.field == "vectors" and "need 4 edit rows" in str(ei.value)


def test_a_read_and_a_guardrail_on_one_sae_are_admitted():
    got = conv(reads=[read("s", 2, watch=[4])], abort_when=[when("s", 7, ">", 1.0)])
    assert [r.sae for r in got.reads.reads] == ["s"] and len(got.guards.guards) == 1
