"""Chat messages and logprobs over gRPC, against the HF reference (shared server)."""

from __future__ import annotations

import json
import subprocess
import sys

import grpc
import pytest
import torch
from transformers import AutoTokenizer

from clients.client import clamp, read
from tests.e2e.conftest import CHAT_TEMPLATE, SAE_IDS
from tests.e2e.reference import (
    CLAMP,
    Edit,
    HFReference,
    check_teacher_forced,
    render_chat_reference,
)

pytestmark = pytest.mark.e2e
PROMPT = [5, 100, 200, 300, 45, 67, 12, 400]
CHAT = [("system", "the ocean wave"), ("user", "a ship with a sail"), ("assistant", "the star"),
        ("user", "rocket and planet orbit")]
# fp32 engine vs fp32 HF: float rounding only. The tiny model's head is scaled for clear
# greedy margins, so logprobs reach -150 and the absolute error grows with them.
LP_TOL, LP_RTOL = 1e-3, 1e-5


@pytest.fixture(scope="module")
def ref(server):
    return HFReference(server.model_dir, server.sae_dirs, SAE_IDS)


@pytest.fixture(scope="module")
def rendered(server):
    tok = AutoTokenizer.from_pretrained(server.model_dir)
    return render_chat_reference(tok, CHAT_TEMPLATE.read_text(), CHAT)


def test_chat_is_rendered_with_the_template_and_steered_like_its_tokens(server, ref, rendered):
    sid = "resid_l1"
    feature = int(ref.latents(rendered, sid).sum(0).argmax())
    edits = [Edit(sid, feature, CLAMP, 40.0)]
    with server.client() as c:
        chat = c.generate_text(CHAT, max_tokens=10, temperature=0.0, ignore_eos=True,
                               interventions=[clamp(sid, feature, 40.0)],
                               reads=[read(sid, top_k=4, watch=[feature], scope="prompt")])
        as_ids = c.generate_text(rendered, max_tokens=10, temperature=0.0, ignore_eos=True,
                                 interventions=[clamp(sid, feature, 40.0)])
        plain = c.generate_text(CHAT, max_tokens=10, temperature=0.0, ignore_eos=True)
    assert chat.prompt_token_ids == rendered  # the template's own BOS/EOS, nothing added
    assert chat.token_ids == as_ids.token_ids and chat.token_ids != plain.token_ids
    n = len(rendered)
    check_teacher_forced(ref.logits(rendered + chat.token_ids, edits, n), n, chat.token_ids)
    # reads (and their positions) refer to the rendered sequence, edited latents included
    assert [f.position for f in chat.features] == list(range(n))
    assert [f.token_id for f in chat.features] == rendered
    # reads report the latents as edited: the clamped feature reads as its clamp value
    assert all(f.watch_values[0] == pytest.approx(40.0) for f in chat.features)


def test_encode_accepts_chat_messages(server, rendered):
    with server.client() as c:
        (res,) = c.encode([CHAT], [read("tk", top_k=2)])
    assert list(res.token_ids) == rendered and len(res.features) == len(rendered)


@pytest.mark.parametrize("messages, field, text", [
    ([("tool", "x")], "prompt.messages", "unknown role tool"),
    ([("", "x")], "prompt.messages.messages[0].role", "must not be empty"),
])
def test_chat_errors_name_the_field(server, messages, field, text):
    with server.client() as c, pytest.raises(grpc.RpcError) as ei:
        c.generate_text(messages, max_tokens=2)
    assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert ei.value.details().startswith(field + ":") and text in ei.value.details()


def _check_logprobs(entries, lsm: torch.Tensor, rows: list[int], chosen: list[int], n: int) -> None:
    """Each entry against the reference log-softmax row: chosen value, top-n ids and values."""
    assert len(entries) == len(rows) == len(chosen)
    for e, row, tok in zip(entries, rows, chosen, strict=True):
        want = lsm[row]
        assert e.chosen.token_id == tok
        assert e.chosen.logprob == pytest.approx(float(want[tok]), abs=LP_TOL, rel=LP_RTOL)
        assert e.chosen.rank == int((want > want[tok] + LP_TOL).sum()) + 1
        top = want.topk(n)
        assert [t.token_id for t in e.top] == top.indices.tolist()
        torch.testing.assert_close(torch.tensor([t.logprob for t in e.top]), top.values,
                                   atol=LP_TOL, rtol=LP_RTOL)
        assert [t.rank for t in e.top] == list(range(1, n + 1))


