"""The shipped MLP transcoder of the embedded default (``sae_runtime.training.transcoder_train``).

It loads with the real sae-lens as a ``Transcoder``, its encoder is the plain SAELens formula
on the MLP input (no ``b_dec`` subtraction), it predicts the MLP output of the HF model, and
its labelled "ocean" feature reads ocean text.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from sae_runtime.labels.store import FeatureLabels

sae_lens = pytest.importorskip("sae_lens")

EMBEDDED = Path(__file__).resolve().parents[2] / "server" / "embedded"
TC_DIRS = sorted((EMBEDDED / "saes").glob("topics_tc*"))
OCEAN = "The sailors sailed toward the open sea. The waves were salty near the coral reef."
SPACE = "The astronauts launched toward the planet. The rocket orbited the moon in outer space."
FVU_BOUND = 0.4  # measured 0.18 (ocean) and 0.25 (space) here; 0.18 on held-out corpus text


@pytest.fixture(scope="module")
def setup():
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert TC_DIRS, "no shipped transcoder under server/embedded/saes/topics_tc*"
    tc_dir = TC_DIRS[0]
    cfg = json.loads((tc_dir / "cfg.json").read_text())
    layer = int(cfg["metadata"]["hook_name"].split(".")[1])
    # trained on the MLP's input (the norm's output with its weight): mlp.hook_in, not
    # TransformerLens' ln2.hook_normalized (the same without the weight)
    assert cfg["metadata"]["hook_name"] == f"blocks.{layer}.mlp.hook_in"
    assert cfg["metadata"]["hook_name_out"] == f"blocks.{layer}.hook_mlp_out"
    lens = sae_lens.SAE.load_from_disk(str(tc_dir), device="cpu")
    raw = load_file(str(tc_dir / "sae_weights.safetensors"))
    tok = AutoTokenizer.from_pretrained(EMBEDDED / "model")
    model = AutoModelForCausalLM.from_pretrained(EMBEDDED / "model", dtype=torch.float32).eval()
    lab = FeatureLabels.load(tc_dir / "feature_labels.json", tc_dir.name, cfg["d_sae"])
    return lens, raw, tok, model, layer, lab


@torch.no_grad()
def _mlp_io(model, tok, layer: int, text: str):
    got = {}

    def hook(_mod, args, output):
        got["in"], got["out"] = args[0][0, 1:].float(), output[0, 1:].float()  # BOS dropped

    handle = model.model.layers[layer].mlp.register_forward_hook(hook)
    try:
        model(input_ids=tok(text, return_tensors="pt")["input_ids"])
    finally:
        handle.remove()
    return got["in"], got["out"]


def test_loads_as_saelens_transcoder(setup):
    from sae_lens.saes.transcoder import Transcoder

    lens, raw, *_ = setup
    assert isinstance(lens, Transcoder)
    assert {k: tuple(v.shape) for k, v in raw.items()} == {
        "W_enc": (256, 1024), "W_dec": (1024, 256), "b_enc": (1024,), "b_dec": (256,)}
    assert all(v.dtype == torch.float32 for v in raw.values())
    # decoder rows unit-norm (norms folded into the encoder), so activations are comparable
    torch.testing.assert_close(raw["W_dec"].norm(dim=1), torch.ones(1024), atol=1e-4, rtol=0)


@torch.no_grad()
@pytest.mark.parametrize("text", [OCEAN, SPACE])
def test_encode_matches_formula_and_predicts_mlp_out(setup, text):
    lens, raw, tok, model, layer, _ = setup
    x, y = _mlp_io(model, tok, layer, text)
    f = lens.encode(x)
    torch.testing.assert_close(f, torch.relu(x @ raw["W_enc"] + raw["b_enc"]), atol=1e-4, rtol=1e-4)
    pred = lens.decode(f)
    torch.testing.assert_close(pred, f @ raw["W_dec"] + raw["b_dec"], atol=1e-4, rtol=1e-4)
    fvu = float((y - pred).pow(2).sum() / (y - y.mean(0)).pow(2).sum())
    assert fvu < FVU_BOUND, fvu
    assert 1 <= float((f > 0).sum(-1).float().mean()) <= 200


@torch.no_grad()
def test_ocean_feature_reads_ocean_text(setup):
    lens, _, tok, model, layer, lab = setup
    ocean = [f for f in lab.features.values() if f.topic == "ocean" and f.label.startswith("ocean")]
    assert ocean
    best = max(ocean, key=lambda f: f.score)
    acts = {name: float(lens.encode(_mlp_io(model, tok, layer, text)[0])[:, best.index].mean())
            for name, text in (("ocean", OCEAN), ("space", SPACE))}
    assert acts["ocean"] > acts["space"], (best.index, acts)
