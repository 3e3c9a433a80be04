"""The steer CLI's position flags (no server): syntax only, values are the server's to judge."""

from __future__ import annotations

import pytest

from clients.cli import build_parser, interventions_arg, reads_arg, selector_arg
from clients.client import parse_range
from steering.v1 import steering_pb2 as pb


def parse(*argv):
    return build_parser().parse_args(["generate", "--prompt", "hi", *argv])


def test_position_flags_build_one_selector_for_the_edits_and_one_for_the_reads():
    a = parse("--clamp", "s:1=2", "--add", "s:2=1", "--positions", "prompt:-1:", "--positions", "gen::20",
              "--exclude-ranges", "--token-ids", "1,13", "--exclude-token-ids",
              "--read", "s:3", "--read-positions", "abs:4:9")
    sel = selector_arg(a.positions, a.exclude_ranges, a.token_ids, a.exclude_token_ids)
    ivs = interventions_arg(a.edits, None, sel)
    for iv in ivs:
        assert iv.scope == pb.SCOPE_UNSPECIFIED and iv.positions == sel
    assert [(r.frame, r.HasField("start"), r.start, r.HasField("end"), r.end) for r in sel.ranges] == [
        (pb.POSITION_FRAME_PROMPT, True, -1, False, 0), (pb.POSITION_FRAME_GENERATION, False, 0, True, 20)]
    assert sel.exclude_ranges and list(sel.token_ids) == [1, 13] and sel.exclude_token_ids
    (rd,) = reads_arg(a.read_topk, a.watch, a.read_scope, selector_arg(a.read_positions, a.read_exclude_ranges))
    assert rd.scope == pb.READ_SCOPE_UNSPECIFIED
    assert list(rd.positions.ranges) == [pb.PositionRange(frame=pb.POSITION_FRAME_ABSOLUTE, start=4, end=9)]


def test_without_position_flags_the_old_scopes_are_sent():
    a = parse("--clamp", "s:1=2", "--read", "s:3")
    (iv,) = interventions_arg(a.edits, None, selector_arg(a.positions, a.exclude_ranges, a.token_ids,
                                                    a.exclude_token_ids))
    assert iv.scope == pb.SCOPE_ALL and not iv.HasField("positions")
    (rd,) = reads_arg(a.read_topk, a.watch, a.read_scope, selector_arg(a.read_positions, a.read_exclude_ranges))
    assert rd.scope == pb.READ_SCOPE_ALL and not rd.HasField("positions")


@pytest.mark.parametrize("bad", [["--positions", "prompt:1"], ["--positions", "tail:1:2"],
                                 ["--positions", "gen:x:"], ["--token-ids", "1,a"]])
def test_malformed_position_flags_are_usage_errors(bad):
    with pytest.raises(SystemExit) as ei:
        parse(*bad)
    assert ei.value.code == 2


def test_parse_range_leaves_values_to_the_server():
    r = parse_range("gen:5:2")  # reversed: the server refuses it, naming the field
    assert (r.frame, r.start, r.end) == (pb.POSITION_FRAME_GENERATION, 5, 2)
    assert parse_range("absolute::") == pb.PositionRange(frame=pb.POSITION_FRAME_ABSOLUTE)
