"""The OpenAI-compatible HTTP front end, driven by the real ``openai`` package (shared server).

Every generation is compared with the gRPC path's answer to the same request (greedy), so
the HTTP layer must add nothing and lose nothing: tokens, text, reads and logprobs.
"""

from __future__ import annotations

import time

import httpx
import openai
import pytest

from clients.client import clamp, read

pytestmark = pytest.mark.e2e
PROMPT = [5, 100, 200, 300, 45, 67, 12, 400]
CHAT = [("system", "the ocean wave"), ("user", "a ship with a sail")]
STEER = {"sae": "resid_l1", "feature": 10, "mode": "clamp", "value": 30.0}
READ = {"sae": "tk", "top_k": 3, "watch": [5]}


@pytest.fixture(scope="module")
def oai(server):
    with server.openai() as c:
        yield c


@pytest.fixture(scope="module")
def model(oai):
    (m,) = oai.models.list().data
    return m.id


def grpc_greedy(server, prompt, steered: bool, n=10, **kw):
    with server.client() as c:
        return c.generate_text(prompt, max_tokens=n, temperature=0.0, ignore_eos=True,
                               interventions=[clamp("resid_l1", 10, 30.0)] if steered else [], **kw)


def extra(steered: bool, **more) -> dict:
    return {"ignore_eos": True, "return_token_ids": True,
            **({"interventions": [STEER]} if steered else {}), **more}


def test_models_lists_the_served_model(oai, server, model):
    assert model == str(server.model_dir)
    assert oai.models.list().data[0].model_extra["max_model_len"] == 256


@pytest.mark.parametrize("steered", [False, True], ids=["plain", "steered"])
def test_completion_equals_grpc(server, oai, model, steered):
    want = grpc_greedy(server, PROMPT, steered)
    r = oai.completions.create(model=model, prompt=PROMPT, max_tokens=10, temperature=0,
                               extra_body=extra(steered))
    (ch,) = r.choices
    assert ch.model_extra["token_ids"] == want.token_ids and ch.text == want.text
    assert ch.model_extra["prompt_token_ids"] == PROMPT
    assert ch.finish_reason == "length" and r.object == "text_completion" and r.model == model
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(PROMPT), 10)
    if steered:
        assert want.token_ids != grpc_greedy(server, PROMPT, False).token_ids


@pytest.mark.parametrize("steered", [False, True], ids=["plain", "steered"])
def test_streamed_completion_with_reads_equals_grpc(server, oai, model, steered):
    want = grpc_greedy(server, "the ocean wave", steered,
                       reads=[read("tk", top_k=3, watch=[5])])
    chunks = list(oai.completions.create(
        model=model, prompt="the ocean wave", max_tokens=10, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body=extra(steered, reads=[READ])))
    *body, usage = chunks
    assert usage.choices == [] and usage.usage.completion_tokens == 10
    assert len(body) > 2, "not streamed"
    assert [t for c in body for t in c.choices[0].model_extra["token_ids"]] == want.token_ids
    assert "".join(c.choices[0].text for c in body) == want.text
    feats = [f for c in body for f in c.choices[0].model_extra["features"]]
    assert feats == [{"position": f.position, "token_id": f.token_id, "sae": f.sae,
                      "indices": list(f.indices), "values": list(f.values),
                      "watch_values": list(f.watch_values)} for f in want.features]
    # reads arrive beside the tokens, not all at the end
    assert sum(bool(c.choices[0].model_extra["features"]) for c in body) > 2
    assert body[-1].choices[0].finish_reason == "length"


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
@pytest.mark.parametrize("steered", [False, True], ids=["plain", "steered"])
def test_chat_completion_equals_grpc_chat(server, oai, model, steered, stream):
    want = grpc_greedy(server, CHAT, steered, logprobs=2)
    msgs = [{"role": r, "content": c} for r, c in CHAT]
    r = oai.chat.completions.create(model=model, messages=msgs, max_tokens=10, temperature=0,
                                    logprobs=True, top_logprobs=2, stream=stream,
                                    extra_body=extra(steered))
    if stream:
        chunks = list(r)
        assert chunks[0].choices[0].delta.role == "assistant"
        assert chunks[0].model_extra["prompt_token_ids"] == want.prompt_token_ids
        ids = [t for c in chunks for t in c.choices[0].model_extra["token_ids"]]
        text = "".join(c.choices[0].delta.content or "" for c in chunks)
        lps = [e for c in chunks if c.choices[0].logprobs for e in c.choices[0].logprobs.content]
        finish = chunks[-1].choices[0].finish_reason
    else:
        (ch,) = r.choices
        assert r.model_extra["prompt_token_ids"] == want.prompt_token_ids
        assert ch.message.role == "assistant" and r.object == "chat.completion"
        ids, text, lps, finish = ch.model_extra["token_ids"], ch.message.content, ch.logprobs.content, ch.finish_reason
    assert ids == want.token_ids and text == want.text and finish == "length"
    assert [e.logprob for e in lps] == pytest.approx([e.chosen.logprob for e in want.logprobs])
    assert [[t.token for t in e.top_logprobs] for e in lps] == \
        [[t.token for t in e.top] for e in want.logprobs]
    assert all(e.bytes == list(e.token.encode()) for e in lps)


