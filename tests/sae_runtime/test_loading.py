"""Directory loading: formats are detected, hooks parsed, and malformed directories fail with
a message naming the file and the problem."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from sae_runtime import registry
from sae_runtime.errors import SAEFormatError
from sae_runtime.loading import detect_format, load_sae, load_sae_config, parse_hook_name


def _write(path, cfg: dict, tensors: dict):
    path.mkdir(parents=True, exist_ok=True)
    (path / "cfg.json").write_text(json.dumps(cfg))
    save_file(tensors, str(path / "sae_weights.safetensors"))
    return path


def _good(tmp_path, **over):
    cfg = {"d_in": 8, "d_sae": 16, "architecture": "standard", "apply_b_dec_to_input": False,
           "normalize_activations": "none", "metadata": {"hook_name": "blocks.3.hook_resid_pre"}}
    cfg.update(over)
    t = {"W_enc": torch.randn(8, 16), "W_dec": torch.randn(16, 8), "b_enc": torch.randn(16),
         "b_dec": torch.randn(8)}
    return cfg, t


# ----------------------------------------------------------------------------- hook names


@pytest.mark.parametrize("hook, want", [
    ("blocks.3.hook_resid_post", (3, "resid_post")),
    ("blocks.12.hook_resid_pre", (12, "resid_pre")),
    ("blocks.0.hook_mlp_out", (0, "mlp_out")),
    ("blocks.7.hook_attn_out", (7, "attn_out")),
    ("blocks.7.attn.hook_z", (7, "z")),
    ("layers.12", (12, "resid_post")),
    ("layers.12.mlp", (12, "mlp_out")),
    ("layers.4.self_attn", (4, "attn_out")),
    ("model.layers.4", (4, "resid_post")),
    ("gpt_neox.layers.2.mlp", (2, "mlp_out")),
    ("transformer.h.1", (1, "resid_post")),
])
def test_parse_hook_name(hook, want):
    assert parse_hook_name(hook, "src") == want


@pytest.mark.parametrize("hook, message", [
    ("blocks.0.hook_resid_pre", r"src: blocks\.0\.hook_resid_pre \(the embedding output\)"),
    ("blocks.1.hook_mlp_in", r"src: hook_name 'blocks\.1\.hook_mlp_in' is not supported; "
                             r"supported hooks are blocks\.L\.hook_resid_post"),
    ("blocks.1.ln2.hook_normalized", "is not supported"),
    ("layers.3.mlp.down_proj", "is not supported"),
    ("embed_tokens", "is not supported"),
    ("hook_embed", "is not supported"),
])
def test_parse_hook_name_rejects(hook, message):
    with pytest.raises(SAEFormatError, match=message):
        parse_hook_name(hook, "src")


# ----------------------------------------------------------------------------- SAELens


def test_legacy_flat_layout_with_activation_fn_kwargs(tmp_path):
    cfg, t = _good(tmp_path)
    del cfg["architecture"], cfg["metadata"]
    cfg.update(hook_name="blocks.1.hook_resid_post", activation_fn_str="topk",
               activation_fn_kwargs={"k": 3}, model_name="gpt2")
    sae = load_sae(_write(tmp_path / "s", cfg, t))
    assert (sae.cfg.architecture, sae.cfg.k, sae.cfg.layer, sae.cfg.model_name) == ("topk", 3, 1, "gpt2")


def test_legacy_topk_named_by_activation_fn_and_sparsity_file_ignored(tmp_path):
    cfg, t = _good(tmp_path)
    cfg.update(activation_fn="topk", activation_fn_kwargs={"k": 5})  # architecture: standard
    p = _write(tmp_path / "s", cfg, t)
    save_file({"sparsity": torch.zeros(16)}, str(p / "sparsity.safetensors"))
    assert (load_sae(p).cfg.architecture, load_sae_config(p).k) == ("topk", 5)


def test_legacy_hook_point_and_boolean_normalize(tmp_path):
    cfg, t = _good(tmp_path)
    del cfg["architecture"], cfg["metadata"], cfg["apply_b_dec_to_input"]
    cfg.update(hook_point="blocks.2.hook_mlp_out", normalize_activations=False)
    c = load_sae_config(_write(tmp_path / "s", cfg, t))
    # SAELens' defaults for configs that do not say: apply_b_dec_to_input is true
    assert (c.layer, c.site, c.apply_b_dec_to_input, c.normalization) == (2, "mlp_out", True,
                                                                          "none")


def test_hook_override_and_resid_pre(tmp_path):
    cfg, t = _good(tmp_path)
    p = _write(tmp_path / "s", cfg, t)
    assert (load_sae_config(p).layer, load_sae_config(p).site) == (3, "resid_pre")
    c = load_sae_config(p, hook_name="blocks.5.hook_resid_post")
    assert (c.layer, c.site, c.hook_name) == (5, "resid_post", "blocks.5.hook_resid_post")
    c = load_sae_config(p, hook_name="blocks.5.attn.hook_z")
    assert (c.layer, c.site) == (5, "z")


def test_expected_average_only_in_reads_the_scaler(tmp_path, caplog):
    cfg, t = _good(tmp_path, normalize_activations="expected_average_only_in")
    p = _write(tmp_path / "s", cfg, t)
    c = load_sae_config(p)  # no scaler: identity, as sae-lens' encode, with a warning
    assert c.normalization == "none" and "activation_scaler.json" in caplog.text
    (p / "activation_scaler.json").write_text(json.dumps({"scaling_factor": 4.0,
                                                          "has_whitening": False}))
    c = load_sae_config(p)
    assert (c.normalization, c.norm_scale_in, c.norm_scale_out) == ("constant_scale", 4.0, 0.25)


def _mutate_gated(c, t):
    c.update(architecture="gated")
    t["b_gate"] = t.pop("b_enc")
    t["r_mag"] = torch.randn(16)  # b_mag missing


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda c, t: t.pop("W_dec"), r"sae_weights\.safetensors: missing tensor 'W_dec'"),
        (lambda c, t: t.update(W_enc=torch.randn(9, 16)),
         r"sae_weights\.safetensors: tensor 'W_enc' has shape \(9, 16\), expected \(8, 16\) "
         r"from cfg\.json \(d_in=8, d_sae=16\)"),
        (lambda c, t: c.update(architecture="mystery"),
         r"cfg\.json: unknown SAE architecture 'mystery'; supported: "
         + ", ".join(registry.names())),
        # a transcoder class must read an MLP input (tests/sae_runtime/test_transcoders.py)
        (lambda c, t: c.update(architecture="jumprelu_transcoder"),
         r"cfg\.json: transcoder input hook 'blocks\.\d+\.hook_resid_pre' is not supported"),
        (lambda c, t: c.update(metadata={"hook_name": "blocks.1.hook_mlp_in"}),
         r"cfg\.json: hook_name 'blocks\.1\.hook_mlp_in' is not supported"),
        (lambda c, t: c.update(metadata={"hook_name": "blocks.0.hook_resid_pre"}),
         r"blocks\.0\.hook_resid_pre \(the embedding output\) is not supported"),
        (lambda c, t: c.update(metadata={}), r"cfg\.json: no hook_name"),
        (lambda c, t: c.update(hook_head_index=2), r"cfg\.json: hook_head_index is set"),
        (lambda c, t: c.update(normalize_activations="bogus"),
         r"cfg\.json: normalize_activations='bogus' is not supported; supported: none, "),
        (lambda c, t: c.update(architecture="jumprelu"), r"missing tensor 'threshold'"),
        (_mutate_gated, r"sae_weights\.safetensors: missing tensor 'b_mag'"),
        (lambda c, t: c.update(architecture="batchtopk", k=3.0),
         r"sae_weights\.safetensors: missing tensor 'threshold'"),
        (lambda c, t: c.pop("d_sae"), r"cfg\.json: missing key 'd_sae'"),
        (lambda c, t: c.update(architecture="topk"), r"cfg\.json: topk architecture needs 'k'"),
        (lambda c, t: c.update(architecture="abstopk", k=2.5),
         r"cfg\.json: abstopk architecture needs an integer k, got 2\.5"),
        (lambda c, t: c.update(architecture="topk", k=17), r"cfg\.json: k must be in \[1, d_sae"),
        (lambda c, t: c.update(architecture="groupmax", k=3),
         r"cfg\.json: groupmax needs d_sae \(16\) to be a multiple of k \(3\)"),
        (lambda c, t: c.update(rescale_acts_by_decoder_norm=True),
         r"cfg\.json: rescale_acts_by_decoder_norm is only defined for TopK"),
        (lambda c, t: t.update(scaling_factor=torch.ones(16)),
         r"sae_weights\.safetensors: tensor 'scaling_factor'"),
    ],
)
def test_malformed_saelens_directories_name_file_and_problem(tmp_path, mutate, message):
    cfg, t = _good(tmp_path)
    mutate(cfg, t)
    p = _write(tmp_path / "s", cfg, t)
    with pytest.raises(SAEFormatError, match=message):
        load_sae(p)


def test_malformed_activation_scaler(tmp_path):
    cfg, t = _good(tmp_path, normalize_activations="covariance_whitening")
    p = _write(tmp_path / "s", cfg, t)
    (p / "activation_scaler.json").write_text("{")
    with pytest.raises(SAEFormatError, match=r"activation_scaler\.json: cannot read JSON"):
        load_sae_config(p)
    (p / "activation_scaler.json").write_text(json.dumps({"scaling_factor": -1}))
    with pytest.raises(SAEFormatError, match=r"activation_scaler\.json: scaling_factor must be "
                                             r"positive"):
        load_sae_config(p)
    (p / "activation_scaler.json").write_text(json.dumps({"scaling_factor": None,
                                                          "has_whitening": True}))
    save_file({"mean": torch.zeros(8), "matrix": torch.eye(7), "inverse_matrix": torch.eye(8)},
              str(p / "activation_whitening.safetensors"))
    with pytest.raises(SAEFormatError, match=r"activation_whitening\.safetensors: tensor "
                                             r"'matrix' has shape \(7, 7\), expected \(8, 8\)"):
        load_sae_config(p)


def test_missing_weights_file_and_bad_json(tmp_path):
    cfg, t = _good(tmp_path)
    p = _write(tmp_path / "s", cfg, t)
    (p / "sae_weights.safetensors").unlink()
    with pytest.raises(SAEFormatError, match=r"sae_weights\.safetensors: missing weights file"):
        load_sae(p)
    (p / "cfg.json").write_text("{not json")
    with pytest.raises(SAEFormatError, match=r"cfg\.json: cannot read JSON config"):
        load_sae(p)
    (p / "cfg.json").write_text("[1, 2]")
    with pytest.raises(SAEFormatError, match=r"cfg\.json: expected a JSON object"):
        load_sae(p)
    shutil.rmtree(p)
    with pytest.raises(SAEFormatError, match="not a directory"):
        load_sae(p)
    p.mkdir()
    with pytest.raises(SAEFormatError, match=r"no recognised SAE format; expected one of: "
                                             r"cfg\.json \+ sae\.safetensors .*params\.npz"):
        load_sae(p)


def test_corrupt_safetensors_names_the_file(tmp_path):
    cfg, t = _good(tmp_path)
    p = _write(tmp_path / "s", cfg, t)
    (p / "sae_weights.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(SAEFormatError, match=r"sae_weights\.safetensors: cannot read safetensors"):
        load_sae_config(p)


# ----------------------------------------------------------------------------- Gemma Scope


def _gemma(tmp_path, release="gemma-scope-2b-pt-res", layer_dir="layer_4", **over):
    t = {"W_enc": np.zeros((8, 16), np.float32), "W_dec": np.zeros((16, 8), np.float32),
         "b_enc": np.zeros(16, np.float32), "b_dec": np.zeros(8, np.float32),
         "threshold": np.zeros(16, np.float32)}
    t.update(over)
    t = {k: v for k, v in t.items() if v is not None}
    d = tmp_path / release / layer_dir / "width_16k" / "average_l0_20"
    d.mkdir(parents=True)
    np.savez(d / "params.npz", **t)
    return d


def test_gemma_scope_hook_from_folders_or_override(tmp_path):
    d = _gemma(tmp_path, release="renamed")
    with pytest.raises(SAEFormatError, match=r"params\.npz: cannot tell the hook from the folder "
                                             r"names: no site .*pass the hook explicitly"):
        load_sae_config(d)
    c = load_sae_config(d, hook_name="blocks.4.hook_mlp_out")
    assert (c.layer, c.site, c.format) == (4, "mlp_out", "gemma_scope")
    d2 = _gemma(tmp_path / "b", layer_dir="some_dir")
    with pytest.raises(SAEFormatError, match=r"no layer \(a 'layer_L' folder\)"):
        load_sae_config(d2)


@pytest.mark.parametrize("over, message", [
    ({"threshold": None}, r"params\.npz: missing tensor 'threshold'"),
    ({"W_dec": np.zeros((16, 9), np.float32)},
     r"params\.npz: tensor 'W_dec' has shape \(16, 9\), expected \(16, 8\) from W_enc's shape"),
    ({"W_enc": None}, r"params\.npz: missing 2-D tensor 'W_enc'"),
])
def test_malformed_gemma_scope(tmp_path, over, message):
    with pytest.raises(SAEFormatError, match=message):
        load_sae(_gemma(tmp_path, **over))


def test_gemma_scope_reads_transcoder_releases_and_rejects_corrupt_archives(tmp_path):
    c = load_sae_config(_gemma(tmp_path, release="gemma-scope-2b-pt-transcoders"))
    # Gemma Scope transcoders read the pre-MLP norm without its weight (SAELens
    # gemma_2_transcoder: blocks.L.ln2.hook_normalized, TransformerLens' definition)
    assert (c.input_site, c.site, c.layer, c.hook_name, c.hook_name_out) == (
        "ln2_normalized", "mlp_out", 4, "blocks.4.ln2.hook_normalized", "blocks.4.hook_mlp_out")
    d = _gemma(tmp_path / "c")
    (d / "params.npz").write_bytes(b"not a zip")
    with pytest.raises(SAEFormatError, match=r"params\.npz: cannot read npz archive"):
        load_sae_config(d)


# ----------------------------------------------------------------------------- Llama Scope


def _llama(tmp_path, hp_over=None, t_over=None, weights="checkpoints/final.safetensors"):
    hp = {"d_model": 8, "d_sae": 16, "hook_point_in": "blocks.2.hook_mlp_out",
          "hook_point_out": "blocks.2.hook_mlp_out", "act_fn": "jumprelu",
          "jump_relu_threshold": 0.5, "norm_activation": "dataset-wise",
          "dataset_average_activation_norm": {"in": 2.0, "out": 2.0}, "use_decoder_bias": True,
          "apply_decoder_bias_to_pre_encoder": False, "sparsity_include_decoder_norm": True}
    hp.update(hp_over or {})
    t = {"encoder.weight": torch.zeros(16, 8), "encoder.bias": torch.zeros(16),
         "decoder.weight": torch.zeros(8, 16), "decoder.bias": torch.zeros(8)}
    t.update(t_over or {})
    d = tmp_path / "L2M"
    (d / "checkpoints").mkdir(parents=True)
    (d / "hyperparams.json").write_text(json.dumps({k: v for k, v in hp.items()
                                                    if v is not None}))
    if weights:
        save_file(t, str(d / weights))
    return d


def test_llama_scope_config(tmp_path):
    c = load_sae_config(_llama(tmp_path))
    assert (c.format, c.architecture, c.layer, c.site, c.normalization) == (
        "llama_scope", "jumprelu", 2, "mlp_out", "constant_scale")
    assert c.norm_scale_in == pytest.approx(8**0.5 / 2.0)
    assert c.norm_scale_out == pytest.approx(2.0 / 8**0.5)


@pytest.mark.parametrize("hp_over, t_over, weights, message", [
    ({"d_model": None}, None, "checkpoints/final.safetensors",
     r"hyperparams\.json: missing key 'd_model'"),
    (None, None, None, r"checkpoints/final\.safetensors: missing weights file"),
    ({"hook_point_out": "blocks.2.hook_resid_post"}, None, "checkpoints/final.safetensors",
     r"hyperparams\.json: hook_point_in .* differs from hook_point_out .*transcoder"),
    ({"act_fn": "batchtopk"}, None, "checkpoints/final.safetensors",
     r"hyperparams\.json: act_fn 'batchtopk' is not supported; supported: relu, jumprelu, topk"),
    ({"dataset_average_activation_norm": None}, None, "checkpoints/final.safetensors",
     r"hyperparams\.json: norm_activation 'dataset-wise' needs dataset_average_activation_norm"),
    ({"norm_activation": "batch-wise"}, None, "checkpoints/final.safetensors",
     r"norm_activation 'batch-wise' is not supported"),
    ({"use_glu_encoder": True}, None, "checkpoints/final.safetensors",
     r"use_glu_encoder is not supported"),
    ({"act_fn": "topk"}, None, "checkpoints/final.safetensors",
     r"hyperparams\.json: missing key 'top_k'"),
    (None, {"encoder.weight": torch.zeros(16, 9)}, "checkpoints/final.safetensors",
     r"final\.safetensors: tensor 'encoder\.weight' has shape \(16, 9\), expected \(16, 8\) "
     r"from hyperparams\.json \(d_model=8, d_sae=16\)"),
])
def test_malformed_llama_scope(tmp_path, hp_over, t_over, weights, message):
    d = _llama(tmp_path, hp_over, t_over, weights)
    with pytest.raises(SAEFormatError, match=message):
        load_sae(d)


# ----------------------------------------------------------------------------- sparsify


def _sparsify(tmp_path, folder="layers.6.mlp", cfg_over=None, t_over=None):
    cfg = {"activation": "topk", "expansion_factor": 2, "normalize_decoder": True,
           "num_latents": 0, "k": 4, "multi_topk": False, "skip_connection": False,
           "transcode": False, "d_in": 8}
    cfg.update(cfg_over or {})
    t = {"encoder.weight": torch.zeros(16, 8), "encoder.bias": torch.zeros(16),
         "W_dec": torch.zeros(16, 8), "b_dec": torch.zeros(8)}
    t.update(t_over or {})
    d = tmp_path / folder
    d.mkdir(parents=True)
    (d / "cfg.json").write_text(json.dumps(cfg))
    save_file(t, str(d / "sae.safetensors"))
    return d


def test_sparsify_hook_from_folder_or_override(tmp_path):
    c = load_sae_config(_sparsify(tmp_path))
    assert (c.format, c.architecture, c.d_sae, c.k, c.layer, c.site, c.dtype) == (
        "sparsify", "topk", 16, 4, 6, "mlp_out", "float32")
    d = _sparsify(tmp_path, folder="my_sae")
    with pytest.raises(SAEFormatError, match=r"my_sae: the folder name 'my_sae' is not a "
                                             r"hookpoint .*NAME=PATH@layers\.12"):
        load_sae_config(d)
    c = load_sae_config(d, hook_name="layers.2")
    assert (c.layer, c.site, c.hook_name) == (2, "resid_post", "layers.2")
    assert detect_format(d) == "sparsify"


@pytest.mark.parametrize("cfg_over, t_over, message", [
    ({"transcode": True, "skip_connection": True}, None,
     r"sae\.safetensors: missing tensor 'W_skip'"),
    ({"skip_connection": True}, None, r"cfg\.json: skip_connection=true"),
    ({"activation": "batchtopk"}, None, r"cfg\.json: activation 'batchtopk' is not supported"),
    ({"activation": "groupmax", "k": 3}, None,
     r"cfg\.json: groupmax needs num_latents \(16\) to be a multiple of k \(3\)"),
    ({"k": None}, None, r"cfg\.json: missing key 'k'"),
    (None, {"W_dec": torch.zeros(8, 16)},
     r"sae\.safetensors: tensor 'W_dec' has shape \(8, 16\), expected \(16, 8\) from cfg\.json"),
])
def test_malformed_sparsify(tmp_path, cfg_over, t_over, message):
    d = _sparsify(tmp_path, cfg_over=cfg_over, t_over=t_over)
    with pytest.raises(SAEFormatError, match=message):
        load_sae(d)
