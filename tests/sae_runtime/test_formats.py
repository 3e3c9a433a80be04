"""Gemma Scope, Llama Scope, sparsify, and the top-AFA / GroupMax / AbsTopK architectures:
files written in each format's real layout, loaded with our loader, compared with a reference.

References (see ``_oracle.check_against_reference`` for what is compared):
- Gemma Scope: sae-lens' ``JumpReLUSAE`` holding the npz tensors with the config sae-lens'
  Gemma Scope loader gives them (``apply_b_dec_to_input=False``, no normalisation).
- Llama Scope: the ``lm_saes`` encode/decode (the library that trained Llama Scope),
  transcribed below from its source; sae-lens' Llama Scope loader is not used because it
  drops ``sparsity_include_decoder_norm``.
- sparsify: the ``eai-sparsify`` package's own ``SparseCoder`` (topk, groupmax); its
  predecessor's ``signed`` TopK is transcribed from EleutherAI/sae ``Sae.select_topk``.
- top-AFA: ``TopAFASAE.forward`` of github.com/SewoongLee/top-afa-sae, transcribed below.
"""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from sae_runtime import ops
from sae_runtime.loading import detect_format, load_sae, load_sae_config
from tests.sae_runtime._oracle import check_against_reference

D_IN, D_SAE = 48, 96


def _x(n: int = 40, seed: int = 7, scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, D_IN, generator=g) + 0.2) * scale