def test_completion_logprobs_in_the_legacy_shape(server, oai, model):
    want = grpc_greedy(server, PROMPT, True, n=6, logprobs=3)
    r = oai.completions.create(model=model, prompt=PROMPT, max_tokens=6, temperature=0, logprobs=3,
                               extra_body=extra(True))
    lp = r.choices[0].logprobs
    assert lp.tokens == [e.chosen.token for e in want.logprobs]
    assert lp.token_logprobs == pytest.approx([e.chosen.logprob for e in want.logprobs])
    assert [list(d) for d in lp.top_logprobs] == \
        [list(dict.fromkeys([e.chosen.token] + [t.token for t in e.top])) for e in want.logprobs]
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)


def test_chat_without_max_tokens_fills_the_context(server, oai, model):
    r = oai.chat.completions.create(model=model, messages=[{"role": "user", "content": "a"}],
                                    temperature=0, extra_body={"ignore_eos": True, "return_token_ids": True})
    assert r.usage.prompt_tokens + r.usage.completion_tokens == 256  # the model length
    assert r.choices[0].finish_reason == "length"


@pytest.mark.parametrize("kw, status, param, text", [
    ({"n": 2}, 400, "n", "only n=1"),
    ({"max_tokens": 300}, 400, "max_tokens", "exceeds the model length"),
    ({"logprobs": 21}, 400, "logprobs", "cap of 20"),
    ({"temperature": -1}, 400, "temperature", "must be >= 0"),
    ({"top_p": 0}, 400, "top_p", "(0, 1]"),
    ({"prompt": [9999]}, 400, "prompt[0]", "out of range"),
    ({"extra_body": {"interventions": [{**STEER, "feature": 9999}]}}, 400,
     "interventions[0].feature", "out of range"),
    ({"extra_body": {"interventions": [{**STEER, "sae": "nope"}]}}, 400, "interventions[0].sae",
     "unknown SAE"),
    ({"extra_body": {"interventions": [{**STEER, "mode": "boost"}]}}, 400, "interventions[0].mode",
     "clamp"),
    ({"extra_body": {"reads": [{"sae": "tk", "top_k": 1000}]}}, 400, "reads[0].top_k", ""),
    ({"extra_body": {"prompt_logprobs": 50}}, 400, "prompt_logprobs", "cap of 20"),
    ({"model": "other"}, 404, "model", "not served here"),
])
def test_bad_completion_requests_are_openai_errors(oai, model, kw, status, param, text):
    args = {"model": model, "prompt": "the ocean", "max_tokens": 4, **kw}
    with pytest.raises(openai.APIStatusError) as ei:
        oai.completions.create(**args)
    err = ei.value
    assert err.status_code == status
    assert err.body["param"] == param and text in err.body["message"]
    assert err.body["type"] == "invalid_request_error" and err.body["code"]


