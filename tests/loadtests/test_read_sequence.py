"""The Locust read-sequence check on hand-made streams (loadtests/read_sequence.py).

Each case is written out by hand from the rule in docs/api.md (position p is reported once token
p has been fed; the last generated token never is; each selected position exactly once, in
order, carrying the token it consumes), then broken in one way.
"""

from __future__ import annotations

import pytest

from loadtests.read_sequence import read_sequence_errors
from steering.v1 import steering_pb2 as pb

ALL, PROMPT, GEN = pb.READ_SCOPE_ALL, pb.READ_SCOPE_PROMPT, pb.READ_SCOPE_GENERATION
PROMPT_IDS = [11, 12, 13]
GENERATED = [21, 22, 23]  # fed positions 0..4 carry 11 12 13 21 22; 23 (position 5) never fed
GOOD_ALL = [("a", 0, 11), ("a", 1, 12), ("a", 2, 13), ("a", 3, 21), ("a", 4, 22)]


def errors(features, reads=(("a", ALL),), prompt=PROMPT_IDS, generated=GENERATED):
    return read_sequence_errors(list(reads), prompt, generated, features)


def test_a_correct_stream_passes():
    assert errors(GOOD_ALL) == []
    assert errors(GOOD_ALL, reads=[("a", pb.READ_SCOPE_UNSPECIFIED)]) == []  # default: all


def test_scopes_and_two_reads_interleaved_by_position():
    assert errors([("a", 0, 11), ("a", 1, 12), ("a", 2, 13)], reads=[("a", PROMPT)]) == []
    assert errors([("a", 3, 21), ("a", 4, 22)], reads=[("a", GEN)]) == []
    both = [("a", 0, 11), ("b", 0, 11), ("a", 1, 12), ("b", 1, 12), ("a", 2, 13),
            ("b", 2, 13), ("a", 3, 21), ("a", 4, 22)]
    assert errors(both, reads=[("a", ALL), ("b", PROMPT)]) == []


def test_gap():
    got = errors([f for f in GOOD_ALL if f[1] != 2])
    assert got == ["read sequence: a position 2 missing (1 of 0..4 missing)"]


def test_duplicate():
    prompt = list(range(100, 115))  # 15 prompt tokens, 5 generated: fed positions 0..18
    gen = [200, 201, 202, 203, 204]
    full = prompt + gen
    feats = [("a", p, full[p]) for p in range(19)]
    feats.insert(18, ("a", 17, full[17]))
    assert errors(feats, prompt=prompt, generated=gen) == ["read sequence: a position 17 twice"]


def test_out_of_order():
    feats = [GOOD_ALL[0], GOOD_ALL[1], GOOD_ALL[3], GOOD_ALL[2], GOOD_ALL[4]]
    assert errors(feats) == ["read sequence: a position 2 after position 3 (out of order)"]
    # across reads: b's position 0 after a's position 1
    feats = [("a", 0, 11), ("a", 1, 12), ("b", 0, 11), ("b", 1, 12)]
    got = errors(feats, reads=[("a", PROMPT), ("b", PROMPT)], generated=[21])
    assert got[0] == "read sequence: b position 0 after position 1 of another read (out of order)"


def test_wrong_token():
    feats = list(GOOD_ALL)
    feats[3] = ("a", 3, 22)  # position 3 consumes the first generated token, 21
    assert errors(feats) == [
        "read sequence: a position 3 carries token 22, the stream's token there is 21"]


def test_the_last_generated_token_has_no_read():
    got = errors([*GOOD_ALL, ("a", 5, 23)])
    assert got == ["read sequence: a position 5 was never fed (prompt 3 + generated 3: "
                   "last fed position 4)"]


def test_outside_scope_and_unread_sae():
    got = errors(GOOD_ALL[:4], reads=[("a", PROMPT)])
    assert got == ["read sequence: a position 3 is outside the read's READ_SCOPE_PROMPT (0..2)"]
    got = errors([*GOOD_ALL[:1], ("z", 0, 11), *GOOD_ALL[1:]])
    assert got == ["read sequence: features of SAE 'z', which was not read"]


def test_selector_reads_skip_coverage_but_not_order():
    assert errors([("a", 1, 12), ("a", 3, 21)], reads=[("a", None)]) == []
    assert errors([("a", 3, 21), ("a", 1, 12)], reads=[("a", None)]) == [
        "read sequence: a position 1 after position 3 (out of order)"]


@pytest.mark.parametrize("n_gen", [0, 1])
def test_nothing_generated_yet_fed_means_prompt_only(n_gen):
    gen = GENERATED[:n_gen]  # one generated token: still only the prompt is fed
    assert errors(GOOD_ALL[:3], generated=gen) == []
    assert errors(GOOD_ALL[:2], generated=gen) == [
        "read sequence: a position 2 missing (1 of 0..2 missing)"]
