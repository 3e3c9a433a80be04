"""A cross-layer transcoder's feature addressed as ``LAYER/J`` (as an attribution graph names
it) in the Python client and the ``steer`` CLI: converted to the flat index the server takes,
``slot * features_per_layer + J``, with the SAE's ``ListSAEs`` entry (no server here: the
entries are written as the server reports them, ``tests/e2e/test_clt.py`` checks the real
ones and a CLI clamp on the served CLT)."""

from __future__ import annotations

import pytest

from clients.cli import build_parser, interventions_arg, reads_arg, resolve_features
from clients.client import (
    LayerFeature,
    SteeringClient,
    flat_feature,
    parse_condition,
    parse_feature,
)
from steering.v1 import steering_pb2 as pb

F = 64
CLT = pb.SAEInfo(id="topics_clt", layers=[0, 1, 2], features_per_layer=F, d_sae=3 * F)
LATE = pb.SAEInfo(id="late", layers=[4, 5, 6], features_per_layer=F, d_sae=3 * F)
SAE = pb.SAEInfo(id="topics_l1", d_sae=512)


@pytest.fixture
def client(monkeypatch):
    c = SteeringClient("127.0.0.1:9")  # never dialled: ListSAEs is answered below
    calls = []

    def list_saes():
        calls.append(1)
        return [CLT, LATE, SAE]

    monkeypatch.setattr(c, "list_saes", list_saes)
    c.calls = calls
    yield c
    c.close()


def test_parse_feature_takes_an_index_or_layer_slash_index():
    assert parse_feature("7") == 7 and type(parse_feature("7")) is int
    assert parse_feature("1/19") == LayerFeature(1, 19)
    for bad in ("x", "1/", "/3", "1/-2", "-1", "a/3", "1/2/3"):
        with pytest.raises(ValueError, match="feature"):
            parse_feature(bad)


def test_flat_feature_is_slot_times_features_per_layer_plus_index():
    assert flat_feature(CLT, LayerFeature(0, 5)) == 5
    assert flat_feature(CLT, LayerFeature(1, 19)) == F + 19
    assert flat_feature(CLT, LayerFeature(2, F - 1)) == 3 * F - 1
    assert flat_feature(LATE, LayerFeature(5, 3)) == F + 3  # layer 5 is the CLT's slot 1
    assert flat_feature(SAE, 12) == 12  # a flat index passes as it is


@pytest.mark.parametrize("info, feature, msg", [
    (SAE, LayerFeature(0, 3), r"'topics_l1' is not one"),
    (CLT, LayerFeature(3, 0), r"layer 3 is not one of its layers \[0, 1, 2\]"),
    (LATE, LayerFeature(1, 0), r"layer 1 is not one of its layers \[4, 5, 6\]"),
    (CLT, LayerFeature(1, F), rf"index {F} is out of range \(it has {F} features per layer"),
])
def test_flat_feature_refuses_a_non_clt_and_out_of_range(info, feature, msg):
    with pytest.raises(ValueError, match=msg):
        flat_feature(info, feature)


def test_the_client_converts_with_one_list_saes(client):
    assert client.flat_feature("topics_clt", LayerFeature(2, 4)) == 2 * F + 4
    assert client.flat_feature("topics_clt", 9) == 9
    assert client.flat_feature("late", LayerFeature(6, 1)) == 2 * F + 1
    assert len(client.calls) == 1
    with pytest.raises(ValueError, match="serves no SAE 'nope'"):
        client.flat_feature("nope", LayerFeature(0, 1))
    cond = parse_condition("topics_clt:1/3>0.5", resolve=client.flat_feature)
    assert (cond.sae, cond.feature, cond.threshold) == ("topics_clt", F + 3, 0.5)
    with pytest.raises(ValueError, match="needs the SAE's layers"):
        parse_condition("topics_clt:1/3>0.5")


def test_generate_flags_take_layer_addressed_features(client):
    args = build_parser().parse_args([
        "generate", "--prompt", "hi", "--clamp", "topics_clt:1/19=6", "--ablate", "topics_clt:7",
        "--add", "topics_l1:12=2", "--watch", "topics_clt:2/5", "--read", "topics_clt:3",
        "--when", "topics_clt:1/3>0.5", "--abort-when", "topics_clt:0/1<2",
        "--abort-when", "topics_l1:4>1"])
    resolve_features(client, args)
    ivs = interventions_arg(args.edits, None, cond=args.when)
    assert [(i.sae, i.feature) for i in ivs] == [
        ("topics_clt", F + 19), ("topics_clt", 7), ("topics_l1", 12)]
    assert all((i.when.sae, i.when.feature) == ("topics_clt", F + 3) for i in ivs)
    (r,) = reads_arg(args.read_topk, args.watch, None)
    assert (r.sae, r.top_k, list(r.watch)) == ("topics_clt", 3, [2 * F + 5])
    assert [(c.sae, c.feature) for c in args.abort_when] == [("topics_clt", 1), ("topics_l1", 4)]
    assert len(client.calls) == 1


def test_encode_and_features_show_take_layer_addressed_features(client):
    args = build_parser().parse_args(["encode", "--prompt", "hi", "--sae", "topics_clt",
                                      "--watch", "1/2", "--watch", "8"])
    resolve_features(client, args)
    assert args.watch_features == [F + 2, 8]
    args = build_parser().parse_args(["features", "show", "topics_clt:2/63"])
    resolve_features(client, args)
    assert args.feature == ("topics_clt", 2 * F + 63)
    assert len(client.calls) == 1


def test_no_layer_addressed_feature_no_list_saes(client):
    args = build_parser().parse_args(["generate", "--prompt", "hi", "--clamp", "topics_clt:70=1",
                                      "--watch", "topics_l1:3", "--when", "topics_clt:71>0"])
    resolve_features(client, args)
    assert (args.edits[0][2], args.watch, args.when.feature) == (70, [("topics_l1", 3)], 71)
    assert client.calls == []


@pytest.mark.parametrize("argv, msg", [
    (["generate", "--prompt", "hi", "--clamp", "topics_l1:0/3=1"],
     r"--clamp: feature 0/3 of SAE 'topics_l1': LAYER/J addresses a cross-layer transcoder"),
    (["generate", "--prompt", "hi", "--watch", "topics_clt:5/1"],
     r"--watch: feature 5/1 of SAE 'topics_clt': layer 5 is not one of its layers"),
    (["generate", "--prompt", "hi", "--clamp", "topics_clt:1/3=1", "--when", "topics_clt:1/64>0"],
     r"--when: feature 1/64 of SAE 'topics_clt': index 64 is out of range"),
    (["encode", "--prompt", "hi", "--activations", "blocks.0.hook_resid_post", "--watch", "0/1"],
     r"--watch LAYER/J needs --sae"),
])
def test_unresolvable_layer_features_name_the_flag(client, argv, msg):
    args = build_parser().parse_args(argv)
    with pytest.raises(ValueError, match=msg):
        resolve_features(client, args)


@pytest.mark.parametrize("bad", [["--clamp", "topics_clt:1/=2"], ["--watch", "topics_clt:x/1"],
                                 ["--when", "topics_clt:1/a>0"], ["--clamp", "topics_clt:1/-1=2"]])
def test_malformed_layer_features_are_usage_errors(bad):
    with pytest.raises(SystemExit) as ei:
        build_parser().parse_args(["generate", "--prompt", "hi", *bad])
    assert ei.value.code == 2
