"""Transcoders: loading every supported format as sae-lens / sparsify read it, and the hook
(stash the MLP input, edit the MLP output) against the published formula.

The oracles are the libraries: ``sae_lens`` (``SAE.load_from_disk`` for the SAELens
transcoder classes, its Gemma Scope 2 loader for ``transcoder/`` folders) and
``eai-sparsify`` (``SparseCoder.load_from_disk``) for ``transcode: true`` coders. The edit
rule is the issue's: ``mlp_out += (v - f_i(x_in)) W_dec[i]``.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from sae_runtime import ops
from sae_runtime.errors import SAEFormatError
from sae_runtime.loading import load_sae, load_sae_config
from sae_runtime.step.edits import POS_INF, edit_rows
from sae_runtime.step.tables import HookTables
from tests.fixtures.tiny import make_model, make_transcoder
from tests.transcoder_refs import load_sae_lens_transcoder

SAELENS_ARCHS = ["transcoder", "skip_transcoder", "jumprelu_transcoder", "jumprelu_skip_transcoder"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tc_model") / "tiny-llama"
    make_model(d, layers=2)
    return d


def _x(n=24, d=128, seed=0):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed)) * 1.5


@pytest.mark.parametrize("arch", SAELENS_ARCHS)
def test_saelens_transcoders_encode_as_sae_lens_does(tmp_path, model_dir, arch):
    folder = make_transcoder(tmp_path / arch, model_dir, layer=1, architecture=arch)
    ours = load_sae(folder)
    ref = load_sae_lens_transcoder(folder)
    assert type(ref).__name__.lower().replace("_", "") == arch.replace("_", "")
    c = ours.cfg
    assert (c.transcoder, c.input_site, c.site, c.layer) == (True, "ln2_normalized", "mlp_out", 1)
    assert c.hook_name == "blocks.1.ln2.hook_normalized" and c.hook_name_out == "blocks.1.hook_mlp_out"
    assert c.architecture == ("jumprelu" if arch.startswith("jumprelu") else "standard")
    assert c.training_architecture == arch and not c.apply_b_dec_to_input
    x = _x()
    with torch.no_grad():
        want = ref.encode(x)
    got = ops.encode(ours, x)
    assert (want > 0).float().mean() > 0.02, "the test transcoder must fire"
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours.W_dec, ref.W_dec.detach())
    # The edit: x_out + (v - f_i) W_dec[i], where f comes from the *input*.
    i = int(want.sum(0).argmax())
    delta = ops.intervention_delta(ours, x, torch.full((len(x), 1), i),
                                   torch.full((len(x), 1), int(ops.Mode.CLAMP)),
                                   torch.full((len(x), 1), 3.0))
    torch.testing.assert_close(delta, (3.0 - want[:, i:i + 1]) * ref.W_dec[i].detach(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("affine", [False, True])
def test_gemma_scope_2_transcoders_load_as_sae_lens_gemma_3_loader_does(tmp_path, model_dir, affine):
    arch = "jumprelu_skip_transcoder" if affine else "jumprelu_transcoder"
    folder = make_transcoder(tmp_path, model_dir, layer=1, architecture=arch, fmt="gemma_scope_2")
    ours = load_sae(folder)
    ref = load_sae_lens_transcoder(folder)
    assert ref.cfg.architecture() == arch  # sae-lens's own reading of the folder
    assert ref.cfg.metadata.hook_name_out == ours.cfg.hook_name_out == "blocks.1.hook_mlp_out"
    assert (ours.cfg.format, ours.cfg.input_site, ours.cfg.layer) == ("gemma_scope", "mlp_in", 1)
    assert ours.cfg.training_architecture == arch
    x = _x()
    with torch.no_grad():
        want = ref.encode(x)
    assert (want > 0).any()
    torch.testing.assert_close(ops.encode(ours, x), want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours.W_dec, ref.W_dec.detach())
    if affine:  # the skip is in sae-lens's reconstruction, not in an edit's delta
        assert ref.W_skip.abs().sum() > 0


def test_sparsify_transcoders_encode_as_sparsify_does(tmp_path):
    from sparsify import SparseCoder, SparseCoderConfig

    d, n = 32, 96
    torch.manual_seed(0)
    coder = SparseCoder(d, SparseCoderConfig(num_latents=n, k=6, transcode=True, skip_connection=True))
    with torch.no_grad():
        for p in (coder.encoder.weight, coder.encoder.bias, coder.W_dec, coder.b_dec, coder.W_skip):
            p.normal_()
    folder = tmp_path / "layers.1.mlp"
    coder.save_to_disk(folder)
    cfg = load_sae_config(folder)
    assert (cfg.input_site, cfg.site, cfg.layer, cfg.apply_b_dec_to_input) == ("mlp_in", "mlp_out", 1, False)
    ours = load_sae(folder)
    x = _x(d=d)
    with torch.no_grad():
        enc = coder.encode(x)
        want = torch.zeros(len(x), n).scatter_(1, enc.top_indices, enc.top_acts)
    torch.testing.assert_close(ops.encode(ours, x), want, atol=1e-5, rtol=1e-5)

    resid = tmp_path / "layers.1"  # transcode at a block output: not an MLP transcoder
    coder.save_to_disk(resid)
    with pytest.raises(SAEFormatError, match="only transcoders of an MLP"):
        load_sae_config(resid)


def _edit_cfg(folder, **changes):
    cfg = json.loads((folder / "cfg.json").read_text())
    meta = cfg["metadata"]
    for k, v in changes.items():
        (meta if k.startswith("hook") else cfg)[k] = v
    (folder / "cfg.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("change, message", [
    ({"hook_name_out": "blocks.0.hook_mlp_out"}, "must write blocks.1.hook_mlp_out"),
    ({"hook_name_out": "blocks.1.hook_resid_post"}, "must write blocks.1.hook_mlp_out"),
    ({"hook_name": "blocks.1.hook_resid_mid"}, "transcoder input hook"),
    ({"d_out": 64}, "d_out=64 differs from d_in=128"),
    ({"apply_b_dec_to_input": True}, "apply_b_dec_to_input is true"),
    ({"normalize_activations": "layer_norm"}, "normalization 'none'"),
])
def test_bad_transcoder_files_are_refused_naming_the_problem(tmp_path, model_dir, change, message):
    folder = make_transcoder(tmp_path / "tc", model_dir, layer=1, architecture="transcoder")
    _edit_cfg(folder, **change)
    with pytest.raises(SAEFormatError, match=message):
        load_sae_config(folder)


def test_cross_layer_transcoders_are_refused(tmp_path):
    folder = tmp_path / "clt" / "layer_0"
    folder.mkdir(parents=True)
    save_file({"w_enc": torch.zeros(4, 8), "w_dec": torch.zeros(8, 4), "b_enc": torch.zeros(8),
               "b_dec": torch.zeros(4), "threshold": torch.zeros(8)}, str(folder / "params.safetensors"))
    with pytest.raises(SAEFormatError, match="cross-layer transcoders"):
        load_sae_config(folder)


@pytest.mark.parametrize("backend", ["compact", "reference"])
def test_the_hook_encodes_the_stashed_mlp_input_and_edits_the_mlp_output(
        tmp_path, model_dir, backend, monkeypatch):
    import sae_runtime.step.tables as tables_mod

    monkeypatch.setattr(tables_mod, "backend_for", lambda device: backend)
    folder = make_transcoder(tmp_path / "tc", model_dir, layer=1, architecture="jumprelu_transcoder")
    sae = load_sae(folder)
    ref = load_sae_lens_transcoder(folder)
    x_in, y = _x(10), _x(10, seed=5)
    with torch.no_grad():
        f = ref.encode(x_in)
    feat = int(f.sum(0).argmax())
    tables = HookTables(sae, max_tokens=16, max_slots=2, max_feats=2, staged=False)
    rows = edit_rows(1)
    rows["feature"], rows["mode"], rows["value"] = feat, int(ops.Mode.CLAMP), 7.0
    rows["pos_lo"], rows["pos_hi"] = 3, POS_INF  # positions 3.. only
    tables.add_edits(0, 10, 0, rows)
    assert torch.equal(tables.stash_input(x_in), x_in)
    out = tables.apply(y, None)
    want = y.clone()
    want[3:] += (7.0 - f[3:, feat:feat + 1]) * ref.W_dec[feat].detach()
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    # Not the SAE-style edit: encoding the output instead would give another delta.
    wrong = y.clone()
    with torch.no_grad():
        wrong[3:] += (7.0 - ref.encode(y)[3:, feat:feat + 1]) * ref.W_dec[feat]
    assert not torch.allclose(out, wrong, atol=1e-3)
    tables.clear()
    # A step without edits or reads at this hook keeps nothing and edits nothing.
    stale = tables.stash.clone()
    if backend == "compact":
        assert torch.equal(tables.stash_input(x_in * 2), x_in * 2)
        assert torch.equal(tables.stash, stale)
    assert torch.equal(tables.apply(y, None), y)


def test_an_sae_without_a_transcoder_has_no_stash(model_dir, tmp_path):
    from tests.sae_runtime._factories import random_sae

    tables = HookTables(random_sae("standard", 8, 16, seed=0), max_tokens=4, max_slots=1, max_feats=1)
    assert tables.stash is None
    with pytest.raises(AssertionError):
        tables.stash_input(torch.zeros(2, 8))
    assert np.all(tables._np["tok_slot"] == -1)


def _tl_llama(hf_model):
    """TransformerLens' own HookedTransformer holding the weights of the HF Llama."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformer_lens.pretrained.weight_conversions import convert_llama_weights

    c = hf_model.config
    cfg = HookedTransformerConfig(
        d_model=c.hidden_size, d_head=c.hidden_size // c.num_attention_heads,
        n_heads=c.num_attention_heads, d_mlp=c.intermediate_size, n_layers=c.num_hidden_layers,
        n_ctx=c.max_position_embeddings, d_vocab=c.vocab_size, act_fn="silu",
        normalization_type="RMS", positional_embedding_type="rotary",
        rotary_dim=c.hidden_size // c.num_attention_heads, final_rms=True, gated_mlp=True,
        eps=c.rms_norm_eps, n_key_value_heads=c.num_key_value_heads,
        original_architecture="LlamaForCausalLM", rotary_base=10000, dtype=torch.float32)
    tl = HookedTransformer(cfg)
    tl.load_state_dict(convert_llama_weights(hf_model, cfg), strict=False)
    return tl.eval()


