"""Raw activation reads (``activation_reads``) against Hugging Face ``transformers``.

The shared server declares ``ACT_HOOKS`` (``--activation-hooks``, tests/e2e/conftest.py).
The reference is the fp32 HF model with plain forward hooks on its modules
(``HFReference.hidden``); a steered request's reference adds the same edit with an HF hook
(sae-lens's SAE math, ``HFReference``), registered before the capture, so it sees the edited
values: the documented "after this request's edits" convention. A ``before_edits`` read's
reference is the same forward with only the request's edits at earlier sites (an edit at
block L's output changes nothing up to that output, so the values there are the ones the
site's own edits start from).
"""

from __future__ import annotations

import base64
import concurrent.futures as cf
import json
import subprocess
import sys

import grpc
import numpy as np
import pytest
import torch

from clients.client import activation_read, clamp, collect, positions, prompt_range, unpack
from tests.e2e.conftest import SAE_IDS
from tests.e2e.reference import CLAMP, Edit, HFReference

pytestmark = pytest.mark.e2e
PROMPT = [5, 100, 200, 300, 45, 67, 12, 400, 9, 33]
TOL = 1e-4
RESID = [f"blocks.{L}.hook_resid_post" for L in range(3)]


@pytest.fixture(scope="module")
def ref(server):
    return HFReference(server.model_dir, server.sae_dirs, SAE_IDS)


def close(got: np.ndarray, want: torch.Tensor, atol: float = TOL) -> None:
    torch.testing.assert_close(torch.from_numpy(np.array(got, dtype=np.float32)),
                               want.to(torch.float32), atol=atol, rtol=0)


def test_model_info_lists_declared_hooks(server):
    with server.client() as c:
        info = c.model_info()
    assert list(info.activation_hooks) == [
        "blocks.0.hook_attn_out", "blocks.0.hook_mlp_out", "blocks.0.hook_resid_post",
        "blocks.1.attn.hook_z", "blocks.1.ln2.hook_normalized", "blocks.1.hook_resid_post",
        "blocks.2.hook_resid_pre", "blocks.2.hook_resid_post"]
    assert info.max_activation_reads > 0 and info.max_activation_bytes > 0


def test_generate_streams_activations_matching_hf(server, ref):
    hooks = [*RESID, "blocks.2.hook_resid_pre", "blocks.0.hook_mlp_out", "blocks.0.hook_attn_out",
             "blocks.1.attn.hook_z", "blocks.1.ln2.hook_normalized"]
    with server.client() as c:
        stream = list(c.generate(PROMPT, max_tokens=6, temperature=0.0, ignore_eos=True,
                                 activation_reads=[activation_read(h) for h in hooks]))
    r = collect(iter(stream))
    full = PROMPT + r.token_ids
    want = ref.hidden(full, hooks)
    fed = list(range(len(full) - 1))  # the last generated token is never fed
    for h in hooks:
        # every fed position exactly once, in order, across the stream's messages
        assert r.activation_positions[h] == fed, h
        assert r.activations[h].shape == (len(fed), want[h].shape[-1])
        close(r.activations[h], want[h][:-1])
    # streamed with the tokens: some message after the first carries rows of generated positions
    later = [p for m in stream[1:] for a in m.activations for p in a.positions]
    assert any(p >= len(PROMPT) for p in later)
    np.testing.assert_array_equal(r.activations["blocks.2.hook_resid_pre"],
                                  r.activations["blocks.1.hook_resid_post"])


def test_activations_are_taken_after_an_earlier_steer(server, ref):
    feature, value = 9, 12.0
    hooks = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post", "blocks.2.hook_resid_post"]
    with server.client() as c:
        r = c.generate_text(PROMPT, max_tokens=5, temperature=0.0, ignore_eos=True,
                            interventions=[clamp("resid_l1", feature, value)],
                            activation_reads=[activation_read(h) for h in hooks])
    full = PROMPT + r.token_ids
    steered = ref.hidden(full, hooks, [Edit("resid_l1", feature, CLAMP, value)], len(PROMPT))
    plain = ref.hidden(full, hooks)
    for h in hooks:
        close(r.activations[h], steered[h][:-1])
    # the edit sits at block 1's output: block 0 is untouched, blocks 1 and 2 are not
    close(r.activations["blocks.0.hook_resid_post"], plain["blocks.0.hook_resid_post"][:-1])
    for h in hooks[1:]:
        assert (steered[h] - plain[h]).abs().max() > 1e-2, f"the steer does not reach {h}"


