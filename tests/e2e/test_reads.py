"""Feature reads streamed beside tokens, and Encode, against the HF + sae-lens reference."""

from __future__ import annotations

import concurrent.futures as cf
import json
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
import torch

from clients.client import clamp, read
from steering.v1 import steering_pb2 as pb
from tests.e2e.conftest import SAE_IDS
from tests.e2e.reference import HFReference

pytestmark = pytest.mark.e2e
PROMPT = [5, 100, 200, 300, 45, 67, 12, 400]
TOL = 1e-4


@pytest.fixture(scope="module")
def ref(server):
    return HFReference(server.model_dir, server.sae_dirs, SAE_IDS)


def ref_latents(ref: HFReference, sid: str, ids: list[int]) -> torch.Tensor:
    """sae-lens latents of the plain HF activation at the SAE's site: [T, d_sae]."""
    return ref.latents(ids, sid)


def check_against(dense: torch.Tensor, feats, k: int, watch: list[int]) -> None:
    for f in feats:
        row = dense[f.position]
        want_top = row.topk(k).values
        assert list(f.values) == sorted(f.values, reverse=True)
        torch.testing.assert_close(torch.tensor(list(f.values)), want_top, atol=TOL, rtol=0)
        torch.testing.assert_close(row[list(f.indices)], torch.tensor(list(f.values)), atol=TOL, rtol=0)
        torch.testing.assert_close(torch.tensor(list(f.watch_values)), row[watch], atol=TOL, rtol=0)


def generate(server, prompt, n=10, reads=(), interventions=()):
    with server.client() as c:
        return c.generate_text(prompt, max_tokens=n, temperature=0.0, ignore_eos=True,
                               reads=list(reads), interventions=list(interventions))


@pytest.mark.parametrize("sid", SAE_IDS)
def test_reads_match_reference_at_prompt_and_generated_positions(server, ref, sid):
    watch = [0, 17, 200]
    out = generate(server, PROMPT, reads=[read(sid, top_k=8, watch=watch)])
    full = PROMPT + out.token_ids
    # every fed position exactly once, in order; the last generated token has no read
    assert [f.position for f in out.features] == list(range(len(full) - 1))
    assert [f.token_id for f in out.features] == full[:-1]
    assert all(f.sae == sid for f in out.features)
    dense = ref_latents(ref, sid, full)
    assert (dense[:, watch] == 0).any(), "watch list should include inactive features"
    check_against(dense, out.features, 8, watch)


def test_read_scopes(server):
    n = 6
    gen = generate(server, PROMPT, n, reads=[read("resid_l1", 4, scope="generation")])
    assert [f.position for f in gen.features] == list(range(len(PROMPT), len(PROMPT) + n - 1))
    pr = generate(server, PROMPT, n, reads=[read("resid_l1", 4, scope="prompt")])
    assert [f.position for f in pr.features] == list(range(len(PROMPT)))


def test_reads_with_clamp_report_edited_latents(server, ref):
    feature, target = 9, 7.5
    out = generate(server, PROMPT, reads=[read("resid_l1", top_k=4, watch=[feature, 3])],
                   interventions=[clamp("resid_l1", feature, target)])
    full = PROMPT + out.token_ids
    # edits at block 1 do not change block 1's own input, so the incoming activation is the
    # plain HF residual of the (steered) token sequence; the clamped feature reads as 7.5
    dense = ref_latents(ref, "resid_l1", full)
    dense[:, feature] = target
    assert all(f.watch_values[0] == pytest.approx(target) for f in out.features)
    check_against(dense, out.features, 4, [feature, 3])


def test_several_saes_read_at_once_in_position_then_request_order(server, ref):
    out = generate(server, PROMPT, 5, reads=[read("tk", 3), read("jr", 0, watch=[1, 2])])
    full = PROMPT + out.token_ids
    assert [(f.position, f.sae) for f in out.features] == [
        (p, s) for p in range(len(full) - 1) for s in ("tk", "jr")]
    check_against(ref_latents(ref, "tk", full), [f for f in out.features if f.sae == "tk"], 3, [])
    check_against(ref_latents(ref, "jr", full), [f for f in out.features if f.sae == "jr"], 0, [1, 2])


def test_concurrent_readers_and_non_readers_get_exactly_their_positions(server):
    n_req = 12
    prompts = [[(17 * i + j) % 500 + 3 for j in range(5 + 23 * (i % 4))] for i in range(n_req)]  # up to 74: chunked
    scopes = ["all", "prompt", "generation"]

    def spec(i):
        if i % 3 == 2:
            return []
        return [read(SAE_IDS[i % 3], 5, watch=[i], scope=scopes[i % 3])]

    def run(i):
        return generate(server, prompts[i], 8, reads=spec(i),
                        interventions=[clamp("resid_l1", i, 12.0)] if i % 4 == 1 else [])

    solo = [run(i) for i in range(n_req)]
    with cf.ThreadPoolExecutor(n_req) as pool:
        together = list(pool.map(run, range(n_req)))
    for i in range(n_req):
        t, s = together[i], solo[i]
        assert t.token_ids == s.token_ids
        P, full = len(prompts[i]), len(prompts[i]) + len(t.token_ids)
        want = {"all": range(full - 1), "prompt": range(P), "generation": range(P, full - 1)}
        if not spec(i):
            assert t.features == []
            continue
        assert [f.position for f in t.features] == list(want[scopes[i % 3]]), f"request {i}"
        for a, b in zip(t.features, s.features, strict=True):
            assert list(a.indices) == list(b.indices)
            assert list(a.values) == pytest.approx(list(b.values), abs=1e-5)


