"""A cross-layer transcoder served through ``--sae`` (the embedded ``topics_clt``, on the
shared ``default_server``): steered tokens and reads against circuit-tracer.

Oracle: circuit-tracer's own ``CrossLayerTranscoder`` loaded from the same folder, its
feature intervention re-enacted on a Hugging Face forward of the embedded model
(``tests.clt_refs.hf_clt_steered_logits``: at each source layer the feature is encoded from
the steered MLP input and ``(v - f) * W_dec[s][j, l - s]`` is added to every later MLP
output), teacher-forced on the served tokens; reads against its ``encode`` of the model's
MLP inputs, flattened ``slot * F + index``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
import torch

from clients.client import clamp, conditional, read, when
from sae_runtime.labels.hf_sites import site_activations
from sae_runtime.labels.store import FeatureLabels
from tests import clt_refs
from tests.e2e.reference import check_teacher_forced

pytestmark = pytest.mark.e2e

EMBEDDED = Path(__file__).resolve().parents[2] / "server" / "embedded"
CLT = "topics_clt"
FOLDER = EMBEDDED / "saes" / CLT
TEXT = "Yesterday my friend and I walked to the"


@pytest.fixture(scope="module")
def ref():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(EMBEDDED / "model", dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(EMBEDDED / "model")
    ct = clt_refs.ct_load_clt(FOLDER)
    n_layers = len(ct.W_enc)
    F = ct.W_enc[0].shape[0]
    labels = FeatureLabels.load(FOLDER / "feature_labels.json", CLT, n_layers * F)
    return model, tok, ct, n_layers, F, labels


def _ocean(labels, F, slot):
    """The best-scored ocean feature of ``slot`` (flat index) and a clamp value for it."""
    feats = [f for f in labels.features.values()
             if f.index // F == slot and f.topic == "ocean" and f.label.startswith("ocean")]
    best = max(feats, key=lambda f: f.score)
    return best.index, 3.0 * best.max_activation


def test_the_clt_is_listed_with_its_layers(default_server, ref):
    *_, n_layers, F, _ = ref
    with default_server.client() as c:
        info = {s.id: s for s in c.list_saes()}
    s = info[CLT]
    assert (list(s.layers), s.features_per_layer, s.d_sae, s.layer, s.site, s.input_site) == (
        list(range(n_layers)), F, n_layers * F, 0, 4, 6)
    assert (s.hook_name, s.hook_name_out) == ("blocks.0.mlp.hook_in",
                                              f"blocks.{n_layers - 1}.hook_mlp_out")
    assert info["topics_l1"].layers == []  # an SAE has none
    with urllib.request.urlopen(default_server.http_url + "/saes", timeout=30) as r:
        http = {s["id"]: s for s in json.load(r)["data"]}
    assert (http[CLT]["layers"], http[CLT]["d_sae"]) == (list(range(n_layers)), n_layers * F)


def test_clamps_at_two_layers_are_circuit_tracers_intervention(default_server, ref):
    model, tok, ct, n_layers, F, labels = ref
    (j0, v0), (j1, v1) = _ocean(labels, F, 0), _ocean(labels, F, 1)
    prompt = tok(TEXT)["input_ids"]
    kw = dict(max_tokens=12, temperature=0.0, ignore_eos=True)
    with default_server.client() as c:
        plain = c.generate_text(prompt, **kw)
        steered = c.generate_text(prompt, interventions=[clamp(CLT, j0, v0), clamp(CLT, j1, v1)],
                                  **kw)
    assert steered.token_ids != plain.token_ids, "the clamp must change the text"
    ids = torch.tensor(prompt + steered.token_ids)
    logits = clt_refs.hf_clt_steered_logits(model, ids, ct, [(0, j0, v0), (1, j1 - F, v1)],
                                            n_layers)
    check_teacher_forced(logits, len(prompt), steered.token_ids)


@torch.no_grad()
def test_reads_are_circuit_tracers_flat_latents(default_server, ref):
    model, tok, ct, n_layers, F, labels = ref
    (j0, v0), (j1, _) = _ocean(labels, F, 0), _ocean(labels, F, 1)
    watch = [j0, j1, (n_layers - 1) * F + 5]
    prompt = tok(TEXT)["input_ids"]
    kw = dict(max_tokens=6, temperature=0.0, ignore_eos=True)
    with default_server.client() as c:
        out = c.generate_text(prompt, reads=[read(CLT, top_k=5, watch=watch)], **kw)
        edited = c.generate_text(prompt, interventions=[clamp(CLT, j0, v0)],
                                 reads=[read(CLT, watch=[j0])], **kw)
    ids = torch.tensor(prompt + out.token_ids)
    xs = torch.stack([site_activations(model, ids[None], s, "mlp_in")[0] for s in range(n_layers)])
    flat = ct.encode(xs).permute(1, 0, 2).reshape(len(ids), n_layers * F)  # [T, L * F]
    assert len(out.features) >= len(prompt)
    for f in out.features:
        want = flat[f.position]
        assert list(f.values) == pytest.approx(want.topk(5).values.tolist(), abs=1e-4)
        assert all(abs(float(want[i]) - v) <= 1e-4 for i, v in zip(f.indices, f.values, strict=True))
        assert list(f.watch_values) == pytest.approx(want[watch].tolist(), abs=1e-4)
    assert {i // F for f in out.features for i in f.indices} - {0}, "reads span the layers"
    # a read reports the request's own edit: the clamped feature reads its clamp value
    assert all(f.watch_values[0] == pytest.approx(v0, rel=1e-5) for f in edited.features)


def test_a_condition_on_another_layer_is_refused(default_server, ref):
    *_, F, _ = ref
    iv = conditional(clamp(CLT, F + 3, 1.0), when(CLT, 5, ">", 0.1))
    with default_server.client() as c, pytest.raises(grpc.RpcError) as e:
        c.generate_text([1, 2, 3], interventions=[iv], max_tokens=2)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "interventions[0].when.feature" in e.value.details()


def _logprobs(out) -> list[tuple]:
    return [(e.chosen.token_id, e.chosen.logprob, tuple((t.token_id, t.logprob) for t in e.top))
            for e in out.logprobs]


def test_plain_requests_beside_clt_clamps_are_bit_identical_to_alone(default_server, ref):
    """One concurrent batch: two plain requests and two CLT-clamped ones (a layer-0 and a
    layer-1 feature) on the same prompts. The plain ones' tokens and logprobs equal the same
    requests run alone, bit for bit (the carry and the slot hooks touch only the rows that
    edit); the clamped ones are steered."""
    _, tok, _, _, F, labels = ref
    (j0, v0), (j1, v1) = _ocean(labels, F, 0), _ocean(labels, F, 1)
    prompts = [tok(t)["input_ids"] for t in (TEXT, "The weather this morning was")]
    kw = dict(max_tokens=12, temperature=0.0, ignore_eos=True, logprobs=3)
    with default_server.client() as c:
        alone = [c.generate_text(p, **kw) for p in prompts]
        with ThreadPoolExecutor(4) as pool:
            plain = [pool.submit(c.generate_text, p, **kw) for p in prompts]
            steered = [pool.submit(c.generate_text, p, interventions=[clamp(CLT, j, v)], **kw)
                       for p, (j, v) in zip(prompts, ((j0, v0), (j1, v1)), strict=True)]
            plain, steered = [f.result() for f in plain], [f.result() for f in steered]
    for a, p, s in zip(alone, plain, steered, strict=True):
        assert p.token_ids == a.token_ids
        assert len(a.logprobs) == len(a.token_ids) and _logprobs(p) == _logprobs(a)
        assert s.token_ids != a.token_ids, "a CLT clamp must steer its own request"


def test_the_cli_takes_a_feature_as_layer_slash_index(default_server, ref):
    """``--clamp topics_clt:1/J=V`` (feature J of layer 1, as an attribution graph names it)
    is the flat feature ``F + J``: the same tokens as the client's clamp of ``F + J``, and
    ``--watch topics_clt:1/J`` reads it at its clamp value."""
    _, tok, _, _, F, labels = ref
    j1, v1 = _ocean(labels, F, 1)
    prompt = tok(TEXT)["input_ids"]
    with default_server.client() as c:
        want = c.generate_text(prompt, max_tokens=8, temperature=0.0,
                               interventions=[clamp(CLT, j1, v1)])
    cmd = [sys.executable, "-m", "clients.cli", "--target", default_server.target, "generate",
           "--prompt-ids", ",".join(map(str, prompt)), "--max-tokens", "8", "--temperature", "0",
           "--clamp", f"{CLT}:1/{j1 - F}={v1}", "--watch", f"{CLT}:1/{j1 - F}", "--json"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["token_ids"] == want.token_ids
    assert all(f["watch_values"] == [pytest.approx(v1, rel=1e-5)] for f in out["features"])
    bad = [*cmd[:6], "--prompt-ids", "1,2", "--clamp", f"topics_l1:1/{j1 - F}=1"]
    r = subprocess.run(bad, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "is not one (give its index)" in r.stderr, r.stderr