def test_encode_pooled_and_selected_positions(server, ref):
    with server.client() as c:
        res = c.encode_activations([PROMPT], [
            activation_read("blocks.0.hook_resid_post", pool="mean"),
            activation_read("blocks.1.hook_resid_post", pool="max"),
            activation_read("blocks.2.hook_resid_post", pool="last"),
            activation_read("blocks.0.hook_mlp_out", at=positions(prompt_range(2, 5))),
        ])
    (r,) = res
    assert r.token_ids == PROMPT
    want = ref.hidden(PROMPT, [*RESID, "blocks.0.hook_mlp_out"])
    n = len(PROMPT)
    assert r.positions["blocks.0.hook_resid_post"] == list(range(n))
    close(r.activations["blocks.0.hook_resid_post"], want[RESID[0]].mean(0, keepdim=True))
    close(r.activations["blocks.1.hook_resid_post"], want[RESID[1]].max(0, keepdim=True).values)
    close(r.activations["blocks.2.hook_resid_post"], want[RESID[2]][-1:])
    assert r.positions["blocks.0.hook_mlp_out"] == [2, 3, 4]
    close(r.activations["blocks.0.hook_mlp_out"], want["blocks.0.hook_mlp_out"][2:5])


def test_half_precision_round_trip(server, ref):
    want = ref.hidden(PROMPT, RESID[1:2])[RESID[1]]
    got = {}
    for dtype in ("f32", "f16", "bf16"):
        with server.client() as c:
            (raw,) = c.encode([PROMPT], activation_reads=[activation_read(RESID[1], dtype=dtype)])
        (a,) = raw.activations
        assert list(a.shape) == [len(PROMPT), 128]
        assert len(a.data) == (4 if dtype == "f32" else 2) * len(PROMPT) * 128
        got[dtype] = unpack(a)
    close(got["f32"], want)
    # the half-precision values are the float32 ones rounded (numpy's float16, torch's
    # bfloat16: round to nearest even)
    f32 = torch.from_numpy(got["f32"])
    np.testing.assert_array_equal(got["f16"], f32.to(torch.float16).float().numpy())
    np.testing.assert_array_equal(got["bf16"], f32.to(torch.bfloat16).float().numpy())


def test_undeclared_hook_is_refused_naming_the_field(server):
    with server.client() as c, pytest.raises(grpc.RpcError) as e:
        c.generate_text(PROMPT, max_tokens=2, activation_reads=[
            activation_read(RESID[0]), activation_read("blocks.1.hook_mlp_out")])
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "activation_reads[1].hook" in e.value.details()
    assert "blocks.*.hook_resid_post" in e.value.details()  # the declared globs


def test_http_activation_reads_base64(server, ref):
    client = server.openai()
    out = client.completions.create(
        model=str(server.model_dir), prompt=PROMPT, max_tokens=3, temperature=0.0,
        extra_body={"ignore_eos": True, "return_token_ids": True,
                    "activation_reads": [{"hook": RESID[2]},
                                         {"hook": RESID[0], "pool": "mean", "dtype": "float16"}]})
    choice = out.choices[0].model_dump()
    full = PROMPT + choice["token_ids"]
    want = ref.hidden(full, [RESID[0], RESID[2]])
    per_pos, pooled = choice["activations"]
    assert per_pos["hook"] == RESID[2] and per_pos["dtype"] == "float32"
    assert per_pos["positions"] == list(range(len(full) - 1))
    rows = np.frombuffer(base64.b64decode(per_pos["data"]), "<f4").reshape(per_pos["shape"])
    close(rows, want[RESID[2]][:-1])
    assert pooled["pool"] == "mean" and pooled["shape"] == [1, 128]
    prow = np.frombuffer(base64.b64decode(pooled["data"]), "<f2").astype(np.float32)
    close(prow[None], want[RESID[0]][:-1].mean(0, keepdim=True), atol=1e-2)


