"""Position selectors through the converters (gRPC and the HTTP body): round trip, and every
bad value refused with INVALID_ARGUMENT naming the field. No network, no engine."""

from __future__ import annotations

import pytest

from clients.client import (
    SteeringClient,
    absolute_range,
    clamp,
    generation_range,
    positions,
    prompt_range,
    read,
)
from sae_runtime.errors import InvalidRequestError
from sae_runtime.saes.base import SAEConfig
from sae_runtime.spec.interventions import Scope
from sae_runtime.spec.reads import ReadScope
from sae_runtime.spec.selectors import GENERATION, Frame, Range, Selector
from sae_runtime.spec.vectors import VectorIndex
from server.core import validate
from server.grpc import convert
from server.http.bodies import CompletionBody, field_table, generate_request
from server.http.errors import http_error
from steering.v1 import steering_pb2 as pb

SAES = {"s": SAEConfig("standard", 8, 100, "blocks.1.hook_resid_post", 1, "resid_post")}
LIMITS = validate.Limits(max_interventions=4, vocab_size=512, max_read_top_k=10, max_watch=4)
build = SteeringClient.build_request


def check(req):
    return validate.generation(req, saes=SAES, limits=LIMITS, vectors=VectorIndex({}))


def conv(req):
    return check(convert.generate_request(req))


def test_round_trip_and_scope_sugar():
    at = positions(prompt_range(-1), generation_range(0, 20), exclude_ranges=True,
                   token_ids=[1, 2], exclude_token_ids=True)
    got = conv(build("x", interventions=[clamp("s", 4, 2.0, at=at), clamp("s", 5, 1.0, "generation_only")],
                     reads=[read("s", 2, at=positions(absolute_range(3, 7)))]))
    a, b = got.spec.interventions
    assert a.selector == Selector((Range(Frame.PROMPT, -1), Range(Frame.GENERATION, 0, 20)), True,
                                  (1, 2), True)
    assert b.positions is None and b.scope == Scope.GENERATION_ONLY and b.selector == GENERATION
    (r,) = got.reads.reads
    assert r.selector == Selector((Range(Frame.ABSOLUTE, 3, 7),)) and got.reads.wants_prompt
    # a client helper without a selector still sends the old scope
    assert clamp("s", 1, 1.0).scope == pb.SCOPE_ALL and not clamp("s", 1, 1.0).HasField("positions")
    gen = conv(build("x", reads=[read("s", 2, at=positions(generation_range(1, 4)))]))
    assert not gen.reads.wants_prompt


def _iv(sel: pb.PositionSelector, **kw) -> pb.GenerateRequest:
    return build("x", interventions=[clamp("s", 1, 1.0, at=sel, **kw)])


def _rd(sel: pb.PositionSelector, **kw) -> pb.GenerateRequest:
    return build("x", reads=[read("s", 2, at=sel, **kw)])


F = "interventions[0].positions"
BAD = [
    (_iv(positions(prompt_range(5, 2))), f"{F}.ranges[0]", "reversed"),
    (_iv(positions(prompt_range(-1, -4))), f"{F}.ranges[0]", "reversed"),
    (_iv(positions(absolute_range(3, 3))), f"{F}.ranges[0]", "empty"),
    (_iv(positions(generation_range(-2))), f"{F}.ranges[0].start", "must be >= 0"),
    (_iv(positions(generation_range(0, 5), absolute_range(0, -1))), f"{F}.ranges[1].end", "must be >= 0"),
    (_iv(positions(pb.PositionRange(start=1))), f"{F}.ranges[0].frame", "must be set"),
    (_iv(positions(pb.PositionRange(frame=9))), f"{F}.ranges[0].frame", "unknown frame"),
    (_iv(positions(*[absolute_range(i, i + 1) for i in range(9)])), f"{F}.ranges", "at most 8"),
    (_iv(positions(token_ids=range(65))), f"{F}.token_ids", "at most 64"),
    (_iv(positions(token_ids=[1, 512])), f"{F}.token_ids[1]", "out of range"),
    (_iv(positions(token_ids=[1, 1])), f"{F}.token_ids[1]", "listed twice"),
    (_iv(positions(exclude_ranges=True)), f"{F}.exclude_ranges", "needs ranges"),
    (_iv(positions(exclude_token_ids=True)), f"{F}.exclude_token_ids", "needs token_ids"),
    (_iv(positions(prompt_range(0, 2)), scope="all"), F, "not both"),
    (_iv(positions(*[absolute_range(2 * i, 2 * i + 1) for i in range(5)])), "interventions",
     "need 5 edit rows"),
    (_rd(positions(token_ids=[3, 3])), "reads[0].positions.token_ids[1]", "listed twice"),
    (_rd(positions(prompt_range(3, 1))), "reads[0].positions.ranges[0]", "reversed"),
    (_rd(positions(prompt_range(0, 2)), scope="prompt"), "reads[0].positions", "not both"),
]


@pytest.mark.parametrize("req, field, text", BAD)
def test_bad_selectors_are_invalid_argument_naming_the_field(req, field, text):
    with pytest.raises(InvalidRequestError) as ei:
        conv(req)
    assert ei.value.field == field and text in str(ei.value) and str(ei.value).startswith(field + ":")


def test_http_body_uses_the_same_conversion():
    body = CompletionBody(model="m", prompt="hi", interventions=[{
        "sae": "s", "feature": 3, "mode": "add", "value": 2.0,
        "positions": {"ranges": [{"frame": "generation", "start": 0, "end": 20}],
                      "token_ids": [7], "exclude_token_ids": True}}],
        reads=[{"sae": "s", "top_k": 2, "positions": {"ranges": [{"frame": "prompt", "start": -3}]}}])
    got = check(generate_request(body))
    (iv,) = got.spec.interventions
    assert iv.selector == Selector((Range(Frame.GENERATION, 0, 20),), False, (7,), True)
    assert got.reads.reads[0].selector == Selector((Range(Frame.PROMPT, -3),))
    assert got.reads.reads[0].scope is None and ReadScope.ALL.selector == Selector()
    # an error names the body field, as every HTTP validation error does
    bad = CompletionBody(model="m", prompt="hi", interventions=[{
        "sae": "s", "feature": 3, "mode": "add", "value": 2.0,
        "positions": {"ranges": [{"frame": "absolute", "start": 4, "end": 1}]}}])
    with pytest.raises(InvalidRequestError) as ei:
        check(generate_request(bad))
    err = http_error(ei.value, field_table(bad))
    assert err.status == 400 and err.body["error"]["param"] == "interventions[0].positions.ranges[0]"
    neg = CompletionBody(model="m", prompt="hi", interventions=[{
        "sae": "s", "feature": 3, "mode": "add", "positions": {"token_ids": [-1]}}])
    with pytest.raises(InvalidRequestError) as ei:
        generate_request(neg)
    assert ei.value.field == "interventions[0].positions.token_ids[0]"