def _rand(*shape, seed, scale=1.0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


# ----------------------------------------------------------------------------- Gemma Scope


def _gemma_tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    W_dec = _rand(D_SAE, D_IN, seed=seed, scale=0.2)
    return {"W_enc": _rand(D_IN, D_SAE, seed=seed + 1, scale=0.2),
            "W_dec": W_dec, "b_enc": _rand(D_SAE, seed=seed + 2, scale=0.3),
            "b_dec": _rand(D_IN, seed=seed + 3, scale=0.3),
            "threshold": torch.rand(D_SAE, generator=torch.Generator().manual_seed(seed)) * 0.6}


def _gemma_reference(t: dict[str, torch.Tensor]):
    sae_lens = pytest.importorskip("sae_lens")
    ref = sae_lens.JumpReLUSAE(sae_lens.JumpReLUSAEConfig(
        d_in=D_IN, d_sae=D_SAE, apply_b_dec_to_input=False, normalize_activations="none"))
    ref.load_state_dict({k: v.clone() for k, v in t.items()})
    return ref.encode, lambda f, x: ref.decode(f)


@pytest.mark.parametrize("release, site, hook", [
    ("gemma-scope-2b-pt-res", "resid_post", "blocks.3.hook_resid_post"),
    ("gemma-scope-9b-it-mlp-canonical", "mlp_out", "blocks.3.hook_mlp_out"),
    ("gemma-scope-2b-pt-att", "z", "blocks.3.attn.hook_z"),
])
def test_gemma_scope_npz(tmp_path, release, site, hook):
    t = _gemma_tensors()
    d = tmp_path / release / "layer_3" / "width_16k" / "average_l0_71"
    d.mkdir(parents=True)
    np.savez(d / "params.npz", **{k: v.numpy() for k, v in t.items()})
    assert detect_format(d) == "gemma_scope"
    cfg = load_sae_config(d)
    assert (cfg.architecture, cfg.layer, cfg.site, cfg.hook_name) == ("jumprelu", 3, site, hook)
    assert (cfg.d_in, cfg.d_sae, cfg.apply_b_dec_to_input, cfg.format) == (
        D_IN, D_SAE, False, "gemma_scope")
    assert cfg.model_name.startswith("gemma-2-")
    ours = load_sae(d)
    check_against_reference(ours, _x(), *_gemma_reference(t))


def test_gemma_scope_2_safetensors(tmp_path):
    """Gemma Scope 2: lower-case w_enc/w_dec in params.safetensors; attn_out folders are z."""
    t = _gemma_tensors(seed=4)
    d = tmp_path / "attn_out" / "layer_5_width_16k_l0_medium"
    d.mkdir(parents=True)
    save_file({("w_" + k[2:] if k.startswith("W_") else k): v for k, v in t.items()},
              str(d / "params.safetensors"))
    (d / "config.json").write_text(json.dumps({"model_name": "google/gemma-3-270m",
                                               "architecture": "jump_relu"}))
    cfg = load_sae_config(d)
    assert (cfg.layer, cfg.site, cfg.model_name) == (5, "z", "google/gemma-3-270m")
    check_against_reference(load_sae(d), _x(seed=3), *_gemma_reference(t))


# ----------------------------------------------------------------------------- Llama Scope


def _lm_saes_reference(hp: dict, t: dict[str, torch.Tensor]):
    """``lm_saes`` SparseAutoEncoder.encode/decode (Llama Scope release) with the caller's
    dataset-wise/token-wise normalise and denormalise around them."""
    d_model = hp["d_model"]
    W_E, b_E = t["encoder.weight"], t["encoder.bias"]  # nn.Linear(d_model, d_sae)
    W_D, b_D = t["decoder.weight"], t.get("decoder.bias")  # nn.Linear(d_sae, d_model)
    use_bias = hp["use_decoder_bias"]

    def norm_factor(x, which):
        if hp["norm_activation"] == "token-wise":
            return math.sqrt(d_model) / torch.norm(x, 2, dim=-1, keepdim=True)
        if hp["norm_activation"] == "dataset-wise":
            return torch.tensor(math.sqrt(d_model) / hp["dataset_average_activation_norm"][which])
        return torch.tensor(1.0)

    def activation_mask(x):
        if hp["act_fn"] == "relu":
            return torch.where(x > 0, 1, 0)
        if hp["act_fn"] == "jumprelu":
            return torch.where(x > hp["jump_relu_threshold"], 1, 0)
        x = torch.clamp(x, min=0.0)
        kth, _ = torch.kthvalue(x, k=x.shape[-1] - hp["top_k"] + 1, dim=-1)
        assert (kth > 0).all(), "fewer than k positive latents: lm_saes' degenerate case"
        return torch.where(x >= kth[..., None], 1, 0)

    def encode(x):
        x = x * norm_factor(x, "in")
        if use_bias and hp["apply_decoder_bias_to_pre_encoder"]:
            x = x - b_D
        hidden_pre = x @ W_E.T + b_E
        if hp["sparsity_include_decoder_norm"]:
            true_acts = hidden_pre * torch.norm(W_D, p=2, dim=0)
        else:
            true_acts = hidden_pre
        return hidden_pre * activation_mask(true_acts)

    def decode(f, x):
        rec = f @ W_D.T + (b_D if use_bias else 0.0)
        return rec / norm_factor(x, "out")  # SAE: the label is the input itself

    return encode, decode


LLAMA_CASES = [
    # act_fn, norm_activation, apply_decoder_bias_to_pre_encoder, sparsity_include_decoder_norm
    ("jumprelu", "dataset-wise", False, True),  # the published Llama Scope configuration
    ("jumprelu", "token-wise", True, True),
    ("topk", "dataset-wise", True, True),
    ("topk", "inference", False, False),
    ("relu", "dataset-wise", True, False),
]


def _llama_scope_dir(tmp_path, act_fn, norm, pre_bias, dec_norm, use_bias=True):
    d_model = D_IN
    hp = {
        "d_model": d_model, "d_sae": D_SAE, "expansion_factor": D_SAE // D_IN,
        "hook_point_in": "blocks.7.hook_resid_post", "hook_point_out": "blocks.7.hook_resid_post",
        "act_fn": act_fn, "jump_relu_threshold": 0.9, "top_k": 9, "norm_activation": norm,
        "dataset_average_activation_norm": {"in": 3.5, "out": 4.25},
        "use_decoder_bias": use_bias, "apply_decoder_bias_to_pre_encoder": pre_bias,
        "sparsity_include_decoder_norm": dec_norm, "use_glu_encoder": False,
    }
    # Decoder columns of uneven norm so that sparsity_include_decoder_norm matters.
    W_D = _rand(d_model, D_SAE, seed=21, scale=0.2) * (torch.rand(D_SAE) * 1.5 + 0.25)
    t = {"encoder.weight": _rand(D_SAE, d_model, seed=22, scale=0.2),
         "encoder.bias": _rand(D_SAE, seed=23, scale=0.3), "decoder.weight": W_D}
    if use_bias:
        t["decoder.bias"] = _rand(d_model, seed=24, scale=0.3)
    d = tmp_path / "Llama3_1-8B-Base-L7R-8x"
    (d / "checkpoints").mkdir(parents=True)
    (d / "hyperparams.json").write_text(json.dumps(hp))
    save_file(t, str(d / "checkpoints" / "final.safetensors"))
    return d, hp, t


@pytest.mark.parametrize("act_fn, norm, pre_bias, dec_norm", LLAMA_CASES)
def test_llama_scope(tmp_path, act_fn, norm, pre_bias, dec_norm):
    d, hp, t = _llama_scope_dir(tmp_path, act_fn, norm, pre_bias, dec_norm)
    assert detect_format(d) == "llama_scope"
    ours = load_sae(d)
    want_norm = {"dataset-wise": "constant_scale", "token-wise": "token_norm",
                 "inference": "none"}[norm]
    assert (ours.cfg.layer, ours.cfg.site, ours.cfg.normalization, ours.cfg.format) == (
        7, "resid_post", want_norm, "llama_scope")
    assert ours.cfg.architecture == {"relu": "standard"}.get(act_fn, act_fn)
    # The inputs have roughly the dataset norm the file declares, as real activations do.
    check_against_reference(ours, _x(scale=3.5 / math.sqrt(D_IN)), *_lm_saes_reference(hp, t))


def test_llama_scope_without_decoder_bias_and_later_lm_saes_names(tmp_path):
    d, hp, t = _llama_scope_dir(tmp_path, "jumprelu", "dataset-wise", True, True,
                                use_bias=False)
    # The later lm_saes layout: W_E [d_model, d_sae], b_E, W_D [d_sae, d_model].
    save_file({"W_E": t["encoder.weight"].t().contiguous(), "b_E": t["encoder.bias"],
               "W_D": t["decoder.weight"].t().contiguous()}, str(d / "sae_weights.safetensors"))
    ours = load_sae(d)
    assert not ours.cfg.apply_b_dec_to_input and torch.equal(ours.b_dec, torch.zeros(D_IN))
    check_against_reference(ours, _x(scale=0.5), *_lm_saes_reference(hp, t))


# ----------------------------------------------------------------------------- sparsify


def _sparsify_coder(monkeypatch, activation: str, k: int, seed: int = 0):
    os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")  # CPU: its eager decoder
    pytest.importorskip("sparsify")
    import sparsify.sparse_coder
    from sparsify.config import SparseCoderConfig
    from sparsify.sparse_coder import SparseCoder
    from sparsify.utils import eager_decode

    monkeypatch.setattr(sparsify.sparse_coder, "decoder_impl", eager_decode)

    coder = SparseCoder(D_IN, SparseCoderConfig(activation=activation, num_latents=D_SAE, k=k))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in coder.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.25)

    def encode(x):
        top_acts, top_indices, _ = coder.encode(x)
        return torch.zeros(x.shape[0], D_SAE).scatter_(1, top_indices, top_acts)

    def decode(f, x):  # sparsify's decoder over every latent
        idx = torch.arange(D_SAE).expand(f.shape[0], D_SAE).contiguous()
        return coder.decode(f, idx)

    return coder, encode, decode