def test_cli_encode_json(server, ref):
    cmd = [sys.executable, "-m", "clients.cli", "--target", server.target, "encode",
           "--prompt-ids", ",".join(map(str, PROMPT)), "--activations", RESID[1],
           "--activations-pool", "max", "--json"]
    out = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True,
                                    timeout=120).stdout)
    (entry,) = out["activations"]
    assert entry["hook"] == RESID[1] and entry["positions"] == list(range(len(PROMPT)))
    want = ref.hidden(PROMPT, [RESID[1]])[RESID[1]].max(0, keepdim=True).values
    close(np.array(entry["values"]), want)


# ---------------------------------------------------------------------------- before edits
# Hooks on the shared server: tk edits block 0's output, resid_l1 and jr block 1's, the
# vector banks blocks 0-2's outputs; nothing edits hook_mlp_out, hook_attn_out, z or ln2.
EDITED = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post", "blocks.2.hook_resid_pre",
          "blocks.2.hook_resid_post"]


def test_model_info_lists_the_hooks_with_edits(server):
    with server.client() as c:
        info = c.model_info()
    assert sorted(info.activation_hooks_with_edits) == sorted(EDITED)


def test_before_edits_reads_the_site_without_this_requests_edit_there(server, ref):
    """An earlier-site clamp (tk, block 0) and one at the read site (resid_l1, block 1):
    block 1's output before edits is HF with the block-0 edit only, after edits HF with
    both; ``blocks.2.hook_resid_pre`` is the same position (block 1's output)."""
    early, late = Edit("tk", 3, CLAMP, 6.0), Edit("resid_l1", 9, CLAMP, 12.0)
    reads = [activation_read(RESID[1]), activation_read(RESID[1], before_edits=True),
             activation_read("blocks.2.hook_resid_pre", before_edits=True),
             activation_read(RESID[0], before_edits=True), activation_read(RESID[0])]
    with server.client() as c:
        r = c.generate_text(PROMPT, max_tokens=5, temperature=0.0, ignore_eos=True,
                            interventions=[clamp("tk", 3, 6.0), clamp("resid_l1", 9, 12.0)],
                            activation_reads=reads)
    full = PROMPT + r.token_ids
    both = ref.hidden(full, RESID[:2], [early, late], len(PROMPT))
    earlier = ref.hidden(full, RESID[:2], [early], len(PROMPT))
    plain = ref.hidden(full, RESID[:2])
    fed = list(range(len(full) - 1))
    assert r.activation_positions_before[RESID[1]] == r.activation_positions[RESID[1]] == fed
    close(r.activations[RESID[1]], both[RESID[1]][:-1])
    close(r.activations_before[RESID[1]], earlier[RESID[1]][:-1])
    close(r.activations_before["blocks.2.hook_resid_pre"], earlier[RESID[1]][:-1])
    close(r.activations_before[RESID[0]], plain[RESID[0]][:-1])
    close(r.activations[RESID[0]], both[RESID[0]][:-1])
    # each edit moves what it should: the site's own edit separates before from after, the
    # earlier one reaches the before values
    assert (both[RESID[1]] - earlier[RESID[1]]).abs().max() > 1e-1
    assert (earlier[RESID[1]] - plain[RESID[1]]).abs().max() > 1e-1
    assert (both[RESID[0]] - plain[RESID[0]]).abs().max() > 1e-1


