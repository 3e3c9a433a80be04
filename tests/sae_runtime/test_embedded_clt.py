"""The shipped cross-layer transcoder of the embedded default (``sae_runtime.training.clt_train``).

circuit-tracer itself loads it (its ``load_clt`` on the folder, the format it writes) to the
same tensors as ours; its encode of the model's real MLP inputs predicts every layer's MLP
output (the circuit-tracer decode); its labels use the flat index; and its labelled layer-0
"ocean" feature reads ocean text.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sae_runtime.labels.store import FeatureLabels
from sae_runtime.loading import load_clt
from sae_runtime.saes import clt as clt_math
from tests import clt_refs

EMBEDDED = Path(__file__).resolve().parents[2] / "server" / "embedded"
CLT_DIR = EMBEDDED / "saes" / "topics_clt"
OCEAN = "The sailors sailed toward the open sea. The waves were salty near the coral reef."
SPACE = "The astronauts launched toward the planet. The rocket orbited the moon in outer space."
FVU_BOUND = 0.45  # all layers, per text: measured 0.28 (ocean), 0.18 (space); without the
# cross-layer terms 0.69, 0.66 (clt_report.json: 0.078 on held-out corpus text)


@pytest.fixture(scope="module")
def setup():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ours = load_clt(CLT_DIR)
    ref = clt_refs.ct_load_clt(CLT_DIR)
    tok = AutoTokenizer.from_pretrained(EMBEDDED / "model")
    model = AutoModelForCausalLM.from_pretrained(EMBEDDED / "model", dtype=torch.float32).eval()
    lab = FeatureLabels.load(CLT_DIR / "feature_labels.json", CLT_DIR.name, ours.cfg.n_features)
    return ours, ref, tok, model, lab


@torch.no_grad()
def _mlp_io(model, tok, text: str):
    """(mlp_in [L, T, d], mlp_out [L, T, d]) of every layer, BOS dropped."""
    got = {}
    hooks = [layer.mlp.register_forward_hook(
        lambda _m, a, o, i=i: got.__setitem__(i, (a[0][0, 1:].float(), o[0, 1:].float())))
        for i, layer in enumerate(model.model.layers)]
    try:
        model(input_ids=tok(text, return_tensors="pt")["input_ids"])
    finally:
        for h in hooks:
            h.remove()
    return (torch.stack([got[i][0] for i in sorted(got)]),
            torch.stack([got[i][1] for i in sorted(got)]))


def test_circuit_tracer_reads_the_files_we_read(setup):
    ours, ref, _, model, _ = setup
    c = ours.cfg
    assert (c.kind, c.format, c.n_layers, c.layers, c.activation) == (
        "clt", "circuit_tracer", model.config.num_hidden_layers, (0, 1, 2, 3), "relu")
    assert (c.input_hook, c.output_hook, c.input_site, c.dtype) == (
        "mlp.hook_in", "hook_mlp_out", "mlp_in", "bfloat16")
    torch.testing.assert_close(ours.W_enc, ref.W_enc.detach().transpose(1, 2), atol=0, rtol=0)
    for s in range(c.n_layers):
        torch.testing.assert_close(ours.W_dec[s], ref.W_dec[s].detach(), atol=0, rtol=0)
        # each feature's decoder vectors to every later layer, together, have unit norm
        norms = ours.W_dec[s].pow(2).sum((1, 2)).sqrt()
        torch.testing.assert_close(norms, torch.ones_like(norms), atol=1e-2, rtol=0)
    assert clt_math.decoder_bytes(c, torch.bfloat16) < 4 * 2**20


@torch.no_grad()
@pytest.mark.parametrize("text", [OCEAN, SPACE])
def test_encode_and_decode_predict_every_mlp_output(setup, text):
    ours, ref, tok, model, _ = setup
    x, y = _mlp_io(model, tok, text)
    f = clt_math.encode(ours, x)
    torch.testing.assert_close(f, ref.encode(x), atol=1e-4, rtol=1e-4)
    pred = clt_math.decode(ours, f)
    fvu = float((y - pred).pow(2).sum() / (y - y.mean(1, keepdim=True)).pow(2).sum())
    assert fvu < FVU_BOUND, fvu
    l0 = (f > 0).float().sum(-1).mean(1)  # per layer
    assert bool(((l0 >= 1) & (l0 <= 200)).all()), l0


@torch.no_grad()
def test_labels_use_the_flat_index_and_a_layer_0_ocean_feature_reads_ocean(setup):
    ours, _, tok, model, lab = setup
    F = ours.cfg.d_sae
    feats = list(lab.features.values())
    assert feats and all(0 <= f.index < ours.cfg.n_features for f in feats)
    ocean = [f for f in feats if f.index < F and f.topic == "ocean" and f.label.startswith("ocean")]
    assert ocean, "no labelled layer-0 ocean feature"
    best = max(ocean, key=lambda f: f.score)
    slot, j = clt_math.split_index(ours.cfg, best.index)
    assert slot == 0
    acts = {name: float(clt_math.encode_layer(ours, _mlp_io(model, tok, text)[0][0], 0)[:, j].mean())
            for name, text in (("ocean", OCEAN), ("space", SPACE))}
    assert acts["ocean"] > acts["space"], (best.index, acts)