@pytest.mark.parametrize("activation, k, arch", [("topk", 7, "topk"), ("groupmax", 8, "groupmax")])
@pytest.mark.parametrize("hookpoint, site", [("layers.5", "resid_post"),
                                             ("layers.5.mlp", "mlp_out")])
def test_sparsify(tmp_path, monkeypatch, activation, k, arch, hookpoint, site):
    coder, encode, decode = _sparsify_coder(monkeypatch, activation, k)
    coder.save_to_disk(tmp_path / hookpoint)
    (tmp_path / "config.json").write_text(json.dumps({"model": "EleutherAI/pythia-70m"}))
    assert detect_format(tmp_path / hookpoint) == "sparsify"
    ours = load_sae(tmp_path / hookpoint)
    assert (ours.cfg.architecture, ours.cfg.k, ours.cfg.layer, ours.cfg.site) == (
        arch, k, 5, site)
    assert (ours.cfg.hook_name, ours.cfg.model_name, ours.cfg.apply_b_dec_to_input) == (
        hookpoint, "EleutherAI/pythia-70m", True)
    check_against_reference(ours, _x(), encode, decode)


def test_sparsify_signed_topk_is_abstopk(tmp_path, monkeypatch):
    """EleutherAI/sae ``signed``: no ReLU, top-k by magnitude, signs kept (Sae.select_topk)."""
    coder, _, decode = _sparsify_coder(monkeypatch, "topk", 7, seed=2)
    d = tmp_path / "layers.3"
    coder.save_to_disk(d)
    cfg = json.loads((d / "cfg.json").read_text())
    (d / "cfg.json").write_text(json.dumps({**cfg, "signed": True}))

    def encode(x):
        latents = (x - coder.b_dec) @ coder.encoder.weight.T + coder.encoder.bias
        _, top_indices = latents.abs().topk(7, sorted=False)
        top_acts = latents.gather(dim=-1, index=top_indices)
        return torch.zeros_like(latents).scatter_(1, top_indices, top_acts)

    ours = load_sae(d)
    assert ours.cfg.architecture == "abstopk"
    with torch.no_grad():
        assert (encode(_x()) < 0).any(), "no negative latent: the signed case is not exercised"
    check_against_reference(ours, _x(), encode, decode)