def test_prompt_reads_are_complete_when_the_prefix_is_cached(server, ref):
    prompt = [(3 * j + 2) % 500 + 3 for j in range(150)]  # > one 128-token KV block
    with server.client() as c:
        c.generate_text(prompt, max_tokens=2, temperature=0.0)  # fills the prefix cache
        warm = c.generate_text(prompt, max_tokens=2, temperature=0.0)
        assert warm.usage.cached_prompt_tokens > 0
        r = c.generate_text(prompt, max_tokens=3, temperature=0.0, reads=[read("resid_l1", 4)])
        after = c.generate_text(prompt, max_tokens=2, temperature=0.0)
    assert [f.position for f in r.features] == list(range(len(prompt) + 2))
    check_against(ref_latents(ref, "resid_l1", prompt + r.token_ids), r.features, 4, [])
    assert after.usage.cached_prompt_tokens > 0, "a reading request broke the cache for plain ones"
    assert after.token_ids == warm.token_ids


def test_encode_matches_reference_with_pooling(server, ref):
    texts = ["the ocean wave ship", [9, 8, 7, 6, 5]]
    with server.client() as c:
        results = c.encode(texts, [read("resid_l1", 3, watch=[2, 40]), read("tk", 2)])
        ids0 = c.generate_text(texts[0], max_tokens=1).prompt_token_ids
    assert len(results) == 2 and list(results[0].token_ids) == ids0
    for res in results:
        ids = list(res.token_ids)
        assert [(f.position, f.sae) for f in res.features] == [
            (p, s) for p in range(len(ids)) for s in ("resid_l1", "tk")]
        for sid, k, watch, pooled in (("resid_l1", 3, [2, 40], res.pooled[0]), ("tk", 2, [], res.pooled[1])):
            dense = ref_latents(ref, sid, ids)
            check_against(dense, [f for f in res.features if f.sae == sid], k, watch)
            assert pooled.sae == sid
            mx, mean = dense.max(0).values, dense.mean(0)
            got = list(pooled.features)
            assert [f.index for f in got[: len(watch)]] == watch
            for f in got:
                assert f.max == pytest.approx(float(mx[f.index]), abs=TOL)
                assert f.mean == pytest.approx(float(mean[f.index]), abs=TOL)
            top = sorted(mx.tolist(), reverse=True)[:k]
            assert [f.max for f in got[len(watch):]] == pytest.approx(top, abs=TOL)


@pytest.mark.parametrize("req, code, text", [
    (pb.EncodeRequest(), grpc.StatusCode.INVALID_ARGUMENT, "inputs: give at least one input"),
    (pb.EncodeRequest(inputs=[pb.Prompt(text="a")]), grpc.StatusCode.INVALID_ARGUMENT, "reads: give at least one"),
    (pb.EncodeRequest(inputs=[pb.Prompt(text="a")], reads=[read("ghost", 1)]), grpc.StatusCode.NOT_FOUND, "ghost"),
    (pb.EncodeRequest(inputs=[pb.Prompt(text="")], reads=[read("tk", 1)]), grpc.StatusCode.INVALID_ARGUMENT,
     "inputs[0].text"),
    (pb.EncodeRequest(inputs=[pb.Prompt(text="a")] * 33, reads=[read("tk", 1)]), grpc.StatusCode.INVALID_ARGUMENT,
     "at most 32"),
    (pb.EncodeRequest(inputs=[pb.Prompt(text="a")], reads=[read("tk", 257)]), grpc.StatusCode.INVALID_ARGUMENT,
     "reads[0].top_k"),
])
def test_encode_errors(server, req, code, text):
    with server.client() as c:
        with pytest.raises(grpc.RpcError) as ei:
            c.stub.Encode(req, timeout=60)
    assert ei.value.code() == code and text in ei.value.details()


def _steer(server, *args):
    exe = str(Path(sys.executable).with_name("steer"))
    return subprocess.run([exe, "--target", server.target, *args], capture_output=True, text=True, timeout=120)


def test_cli_reads_and_encode_json(server):
    r = _steer(server, "generate", "--prompt-ids", "5,100,200", "--max-tokens", "4", "--temperature", "0",
               "--read", "resid_l1:3", "--watch", "resid_l1:7", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert [f["position"] for f in out["features"]] == list(range(3 + 4 - 1))
    f0 = out["features"][0]
    assert set(f0) >= {"position", "token_id", "sae", "indices", "values"} and len(f0["indices"]) == 3
    assert f0["values"] == sorted(f0["values"], reverse=True)
    r = _steer(server, "encode", "--prompt-ids", "5,100,200", "--sae", "tk", "--top-k", "2", "--json")
    assert r.returncode == 0, r.stderr
    enc = json.loads(r.stdout)
    assert [f["position"] for f in enc["features"]] == [0, 1, 2] and len(enc["pooled"][0]["features"]) == 2
    r = _steer(server, "generate", "--prompt", "the ocean", "--max-tokens", "3", "--read", "tk:2")
    assert r.returncode == 0 and "pos    0" in r.stdout and "text: " in r.stdout
    r = _steer(server, "encode", "--prompt", "x", "--sae", "tk", "--top-k", "999")
    assert r.returncode == 1 and "INVALID_ARGUMENT" in r.stderr
