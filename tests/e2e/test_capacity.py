"""The per-step tables at their limits, against the real engine (the shared server:
``--max-num-seqs 32 --max-interventions 8 --max-num-batched-tokens 64``).

Each test is one of the four ways valid requests used to raise inside vLLM's worker
forward and kill the engine for everyone (issue 25; ``sae_runtime.spec.budget`` is the
fix): more reading-and-guarded streams than sequences (two read slots each), a token-id
selector that matched many separate positions beside a full batch (it split into more
edit slots than the tables held), named and inline vectors on one bank over the edit
width, and a pooled ``Encode`` over many rows. After each, the server is still SERVING and
every answered request is checked against the references the other e2e files use (HF +
sae-lens latents, HF with the edits hooked in, HF with the vectors added by hand).
"""

from __future__ import annotations

import concurrent.futures as cf
import itertools
import threading

import grpc
import httpx
import pytest
import torch

from clients.client import (
    absolute_range,
    add,
    clamp,
    collect,
    inline_vector,
    positions,
    read,
    vector,
    when,
)
from tests.e2e.conftest import MAX_BATCHED_TOKENS, MAX_INTERVENTIONS, SAE_IDS
from tests.e2e.reference import ADD, CLAMP, Edit, HFReference, check_teacher_forced
from tests.e2e.steering_ref import directions, hf_inline
from tests.e2e.test_reads import TOL, check_against, ref_latents

pytestmark = pytest.mark.e2e

SEQS = 32  # the shared server's --max-num-seqs
SAE = "resid_l1"


@pytest.fixture(scope="module")
def ref(server):
    return HFReference(server.model_dir, server.sae_dirs, SAE_IDS)


def serving(server) -> None:
    assert server.proc.poll() is None, f"steerd exited; log: {server.log}"
    with server.client() as c:
        assert c.health() == "SERVING"


def prompt_of(i: int, n: int) -> list[int]:
    return [(13 * i + 7 * j) % 500 + 3 for j in range(n)]


def test_more_guarded_readers_than_sequences_all_finish_with_exact_reads(server, ref):
    """max_num_seqs + 1 streams that each read ``tk`` and guard it (a guardrail that never
    trips): two read slots per request at one SAE, 64 in a full decode step."""
    n, gen = SEQS + 1, 20
    prompts = [prompt_of(i, 5 + i % 7) for i in range(n)]

    def run(i):
        with server.client() as c:
            return c.generate_text(prompts[i], max_tokens=gen, temperature=0.0, ignore_eos=True,
                                   reads=[read("tk", 3, watch=[5])],
                                   abort_when=[when("tk", 5, ">", 1e6)])

    with cf.ThreadPoolExecutor(n) as pool:
        outs = list(pool.map(run, range(n)))
    serving(server)
    for i, out in enumerate(outs):
        assert out.finish_reason == "length" and len(out.token_ids) == gen, i
        full = prompts[i] + out.token_ids
        assert [f.position for f in out.features] == list(range(len(full) - 1)), i
        check_against(ref_latents(ref, "tk", full), out.features, 3, [5])


def test_a_token_id_selector_over_an_alternating_prompt_beside_a_full_batch(server, ref):
    """One request whose 8 edits (--max-interventions) select one of two alternating
    tokens, prefilled while 31 steered requests decode: its prompt chunks matched at every
    other row (one edit slot per run before), with every other slot taken."""
    tok_a, tok_b = 100, 45
    prompt = [tok_a if j % 2 == 0 else tok_b for j in range(140)]
    feats = [3 + 5 * k for k in range(MAX_INTERVENTIONS)]
    sel = positions(token_ids=[tok_a])
    token_ivs = [add(SAE, f, 40.0, at=sel) for f in feats]
    n_other = SEQS - 1
    others = {i: (prompt_of(i, 6 + i % 5), 20 + i) for i in range(n_other)}
    decoding = [threading.Event() for _ in range(n_other)]

    def other(i):
        p, f = others[i]
        with server.client() as c:
            stream = c.generate(p, max_tokens=48, temperature=0.0, ignore_eos=True,
                                interventions=[clamp(SAE, f, 12.0)])
            first = next(stream)
            decoding[i].set()
            return collect(itertools.chain([first], stream))

    with cf.ThreadPoolExecutor(n_other) as pool:
        futs = [pool.submit(other, i) for i in range(n_other)]
        for ev in decoding:
            assert ev.wait(120), "a batch request never started"
        with server.client() as c:  # prefilled while the others decode
            out = c.generate_text(prompt, max_tokens=8, temperature=0.0, ignore_eos=True,
                                  interventions=token_ivs)
        rest = [f.result() for f in futs]
    serving(server)
    assert len(prompt) > 2 * MAX_BATCHED_TOKENS  # the prompt is chunked over several steps
    full = prompt + out.token_ids
    at = frozenset(p for p, t in enumerate(full) if t == tok_a)
    logits = ref.logits(full, [Edit(SAE, f, ADD, 40.0, at=at) for f in feats], len(prompt))
    check_teacher_forced(logits, len(prompt), out.token_ids)
    with server.client() as c:
        plain = c.generate_text(prompt, max_tokens=8, temperature=0.0, ignore_eos=True)
    assert plain.token_ids != out.token_ids, "the token-id edits had no effect"
    for i, res in enumerate(rest):
        p, f = others[i]
        assert len(res.token_ids) == 48, i
        check_teacher_forced(ref.logits(p + res.token_ids, [Edit(SAE, f, CLAMP, 12.0)], len(p)),
                             len(p), res.token_ids)


