"""Proto -> core conversion (``server.grpc.convert``) and the core's checks
(``server.core.validate``), without a network or engine."""

from __future__ import annotations

import pytest

from clients.client import SteeringClient, clamp
from sae_runtime.errors import InvalidRequestError, UnknownSAEError
from sae_runtime.ops import Mode
from sae_runtime.saes.base import SAEConfig
from sae_runtime.spec.reads import ReadScope
from sae_runtime.spec.vectors import VectorIndex
from server.config import SAESource, ServerConfig
from server.core import validate
from server.core.service import Core
from server.grpc import convert
from steering.v1 import steering_pb2 as pb
from tests.server.engines import FakeEngine

SAES = {"s": SAEConfig("standard", 8, 100, "blocks.1.hook_resid_post", 1, "resid_post")}
build = SteeringClient.build_request


LIMITS = validate.Limits(max_interventions=3, vocab_size=512, max_read_top_k=10, max_watch=4)


def conv(req):
    return validate.generation(convert.generate_request(req), saes=SAES, limits=LIMITS,
                               vectors=VectorIndex({}))


def with_reads(*reads):
    req = build("x")
    req.reads.extend(reads)
    return req


def test_defaults_and_round_trip():
    got = conv(build("hello", interventions=[clamp("s", 4, 2.0, "generation_only")], request_id="r1"))
    assert (got.prompt.text, got.prompt.ids, got.max_tokens, got.temperature, got.top_p) == (
        "hello", None, validate.DEFAULT_MAX_TOKENS, 1.0, 1.0)
    (iv,) = got.spec.interventions
    assert (iv.sae, iv.feature, iv.mode, iv.value, int(iv.scope)) == ("s", 4, Mode.CLAMP, 2.0, 2)
    assert got.request_id == "r1"
    ids = conv(build([1, 2, 3], max_tokens=5, temperature=0.0, seed=7))
    assert (ids.prompt.ids, ids.max_tokens, ids.temperature, ids.seed) == ((1, 2, 3), 5, 0.0, 7)


@pytest.mark.parametrize(
    "req, field",
    [
        (pb.GenerateRequest(), "prompt"),
        (build(""), "prompt.text"),
        (build([]), "prompt.token_ids.ids"),
        (build([1, 512]), "prompt.token_ids.ids[1]"),
        (build("x", max_tokens=0), "sampling.max_tokens"),
        (build("x", temperature=-0.5), "sampling.temperature"),
        (build("x", temperature=float("nan")), "sampling.temperature"),
        (build("x", top_p=0.0), "sampling.top_p"),
        (build("x", top_p=1.5), "sampling.top_p"),
        (build("x", top_k=100000), "sampling.top_k"),
        (build("x", stop=["ok", ""]), "sampling.stop[1]"),
        (build("x", stop=["s"] * 17), "sampling.stop"),
        (build("x", stop=["ok", "s" * 257]), "sampling.stop[1]"),
        (build("x", stop_token_ids=[9999]), "sampling.stop_token_ids[0]"),
        (build("x", request_id="r" * 129), "request_id"),
        (build("x", interventions=[pb.Intervention(sae="s", feature=1)]), "interventions[0].mode"),
        (build("x", interventions=[pb.Intervention(sae="s", feature=1, mode=9)]), "interventions[0].mode"),
        (build("x", interventions=[pb.Intervention(sae="s", feature=1, mode=1, scope=7)]),
         "interventions[0].scope"),
        (build("x", interventions=[clamp("s", 100, 1.0)]), "interventions[0].feature"),
        (build("x", interventions=[clamp("s", 1, float("inf"))]), "interventions[0].value"),
        (build("x", interventions=[clamp("s", i, 1.0) for i in range(4)]), "interventions"),
        (with_reads(pb.FeatureRead(sae="s")), "reads[0]"),
        (with_reads(pb.FeatureRead(sae="s", top_k=11)), "reads[0].top_k"),
        (with_reads(pb.FeatureRead(sae="s", watch=[1, 2, 3, 4, 5])), "reads[0].watch"),
        (with_reads(pb.FeatureRead(sae="s", watch=[1, 100])), "reads[0].watch[1]"),
        (with_reads(pb.FeatureRead(sae="s", watch=[7, 7])), "reads[0].watch[1]"),
        (with_reads(pb.FeatureRead(sae="s", top_k=1, scope=9)), "reads[0].scope"),
        (with_reads(pb.FeatureRead(sae="s", top_k=1), pb.FeatureRead(sae="s", top_k=2)), "reads[1].sae"),
    ],
)
def test_bad_requests_name_the_field(req, field):
    with pytest.raises(InvalidRequestError) as ei:
        conv(req)
    assert ei.value.field == field


