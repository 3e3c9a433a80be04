"""Steering vectors end to end (shared server, started with ``--vector happy=<GGUF>`` and
``--vector calm=<.npy>``; tests/e2e/conftest.py): teacher-forced against HF ``transformers``
with a plain forward hook on ``model.model.layers[k]`` adding ``strength * direction.k`` to
the block's output (llama.cpp's ``build_cvec(cur, il)`` after block ``il``), layer subsets,
position selectors, a concurrent batch with plain requests, the cache salt, the CLI, the
HTTP body and bad values.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import subprocess
import sys
from contextlib import ExitStack
from pathlib import Path

import grpc
import httpx
import pytest
import torch

from clients.client import generation_range, positions, vector
from tests.e2e.reference import check_teacher_forced
from tests.e2e.steering_ref import PROMPT, N, P, S, directions, greedy, hf_inline
from tests.fixtures.tiny import HIDDEN

pytestmark = pytest.mark.e2e

def hf_logits(hf, ids, adds: list[tuple[str, float, tuple[int, ...] | None, set[int] | None]]):
    """Logits with ``strength * v[k]`` of each named vector added to block k's output
    (layers: None = all of the vector's; positions: None = all)."""
    return hf_inline(hf, ids, [(v, k, strength, at) for name, strength, layers, at in adds
                               for k, v in directions(name).items()
                               if layers is None or k in layers])


def test_model_info_lists_the_vectors_and_list_saes_hides_the_banks(server):
    with server.client() as c:
        info = c.model_info()
        assert {v.name: list(v.layers) for v in info.vectors} == {"happy": [1, 2], "calm": [0]}
        assert not any(s.id.startswith("vectors@") for s in c.list_saes())


@pytest.mark.parametrize("case", ["gguf_all_layers", "npy", "layer_subset", "both_negative"])
def test_vector_equals_adding_it_by_hand_in_hf(server, hf, case):
    adds = {"gguf_all_layers": [("happy", S, None, None)],
            "npy": [("calm", S, None, None)],
            "layer_subset": [("happy", S, (2,), None)],
            "both_negative": [("happy", -S, None, None), ("calm", 2.0, None, None)]}[case]
    out = greedy(server, [vector(n, s, layers or ()) for n, s, layers, _ in adds])
    full = PROMPT + out.token_ids
    check_teacher_forced(hf_logits(hf, full, adds), P, out.token_ids)
    assert out.token_ids != greedy(server).token_ids, f"{case}: the vector had no effect"


def test_vector_positions_and_the_llama_cpp_layer_convention(server, hf):
    sel = positions(generation_range(0, 4))
    out = greedy(server, [vector("happy", S, at=sel)])
    full = PROMPT + out.token_ids
    check_teacher_forced(hf_logits(hf, full, [("happy", S, None, set(range(P, P + 4)))]), P,
                         out.token_ids)
    # direction.k is block k's output, not block k-1's: the shifted reading gives other logits
    shifted = hf_logits(hf, PROMPT, [("happy", S, None, None)])
    with ExitStack() as stack:
        for k, v in directions("happy").items():
            stack.enter_context(hf.model.layers[k - 1].register_forward_hook(
                lambda m, a, o, v=v: ((o[0] if isinstance(o, tuple) else o) + S * v,
                                      *(o[1:] if isinstance(o, tuple) else ()))
                if isinstance(o, tuple) else o + S * v))
        with torch.no_grad():
            off_by_one = hf(torch.tensor([PROMPT])).logits[0]
    assert not torch.allclose(shifted, off_by_one, atol=1e-3)


def test_vectors_beside_plain_requests_in_one_batch(server):
    n = 9
    prompts = [[(17 * i + 3 * j) % 500 + 3 for j in range(4 + 9 * i)] for i in range(n)]

    def kind(i):
        return [] if i % 3 == 0 else [vector("happy" if i % 3 == 1 else "calm", S + i)]

    solo = [greedy(server, kind(i), prompt=prompts[i]).token_ids for i in range(n)]
    plain = {i: greedy(server, prompt=prompts[i]).token_ids for i in range(0, n, 3)}
    with cf.ThreadPoolExecutor(n) as pool:
        together = list(pool.map(lambda i: greedy(server, kind(i), prompt=prompts[i]).token_ids,
                                 range(n)))
    assert together == solo
    assert all(together[i] == plain[i] for i in plain)


def test_vectors_are_in_the_cache_salt(server):
    prompt = [(3 * j + 1) % 500 + 3 for j in range(150)]
    with server.client() as c:
        def run(vs):
            return c.generate_text(prompt, max_tokens=3, temperature=0.0, ignore_eos=True,
                                   vectors=vs)
        run([])
        a = run([vector("happy", S)])
        assert a.usage.cached_prompt_tokens == 0, "a steered request reused plain KV"
        b = run([vector("happy", S + 1)])
        assert b.usage.cached_prompt_tokens == 0, "another strength reused the first one's KV"
        again = run([vector("happy", S)])
        assert again.usage.cached_prompt_tokens > 0 and again.token_ids == a.token_ids


def test_bad_vectors_are_invalid_argument(server):
    cases = [([vector("nope", 1.0)], "vectors[0].name:"),
             ([vector("happy", float("inf"))], "vectors[0].strength:"),
             ([vector("happy", 1.0, (0,))], "vectors[0].layers[0]:"),
             ([vector("calm", 1.0), vector("calm", 2.0)], "vectors[1].name:"),
             ([vector("happy", 1.0, at=positions(generation_range(5, 2)))],
              "vectors[0].positions.ranges[0]:")]
    with server.client() as c:
        for vs, field in cases:
            with pytest.raises(grpc.RpcError) as ei:
                c.generate_text(PROMPT, max_tokens=2, vectors=vs)
            assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT, field
            assert ei.value.details().startswith(field), ei.value.details()
        from clients.client import clamp

        with pytest.raises(grpc.RpcError) as ei:
            c.generate_text(PROMPT, max_tokens=2, interventions=[clamp("vectors@L1", 0, 1.0)])
        assert ei.value.details().startswith("interventions[0].sae:")
        assert c.health() == "SERVING"


def test_cli_and_http_take_vectors(server):
    want = greedy(server, [vector("happy", S, (1,))])
    exe = str(Path(sys.executable).with_name("steer"))
    run = subprocess.run(
        [exe, "--target", server.target, "generate", "--prompt-ids", ",".join(map(str, PROMPT)),
         "--max-tokens", str(N), "--temperature", "0", "--json", "--vector", f"happy={S}@1"],
        capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    cli = json.loads(run.stdout)["token_ids"]  # the CLI stops at EOS: a prefix
    assert cli and cli == want.token_ids[: len(cli)]
    with httpx.Client(timeout=120) as h:
        model = h.get(server.http_url + "/models").json()["data"][0]["id"]
        r = h.post(server.http_url + "/completions", json={
            "model": model, "prompt": PROMPT, "max_tokens": N, "temperature": 0,
            "ignore_eos": True, "return_token_ids": True,
            "vectors": [{"name": "happy", "strength": S, "layers": [1]}]})
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["token_ids"] == want.token_ids


# --------------------------------------------------------------------------- inline vectors


def _rand(seed: int, scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(HIDDEN, generator=g)
    return v / v.norm() * scale


def test_model_info_lists_the_inline_layers(server):
    with server.client() as c:
        info = c.model_info()
    assert list(info.inline_vector_layers) == [1, 2] and info.max_inline_vectors == 4


def test_inline_vectors_equal_adding_them_by_hand_in_hf(server, hf):
    from clients.client import inline_vector

    v1, v2 = _rand(1, 6.0), _rand(2, 6.0)
    out = greedy(server, inline_vectors=[inline_vector(v1, 1, 1.5), inline_vector(v2, 2, -1.0)])
    check_teacher_forced(hf_inline(hf, PROMPT + out.token_ids, [(v1, 1, 1.5, None), (v2, 2, -1.0, None)]),
                         P, out.token_ids)
    assert out.token_ids != greedy(server).token_ids, "the inline vectors had no effect"
    # The same values inline as the server's named vector: the same tokens.
    happy1 = directions("happy")[1]
    assert (greedy(server, inline_vectors=[inline_vector(happy1, 1, S)]).token_ids
            == greedy(server, [vector("happy", S, (1,))]).token_ids)
    # Positions: only the first four generated tokens' activations.
    sel = positions(generation_range(0, 4))
    out = greedy(server, inline_vectors=[inline_vector(v1, 1, 2.0, at=sel)])
    check_teacher_forced(hf_inline(hf, PROMPT + out.token_ids, [(v1, 1, 2.0, set(range(P, P + 4)))]),
                         P, out.token_ids)


def test_each_request_in_a_batch_gets_its_own_inline_vector(server, hf):
    """Concurrent requests at one layer each add their own vector (one scratch row per
    slot), beside a named vector and a plain request."""
    from clients.client import inline_vector

    vs = {i: _rand(10 + i, 6.0) for i in range(5)}
    jobs = {i: dict(inline_vectors=[inline_vector(vs[i], 1, 1.0)]) for i in vs}
    jobs["named"] = dict(vectors=[vector("happy", S, (1,))])
    jobs["plain"] = {}
    with cf.ThreadPoolExecutor(len(jobs)) as pool:
        futs = {k: pool.submit(greedy, server, **kw) for k, kw in jobs.items()}
        outs = {k: f.result().token_ids for k, f in futs.items()}
    for i, v in vs.items():
        check_teacher_forced(hf_inline(hf, PROMPT + outs[i], [(v, 1, 1.0, None)]), P, outs[i])
    assert outs["plain"] == greedy(server).token_ids
    assert outs["named"] == greedy(server, [vector("happy", S, (1,))]).token_ids
    assert len({tuple(outs[i]) for i in vs}) > 1, "the vectors should not all give one output"


def test_inline_vectors_are_in_the_cache_salt(server, hf):
    from clients.client import inline_vector

    prompt = [(5 * j + 2) % 500 + 3 for j in range(150)]
    a_v, b_v = _rand(21, 6.0), _rand(22, 6.0)
    with server.client() as c:
        def run(v):
            return c.generate_text(prompt, max_tokens=3, temperature=0.0, ignore_eos=True,
                                   inline_vectors=[inline_vector(v, 1, 1.0)])
        a = run(a_v)
        assert a.usage.cached_prompt_tokens == 0
        b = run(b_v)
        assert b.usage.cached_prompt_tokens == 0, "another inline vector reused the first's KV"
        again = run(a_v)
        assert again.usage.cached_prompt_tokens > 0 and again.token_ids == a.token_ids
    check_teacher_forced(hf_inline(hf, prompt + b.token_ids, [(b_v, 1, 1.0, None)]), len(prompt),
                         b.token_ids)


def test_bad_inline_vectors_are_invalid_argument(server):
    from clients.client import inline_vector

    ok = [0.1] * HIDDEN
    nan = list(ok)
    nan[7] = float("nan")
    cases = [([inline_vector(ok[:-1], 1)], "inline_vectors[0].values:", "hidden size is 128"),
             ([inline_vector(nan, 1)], "inline_vectors[0].values:", "values[7] is nan"),
             ([inline_vector(ok, 0)], "inline_vectors[0].layer:", "takes no inline vectors"),
             ([inline_vector(ok, 1), inline_vector(ok, 1, 2.0)], "inline_vectors[1].layer:", "one per layer"),
             ([inline_vector(ok, 1)] * 5, "inline_vectors:", "at most 4"),
             ([inline_vector(ok, 2, float("inf"))], "inline_vectors[0].strength:", "finite"),
             ([inline_vector(ok, 2, at=positions(generation_range(5, 2)))],
              "inline_vectors[0].positions.ranges[0]:", "")]
    with server.client() as c:
        for vs, field, words in cases:
            with pytest.raises(grpc.RpcError) as ei:
                c.generate_text(PROMPT, max_tokens=2, inline_vectors=vs)
            assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT, field
            assert ei.value.details().startswith(field) and words in ei.value.details(), ei.value.details()
        assert c.health() == "SERVING"


def test_cli_and_http_take_inline_vectors(server, tmp_path):
    import numpy as np

    from clients.client import inline_vector

    v = _rand(31, 6.0)
    want = greedy(server, inline_vectors=[inline_vector(v, 2, 1.5)])
    np.save(tmp_path / "v.npy", v.numpy())
    exe = str(Path(sys.executable).with_name("steer"))
    run = subprocess.run(
        [exe, "--target", server.target, "generate", "--prompt-ids", ",".join(map(str, PROMPT)),
         "--max-tokens", str(N), "--temperature", "0", "--json",
         "--inline-vector", f"{tmp_path / 'v.npy'}@2=1.5"],
        capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    cli = json.loads(run.stdout)["token_ids"]
    assert cli and cli == want.token_ids[: len(cli)]
    with httpx.Client(timeout=120) as h:
        model = h.get(server.http_url + "/models").json()["data"][0]["id"]
        body = {"model": model, "prompt": PROMPT, "max_tokens": N, "temperature": 0,
                "ignore_eos": True, "return_token_ids": True,
                "inline_vectors": [{"values": v.tolist(), "layer": 2, "strength": 1.5}]}
        r = h.post(server.http_url + "/completions", json=body)
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["token_ids"] == want.token_ids
        body["inline_vectors"][0]["values"] = v.tolist()[:5]
        r = h.post(server.http_url + "/completions", json=body)
        assert r.status_code == 400 and "inline_vectors[0].values" in r.text, r.text