def _spread(n: int):
    return positions(*[absolute_range(2 * i, 2 * i + 1) for i in range(n)])


def test_named_and_inline_vectors_on_one_bank_fill_it_and_no_more(server, hf):
    """At layer 1's bank: a named vector over 7 windows and an inline vector are 8 edit
    rows (--max-interventions), served exactly; one window more is refused at the door
    (gRPC and HTTP) naming the inline vector, and the engine keeps serving."""
    prompt = [5, 100, 200, 300, 45, 67, 12, 400, 100, 77]
    v = torch.linspace(-1.0, 1.0, 128) * 0.8
    happy = directions("happy")[1]
    with server.client() as c:
        out = c.generate_text(prompt, max_tokens=10, temperature=0.0, ignore_eos=True,
                              vectors=[vector("happy", 4.0, (1,), at=_spread(7))],
                              inline_vectors=[inline_vector(v, 1, 1.5)])
        full = prompt + out.token_ids
        want = hf_inline(hf, full, [(happy, 1, 4.0, set(range(0, 14, 2))), (v, 1, 1.5, None)])
        check_teacher_forced(want, len(prompt), out.token_ids)
        with pytest.raises(grpc.RpcError) as ei:
            c.generate_text(prompt, max_tokens=4, vectors=[vector("happy", 4.0, (1,), at=_spread(8))],
                            inline_vectors=[inline_vector(v, 1, 1.5)])
    assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert ei.value.details().startswith("inline_vectors[0]:"), ei.value.details()
    assert f"at most {MAX_INTERVENTIONS}" in ei.value.details()
    with httpx.Client(timeout=120) as h:
        model = h.get(server.http_url + "/models").json()["data"][0]["id"]
        r = h.post(server.http_url + "/completions", json={
            "model": model, "prompt": prompt, "max_tokens": 4,
            "vectors": [{"name": "happy", "strength": 4.0, "layers": [1],
                         "positions": {"ranges": [{"frame": "absolute", "start": 2 * i,
                                                   "end": 2 * i + 1} for i in range(8)]}}],
            "inline_vectors": [{"values": v.tolist(), "layer": 1, "strength": 1.5}]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "inline_vectors[0]", r.text
    serving(server)


def test_a_pooled_encode_over_many_rows_beside_streaming_readers(server, ref):
    """12 inputs of 200 tokens pooled at two SAEs: 2,400 rows over about 40 steps, beside
    streams that read the same SAEs unpooled; the worker computes the dense latents pooling
    needs a bounded chunk at a time (``budget.pool_chunk_rows``)."""
    inputs = [prompt_of(i, 200) for i in range(12)]
    reads = [read(SAE, 3, watch=[2, 40]), read("tk", 2)]

    def stream(i):
        with server.client() as c:
            return c.generate_text(prompt_of(100 + i, 30), max_tokens=12, temperature=0.0,
                                   ignore_eos=True, reads=[read(SAE, 4), read("tk", 2, watch=[1])])

    with cf.ThreadPoolExecutor(3) as pool:
        side = [pool.submit(stream, i) for i in range(3)]
        with server.client(timeout=600) as c:
            results = c.encode(inputs, reads)
        side = [f.result() for f in side]
    serving(server)
    assert len(results) == len(inputs)
    for ids, res in zip(inputs, results, strict=True):
        assert list(res.token_ids) == ids
        for (sid, k, watch), pooled in zip([(SAE, 3, [2, 40]), ("tk", 2, [])], res.pooled,
                                           strict=True):
            dense = ref_latents(ref, sid, ids)
            check_against(dense, [f for f in res.features if f.sae == sid], k, watch)
            mx, mean = dense.max(0).values, dense.mean(0)
            assert pooled.sae == sid
            for f in pooled.features:
                assert f.max == pytest.approx(float(mx[f.index]), abs=TOL)
                assert f.mean == pytest.approx(float(mean[f.index]), abs=TOL)
    for i, out in enumerate(side):
        full = prompt_of(100 + i, 30) + out.token_ids
        check_against(ref_latents(ref, SAE, full), [f for f in out.features if f.sae == SAE], 4, [])
        check_against(ref_latents(ref, "tk", full), [f for f in out.features if f.sae == "tk"], 2, [1])
