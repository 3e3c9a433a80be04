"""Transcoders: loading every supported format as sae-lens / sparsify read it, and the hook
(stash the MLP input, edit the MLP output) against the published formula.

The oracles are the libraries: ``sae_lens`` (``SAE.load_from_disk`` for the SAELens
transcoder classes, its Gemma Scope 2 loader for ``transcoder/`` folders) and
``eai-sparsify`` (``SparseCoder.load_from_disk``) for ``transcode: true`` coders. The edit
rule is the issue's: ``mlp_out += (v - f_i(x_in)) W_dec[i]``.
"""

from __future__ import annotations

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
    assert (c.transcoder, c.input_site, c.site, c.layer) == (True, "mlp_in", "mlp_out", 1)
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