@pytest.mark.parametrize("steered", [False, True], ids=["plain", "steered"])
def test_logprobs_match_the_reference_log_softmax(server, ref, steered):
    sid = "jr"
    edits = [Edit(sid, int(ref.latents(PROMPT, sid).sum(0).argmax()), CLAMP, 30.0)] if steered else []
    ivs = [clamp(e.sae, e.feature, e.value) for e in edits]
    with server.client() as c:
        out = c.generate_text(PROMPT, max_tokens=8, temperature=0.0, ignore_eos=True,
                              interventions=ivs, logprobs=5, prompt_logprobs=3)
    n = len(PROMPT)
    lsm = torch.log_softmax(ref.logits(PROMPT + out.token_ids, edits, n).double(), -1).float()
    _check_logprobs(out.logprobs, lsm, list(range(n - 1, n - 1 + 8)), out.token_ids, 5)
    # prompt entry j is position j+1, predicted from row j
    _check_logprobs(out.prompt_logprobs, lsm, list(range(n - 1)), PROMPT[1:], 3)
    if steered:  # the edit moved the distribution: the comparison is not vacuous
        plain = torch.log_softmax(ref.logits(PROMPT + out.token_ids, [], n), -1)
        assert (plain[n - 1:] - lsm[n - 1:]).abs().max() > 0.1


def test_sampled_tokens_carry_their_own_logprob(server, ref):
    with server.client() as c:
        out = c.generate_text(PROMPT, max_tokens=8, temperature=1.0, seed=5, ignore_eos=True,
                              logprobs=0)
    n = len(PROMPT)
    lsm = torch.log_softmax(ref.logits(PROMPT + out.token_ids, [], n), -1)
    # raw logprobs (before temperature), of the sampled token even when it is not the argmax
    _check_logprobs(out.logprobs, lsm, list(range(n - 1, n + 7)), out.token_ids, 0)
    assert not out.prompt_logprobs


def test_logprob_caps_and_model_info(server):
    with server.client() as c:
        info = c.model_info()
        assert info.max_logprobs == 20 and info.chat_template
        for kw, field in (({"logprobs": 21}, "sampling.logprobs"),
                          ({"prompt_logprobs": 21}, "sampling.prompt_logprobs")):
            with pytest.raises(grpc.RpcError) as ei:
                c.generate_text(PROMPT, max_tokens=2, **kw)
            assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert ei.value.details().startswith(field + ":") and "cap of 20" in ei.value.details()
        assert len(c.generate_text(PROMPT, max_tokens=2, logprobs=20).logprobs[0].top) == 20


def test_cli_chat_with_logprobs(server):
    with server.client() as c:
        want = c.generate_text(CHAT[-1:], max_tokens=4, temperature=0.0, logprobs=2,
                               interventions=[clamp("resid_l1", 3, 20.0)])
    cmd = [sys.executable, "-m", "clients.cli", "--target", server.target, "generate",
           "--message", f"user:{CHAT[-1][1]}", "--max-tokens", "4", "--temperature", "0",
           "--logprobs", "2", "--clamp", "resid_l1:3=20", "--json"]
    got = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
    assert got["token_ids"] == want.token_ids and got["prompt_token_ids"] == want.prompt_token_ids
    assert [e["token_id"] for e in got["logprobs"]] == want.token_ids
    assert [[t["token_id"] for t in e["top"]] for e in got["logprobs"]] == \
        [[t.token_id for t in e.top] for e in want.logprobs]
    assert got["logprobs"][0]["logprob"] == pytest.approx(want.logprobs[0].chosen.logprob)
    text = subprocess.run(cmd[:-1], check=True, capture_output=True, text=True).stdout
    assert len(text.strip().splitlines()) == 1 + 4  # the text, then one line per token


def test_prompt_positions_are_not_skipped_with_prompt_logprobs(server):
    long = [(3 * j + 1) % 500 + 3 for j in range(150)]  # a full KV block: cacheable
    with server.client() as c:
        c.generate_text(long, max_tokens=1, temperature=0.0)
        out = c.generate_text(long, max_tokens=1, temperature=0.0, prompt_logprobs=1)
    assert len(out.prompt_logprobs) == len(long) - 1
    assert [e.chosen.token_id for e in out.prompt_logprobs] == long[1:]
    assert out.usage.cached_prompt_tokens == 0