def test_before_and_after_reads_of_requests_in_one_batch(server, ref):
    """Concurrent requests, each with its own block-1 clamp and its own read (before edits
    for even i, after for odd i, both for i = 0) of block 1's output: each one's rows are its
    own reference's."""
    n = 6
    prompts = [[(31 * i + 7 * j) % 500 + 3 for j in range(6 + 5 * i)] for i in range(n)]

    def run(i):
        reads = [activation_read(RESID[1], before_edits=i % 2 == 0)]
        if i == 0:
            reads.append(activation_read(RESID[1]))
        edits = [clamp("tk", i, 5.0), clamp("resid_l1", 10 + i, 10.0)]
        with server.client() as c:
            return c.generate_text(prompts[i], max_tokens=6, temperature=0.0, ignore_eos=True,
                                   interventions=edits, activation_reads=reads)

    with cf.ThreadPoolExecutor(n) as pool:
        results = list(pool.map(run, range(n)))
    for i, r in enumerate(results):
        full = prompts[i] + r.token_ids
        early = [Edit("tk", i, CLAMP, 5.0)]
        both = ref.hidden(full, [RESID[1]], [*early, Edit("resid_l1", 10 + i, CLAMP, 10.0)],
                          len(prompts[i]))[RESID[1]][:-1]
        earlier = ref.hidden(full, [RESID[1]], early, len(prompts[i]))[RESID[1]][:-1]
        if i % 2 == 0:
            assert r.activation_positions_before[RESID[1]] == list(range(len(full) - 1))
            close(r.activations_before[RESID[1]], earlier)
        if i % 2 == 1 or i == 0:
            assert r.activation_positions[RESID[1]] == list(range(len(full) - 1))
            close(r.activations[RESID[1]], both)
        if i % 2 == 1:
            assert r.activations_before == {}


def test_before_and_after_where_nothing_edits_is_refused_naming_the_field(server, ref):
    hook = "blocks.0.hook_mlp_out"
    with server.client() as c, pytest.raises(grpc.RpcError) as e:
        c.generate_text(PROMPT, max_tokens=2, activation_reads=[
            activation_read(hook), activation_read(hook, before_edits=True)])
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "activation_reads[1].before_edits" in e.value.details()
    assert "nothing edits blocks.0.hook_mlp_out" in e.value.details()
    # alone, a before-edits read there gives the (same) after-edits values
    with server.client() as c:
        (r,) = c.encode_activations([PROMPT], [activation_read(hook, before_edits=True)])
    close(r.activations_before[hook], ref.hidden(PROMPT, [hook])[hook])


def test_http_and_cli_mark_before_edits_reads(server, ref):
    out = server.openai().completions.create(
        model=str(server.model_dir), prompt=PROMPT, max_tokens=3, temperature=0.0,
        extra_body={"ignore_eos": True, "return_token_ids": True,
                    "interventions": [{"sae": "resid_l1", "feature": 9, "value": 12.0,
                                       "mode": "clamp"}],
                    "activation_reads": [{"hook": RESID[1]},
                                         {"hook": RESID[1], "before_edits": True}]})
    choice = out.choices[0].model_dump()
    full = PROMPT + choice["token_ids"]
    after, before = choice["activations"]
    assert (after["before_edits"], before["before_edits"]) == (False, True)
    rows = {e["before_edits"]: np.frombuffer(base64.b64decode(e["data"]), "<f4").reshape(e["shape"])
            for e in (after, before)}
    close(rows[False], ref.hidden(full, [RESID[1]], [Edit("resid_l1", 9, CLAMP, 12.0)],
                                  len(PROMPT))[RESID[1]][:-1])
    close(rows[True], ref.hidden(full, [RESID[1]])[RESID[1]][:-1])
    cmd = [sys.executable, "-m", "clients.cli", "--target", server.target, "generate",
           "--prompt-ids", ",".join(map(str, PROMPT)), "--max-tokens", "3", "--temperature", "0",
           "--clamp", "resid_l1:9=12.0", "--activations", RESID[1],
           "--activations-before-edits", RESID[1], "--json"]
    res = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True,
                                    timeout=120).stdout)
    a, b = res["activations"]
    assert a["hook"] == b["hook"] == RESID[1]
    assert "before_edits" not in a and b["before_edits"] is True
    full = PROMPT + res["token_ids"]
    close(np.array(b["values"]), ref.hidden(full, [RESID[1]])[RESID[1]][:-1])
