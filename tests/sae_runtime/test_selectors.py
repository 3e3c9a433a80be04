"""Position selectors: resolution, validation, the payload, the cache salt, and the planner's
token-id rows on hand-built batches against a per-token oracle written here.

The oracle decides from the selector's fields alone (not from ``Selector.windows``):
``_selected`` below spells out the documented rule position by position.
"""

from __future__ import annotations

import msgspec
import numpy as np
import pytest
import torch

from sae_runtime import ops
from sae_runtime.errors import InvalidRequestError
from sae_runtime.kernels import row_edits
from sae_runtime.saes.base import SAEConfig
from sae_runtime.spec.interventions import Intervention, Scope, SteeringSpec
from sae_runtime.spec.payloads import (
    EditPayload,
    ReadPayload,
    RequestPayload,
    decode_request,
    encode_request,
)
from sae_runtime.spec.reads import Read, ReadScope, ReadSpec
from sae_runtime.spec.selectors import (
    ALL,
    GENERATION,
    MAX_RANGES,
    MAX_TOKEN_IDS,
    POS_INF,
    PROMPT,
    Frame,
    Range,
    Selector,
)
from sae_runtime.step.planner import (
    ScheduledRequest,
    StepDescription,
    compile_request,
    plan_step,
    token_pieces,
)
from sae_runtime.step.tables import HookTables
from tests.sae_runtime._factories import random_sae
from tests.sae_runtime.test_planner import _dense_oracle

A, P, G = Frame.ABSOLUTE, Frame.PROMPT, Frame.GENERATION


def _in_range(r: Range, pos: int, n: int) -> bool:
    """The documented meaning of one range, position by position."""
    if r.frame == A:
        return (r.start or 0) <= pos and (r.end is None or pos < r.end)
    if r.frame == G:
        k = pos - n
        return k >= 0 and (r.start or 0) <= k and (r.end is None or k < r.end)
    if pos >= n:
        return False

    def at(v):  # negative: from the prompt's end
        return v + n if v < 0 else v

    return at(r.start or 0) <= pos and (r.end is None or pos < at(r.end))


def _selected(sel: Selector, pos: int, n: int, tok: int) -> bool:
    in_ranges = any(_in_range(r, pos, n) for r in sel.ranges) if sel.ranges else True
    if sel.ranges and sel.exclude_ranges:
        in_ranges = not in_ranges
    in_tokens = (tok in sel.token_ids) != sel.exclude_token_ids if sel.token_ids else True
    return in_ranges and in_tokens


SELECTORS = {
    "all": ALL,
    "generation": GENERATION,
    "prompt": PROMPT,
    "first3_prompt": Selector((Range(P, 0, 3),)),
    "last_prompt": Selector((Range(P, -1),)),
    "last3_prompt": Selector((Range(P, -3, None),)),
    "prompt_2_to_minus2": Selector((Range(P, 2, -2),)),
    "prompt_minus5_to_4": Selector((Range(P, -5, 4),)),
    "first20_gen": Selector((Range(G, 0, 20),)),
    "from_5th_gen": Selector((Range(G, 4),)),
    "abs_window": Selector((Range(A, 3, 9),)),
    "abs_from": Selector((Range(A, 6),)),
    "union_overlapping": Selector((Range(A, 2, 6), Range(P, 4, 8), Range(G, 1, 3))),
    "not_first3": Selector((Range(P, 0, 3),), exclude_ranges=True),
    "not_gen_window": Selector((Range(G, 2, 4), Range(A, 0, 1)), exclude_ranges=True),
    "tokens": Selector(token_ids=(7, 11)),
    "not_tokens": Selector(token_ids=(7,), exclude_token_ids=True),
    "tokens_in_gen": Selector((Range(G, 0, 5),), token_ids=(7, 11)),
    "tokens_outside_prompt_head": Selector((Range(P, 0, 2),), exclude_ranges=True, token_ids=(11,),
                                           exclude_token_ids=True),
}


