"""Position selectors end to end (shared server): every selector kind, teacher-forced against
the HF reference with the edit applied at positions this file computes by hand from the
documented rule; reads with ranges; a concurrent batch mixing selectors with plain
requests; the CLI and the HTTP body.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from clients.client import (
    absolute_range,
    clamp,
    generation_range,
    positions,
    prompt_range,
    read,
)
from tests.e2e.conftest import SAE_IDS
from tests.e2e.reference import CLAMP, Edit, HFReference, check_teacher_forced

pytestmark = pytest.mark.e2e

PROMPT = [5, 100, 200, 300, 45, 67, 12, 400, 100, 77]
P = len(PROMPT)
N_GEN = 12
SAE, VALUE = "resid_l1", 40.0


@pytest.fixture(scope="module")
def ref(server):
    return HFReference(server.model_dir, server.sae_dirs, SAE_IDS)


@pytest.fixture(scope="module")
def feature(ref):
    return int(ref.latents(PROMPT, SAE).sum(0).argmax())


def greedy(server, interventions=(), prompt=PROMPT, n=N_GEN, reads=()):
    with server.client() as c:
        return c.generate_text(prompt, max_tokens=n, temperature=0.0, ignore_eos=True,
                               interventions=list(interventions), reads=list(reads))


# name -> (selector, the positions it selects given the prompt length and full sequence)
CASES = {
    "prompt_window": (positions(prompt_range(2, 5)), lambda n, seq: set(range(2, 5))),
    "prompt_from_end": (positions(prompt_range(-2)), lambda n, seq: {n - 2, n - 1}),
    "first_4_generated": (positions(generation_range(0, 4)), lambda n, seq: set(range(n, n + 4))),
    "from_5th_generated": (positions(generation_range(4)),
                           lambda n, seq: set(range(n + 4, len(seq)))),
    "absolute_window": (positions(absolute_range(6, 14)), lambda n, seq: set(range(6, 14))),
    "exclude_ranges": (positions(prompt_range(0, -1), generation_range(3, 6), exclude_ranges=True),
                       lambda n, seq: {p for p in range(len(seq))
                                       if not (p < n - 1 or n + 3 <= p < n + 6)}),
    "token_ids": (positions(token_ids=[100, 45, 12]),
                  lambda n, seq: {p for p, t in enumerate(seq) if t in (100, 45, 12)}),
    "exclude_token_ids_in_generation": (
        positions(generation_range(), token_ids=[100], exclude_token_ids=True),
        lambda n, seq: {p for p, t in enumerate(seq) if p >= n and t != 100}),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_each_selector_kind_matches_the_reference(server, ref, feature, name):
    sel, selected = CASES[name]
    out = greedy(server, [clamp(SAE, feature, VALUE, at=sel)])
    full = PROMPT + out.token_ids
    at = frozenset(selected(P, full))
    check_teacher_forced(ref.logits(full, [Edit(SAE, feature, CLAMP, VALUE, at=at)], P), P, out.token_ids)
    # not vacuous: the edit moved greedy decoding, and only where the selector says
    assert out.token_ids != greedy(server).token_ids, f"{name}: the edit had no effect"
    assert out.token_ids != greedy(server, [clamp(SAE, feature, VALUE)]).token_ids, \
        f"{name}: same output as an edit at every position"


def test_token_id_selector_on_a_chunked_prompt(server, ref):
    """A prompt over the 64-token step budget, with the token at many scattered positions:
    more separate runs in each prefill chunk than one slot has edit rows (the request still
    takes one slot: the runs are a per-row token match, ``tok_match``)."""
    prompt = [(7 * i + 3) % 500 + 3 for i in range(150)]  # 150 distinct tokens
    toks = prompt[:100:5]  # every 5th position of the first 100
    sel = positions(token_ids=toks)
    out = greedy(server, [clamp(SAE, 5, 30.0, at=sel)], prompt=prompt, n=6)
    full = prompt + out.token_ids
    at = frozenset(p for p, t in enumerate(full) if t in toks)
    # the first 64-token chunk alone has more separate positions than one slot has edit
    # rows (--max-interventions 8)
    assert sum(p < 64 for p in at) > 8
    check_teacher_forced(ref.logits(full, [Edit(SAE, 5, CLAMP, 30.0, at=at)], len(prompt)),
                         len(prompt), out.token_ids)


def test_reads_report_exactly_the_selected_positions(server, ref):
    sel = positions(prompt_range(0, 2), prompt_range(-1), generation_range(2, 5))
    out = greedy(server, reads=[read("tk", 3, watch=[4], at=sel)], n=8)
    full = PROMPT + out.token_ids
    want = [0, 1, P - 1, P + 2, P + 3, P + 4]
    assert [f.position for f in out.features] == want
    assert [f.token_id for f in out.features] == [full[p] for p in want]
    dense = ref.latents(full, "tk")
    for f in out.features:
        row = dense[f.position]
        assert list(f.values) == pytest.approx(row.topk(3).values.tolist(), abs=1e-4)
        assert list(f.watch_values) == pytest.approx([float(row[4])], abs=1e-4)
    gen_only = greedy(server, reads=[read("tk", 2, at=positions(generation_range(1)))], n=5)
    assert [f.position for f in gen_only.features] == list(range(P + 1, P + 4))


def test_reads_by_token_id_report_exactly_those_positions(server, ref):
    # Generated tokens decide too: pick the tokens of the plain greedy run's positions 1 and
    # P + 1, so the selector matches a prompt position and a generated one (at least).
    plain = greedy(server, n=6)
    full0 = PROMPT + plain.token_ids
    toks = sorted({full0[1], full0[P + 1]})
    for exclude in (False, True):
        sel = positions(token_ids=toks, exclude_token_ids=exclude)
        out = greedy(server, reads=[read("tk", 3, at=sel)], n=6)
        full = PROMPT + out.token_ids
        assert out.token_ids == plain.token_ids  # reading does not steer
        fed = range(len(full) - 1)  # the last generated token has no activation
        want = [p for p in fed if (full[p] in toks) != exclude]
        assert [f.position for f in out.features] == want, f"exclude={exclude}"
        dense = ref.latents(full, "tk")
        for f in out.features:
            assert f.token_id == full[f.position]
            assert list(f.values) == pytest.approx(dense[f.position].topk(3).values.tolist(),
                                                   abs=1e-4)


def _mixed(i: int, feature: int):
    """Request i of the mixed batch: every third plain, the others a selector kind each."""
    if i % 3 == 0:
        return []
    names = sorted(CASES)
    sel = CASES[names[i % len(names)]][0]
    return [clamp(SAE, (feature + i) % 256, 20.0 + i, at=sel)]


def test_concurrent_selectors_and_plain_requests_equal_solo(server, ref, feature):
    n = 15
    prompts = [[(11 * i + 3 * j) % 500 + 3 for j in range(6 + (i % 4) * 21)] for i in range(n)]
    solo = [greedy(server, _mixed(i, feature), prompt=prompts[i]).token_ids for i in range(n)]
    plain = {i: greedy(server, prompt=prompts[i]).token_ids for i in range(n)}
    with cf.ThreadPoolExecutor(n) as pool:
        together = list(pool.map(
            lambda i: greedy(server, _mixed(i, feature), prompt=prompts[i]).token_ids, range(n)))
    for i in range(n):
        assert together[i] == solo[i], f"request {i} changed when batched"
        if i % 3 == 0:
            assert together[i] == plain[i], f"plain request {i} changed beside selectors"
    steered = [i for i in range(n) if i % 3]
    assert sum(together[i] != plain[i] for i in steered) > len(steered) // 2
    # the batched selector requests are still exactly the reference's
    names = sorted(CASES)
    for i in steered[:4]:
        (iv,) = _mixed(i, feature)
        full = prompts[i] + together[i]
        at = frozenset(CASES[names[i % len(names)]][1](len(prompts[i]), full))
        edit = Edit(SAE, iv.feature, CLAMP, iv.value, at=at)
        check_teacher_forced(ref.logits(full, [edit], len(prompts[i])), len(prompts[i]), together[i])


def test_selector_is_in_the_cache_salt(server):
    prompt = [(5 * j + 2) % 500 + 3 for j in range(150)]  # > one KV block (128 tokens)
    a = positions(prompt_range(0, 64))
    b = positions(prompt_range(0, 100))
    with server.client() as c:
        def run(sel):
            return c.generate_text(prompt, max_tokens=4, temperature=0.0, ignore_eos=True,
                                   interventions=[clamp(SAE, 7, 40.0, at=sel)])
        first = run(a)
        other = run(b)
        again = run(a)
    assert other.usage.cached_prompt_tokens == 0, "another selector reused the first one's KV"
    assert again.usage.cached_prompt_tokens > 0 and again.token_ids == first.token_ids


def test_bad_selector_is_invalid_argument(server):
    with server.client() as c:
        with pytest.raises(grpc.RpcError) as ei:
            c.generate_text(PROMPT, max_tokens=2,
                            interventions=[clamp(SAE, 1, 1.0, at=positions(generation_range(5, 2)))])
    assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert ei.value.details().startswith("interventions[0].positions.ranges[0]:")


def _steer(server, *args):
    exe = str(Path(sys.executable).with_name("steer"))
    return subprocess.run([exe, "--target", server.target, *args], capture_output=True, text=True,
                          timeout=120)


def test_cli_position_flags(server, feature):
    ids = ",".join(map(str, PROMPT))
    r = _steer(server, "generate", "--prompt-ids", ids, "--max-tokens", str(N_GEN),
               "--temperature", "0", "--clamp", f"{SAE}:{feature}={VALUE}",
               "--positions", "prompt:-2:", "--read", "tk:2", "--read-positions", "gen:1:3", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    want = greedy(server, [clamp(SAE, feature, VALUE, at=CASES["prompt_from_end"][0])])
    assert out["token_ids"] == want.token_ids
    assert [f["position"] for f in out["features"]] == [P + 1, P + 2]
    r = _steer(server, "generate", "--prompt-ids", ids, "--max-tokens", "2", "--clamp", f"{SAE}:1=2",
               "--positions", "gen:-1:")
    assert r.returncode == 1 and "INVALID_ARGUMENT" in r.stderr and "positions.ranges[0].start" in r.stderr


def test_http_body_selectors_equal_grpc(server, feature):
    with server.openai() as oai:
        (m,) = oai.models.list().data
        body = {"ignore_eos": True, "return_token_ids": True, "interventions": [{
            "sae": SAE, "feature": feature, "mode": "clamp", "value": VALUE,
            "positions": {"token_ids": [100, 45, 12]}}]}
        r = oai.completions.create(model=m.id, prompt=PROMPT, max_tokens=N_GEN, temperature=0,
                                   extra_body=body)
    want = greedy(server, [clamp(SAE, feature, VALUE, at=CASES["token_ids"][0])])
    assert r.choices[0].model_extra["token_ids"] == want.token_ids
