"""SAELens directory loading: good files load, malformed ones name the file and problem."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import save_file

from sae_runtime.errors import SAEFormatError
from sae_runtime.loading import load_sae, load_sae_config


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


def test_legacy_flat_layout_with_activation_fn_kwargs(tmp_path):
    cfg, t = _good(tmp_path)
    del cfg["architecture"], cfg["metadata"]
    cfg.update(hook_name="blocks.1.hook_resid_post", activation_fn_str="topk",
               activation_fn_kwargs={"k": 3}, model_name="gpt2")
    sae = load_sae(_write(tmp_path / "s", cfg, t))
    assert (sae.cfg.architecture, sae.cfg.k, sae.cfg.layer, sae.cfg.model_name) == ("topk", 3, 1, "gpt2")


def test_hook_override_and_resid_pre(tmp_path):
    cfg, t = _good(tmp_path)
    p = _write(tmp_path / "s", cfg, t)
    assert (load_sae_config(p).layer, load_sae_config(p).site) == (3, "resid_pre")
    c = load_sae_config(p, hook_name="blocks.5.hook_resid_post")
    assert (c.layer, c.site, c.hook_name) == (5, "resid_post", "blocks.5.hook_resid_post")


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda c, t: t.pop("W_dec"), r"sae_weights\.safetensors: missing tensor 'W_dec'"),
        (lambda c, t: t.update(W_enc=torch.randn(9, 16)),
         r"sae_weights\.safetensors: tensor 'W_enc' has shape \(9, 16\), expected \(8, 16\)"),
        (lambda c, t: c.update(architecture="mystery"),
         r"unknown SAE architecture 'mystery'; supported: jumprelu, standard, topk"),
        (lambda c, t: c.update(metadata={"hook_name": "blocks.1.hook_mlp_out"}),
         r"cfg\.json: hook_name 'blocks\.1\.hook_mlp_out' is not supported"),
        (lambda c, t: c.update(metadata={"hook_name": "blocks.0.hook_resid_pre"}),
         r"blocks\.0\.hook_resid_pre \(the embedding output\) is not supported"),
        (lambda c, t: c.update(normalize_activations="expected_average_only_in"),
         r"normalize_activations='expected_average_only_in' is not supported"),
        (lambda c, t: c.update(architecture="jumprelu"), r"missing tensor 'threshold'"),
        (lambda c, t: c.pop("d_sae"), r"cfg\.json: missing key 'd_sae'"),
        (lambda c, t: c.update(architecture="topk"), r"cfg\.json: topk architecture needs 'k'"),
    ],
)
def test_malformed_directories_name_file_and_problem(tmp_path, mutate, message):
    cfg, t = _good(tmp_path)
    mutate(cfg, t)
    p = _write(tmp_path / "s", cfg, t)
    with pytest.raises(SAEFormatError, match=message):
        load_sae(p)


def test_missing_weights_file_and_bad_json(tmp_path):
    cfg, t = _good(tmp_path)
    p = _write(tmp_path / "s", cfg, t)
    (p / "sae_weights.safetensors").unlink()
    with pytest.raises(SAEFormatError, match=r"sae_weights\.safetensors: missing weights file"):
        load_sae(p)
    (p / "cfg.json").write_text("{not json")
    with pytest.raises(SAEFormatError, match=r"cfg\.json: cannot read JSON config"):
        load_sae(p)
    shutil.rmtree(p)
    with pytest.raises(SAEFormatError, match="not a directory"):
        load_sae(p)
    p.mkdir()
    with pytest.raises(SAEFormatError, match="no recognised SAE format"):
        load_sae(p)