@pytest.mark.parametrize("name", sorted(SELECTORS))
@pytest.mark.parametrize("n", [1, 2, 5, 9])
def test_windows_and_covers_match_the_documented_rule(name, n):
    sel = SELECTORS[name]
    rng = np.random.default_rng(n)
    toks = rng.choice([3, 7, 11, 12], size=40)
    wins = sel.windows(n)
    assert all(lo < hi for lo, hi in wins) and all(a[1] < b[0] for a, b in zip(wins, wins[1:], strict=False))
    assert len(wins) <= sel.max_windows
    for pos in range(40):
        want = _selected(sel, pos, n, int(toks[pos]))
        assert sel.covers(pos, n, int(toks[pos])) == want, (name, n, pos)
        in_win = any(lo <= pos < hi for lo, hi in wins)
        assert in_win == _selected(Selector(sel.ranges, sel.exclude_ranges), pos, n, 0)
    assert (POS_INF in {hi for _, hi in wins}) == _selected(
        Selector(sel.ranges, sel.exclude_ranges), 10**9, n, 0)


def test_sugar_and_prompt_clipping():
    assert ALL.windows(5) == ((0, POS_INF),)
    assert GENERATION.windows(5) == ((5, POS_INF),)
    assert PROMPT.windows(5) == ((0, 5),)
    assert Scope.GENERATION_ONLY.selector == GENERATION and ReadScope.PROMPT.selector == PROMPT
    assert Selector((Range(P, -10, 100),)).windows(4) == ((0, 4),)  # clipped to the prompt
    assert Selector((Range(P, 3, -3),)).windows(4) == ()  # mixed signs: empty for a short prompt
    assert Selector((Range(P, 0, 3),), exclude_ranges=True).windows(8) == ((3, POS_INF),)
    assert Selector((Range(A, 0, 4), Range(A, 4, 6))).windows(3) == ((0, 6),)  # merged


@pytest.mark.parametrize("sel, field", [
    (Selector((Range(P, 5, 2),)), "p.ranges[0]"),  # reversed
    (Selector((Range(P, -1, -3),)), "p.ranges[0]"),  # reversed, from the end
    (Selector((Range(A, 4, 4),)), "p.ranges[0]"),  # empty
    (Selector((Range(G, None, 0),)), "p.ranges[0]"),  # empty
    (Selector((Range(G, 0, 3), Range(G, -1, 3))), "p.ranges[1].start"),  # negative step
    (Selector((Range(A, 0, -2),)), "p.ranges[0].end"),  # negative absolute
    (Selector((Range(P, 2**41),)), "p.ranges[0].start"),
    (Selector((Range(A, 0, 1),) * (MAX_RANGES + 1)), "p.ranges"),
    (Selector(token_ids=tuple(range(MAX_TOKEN_IDS + 1))), "p.token_ids"),
    (Selector(token_ids=(3, 512)), "p.token_ids[1]"),
    (Selector(token_ids=(3, 4, 3)), "p.token_ids[2]"),
    (Selector(exclude_ranges=True), "p.exclude_ranges"),
    (Selector(exclude_token_ids=True), "p.exclude_token_ids"),
])
def test_bad_selectors_name_the_field(sel, field):
    with pytest.raises(InvalidRequestError) as ei:
        sel.validate("p", vocab_size=512)
    assert ei.value.field == field


def test_mixed_sign_prompt_range_is_valid():
    Selector((Range(P, 2, -2),)).validate("p", 512)
    Selector((Range(P, -5, 4),), token_ids=(0, 511)).validate("p", 512)


SAES = {"s": SAEConfig("standard", 8, 100, "blocks.1.hook_resid_post", 1, "resid_post")}


