"""The steer CLI's --when / --latch / --abort-when / --vector flags (no server): syntax only."""

from __future__ import annotations

import pytest

from clients.cli import build_parser, condition_arg, guards_arg, interventions_arg, vector_arg
from steering.v1 import steering_pb2 as pb


def parse(*argv):
    return build_parser().parse_args(["generate", "--prompt", "hi", *argv])


def test_when_and_latch_make_every_edit_conditional():
    a = parse("--clamp", "s:1=2", "--ablate", "s:3", "--when", "s:7>0.25", "--latch")
    ivs = interventions_arg(a.edits, None, None, a.when, a.latch)
    for iv in ivs:
        assert iv.when == pb.FeatureCondition(sae="s", feature=7, op=pb.COMPARISON_GT, threshold=0.25)
        assert iv.latch
    b = parse("--clamp", "s:1=2", "--when", "s:7<-1e-3")
    (iv,) = interventions_arg(b.edits, None, None, b.when, b.latch)
    assert iv.when.op == pb.COMPARISON_LT and iv.when.threshold == pytest.approx(-1e-3)
    assert not iv.latch


def test_abort_when_watches_generation_unless_asked_for_the_prompt():
    a = parse("--abort-when", "s:2>3", "--abort-when", "t:4<1")
    gs = guards_arg(a.abort_when, a.abort_on_prompt)
    assert [(g.condition.sae, g.condition.feature) for g in gs] == [("s", 2), ("t", 4)]
    assert not any(g.HasField("positions") for g in gs)  # the server's default: generated
    (g,) = guards_arg(parse("--abort-when", "s:2>3", "--abort-on-prompt").abort_when, True)
    assert g.HasField("positions") and not g.positions.ranges  # every position


def test_vector_flag_takes_strength_and_layers():
    assert vector_arg("happy=4") == ("happy", 4.0, [])
    assert vector_arg("calm=-2.5@10,11") == ("calm", -2.5, [10, 11])


@pytest.mark.parametrize("bad", ["s:1", "s:x>1", "s:1=2", "1>2", "s:1>>2"])
def test_bad_conditions_are_argparse_errors(bad):
    import argparse

    with pytest.raises(argparse.ArgumentTypeError, match="SAE:FEATURE"):
        condition_arg(bad)
    with pytest.raises(SystemExit):
        parse("--when", bad)