def test_ln2_hook_normalized_transcoders_read_the_norm_without_its_weight(tmp_path):
    """SAELens' ``blocks.L.ln2.hook_normalized`` is TransformerLens' hook: the pre-MLP
    RMSNorm's ``x / rms(x)`` *before* its weight (the oracle here is TransformerLens itself
    on the same weights). The worker serves it from the MLP's input by folding the norm's
    weight into the encoder; reading the MLP input as is would be off by that weight."""
    from transformers import AutoModelForCausalLM

    from sae_runtime.vllm.families import FAMILIES, mlp_norm_affine
    from tests.fixtures.tiny import make_family_model

    model_dir = tmp_path / "llama"
    make_family_model(model_dir, "llama", layers=2)  # pre-MLP norm weights ~ 1 +- 0.4
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    folder = make_transcoder(tmp_path / "tc", model_dir, layer=1, architecture="jumprelu_transcoder")
    ids = torch.randint(3, 512, (1, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        _, cache = _tl_llama(hf).run_with_cache(ids)
    want = load_sae_lens_transcoder(folder).encode(cache["blocks.1.ln2.hook_normalized"][0]).detach()
    assert (want > 0).any()
    sae = load_sae(folder)
    assert sae.cfg.input_site == "ln2_normalized" and sae.cfg.transcoder
    # what the worker does: stash the MLP's input, fold the norm's weight into the encoder
    from sae_runtime.labels.hf_sites import site_activations

    mlp_in = site_activations(hf, ids, 1, "mlp_in")[0]
    served = ops.fold_norm_weight(sae, *mlp_norm_affine(hf.model.layers[1], FAMILIES["LlamaForCausalLM"]))
    torch.testing.assert_close(ops.encode(served, mlp_in), want, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(ops.encode(sae, mlp_in), want, atol=1e-2)  # the weight matters here
    torch.testing.assert_close(served.W_dec, sae.W_dec, atol=0, rtol=0)  # edits move the same way


def test_folding_a_layernorm_bias_and_refusing_a_zero_weight():
    from tests.sae_runtime._factories import random_sae

    sae = random_sae("standard", 8, 16, seed=0)
    sae = type(sae)(dataclasses.replace(sae.cfg, input_site="ln2_normalized", site="mlp_out",
                                        apply_b_dec_to_input=False),
                    sae.W_enc, sae.W_dec, sae.b_enc, sae.b_dec)
    g = torch.Generator().manual_seed(1)
    x_hat, w, b = torch.randn(5, 8, generator=g), torch.rand(8, generator=g) + 0.5, torch.randn(8, generator=g)
    folded = ops.fold_norm_weight(sae, w, b)
    torch.testing.assert_close(ops.encode(folded, x_hat * w + b), ops.encode(sae, x_hat), atol=1e-5, rtol=1e-5)
    w[3] = 0
    with pytest.raises(SAEFormatError, match="1 zero entries"):
        ops.fold_norm_weight(sae, w, b)