def test_edit_rows_per_sae_are_capped():
    two = Selector((Range(A, 0, 2), Range(A, 5, 6)))
    ok = SteeringSpec((Intervention("s", 1, ops.Mode.CLAMP, 1.0, positions=two),
                       Intervention("s", 2, ops.Mode.ADD, 1.0)))
    ok.validate(SAES, max_interventions=3, vocab_size=512)
    over = SteeringSpec((Intervention("s", 1, ops.Mode.CLAMP, 1.0, positions=two),
                         Intervention("s", 2, ops.Mode.ADD, 1.0,
                                      positions=Selector((Range(A, 0, 2),), exclude_ranges=True))))
    with pytest.raises(InvalidRequestError, match="need 4 edit rows") as ei:
        over.validate(SAES, max_interventions=3, vocab_size=512)
    assert ei.value.field == "interventions"
    with pytest.raises(InvalidRequestError) as ei:
        SteeringSpec((Intervention("s", 1, ops.Mode.CLAMP, 1.0, positions=Selector(token_ids=(600,))),)
                     ).validate(SAES, 3, vocab_size=512)
    assert ei.value.field == "interventions[0].positions.token_ids[0]"


def test_read_with_token_ids_is_valid_and_scopes_are_selectors():
    spec = ReadSpec((Read("s", 2, positions=Selector(token_ids=(3,))),))
    spec.validate(SAES, max_top_k=4, max_watch=4, vocab_size=512)
    r = spec.reads[0]
    assert r.covers(7, 5, 3) and not r.covers(7, 5, 4)
    gen_only = ReadSpec((Read("s", 2, positions=Selector((Range(G, 0, 3),))),))
    assert not gen_only.wants_prompt
    assert ReadSpec((Read("s", 2, positions=Selector((Range(A, 5),))),)).wants_prompt
    r = Read("s", 2, scope=ReadScope.GENERATION)
    assert r.covers(5, 5) and not r.covers(4, 5)


def test_cache_salt_covers_the_selector():
    def salt(sel=None, scope=Scope.ALL, n=None):
        return SteeringSpec((Intervention("s", 1, ops.Mode.CLAMP, 2.0, scope, sel),)).cache_salt(n)

    assert salt() == salt(ALL)  # a scope is sugar for its selector
    assert salt(scope=Scope.GENERATION_ONLY) == salt(GENERATION)
    assert salt(Selector((Range(A, 0, 3),))) != salt(Selector((Range(A, 0, 4),)))
    assert salt(Selector(token_ids=(3, 4))) == salt(Selector(token_ids=(4, 3)))
    assert salt(Selector(token_ids=(3,))) != salt(Selector(token_ids=(3,), exclude_token_ids=True))
    assert salt(Selector((Range(A, 0, 3),), exclude_ranges=True)) != salt(Selector((Range(A, 0, 3),)))
    # positions relative to the prompt length: salted by it; absolute ones need not be
    assert salt(GENERATION, n=8) != salt(GENERATION, n=9)
    assert salt(Selector((Range(A, 2),)), n=8) == salt(Selector((Range(A, 2),)), n=9)
    assert salt(GENERATION) == salt(scope=Scope.GENERATION_ONLY)


def test_selectors_travel_in_the_payload():
    sel = Selector((Range(P, -2), Range(G, 0, 5)), True, (4, 9), True)
    sent = RequestPayload(rid="r", edits=(EditPayload(0, 3, int(ops.Mode.ADD), 1.5, sel),),
                          reads=(ReadPayload(0, 2, (1,), PROMPT),))
    got = decode_request(msgspec.msgpack.decode(msgspec.msgpack.encode(
        {"sae_steering": encode_request(sent)})))
    assert got == sent and got.edits[0].positions.ranges[0].frame is Frame.PROMPT


# ---------------------------------------------------------------------------- planner

D_IN, D_SAE = 16, 48
MAX_TOKENS, MAX_SEQS, WIDTH = 64, 12, 4
C, AD, SC = int(ops.Mode.CLAMP), int(ops.Mode.ADD), int(ops.Mode.SCALE)


def _edits(*items):
    return tuple(EditPayload(0, f, m, v, sel) for f, m, v, sel in items)


