"""Chat rendering, logprob conversion and OpenAI body -> core mapping, without an engine."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from clients.client import SteeringClient
from sae_runtime.errors import InvalidRequestError, NoChatTemplateError
from sae_runtime.ops import Mode
from sae_runtime.spec.interventions import Intervention, Scope
from sae_runtime.spec.reads import Read, ReadScope
from sae_runtime.spec.vectors import VectorIndex
from server.core import validate
from server.core.prompts import render_chat
from server.core.service import logprobs_of
from server.grpc import convert
from server.http.bodies import ChatBody, CompletionBody, body_field, field_table, generate_request
from steering.v1 import steering_pb2 as pb
from tests.e2e.reference import render_chat_reference

EMBEDDED = Path(__file__).resolve().parents[2] / "server" / "embedded" / "model"
TEMPLATE = (Path(__file__).resolve().parents[1] / "e2e" / "chat_template.jinja").read_text()
LIMITS = validate.Limits(max_interventions=3, vocab_size=512, max_logprobs=5)


def conv(req: pb.GenerateRequest):
    return validate.generation(convert.generate_request(req), saes={}, limits=LIMITS,
                               vectors=VectorIndex({}))
MSGS = (("system", "be brief"), ("user", "the ocean wave"))


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(EMBEDDED)


def test_render_chat_uses_the_override_file(tok):
    assert tok.chat_template is None  # the embedded model has none of its own
    ids = render_chat(tok, MSGS, TEMPLATE, "m")
    assert ids == render_chat_reference(tok, TEMPLATE, MSGS)
    assert ids[0] == tok.bos_token_id  # the template adds BOS; nothing else does


def test_render_chat_uses_the_tokenizers_own_template(tok):
    own = "{{ bos_token }}{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% endfor %}"
    tok2 = AutoTokenizer.from_pretrained(EMBEDDED)
    tok2.chat_template = own
    assert render_chat(tok2, MSGS, None, "m") == render_chat_reference(tok2, own, MSGS)


def test_render_chat_errors(tok):
    with pytest.raises(NoChatTemplateError, match="model /models/x has no chat template"):
        render_chat(tok, MSGS, None, "/models/x")
    with pytest.raises(InvalidRequestError) as ei:
        render_chat(tok, (("tool", "x"),), TEMPLATE, "m", field="inputs[1]")
    assert ei.value.field == "inputs[1].messages" and "unknown role tool" in str(ei.value)


def test_messages_and_logprobs_validate():
    req = SteeringClient.build_request([{"role": "user", "content": "hi"}, ("assistant", "")],
                                       logprobs=5, prompt_logprobs=0)
    got = conv(req)
    assert got.prompt.messages == (("user", "hi"), ("assistant", ""))
    assert (got.logprobs, got.prompt_logprobs) == (5, 0)
    assert conv(SteeringClient.build_request("x")).logprobs is None
    for kw, field in (({"logprobs": 6}, "sampling.logprobs"),
                      ({"prompt_logprobs": 6}, "sampling.prompt_logprobs")):
        with pytest.raises(InvalidRequestError) as ei:
            conv(SteeringClient.build_request("x", **kw))
        assert ei.value.field == field and "cap of 5" in str(ei.value)
    bad = SteeringClient.build_request([("", "x")])
    with pytest.raises(InvalidRequestError) as ei:
        conv(bad)
    assert ei.value.field == "prompt.messages.messages[0].role"
    empty = pb.GenerateRequest(prompt=pb.Prompt(messages=pb.ChatMessages()))
    with pytest.raises(InvalidRequestError, match="at least one message"):
        conv(empty)


@dataclass
class LP:  # the shape of vllm.logprobs.Logprob
    logprob: float
    rank: int
    decoded_token: str


def test_logprobs_order_top_by_rank_with_chosen_first():
    # vLLM inserts the chosen token first, then the top n; a chosen token inside the top n
    # is not repeated (the dict has n entries), outside it the dict has n + 1
    inside = {7: LP(-1.2, 2, "b"), 3: LP(-0.5, 1, "a"), 9: LP(-2.0, 3, "c")}
    outside = {8: LP(-5.0, 40, "z"), 3: LP(-0.5, 1, "a"), 7: LP(-1.2, 2, "b"), 9: LP(-2.0, 3, "c")}
    a, b = logprobs_of([inside, outside], 3)
    assert (a.chosen.token_id, a.chosen.rank, a.chosen.token) == (7, 2, "b")
    assert [t.token_id for t in a.top] == [3, 7, 9] and [t.rank for t in a.top] == [1, 2, 3]
    assert (b.chosen.token_id, b.chosen.rank) == (8, 40) and [t.token_id for t in b.top] == [3, 7, 9]
    (z,) = logprobs_of([{4: LP(-0.1, 1, "q")}], 0)
    assert z.chosen.token_id == 4 and not z.top
    (m,) = logprobs_of([{4: LP(float("-inf"), 500, "q")}], 0)
    assert m.chosen.logprob == -9999.0


def test_openai_bodies_map_onto_the_core_request():
    body = CompletionBody.model_validate({
        "model": "m", "prompt": [[5, 6, 7]], "max_tokens": 9, "temperature": 0, "seed": 3,
        "stop": "END", "logprobs": 2, "top_k": 4, "ignore_eos": True, "prompt_logprobs": 1,
        "interventions": [{"sae": "s", "feature": 3, "mode": "clamp", "value": 2.5,
                           "scope": "generation_only"}],
        "reads": [{"sae": "s", "top_k": 2, "watch": [1], "scope": "prompt"}],
        "request_id": "r", "user": "ignored", "some_future_field": 1})
    req = generate_request(body)
    assert req.prompt.ids == (5, 6, 7) and req.request_id == "r"
    assert (req.max_tokens, req.temperature, req.seed, req.stop, req.logprobs, req.top_k,
            req.ignore_eos, req.prompt_logprobs) == (9, 0.0, 3, ("END",), 2, 4, True, 1)
    assert req.interventions[0] == Intervention("s", 3, Mode.CLAMP, 2.5, Scope.GENERATION_ONLY)
    assert req.reads[0] == Read("s", 2, (1,), ReadScope.PROMPT)
    assert req.top_p is None and not req.fit_max_tokens

    chat = ChatBody.model_validate({"model": "m", "messages": [
        {"role": "system", "content": "x"},
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}],
        "logprobs": True, "top_logprobs": 3, "max_completion_tokens": 4})
    req = generate_request(chat)
    assert req.prompt.messages == (("system", "x"), ("user", "ab"))
    assert (req.logprobs, req.max_tokens, req.fit_max_tokens) == (3, 4, True)
    assert generate_request(ChatBody.model_validate(
        {"model": "m", "messages": [{"role": "user", "content": "x"}]})).logprobs is None


@pytest.mark.parametrize("body, field", [
    ({"prompt": "x", "n": 2}, "n"),
    ({"prompt": ["a", "b"]}, "prompt"),
    ({"prompt": "x", "presence_penalty": 0.5}, "presence_penalty"),
    ({"prompt": "x", "logit_bias": {"1": 2}}, "logit_bias"),
    ({"prompt": "x", "echo": True}, "echo"),
    ({"prompt": "x", "best_of": 2}, "best_of"),
    ({"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, "top_logprobs"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages[0].content[0]"),
    ({"messages": [{"role": "user", "content": "x"}], "tools": [{}]}, "tools"),
    ({"messages": []}, "messages"),
])
def test_openai_bodies_we_cannot_honour_are_refused(body, field):
    cls = ChatBody if "messages" in body else CompletionBody
    with pytest.raises(InvalidRequestError) as ei:
        generate_request(cls.model_validate({"model": "m", **body}))
    assert ei.value.field == field


@pytest.mark.parametrize("field, chat, want", [
    ("sampling.max_tokens", False, "max_tokens"),
    ("sampling.logprobs", False, "logprobs"),
    ("sampling.logprobs", True, "top_logprobs"),
    ("sampling.top_p", True, "top_p"),
    ("sampling.stop[1]", False, "stop[1]"),
    ("prompt.text", False, "prompt"),
    ("prompt.token_ids.ids[3]", False, "prompt[3]"),
    ("prompt.messages.messages[2].role", True, "messages[2].role"),
    ("prompt.messages", True, "messages"),
    ("prompt", True, "messages"),
    ("interventions[0].feature", False, "interventions[0].feature"),
    ("reads[1].watch[0]", True, "reads[1].watch[0]"),
])
def test_core_fields_name_the_body_field(field, chat, want):
    body = (ChatBody.model_validate({"model": "m", "messages": []}) if chat
            else CompletionBody(model="m", prompt="x"))
    assert body_field(field, field_table(body)) == want
    chat_body = ChatBody.model_validate({"model": "m", "messages": [], "max_completion_tokens": 3})
    assert body_field("sampling.max_tokens", field_table(chat_body)) == "max_completion_tokens"
    assert body_field("sampling.stop[0]", field_table(
        CompletionBody(model="m", prompt="x", stop="s"))) == "stop"
    assert body_field("abort_when[2].condition.feature", field_table(body)) == "abort_when[2].feature"
