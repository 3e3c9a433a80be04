"""The pure parts of loadtests/bench_serve.py (no server, no engine)."""

from __future__ import annotations

import json
import math

import pytest

from loadtests.bench_serve import (
    MODES,
    RequestResult,
    SSEParser,
    completion_event,
    engine_flags,
    percentile,
    prompt_ids,
    ratios,
    rotated,
    steer_config,
    summarise,
)


def test_sse_parser_splits_events_across_chunks():
    p = SSEParser()
    stream = b'data: {"a": 1}\n\ndata: {"b"\r\n: comment\n\ndata: [DONE]\n\n'
    got = []
    for i in range(0, len(stream), 5):  # arbitrary chunk boundaries
        got += p.feed(stream[i:i + 5])
    assert got == ['{"a": 1}', '{"b"', "[DONE]"]


def test_sse_parser_joins_multiline_data():
    assert SSEParser().feed(b"data: x\ndata:y\n\n") == ["x\ny"]


def test_completion_events_time_text_chunks_and_take_usage():
    r = RequestResult()
    chunk = lambda text: json.dumps({"choices": [{"index": 0, "text": text}]})  # noqa: E731
    assert completion_event(r, chunk(""), 0.1)  # no text yet: not a token
    assert completion_event(r, chunk(" a"), 0.2)
    assert completion_event(r, chunk(" b"), 0.3)
    assert completion_event(r, chunk(" c"), 0.6)
    assert completion_event(r, json.dumps({"choices": [], "usage": {"completion_tokens": 3}}), 0.61)
    assert not completion_event(r, "[DONE]", 0.62)
    assert (r.ttft, r.t_last, r.chunks, r.tokens) == (0.2, 0.6, 3, 3)
    assert r.tpot == pytest.approx(0.2)


def test_completion_event_records_an_error():
    r = RequestResult()
    completion_event(r, json.dumps({"error": {"message": "boom"}}), 0.1)
    assert r.error == "boom"


def test_percentile_matches_linear_interpolation():
    xs = [5.0, 1.0, 3.0, 2.0, 4.0]
    assert percentile(xs, 50) == 3.0
    assert percentile(xs, 0) == 1.0 and percentile(xs, 100) == 5.0
    assert percentile(xs, 99) == pytest.approx(4.96)
    assert math.isnan(percentile([], 50))


def _round(tokens_s: float, ttft: float, tpot: float, n: int = 4, gen: int = 11) -> dict:
    res = [RequestResult(tokens=gen, ttft=ttft, t_last=ttft + tpot * (gen - 1)) for _ in range(n)]
    return {"wall_s": n * gen / tokens_s, "tokens": n * gen, "results": res,
            "cpu_s": {"front_end": 1.0, "engine": 2.0}}


def test_summarise_and_ratios():
    raw = {"vllm": summarise([_round(100, 0.010, 0.002), _round(120, 0.010, 0.002)]),
           "ours": summarise([_round(99, 0.020, 0.001), _round(99, 0.020, 0.001)])}
    assert raw["vllm"]["tok_s"] == pytest.approx(110)
    assert raw["vllm"]["ttft_ms_p50"] == pytest.approx(10)
    assert raw["vllm"]["tpot_ms_p99"] == pytest.approx(2)
    assert raw["vllm"]["tokens_per_request"] == [11]
    assert raw["vllm"]["cpu_s_per_1k_tok"] == {"front_end": pytest.approx(1 / 0.044, abs=1e-3),
                                              "engine": pytest.approx(2 / 0.044, abs=1e-3)}
    r = ratios(raw)
    assert set(r) == {"ours"}
    assert r["ours"]["tok_s"] == pytest.approx(0.9)
    assert r["ours"]["ttft_ms_p50"] == pytest.approx(2.0)
    assert r["ours"]["tpot_ms_p50"] == pytest.approx(0.5)


def test_rounds_rotate_and_inputs_are_distinct():
    assert [rotated(MODES, r)[0] for r in range(len(MODES))] == list(MODES)
    assert sorted(rotated(MODES, 3)) == sorted(MODES)
    prompts = {tuple(prompt_ids(r, i, 32, 1419)) for r in range(3) for i in range(64)}
    assert len(prompts) == 3 * 64
    assert all(3 <= t < 1419 for p in prompts for t in p)
    configs = {json.dumps(steer_config(i)) for i in range(64)}
    assert len(configs) == 16


def test_vllm_flags_follow_steerd_engine_defaults():
    f = engine_flags("float32")
    assert f["--dtype"] == "float32" and f["--max-num-seqs"] == "64" and f["--seed"] == "0"
    assert "--enable-prefix-caching" in f and "--enforce-eager" not in f