BOS, NL = 1, 13
SPECIAL = RequestPayload(rid="special", edits=_edits((5, C, 3.0, Selector(token_ids=(BOS, NL)))))
MIXED = RequestPayload(rid="mixed", edits=_edits(
    (2, AD, 1.5, Selector((Range(G, 0, 3),))),
    (7, C, -1.0, Selector((Range(P, -2),), token_ids=(NL,), exclude_token_ids=True)),
    (9, SC, 2.0, Selector(token_ids=(NL,), exclude_token_ids=True))))
WINDOWS = RequestPayload(rid="windows", edits=_edits(
    (4, C, 2.0, Selector((Range(A, 1, 3), Range(P, -2), Range(G, 1, 2)))),
    (6, AD, -2.0, Selector((Range(P, 0, 2),), exclude_ranges=True))))


def _tokens(seed: int, n: int) -> list[int]:
    rng = np.random.default_rng(seed)
    return [int(t) for t in rng.choice([BOS, NL, 20, 21, 22], size=n, p=[.15, .25, .2, .2, .2])]


# (payload, prompt length, token sequence seed) per request; a step lists
# (request index, start row, end row, first position); rows past the last request are padding.
REQUESTS = [(SPECIAL, 30, 1), (MIXED, 9, 2), (WINDOWS, 7, 3), (None, 5, 4)]
STEPS = {
    "chunked_prefill_many_matches": [  # the special-token prompt needs several slots per chunk
        [(0, 0, 20, 0), (1, 20, 29, 0), (3, 29, 34, 0)],
        [(0, 0, 10, 20), (2, 10, 17, 0), (1, 17, 18, 9)],
        [(0, 0, 1, 30), (1, 1, 2, 10), (2, 2, 3, 7), (3, 3, 4, 5)],
    ],
    "preempted_recompute": [  # prompt and generated positions again in one go
        [(1, 0, 12, 0), (2, 12, 22, 0), (0, 22, 56, 0)],
        [(1, 0, 1, 12), (2, 1, 2, 10), (0, 2, 3, 34)],
    ],
}


def _oracle(payload, n, pos, tok):
    if payload is None:
        return []
    return [(e.feature, e.mode, e.value) for e in payload.edits if _selected(e.positions, pos, n, tok)]


@pytest.mark.parametrize("name", sorted(STEPS))
def test_token_id_rows_give_exactly_the_oracle_edits(name):
    hook = HookTables(random_sae("jumprelu", D_IN, D_SAE, seed=0), MAX_TOKENS, MAX_SEQS, WIDTH)
    plans = {i: compile_request(p, n) for i, (p, n, _) in enumerate(REQUESTS)}
    seqs = {i: _tokens(seed, 80) for i, (_, _, seed) in enumerate(REQUESTS)}
    g = torch.Generator().manual_seed(0)
    used_slots = 0
    for step in STEPS[name]:
        T = max(b for _, _, b, _ in step) + 2
        flat = np.zeros(T, dtype=np.int32)
        for i, a, b, pos0 in step:
            flat[a:b] = seqs[i][pos0 : pos0 + b - a]
        reqs = [ScheduledRequest(f"r{i}", a, b, pos0, plans[i]) for i, a, b, pos0 in step]
        plan_step([hook], StepDescription(reqs, flat))
        used_slots = max(used_slots, hook.n_slots - sum(plans[i].edits != {} for i, *_ in step))
        want = {}
        for i, a, b, pos0 in step:
            payload, n, _ = REQUESTS[i]
            for t in range(a, b):
                if items := _oracle(payload, n, pos0 + t - a, seqs[i][pos0 + t - a]):
                    want[t] = sorted(items)
        feat, mode, val = row_edits(hook.edits, hook.tok_slot[:T], hook.tok_pos[:T])
        for t in range(T):
            live = mode[t] != ops.Mode.NONE
            got = sorted((int(f), int(m), float(v)) for f, m, v in
                         zip(feat[t][live], mode[t][live], val[t][live], strict=True))
            assert got == want.get(t, []), f"{name}: row {t}"
        h, residual = torch.randn(T, D_IN, generator=g), torch.randn(T, D_IN, generator=g)
        out = hook.apply(h, residual)
        untouched = [t for t in range(T) if t not in want]
        assert torch.equal(out[untouched], h[untouched])
        want_out = _dense_oracle(hook.sae, h, h + residual, want)
        torch.testing.assert_close(out, want_out, atol=1e-4, rtol=1e-4)
        hook.clear()
    assert used_slots > 0, "no step needed more than one slot for a request"