# ----------------------------------------------------------------------------- top-AFA


def _top_afa_reference(t: dict[str, torch.Tensor], input_unit_norm: bool):
    """``TopAFASAE.forward`` (+ ``preprocess_input``/``postprocess_output``) of the paper's
    code; ``encode`` returns ``acts_topk``, ``decode`` the postprocessed reconstruction."""
    W_enc, W_dec, b_dec = t["W_enc"], t["W_dec"], t["b_dec"]

    def preprocess(x):
        if not input_unit_norm:
            return x, None, None
        x_mean = x.mean(dim=-1, keepdim=True)
        x = x - x_mean
        x_std = x.std(dim=-1, keepdim=True)
        return x / (x_std + 1e-5), x_mean, x_std

    def encode(x):
        x, _, _ = preprocess(x)
        x_cent = x - b_dec
        acts = torch.relu(x_cent @ W_enc)
        afa = torch.norm(x_cent, p=2, dim=1, keepdim=True).pow(2)
        dec_scaled_acts = (acts * torch.norm(W_dec, p=2, dim=-1)).pow(2)
        max_indices = torch.argsort(dec_scaled_acts, dim=-1, descending=True)
        cumulative_fa = torch.cumsum(torch.gather(dec_scaled_acts, -1, max_indices), dim=-1)
        cumulative_fa[..., -1] = 1e8
        afa = torch.sqrt(afa)
        cumulative_fa = torch.sqrt(cumulative_fa)
        k = torch.abs(cumulative_fa - afa).argmin(dim=-1) + 1
        keep = torch.zeros_like(acts, dtype=torch.bool).scatter_(
            dim=1, index=max_indices,
            src=torch.arange(acts.shape[1]).unsqueeze(0) < k.unsqueeze(1))
        return acts * keep

    def decode(f, x):
        _, x_mean, x_std = preprocess(x)
        rec = f @ W_dec + b_dec
        return rec * x_std + x_mean if input_unit_norm else rec

    return encode, decode


@pytest.mark.parametrize("input_unit_norm", [False, True])
def test_top_afa(tmp_path, input_unit_norm):
    W_dec = _rand(D_SAE, D_IN, seed=31, scale=0.25) * (torch.rand(D_SAE, 1) + 0.5)
    t = {"W_enc": _rand(D_IN, D_SAE, seed=32, scale=0.25), "W_dec": W_dec,
         "b_enc": torch.zeros(D_SAE),  # the reference trains without an encoder bias
         "b_dec": _rand(D_IN, seed=33, scale=0.8)}  # large: ||x - b_dec|| differs from ||x||
    d = tmp_path / "top_afa"
    d.mkdir()
    save_file(t, str(d / "sae_weights.safetensors"))
    (d / "cfg.json").write_text(json.dumps({
        "architecture": "top_afa", "d_in": D_IN, "d_sae": D_SAE, "apply_b_dec_to_input": True,
        "normalize_activations": "layer_norm" if input_unit_norm else "none",
        "metadata": {"hook_name": "blocks.1.hook_resid_post"}}))
    ours = load_sae(d)
    assert ours.cfg.architecture == "top_afa"
    encode, decode = _top_afa_reference(t, input_unit_norm)
    x = _x(n=160)
    with torch.no_grad():
        f = encode(x)
        l0, active = (f != 0).sum(dim=1), (torch.relu(ops.pre_activations(ours, x)) > 0).sum(1)
    assert l0.min() != l0.max(), "every token kept as many latents: the adaptive k is untested"
    assert (l0 < active).all(), "the norm-matching cut falls outside the active latents"
    check_against_reference(ours, x, encode, decode)
