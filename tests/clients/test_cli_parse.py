"""The steer CLI's argument parsing (no server)."""

from __future__ import annotations

import pytest

from clients.cli import build_parser, interventions_arg
from steering.v1 import steering_pb2 as pb


def parse(*argv):
    return build_parser().parse_args(["generate", *argv])


def test_edits_in_order_with_modes_and_scope():
    a = parse("--prompt", "hi", "--clamp", "res:l1:3=2.5", "--ablate", "s:4", "--scale", "s:5=0.5",
              "--add", "s:6=-3")
    ivs = interventions_arg(a.edits, "generation_only")
    assert [(i.sae, i.feature, i.mode, i.value) for i in ivs] == [
        ("res:l1", 3, pb.INTERVENTION_MODE_CLAMP, 2.5), ("s", 4, pb.INTERVENTION_MODE_ABLATE, 0.0),
        ("s", 5, pb.INTERVENTION_MODE_SCALE, 0.5), ("s", 6, pb.INTERVENTION_MODE_ADD, -3.0)]
    assert all(i.scope == pb.SCOPE_GENERATION_ONLY for i in ivs)


def test_prompt_ids_and_nan_passes_through_for_the_server_to_judge():
    a = parse("--prompt-ids", "1,2,3", "--clamp", "s:1=nan")
    assert a.prompt_ids == [1, 2, 3]
    assert a.edits[0][3] != a.edits[0][3]  # NaN reaches the server, which rejects it


@pytest.mark.parametrize("bad", [["--clamp", "s:1"], ["--ablate", "s:1=2"], ["--clamp", "s=1"],
                                 ["--clamp", "s:x=1"], ["--clamp", "s:-1=1"]])
def test_malformed_edits_are_usage_errors(bad):
    with pytest.raises(SystemExit) as ei:
        parse("--prompt", "hi", *bad)
    assert ei.value.code == 2


def test_prompt_is_required_and_exclusive():
    with pytest.raises(SystemExit):
        parse("--max-tokens", "3")
    with pytest.raises(SystemExit):
        parse("--prompt", "a", "--prompt-ids", "1")


def test_reads_merge_per_sae_in_order():
    from clients.cli import reads_arg

    a = parse("--prompt", "hi", "--read", "b:4", "--watch", "a:7", "--watch", "b:2", "--watch", "a:1",
              "--read-scope", "generation")
    reads = reads_arg(a.read_topk, a.watch, a.read_scope)
    assert [(r.sae, r.top_k, list(r.watch), r.scope) for r in reads] == [
        ("b", 4, [2], pb.READ_SCOPE_GENERATION), ("a", 0, [7, 1], pb.READ_SCOPE_GENERATION)]


def test_encode_parses():
    a = build_parser().parse_args(["encode", "--prompt-ids", "1,2", "--sae", "s", "--top-k", "3",
                                   "--watch", "5", "--json"])
    assert (a.prompt_ids, a.sae, a.top_k, a.watch_features, a.json) == ([1, 2], "s", 3, [5], True)


def test_features_subcommands_parse():
    a = build_parser().parse_args(["features", "search", "ocean", "--json", "--limit", "3"])
    assert (a.command, a.features_command, a.text, a.json, a.limit) == ("features", "search", "ocean", True, 3)
    a = build_parser().parse_args(["features", "show", "topics:l1:12"])
    assert a.feature == ("topics:l1", 12)
    for bad in ("topics_l1", "topics_l1:x", ":3", "s:-1"):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["features", "show", bad])
