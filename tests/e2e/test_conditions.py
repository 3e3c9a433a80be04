"""Conditional edits, latches and guardrails end to end (shared server): teacher-forced
against the HF reference (sae-lens latents of the hooked activation decide where a
condition holds, independently of our kernels), guardrails stopping exactly at the
position the reference's latents cross the threshold, a concurrent batch mixing all of
them with plain requests, the CLI and the HTTP body.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import subprocess
import sys
from pathlib import Path

import grpc
import httpx
import pytest

from clients.client import clamp, conditional, guardrail, positions, when
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


def greedy(server, interventions=(), prompt=PROMPT, n=N_GEN, **kw):
    with server.client() as c:
        return c.generate_text(prompt, max_tokens=n, temperature=0.0, ignore_eos=True,
                               interventions=list(interventions), **kw)


@pytest.fixture(scope="module")
def plain(server):
    return greedy(server)


@pytest.fixture(scope="module")
def split_feature(ref, plain):
    """(edited feature, condition feature, threshold): the condition holds at some but
    not all positions of the plain sequence, either way round."""
    full = PROMPT + plain.token_ids
    lat = ref.latents(full, SAE)
    fires = (lat > 0).float().mean(0)
    c = int((fires - 0.5).abs().argmin())
    pos = lat[:, c][lat[:, c] > 0]
    thr = float(pos.mean()) / 2  # > thr: the stronger firings; < thr: the rest
    target = int(lat.sum(0).argmax())
    if target == c:
        target = int(lat.sum(0).argsort()[-2])
    return target, c, thr


def _holds(ref, full, c, thr, op=">"):
    v = ref.latents(full, SAE)[:, c]
    return [bool(x > thr) if op == ">" else bool(x < thr) for x in v]


@pytest.mark.parametrize("op", [">", "<"])
def test_conditional_clamp_matches_the_reference(server, ref, split_feature, op):
    f, c, thr = split_feature
    out = greedy(server, [conditional(clamp(SAE, f, VALUE), when(SAE, c, op, thr))])
    full = PROMPT + out.token_ids
    holds = _holds(ref, full, c, thr, op)
    assert any(holds[:-1]) and not all(holds[:-1]), "the condition must split the positions"
    check_teacher_forced(ref.logits(full, [Edit(SAE, f, CLAMP, VALUE, when=(c, op, thr))], P), P,
                         out.token_ids)
    # not vacuous: differs from the unconditional edit and from no edit
    assert out.token_ids != greedy(server, [clamp(SAE, f, VALUE)]).token_ids
    assert out.token_ids != greedy(server).token_ids


def _latch_case(ref, target):
    """(condition feature, threshold): first held at a prompt position q >= 2, and not held
    at some later prompt position, so a latch changes which prompt positions are edited."""
    v_all = ref.latents(PROMPT, SAE)
    for c in v_all.sum(0).argsort(descending=True).tolist():
        if c == target:
            continue
        v = v_all[:, c]
        for q in range(2, P - 1):
            before = float(v[:q].max())
            if float(v[q]) > before + 1e-3:
                thr = (before + float(v[q])) / 2
                if any(float(v[r]) <= thr for r in range(q + 1, P)):
                    return c, thr
    pytest.fail("no feature for a latch case")


def test_latched_clamp_stays_on_after_the_first_hit(server, ref, split_feature):
    f = split_feature[0]
    c, thr = _latch_case(ref, f)
    out = greedy(server, [conditional(clamp(SAE, f, VALUE), when(SAE, c, ">", thr), latch=True)])
    full = PROMPT + out.token_ids
    edit = Edit(SAE, f, CLAMP, VALUE, when=(c, ">", thr), latch=True)
    check_teacher_forced(ref.logits(full, [edit], P), P, out.token_ids)
    unlatched = greedy(server, [conditional(clamp(SAE, f, VALUE), when(SAE, c, ">", thr))])
    assert out.token_ids != unlatched.token_ids, "the latch made no difference"


def _guard_case(ref, plain, sae="tk"):
    """(feature, threshold, trip position): a feature first over the threshold at a
    generated position p >= P + 2 of the plain run (the last token has no activation)."""
    full = PROMPT + plain.token_ids
    lat = ref.latents(full, sae)
    fed = len(full) - 1
    for f in lat[P:fed].amax(0).argsort(descending=True).tolist():
        g = lat[P:fed, f]
        for i in range(2, len(g)):
            earlier = float(g[:i].max())
            if float(g[i]) > earlier + 1e-3:
                return f, (earlier + float(g[i])) / 2, P + i
    pytest.fail("no feature crosses a threshold late enough in the plain run")


def test_guardrail_stops_at_the_generated_position_it_trips(server, ref, plain):
    f, thr, p = _guard_case(ref, plain)
    out = greedy(server, abort_when=[when("tk", f, ">", thr)])
    assert out.finish_reason == "feature"
    assert out.guardrail.position == p and out.guardrail.feature == f
    assert out.guardrail.sae == "tk" and out.guardrail.guardrail == 0
    full = PROMPT + plain.token_ids
    assert out.guardrail.value == pytest.approx(float(ref.latents(full, "tk")[p, f]), abs=1e-4)
    # tokens up to position p, none sampled from it or after
    assert out.token_ids == plain.token_ids[: p + 1 - P]
    assert out.usage.completion_tokens == len(out.token_ids)
    # a threshold never reached lets the request finish normally
    never = greedy(server, abort_when=[when("tk", f, ">", 1e9)])
    assert never.finish_reason == "length" and never.token_ids == plain.token_ids


def test_guardrail_on_a_prompt_position_refuses_before_generating(server, ref):
    lat = ref.latents(PROMPT, "tk")
    f = int(lat[3].argmax())
    thr = float(lat[:3, f].max().clamp(min=0)) + 1e-3
    assert float(lat[3, f]) > thr
    g = guardrail(when("tk", f, ">", thr), at=positions())  # every position
    out = greedy(server, abort_when=[g], reads=[])
    first = next(p for p in range(P) if float(lat[p, f]) > thr)
    assert out.finish_reason == "feature" and out.token_ids == [] and out.text == ""
    assert out.guardrail.position == first
    # the default (generated positions only) does not look at the prompt
    assert greedy(server, abort_when=[when("tk", f, ">", 1e9)]).finish_reason == "length"


def _mixed(i, split, guard):
    f, c, thr = split
    gf, gthr, _ = guard
    kind = i % 4
    if kind == 0:
        return {}
    if kind == 1:
        return {"interventions": [conditional(clamp(SAE, f, VALUE), when(SAE, c, ">", thr))]}
    if kind == 2:
        return {"interventions": [conditional(clamp(SAE, f, VALUE), when(SAE, c, "<", thr),
                                              latch=True)]}
    return {"abort_when": [when("tk", gf, ">", gthr)]}


def test_concurrent_conditions_guardrails_and_plain_equal_solo(server, ref, plain, split_feature):
    guard = _guard_case(ref, plain)
    n = 12
    prompts = [PROMPT if i % 4 == 3 else [(13 * i + 5 * j) % 500 + 3 for j in range(5 + i * 7)]
               for i in range(n)]
    solo = [greedy(server, prompt=prompts[i], **_mixed(i, split_feature, guard)) for i in range(n)]
    plains = {i: greedy(server, prompt=prompts[i]).token_ids for i in range(0, n, 4)}
    with cf.ThreadPoolExecutor(n) as pool:
        together = list(pool.map(
            lambda i: greedy(server, prompt=prompts[i], **_mixed(i, split_feature, guard)), range(n)))
    for i in range(n):
        assert together[i].token_ids == solo[i].token_ids, f"request {i} changed when batched"
        assert together[i].finish_reason == solo[i].finish_reason
        if i % 4 == 0:
            assert together[i].token_ids == plains[i], f"plain request {i} changed"
    for i in range(3, n, 4):
        assert together[i].finish_reason == "feature"
        assert together[i].guardrail.position == guard[2]


def test_bad_conditions_and_guardrails_are_invalid_argument(server):
    cases = [
        ([conditional(clamp(SAE, 1, 1.0), when("tk", 2, ">", 0.0))], [],
         "interventions[0].when.sae:"),
        ([conditional(clamp(SAE, 1, 1.0), when(SAE, 2, ">", float("nan")))], [],
         "interventions[0].when.threshold:"),
        ([conditional(clamp(SAE, 1, 1.0), when(SAE, 10**6, ">", 0.0))], [],
         "interventions[0].when.feature:"),
        ([], [guardrail(when("tk", 1, ">", 0.0), at=positions(token_ids=[5]))],
         "abort_when[0].positions.token_ids:"),
        ([], [when("tk", 1, ">", 0.0)] * 9, "abort_when:"),
    ]
    with server.client() as c:
        for ivs, guards, field in cases:
            with pytest.raises(grpc.RpcError) as ei:
                c.generate_text(PROMPT, max_tokens=2, interventions=ivs, abort_when=guards)
            assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT, field
            assert ei.value.details().startswith(field), ei.value.details()
        with pytest.raises(grpc.RpcError) as ei:  # an unknown SAE is NOT_FOUND, as everywhere
            c.generate_text(PROMPT, max_tokens=2, abort_when=[when("nope", 1, ">", 0.0)])
        assert ei.value.code() == grpc.StatusCode.NOT_FOUND
        assert ei.value.details().startswith("abort_when[0].condition.sae: unknown SAE 'nope'")
        assert "vectors@" not in ei.value.details()
        latch_only = clamp(SAE, 1, 1.0)
        latch_only.latch = True
        with pytest.raises(grpc.RpcError) as ei:
            c.generate_text(PROMPT, max_tokens=2, interventions=[latch_only])
        assert ei.value.details().startswith("interventions[0].latch:")
        assert c.health() == "SERVING"


def test_cli_and_http_take_conditions_and_guardrails(server, ref, plain, split_feature):
    f, c, thr = split_feature
    gf, gthr, p = _guard_case(ref, plain)
    exe = str(Path(sys.executable).with_name("steer"))
    ids = ",".join(map(str, PROMPT))
    run = subprocess.run(
        [exe, "--target", server.target, "generate", "--prompt-ids", ids, "--max-tokens",
         str(N_GEN), "--temperature", "0", "--json", "--clamp", f"{SAE}:{f}={VALUE}",
         "--when", f"{SAE}:{c}>{thr!r}"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    cond = greedy(server, [conditional(clamp(SAE, f, VALUE), when(SAE, c, ">", thr))])
    cli = json.loads(run.stdout)["token_ids"]  # the CLI stops at EOS: a prefix
    assert cli and cli == cond.token_ids[: len(cli)]
    run = subprocess.run(
        [exe, "--target", server.target, "generate", "--prompt-ids", ids, "--max-tokens",
         str(N_GEN), "--temperature", "0", "--json", "--abort-when", f"tk:{gf}>{gthr!r}"],
        capture_output=True, text=True, timeout=120)
    out = json.loads(run.stdout)
    assert out["finish_reason"] == "feature" and out["guardrail"]["position"] == p
    body = {"model": "m", "prompt": PROMPT, "max_tokens": N_GEN, "temperature": 0,
            "ignore_eos": True, "return_token_ids": True,
            "abort_when": [{"sae": "tk", "feature": gf, "op": ">", "threshold": gthr}]}
    with httpx.Client(timeout=120) as h:
        model = h.get(server.http_url + "/models").json()["data"][0]["id"]
        r = h.post(server.http_url + "/completions", json={**body, "model": model})
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        assert choice["finish_reason"] == "content_filter"
        assert choice["guardrail"]["position"] == p
        assert choice["token_ids"] == plain.token_ids[: p + 1 - P]
        bad = h.post(server.http_url + "/completions", json={
            **body, "model": model,
            "abort_when": [{"sae": "tk", "feature": gf, "op": "=", "threshold": 1}]})
        assert bad.status_code == 400 and "abort_when" in bad.text
