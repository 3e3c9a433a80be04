"""Intervention spec validation, cache salts and the worker wire format."""

from __future__ import annotations

import pytest

from sae_runtime.errors import InvalidRequestError, UnknownSAEError
from sae_runtime.ops import Mode
from sae_runtime.saes.base import SAEConfig
from sae_runtime.spec.interventions import Intervention, Scope, SteeringSpec
from sae_runtime.spec.payloads import EXTRA_ARGS_KEY, RequestPayload, decode_request, encode_request
from sae_runtime.spec.reads import Read, ReadScope, ReadSpec

SAES = {"a": SAEConfig("standard", 8, 100, "blocks.1.hook_resid_post", 1, "resid_post"),
        "b": SAEConfig("topk", 8, 50, "blocks.0.hook_resid_post", 0, "resid_post", k=4)}


def spec(*ivs):
    return SteeringSpec(tuple(ivs))


@pytest.mark.parametrize(
    "s, exc, field",
    [
        (spec(Intervention("zz", 1, Mode.CLAMP, 1.0)), UnknownSAEError, "interventions[0].sae"),
        (spec(Intervention("", 1, Mode.CLAMP, 1.0)), InvalidRequestError, "interventions[0].sae"),
        (spec(Intervention("a", 0, Mode.ADD, 1.0), Intervention("b", 50, Mode.CLAMP, 1.0)),
         InvalidRequestError, "interventions[1].feature"),
        (spec(Intervention("a", 3, Mode.CLAMP, float("inf"))), InvalidRequestError, "interventions[0].value"),
        (spec(Intervention("a", 3, Mode.SCALE, float("nan"))), InvalidRequestError, "interventions[0].value"),
        (spec(Intervention("a", 3, Mode.CLAMP, 1.0), Intervention("a", 3, Mode.ADD, 1.0)),
         InvalidRequestError, "interventions[1].feature"),
        (spec(*[Intervention("a", i, Mode.ADD, 1.0) for i in range(5)]), InvalidRequestError, "interventions"),
    ],
)
def test_validation_names_the_field(s, exc, field):
    with pytest.raises(exc) as ei:
        s.validate(SAES, max_interventions=4)
    assert ei.value.field == field


def test_unknown_sae_message_lists_loaded():
    with pytest.raises(UnknownSAEError, match="loaded SAEs: a, b"):
        spec(Intervention("zz", 1, Mode.CLAMP, 1.0)).validate(SAES, 4)


def test_cache_salt_is_order_free_and_distinguishes_specs():
    x = Intervention("a", 1, Mode.CLAMP, 2.0)
    y = Intervention("b", 2, Mode.ADD, -1.0, Scope.GENERATION_ONLY)
    assert spec().cache_salt() is None
    assert spec(x, y).cache_salt() == spec(y, x).cache_salt()
    assert spec(x).cache_salt() != spec(x, y).cache_salt()
    assert spec(x).cache_salt() != spec(Intervention("a", 1, Mode.CLAMP, 2.5)).cache_salt()
    assert spec(Intervention("a", 1, Mode.CLAMP, 2.0, Scope.GENERATION_ONLY)).cache_salt() != spec(x).cache_salt()
    # ablate ignores its value, so the value must not split the cache
    assert spec(Intervention("a", 1, Mode.ABLATE, 5.0)).cache_salt() == spec(
        Intervention("a", 1, Mode.ABLATE, 0.0)).cache_salt()


def test_payload_round_trip_through_extra_args():
    """The payload survives msgpack (what vLLM does to extra_args) field for field."""
    import msgspec

    s = spec(Intervention("b", 7, Mode.SCALE, 0.5, Scope.GENERATION_ONLY), Intervention("a", 1, Mode.ABLATE, 9.0))
    reads = ReadSpec((Read("a", 3, (4, 5), ReadScope.PROMPT),), pooled=True)
    sent = RequestPayload(rid="r1", edits=s.to_payload({"a": 0, "b": 1}),
                          reads=reads.to_payload({"a": 0, "b": 1}), pooled=True)
    extra = msgspec.msgpack.decode(msgspec.msgpack.encode({EXTRA_ARGS_KEY: encode_request(sent)}))
    got = decode_request(extra)
    assert got == sent
    assert [(e.sae, e.feature, e.mode, e.value, e.positions) for e in got.edits] == [
        (1, 7, int(Mode.SCALE), 0.5, Scope.GENERATION_ONLY.selector), (0, 1, int(Mode.ABLATE), 0.0, Scope.ALL.selector)]
    assert [(r.sae, r.top_k, r.watch, r.positions) for r in got.reads] == [
        (0, 3, (4, 5), ReadScope.PROMPT.selector)]
    assert decode_request(None) is None and decode_request({}) is None


def test_cache_salt_is_computed_once_per_spec(monkeypatch):
    import hashlib

    s = spec(Intervention("a", 1, Mode.CLAMP, 2.0))
    first = s.cache_salt()
    monkeypatch.setattr(hashlib, "sha256", None)  # a second hash would fail
    assert s.cache_salt() == first