def test_chat_errors_and_bad_json(server, oai, model):
    with pytest.raises(openai.BadRequestError) as ei:
        oai.chat.completions.create(model=model, messages=[{"role": "tool", "content": "x"}])
    assert ei.value.body["param"] == "messages" and "unknown role" in ei.value.body["message"]
    with pytest.raises(openai.BadRequestError) as ei:
        oai.chat.completions.create(model=model, messages=[{"role": "user", "content": "x"}],
                                    max_completion_tokens=0)
    assert ei.value.body["param"] == "max_completion_tokens"
    r = httpx.post(server.http_url + "/completions", content=b"{not json", timeout=30,
                   headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_argument"
    r = httpx.post(server.http_url + "/completions", json={"model": model}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"


def _idle(server, timeout=60.0) -> dict:
    keys = ("steerd_active_streams", "steerd_read_buffers", "steerd_distinct_configs_in_flight",
            "steerd_engine_unfinished_requests")
    deadline = time.monotonic() + timeout
    while True:
        m = server.metrics()
        if all(m[k] == 0 for k in keys) or time.monotonic() > deadline:
            return {k: m[k] for k in keys}
        time.sleep(0.2)


def test_closing_a_stream_aborts_the_engine_request(server, oai, model):
    for _ in range(5):
        stream = oai.completions.create(model=model, prompt=PROMPT, max_tokens=200, temperature=0,
                                        stream=True, extra_body=extra(True, reads=[READ]))
        next(iter(stream))
        stream.close()
    assert set(_idle(server).values()) == {0}
    t0 = time.monotonic()
    try:  # a non-streaming client that gives up
        r = httpx.post(server.http_url + "/completions", timeout=0.2, json={
            "model": model, "prompt": PROMPT, "max_tokens": 240, "ignore_eos": True})
        raise AssertionError(f"finished in {time.monotonic() - t0:.2f}s: {r.status_code} {r.text[:300]}")
    except httpx.ReadTimeout:
        pass
    assert set(_idle(server).values()) == {0}
    m = server.metrics()
    assert m['steerd_requests_total{code="CANCELLED",door="http",method="Generate"}'] >= 6


def test_http_requests_count_in_the_shared_metrics(server, oai, model):
    def count(code):
        return server.metrics().get(
            f'steerd_requests_total{{code="{code}",door="http",method="Generate"}}', 0)

    before = (count("OK"), count("INVALID_ARGUMENT"), server.metrics()["steerd_generated_tokens_total"])
    oai.chat.completions.create(model=model, messages=[{"role": "user", "content": "a"}],
                                max_tokens=3, extra_body={"ignore_eos": True})
    with pytest.raises(openai.BadRequestError):
        oai.completions.create(model=model, prompt="a", max_tokens=0)
    after = (count("OK"), count("INVALID_ARGUMENT"), server.metrics()["steerd_generated_tokens_total"])
    assert after == (before[0] + 1, before[1] + 1, before[2] + 3)


def test_http_and_grpc_share_one_engine_batch(server, oai, model):
    """Steered and plain requests from both front ends at once each get their solo answer."""
    import concurrent.futures as cf

    def http(i):
        r = oai.completions.create(model=model, prompt=PROMPT[i:], max_tokens=8, temperature=0,
                                   extra_body=extra(i % 2 == 1))
        return r.choices[0].model_extra["token_ids"]

    def grpc_(i):
        return grpc_greedy(server, PROMPT[i:], i % 2 == 1, n=8).token_ids

    solo = [grpc_(i) for i in range(6)]
    with cf.ThreadPoolExecutor(12) as pool:
        hs = [pool.submit(http, i) for i in range(6)]
        gs = [pool.submit(grpc_, i) for i in range(6)]
        assert [f.result() for f in hs] == solo and [f.result() for f in gs] == solo