def test_token_pieces_fit_the_width_and_cover_runs():
    plan = compile_request(SPECIAL, 30)
    rows = plan.edits[0]
    toks = np.array([BOS, NL, NL, 20, NL, 21, 22, BOS, 20, NL, 20, NL, 20, 20, BOS, BOS])
    pos = np.arange(40, 40 + len(toks))
    pieces = token_pieces(rows, plan.token_rules[0], pos, toks, width=2)
    assert all(len(p) <= 2 for _, _, p in pieces)
    got = sorted((int(lo), int(hi)) for _, _, p in pieces for lo, hi in zip(p["pos_lo"], p["pos_hi"], strict=True))
    assert got == [(40, 43), (44, 45), (47, 48), (49, 50), (51, 52), (54, 56)]
    assert [(a, b) for a, b, _ in pieces] == [(0, 5), (7, 10), (11, 16)]
    assert token_pieces(rows, plan.token_rules[0], pos[3:4], toks[3:4], width=2) == []


def test_multi_window_reads_read_the_hull_and_report_through_covers():
    sel = Selector((Range(P, 0, 2), Range(P, -1), Range(G, 1, 2)))
    plan = compile_request(RequestPayload(rid="rd", reads=(ReadPayload(0, 2, (), sel),)), 6)
    (rp,) = plan.reads
    assert rp.windows == ((0, 2), (5, 6), (7, 8)) and (rp.pos_lo, rp.pos_hi) == (0, 8)
    hook = HookTables(random_sae("topk", D_IN, D_SAE, seed=1), MAX_TOKENS, MAX_SEQS, WIDTH)
    (seg,) = plan_step([hook], StepDescription([ScheduledRequest("x", 0, 9, 0, plan)]))
    assert (seg.pos0, seg.n) == (0, 8)
    r = Read("s", 2, positions=sel)
    assert [p for p in range(9) if r.covers(p, 6)] == [0, 1, 5, 7]


def test_v1_adapter_passes_the_step_tokens_only_when_a_request_selects_by_token():
    """The V1 adapter on a fake runner: ``input_ids.np`` (host) reaches the planner for a
    token-id request, and is not touched for others."""
    from types import SimpleNamespace

    from sae_runtime.spec.payloads import EXTRA_ARGS_KEY
    from sae_runtime.vllm.runner_v1 import RequestPlans, describe_step

    def req(payload, n):
        return SimpleNamespace(sampling_params=SimpleNamespace(
            extra_args={EXTRA_ARGS_KEY: encode_request(payload)}), num_prompt_tokens=n)

    ids = np.array([BOS, 20, NL, 21, 0, 0], dtype=np.int32)

    def runner(payload):
        return SimpleNamespace(
            requests={"a": req(payload, 4)},
            input_batch=SimpleNamespace(req_ids=["a"], num_reqs=1,
                                        num_computed_tokens_cpu=np.array([0])),
            query_start_loc=SimpleNamespace(np=np.array([0, 4])),
            input_ids=SimpleNamespace(np=ids), device=torch.device("cpu"))

    step = describe_step(runner(SPECIAL), RequestPlans())
    assert step.token_ids is ids
    assert describe_step(runner(WINDOWS), RequestPlans()).token_ids is None
    hook = HookTables(random_sae("standard", D_IN, D_SAE, seed=2), MAX_TOKENS, MAX_SEQS, WIDTH)
    plan_step([hook], step)
    feat, mode, _ = row_edits(hook.edits, hook.tok_slot[:6], hook.tok_pos[:6])
    assert [bool((m != ops.Mode.NONE).any()) for m in mode] == [True, False, True, False, False, False]
