"""Our SAE math against the sae-lens package (an independent implementation)."""

from __future__ import annotations

import pytest
import torch

from sae_runtime import ops, registry
from sae_runtime.loading import load_sae

sae_lens = pytest.importorskip("sae_lens")

D_IN, D_SAE = 48, 96  # 48: an awkward width, as sparsify's tests use


def _saelens_sae(arch: str, tmp_path):
    """A random sae-lens SAE of ``arch`` with non-trivial biases, saved with save_model."""
    kw = {"k": 7} if arch == "topk" else {}
    cfg_cls = {
        "standard": sae_lens.StandardSAEConfig,
        "jumprelu": sae_lens.JumpReLUSAEConfig,
        "topk": sae_lens.TopKSAEConfig,
    }[arch]
    sae_cls = {
        "standard": sae_lens.StandardSAE,
        "jumprelu": sae_lens.JumpReLUSAE,
        "topk": sae_lens.TopKSAE,
    }[arch]
    cfg = cfg_cls(d_in=D_IN, d_sae=D_SAE, dtype="float32", device="cpu", **kw)
    cfg.metadata.hook_name = "blocks.2.hook_resid_post"
    ref = sae_cls(cfg)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            p.copy_(torch.randn_like(p) * (0.3 if name.startswith("W") else 0.5))
        if arch == "jumprelu":
            ref.threshold.copy_(torch.rand(D_SAE) * 0.8)
    path = tmp_path / arch
    ref.save_model(path)
    return ref, path


@pytest.mark.parametrize("arch", registry.names())
def test_encode_decode_match_sae_lens(arch, tmp_path):
    ref, path = _saelens_sae(arch, tmp_path)
    ours = load_sae(path)
    assert ours.cfg.architecture == arch
    assert (ours.cfg.layer, ours.cfg.site) == (2, "resid_post")
    x = torch.randn(33, D_IN)
    with torch.no_grad():
        want_f = ref.encode(x)
        want_xhat = ref.decode(want_f)
    got_f = ops.encode(ours, x)
    assert (want_f > 0).any(), "test SAE never fires; the comparison would be vacuous"
    torch.testing.assert_close(got_f, want_f, atol=1e-5, rtol=0)
    torch.testing.assert_close(ops.decode(ours, got_f), want_xhat, atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", registry.names())
def test_feature_activations_equal_dense_encode(arch, tmp_path):
    ref, path = _saelens_sae(arch, tmp_path)
    ours = load_sae(path)
    x = torch.randn(20, D_IN)
    cols = torch.randint(0, D_SAE, (20, 5))
    with torch.no_grad():
        dense = ref.encode(x)
    torch.testing.assert_close(ops.feature_activations(ours, x, cols), dense.gather(1, cols),
                               atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", registry.names())
@pytest.mark.parametrize("mode", [ops.Mode.CLAMP, ops.Mode.ABLATE, ops.Mode.SCALE, ops.Mode.ADD])
def test_intervention_delta_matches_edit_and_decode(arch, mode, tmp_path):
    """x + delta == x - decode(f) + decode(f') where f' is f with the edits applied (sae-lens)."""
    ref, path = _saelens_sae(arch, tmp_path)
    ours = load_sae(path)
    x = torch.randn(10, D_IN)
    feats = torch.tensor([3, 17, 40])
    value = 2.5
    with torch.no_grad():
        f = ref.encode(x)
        f_new = f.clone()
        if mode == ops.Mode.CLAMP:
            f_new[:, feats] = value
        elif mode == ops.Mode.ABLATE:
            f_new[:, feats] = 0
        elif mode == ops.Mode.SCALE:
            f_new[:, feats] = f[:, feats] * value
        else:
            f_new[:, feats] = f[:, feats] + value
        want = x - ref.decode(f) + ref.decode(f_new)
    K = len(feats)
    delta = ops.intervention_delta(
        ours, x, feats.expand(10, K), torch.full((10, K), int(mode)), torch.full((10, K), value)
    )
    torch.testing.assert_close(x + delta, want, atol=1e-5, rtol=0)


def test_hand_set_jumprelu_and_topk_exact():
    """Tiny hand-set weights with outputs worked out by hand."""
    from sae_runtime.saes.base import SAE, SAEConfig

    eye = torch.eye(3)
    cfg = SAEConfig("jumprelu", 3, 3, "blocks.1.hook_resid_post", 1, "resid_post")
    sae = SAE(cfg, eye, eye, torch.zeros(3), torch.zeros(3), torch.tensor([0.5, 0.5, 2.0]))
    x = torch.tensor([[1.0, 0.4, 1.5]])
    # feature 0: 1.0 > 0.5 -> 1.0; feature 1: 0.4 <= 0.5 -> 0; feature 2: 1.5 <= 2.0 -> 0
    assert ops.encode(sae, x).tolist() == [[1.0, 0.0, 0.0]]
    tk = SAE(SAEConfig("topk", 3, 3, "blocks.1.hook_resid_post", 1, "resid_post", k=2),
             eye, eye, torch.zeros(3), torch.zeros(3))
    x = torch.tensor([[3.0, -1.0, 2.0]])
    assert ops.encode(tk, x).tolist() == [[3.0, 0.0, 2.0]]
    # clamping feature 1 (not in the top-k: activation 0) to 5 adds 5 * e_1
    d = ops.intervention_delta(tk, x, torch.tensor([[1]]), torch.tensor([[int(ops.Mode.CLAMP)]]),
                               torch.tensor([[5.0]]))
    assert d.tolist() == [[0.0, 5.0, 0.0]]


def test_registry_unknown_name_lists_known():
    from sae_runtime.errors import SAEFormatError

    with pytest.raises(SAEFormatError, match="supported: jumprelu, standard, topk"):
        registry.get("gatedx")


@pytest.mark.parametrize("arch", registry.names())
def test_read_latents_are_sae_lens_latents_with_the_edits_applied(arch, tmp_path):
    ref, path = _saelens_sae(arch, tmp_path)
    ours = load_sae(path)
    x = torch.randn(6, D_IN)
    with torch.no_grad():
        want = ref.encode(x)
    # rows 0-2: clamp 3 to 9, scale 5 by 2, ablate 8, add 1.5 to 9; rows 3-5: no edits
    feat = torch.tensor([[3, 5, 8, 9]] * 3 + [[0, 0, 0, 0]] * 3)
    mode = torch.tensor([[1, 3, 2, 4]] * 3 + [[0, 0, 0, 0]] * 3)
    val = torch.tensor([[9.0, 2.0, 0.0, 1.5]] * 3 + [[0.0] * 4] * 3)
    want[:3, 3] = 9.0
    want[:3, 5] *= 2.0
    want[:3, 8] = 0.0
    want[:3, 9] += 1.5
    torch.testing.assert_close(ops.read_latents(ours, x, feat, mode, val), want, atol=1e-5, rtol=0)