def test_unknown_sae_is_not_found_error():
    with pytest.raises(UnknownSAEError):
        conv(build("x", interventions=[clamp("nope", 1, 1.0)]))
    with pytest.raises(UnknownSAEError) as ei:
        conv(with_reads(pb.FeatureRead(sae="nope", top_k=1)))
    assert ei.value.field == "reads[0].sae"


def test_reads_round_trip_and_default_scope():
    got = conv(with_reads(pb.FeatureRead(sae="s", top_k=3, watch=[5, 1])))
    (r,) = got.reads.reads
    assert (r.sae, r.top_k, r.watch, r.scope) == ("s", 3, (5, 1), None)  # unset: every position
    assert r.selector == ReadScope.ALL.selector
    assert got.reads.wants_prompt
    gen = conv(with_reads(pb.FeatureRead(sae="s", top_k=3, scope=pb.READ_SCOPE_GENERATION)))
    assert not gen.reads.wants_prompt


def test_check_lengths():
    validate.check_lengths(10, 6, 16)
    with pytest.raises(InvalidRequestError, match="ask for at most 6") as ei:
        validate.check_lengths(10, 7, 16)
    assert ei.value.field == "sampling.max_tokens"
    with pytest.raises(InvalidRequestError) as ei:
        validate.check_lengths(16, 1, 16)
    assert ei.value.field == "prompt"


def test_sae_source_parsing_and_duplicate_ids(tmp_path):
    s = SAESource.parse(f"x={tmp_path}@blocks.2.hook_resid_pre")
    assert (s.id, s.path, s.hook_name) == ("x", tmp_path, "blocks.2.hook_resid_pre")
    assert SAESource.parse(str(tmp_path)).id == tmp_path.name
    with pytest.raises(ValueError, match="duplicate SAE ids"):
        ServerConfig(model="m", saes=(SAESource.parse(f"a={tmp_path}"), SAESource.parse(f"a={tmp_path}")))


def test_status_mapping():
    import grpc

    from sae_runtime.errors import ResourceLimitError
    from server.grpc.errors import status_code_of

    assert status_code_of(InvalidRequestError("f", "m")) == grpc.StatusCode.INVALID_ARGUMENT
    assert status_code_of(UnknownSAEError("f", "x", [])) == grpc.StatusCode.NOT_FOUND
    assert status_code_of(ResourceLimitError("x")) == grpc.StatusCode.RESOURCE_EXHAUSTED


def _labels(tmp_path):
    import json

    from sae_runtime.labels import store as feats

    (tmp_path / feats.LABELS_FILE).write_text(json.dumps({"format": feats.FORMAT, "d_sae": 100, "features": [
        {"index": 5, "label": "ocean: whale", "density": 0.1, "max_activation": 3.0,
         "examples": [{"context": "the big", "token": " whale", "activation": 3.0}]}]}))
    return {"s": feats.load_beside(tmp_path, "s", 100)}


def _core(labels) -> Core:
    return Core(FakeEngine(), model="m", saes=SAES, labels=labels, limits=LIMITS, compiled=False)


def test_feature_lookup_and_search(tmp_path):
    import asyncio

    core = _core(_labels(tmp_path))
    f = convert.feature(asyncio.run(core.get_feature("s", 5)))
    assert (f.sae, f.index, f.label, f.examples[0].token) == ("s", 5, "ocean: whale", " whale")
    assert f.max_activation == pytest.approx(3.0)
    found = core.search_features("WHALE")
    assert [x.index for x in found] == [5]


@pytest.mark.parametrize("call, err, needle", [
    (("get", "nope", 1), UnknownSAEError, "unknown SAE 'nope'"),
    (("get", "s", 100), InvalidRequestError, "index: 100 is out of range"),
    (("search", "  ", "", 0), InvalidRequestError, "query"),
    (("search", "x", "", 101), InvalidRequestError, "limit"),
    (("search", "x" * 201, "", 0), InvalidRequestError, "query"),
    (("search", "x", "nope", 0), UnknownSAEError, "nope"),
])
def test_feature_request_errors(tmp_path, call, err, needle):
    import asyncio

    core = _core(_labels(tmp_path))
    with pytest.raises(err, match=needle):
        if call[0] == "get":
            asyncio.run(core.get_feature(*call[1:]))
        else:
            core.search_features(*call[1:])


def test_unlabelled_sae_get_feature_has_an_empty_label_and_search_is_a_failed_precondition():
    import asyncio

    from sae_runtime.errors import NotLabelledError
    from server.grpc.errors import status_code_of

    core = _core({})
    f = asyncio.run(core.get_feature("s", 1))
    assert (f.sae, f.index, f.label) == ("s", 1, "")
    with pytest.raises(NotLabelledError, match="no loaded SAE has feature labels") as e:
        core.search_features("x")
    assert status_code_of(e.value).name == "FAILED_PRECONDITION"
