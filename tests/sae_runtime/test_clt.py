"""Cross-layer transcoders (CLTs) and crosscoders: loading and math against their origins.

Oracles (``tests.clt_refs``): circuit-tracer's own classes write the native files and its
loaders and ``encode``/``decode`` compute the reference; Gemma Scope 2 files are checked
against circuit-tracer's ``load_gemma_scope_2_clt`` and GDM's ``JumpReLUMultiLayerSAE``
formula; the edit against circuit-tracer's feature intervention re-enacted on a Hugging
Face forward of the tiny Llama (every later layer's MLP output gets its share).
"""

from __future__ import annotations

import logging

import pytest
import torch
from safetensors.torch import load_file, save_file

from sae_runtime import ops
from sae_runtime.errors import SAEFormatError
from sae_runtime.labels.hf_sites import edit_site
from sae_runtime.loading import is_clt, load_clt, load_clt_config, load_sae, load_sae_config
from sae_runtime.saes import clt as clt_math
from tests import clt_refs
from tests.fixtures.tiny import LAYERS, clt_samples, make_clt, make_model

ATOL = 1e-5
F = 64


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("clt_model") / "tiny-llama"
    make_model(d)
    return d


@pytest.fixture(scope="module")
def xs(model_dir):
    """Every layer's MLP input on the same tokens: ``[L, N, d]``."""
    return clt_samples(model_dir, LAYERS, "mlp_in", seed=3)[:, :96]


def _close(got, want, what, atol=ATOL):
    assert got.shape == want.shape, f"{what}: {tuple(got.shape)} != {tuple(want.shape)}"
    err = float((got - want).abs().max()) if got.numel() else 0.0
    assert err <= atol * max(1.0, float(want.abs().max())), f"{what}: max |diff| {err:.3g}"


# ---------------------------------------------------------------- circuit-tracer's format

@pytest.mark.parametrize("jump", [True, False])
def test_native_clt_loads_the_tensors_circuit_tracer_loads(tmp_path, model_dir, jump):
    folder = make_clt(tmp_path / "clt", model_dir, jump=jump, input_hook="hook_resid_mid")
    ours, ref = load_clt(folder), clt_refs.ct_load_clt(folder)
    c = ours.cfg
    assert (c.kind, c.format, c.n_layers, c.d_sae, c.d_in, c.layers) == (
        "clt", "circuit_tracer", LAYERS, F, 128, (0, 1, 2))
    assert (c.input_site, c.output_site, c.input_hook, c.output_hook, c.skip) == (
        "resid_mid", "mlp_out", "hook_resid_mid", "hook_mlp_out", False)
    assert c.activation == ("jumprelu" if jump else "relu") and c.model_name == "tiny-llama"
    assert load_clt_config(folder) == c and is_clt(folder)
    torch.testing.assert_close(ours.W_enc, ref.W_enc.detach().transpose(1, 2), atol=0, rtol=0)
    torch.testing.assert_close(ours.b_enc, ref.b_enc.detach(), atol=0, rtol=0)
    torch.testing.assert_close(ours.b_dec, ref.b_dec.detach(), atol=0, rtol=0)
    for s in range(LAYERS):
        torch.testing.assert_close(ours.W_dec[s], ref.W_dec[s].detach(), atol=0, rtol=0)
    if jump:
        torch.testing.assert_close(ours.threshold, ref.activation_function.threshold.detach()[:, 0],
                                   atol=0, rtol=0)
    else:
        assert ours.threshold is None


@pytest.mark.parametrize("jump", [True, False])
def test_native_clt_encodes_and_decodes_as_circuit_tracer(tmp_path, model_dir, xs, jump):
    folder = make_clt(tmp_path / "clt", model_dir, jump=jump)
    ours, ref = load_clt(folder), clt_refs.ct_load_clt(folder)
    with torch.no_grad():
        want_f = ref.encode(xs)
        f = clt_math.encode(ours, xs)
        _close(f, want_f, "encode")
        assert 0.02 < float((want_f > 0).float().mean()) < 0.5, "the test CLT must fire"
        for s in range(LAYERS):
            _close(clt_math.encode_layer(ours, xs[s], s), ref.encode_layer(xs[s], s), f"slot {s}")
        f[:, -1, 0] = torch.where(f[:, -1, 0] > 0, f[:, -1, 0], 1.0)  # see clt_refs: last position
        want = ref.decode(f.to_sparse())  # circuit-tracer sizes its output by the last active one
        _close(clt_math.decode(ours, f), want, "decode")
        for s in range(LAYERS):
            _close(clt_math.decode_layer(ours, f, s), want[s], f"decode slot {s}")
            feats = torch.tensor([0, 5, F - 1])
            _close(clt_math.decoder_vectors(ours, s, feats), ref._get_decoder_vectors(s, feats),
                   f"decoder vectors of slot {s}")


def test_negative_thresholds_follow_circuit_tracers_jumprelu(tmp_path, model_dir, xs):
    folder = make_clt(tmp_path / "clt", model_dir)
    name = "W_enc_1.safetensors"
    t = load_file(str(folder / name))
    t["threshold_1"] = t["threshold_1"] - 2 * t["threshold_1"].abs().max()  # all negative
    save_file(t, str(folder / name))
    ours, ref = load_clt(folder), clt_refs.ct_load_clt(folder)
    assert ours.cfg.activation == "jumprelu_signed"
    with torch.no_grad():
        want = ref.encode(xs)
    assert (want[1] < 0).any(), "circuit-tracer's JumpReLU passes negative pre-activations"
    _close(clt_math.encode(ours, xs), want, "encode")


def test_weights_load_in_the_asked_dtype_and_the_decoder_size_is_reported(tmp_path, model_dir):
    folder = make_clt(tmp_path / "clt", model_dir)
    clt = load_clt(folder, dtype=torch.bfloat16)
    tensors = [clt.W_enc, clt.b_enc, clt.b_dec, clt.threshold, *clt.W_dec]
    assert all(t.dtype == torch.bfloat16 for t in tensors)
    dec = sum(w.numel() for w in clt.W_dec) * 2
    assert clt_math.decoder_bytes(clt.cfg, torch.bfloat16) == dec == 6 * F * 128 * 2
    assert clt_math.weight_bytes(clt.cfg, torch.float32) == sum(t.numel() for t in tensors) * 4
    # Gemma Scope 2's 262k CLT of Gemma 3 1B: 26 slots x 10,080 features, d = 1152
    big = clt_math.CLTConfig(kind="clt", n_layers=26, d_in=1152, d_sae=10080,
                             activation="jumprelu", layers=tuple(range(26)), input_site="mlp_in",
                             output_site="mlp_out")
    assert round(clt_math.decoder_bytes(big, torch.bfloat16) / 2**30, 1) == 7.6


# ---------------------------------------------------------------- Gemma Scope 2 CLTs

@pytest.mark.parametrize("skip", [False, True])
def test_gemma_scope_2_clt_loads_as_circuit_tracer_and_computes_as_gdm(tmp_path, model_dir, xs, skip):
    folder = make_clt(tmp_path, model_dir, fmt="gemma_scope_2", skip=skip)
    ours = load_clt(folder)
    ref = clt_refs.ct_load_gemma_scope_2_clt(folder, LAYERS)
    c = ours.cfg
    assert (c.kind, c.format, c.activation, c.skip, c.input_site, c.output_site) == (
        "clt", "gemma_scope_2", "jumprelu", skip, "mlp_in", "mlp_out")
    torch.testing.assert_close(ours.W_enc, ref.W_enc.detach().transpose(1, 2), atol=0, rtol=0)
    for s in range(LAYERS):
        torch.testing.assert_close(ours.W_dec[s], ref.W_dec[s].detach(), atol=0, rtol=0)
    if skip:
        torch.testing.assert_close(ours.W_skip, ref.W_skip.detach(), atol=0, rtol=0)
    p = clt_refs.stacked(folder, LAYERS)
    acts, recon = clt_refs.gdm_multilayer(xs.transpose(0, 1), p)  # GDM: [N, layer, d]
    with torch.no_grad():
        f = clt_math.encode(ours, xs)
        _close(f, acts.transpose(0, 1), "encode vs JumpReLUMultiLayerSAE")
        _close(clt_math.decode(ours, f, xs if skip else None), recon.transpose(0, 1),
               "decode vs JumpReLUMultiLayerSAE")
        f[:, -1, 0] = torch.where(f[:, -1, 0] > 0, f[:, -1, 0], 1.0)
        _close(clt_math.decode(ours, f, xs if skip else None),
               ref.decode(f.to_sparse(), xs if skip else None), "decode vs circuit-tracer")
    if skip:
        with pytest.raises(ValueError, match="skip connection"):
            clt_math.decode(ours, f)


def test_gemma_scope_2_acausal_decoders_warn_or_are_refused(tmp_path, model_dir, caplog):
    folder = make_clt(tmp_path, model_dir, fmt="gemma_scope_2")
    path = folder / "params_layer_2.safetensors"
    t = load_file(str(path))
    big = float(t["w_dec"][:, 2:].abs().max())
    t["w_dec"][3, 0] = 1e-4 * big  # slot 2 writing slot 0, barely
    save_file(t, str(path))
    with caplog.at_level(logging.WARNING):
        clt = load_clt(folder)
    assert "w_dec[:, :2]" in caplog.text and "dropped, as circuit-tracer does" in caplog.text
    assert clt.W_dec[2].shape == (F, 1, 128)
    t["w_dec"][3, 0] = 0.5 * big
    save_file(t, str(path))
    with pytest.raises(SAEFormatError, match=r"params_layer_2\.safetensors: w_dec\[:, :2\].*refused"):
        load_clt(folder)


def test_gemma_scope_2_crosscoder_folder(tmp_path, model_dir, xs):
    src = make_clt(tmp_path / "src", model_dir, fmt="gemma_scope_2")
    folder = tmp_path / "gemma-scope-2-1b-pt" / "crosscoder" / "layer_0_1_2_width_192_l0_small"
    folder.mkdir(parents=True)
    for i in range(LAYERS):
        name = f"params_layer_{i}.safetensors"
        (folder / name).write_bytes((src / name).read_bytes())
    cc = load_clt(folder)
    assert (cc.cfg.kind, cc.cfg.layers, cc.cfg.input_site, cc.cfg.output_site,
            cc.cfg.model_name) == ("crosscoder", (0, 1, 2), "resid_post", "resid_post",
                                   "gemma-3-1b-pt")
    acts, recon = clt_refs.gdm_multilayer(xs.transpose(0, 1), clt_refs.stacked(folder, LAYERS))
    f = clt_math.encode(cc, xs)
    _close(f, acts.transpose(0, 1), "encode")
    _close(clt_math.decode(cc, f), recon.transpose(0, 1), "decode")
    bad = tmp_path / "crosscoder" / "layer_0_1_width_192_l0_small"
    bad.mkdir(parents=True)
    for i in range(LAYERS):
        (bad / f"params_layer_{i}.safetensors").write_bytes((src / f"params_layer_{i}.safetensors").read_bytes())
    with pytest.raises(SAEFormatError, match=r"names 2 layers \(0, 1\) but there are 3"):
        load_clt_config(bad)


def test_config_yaml_listing_gemma_scope_2_files(tmp_path, model_dir):
    src = make_clt(tmp_path / "gs2", model_dir, fmt="gemma_scope_2")
    folder = tmp_path / "ct"
    folder.mkdir()
    files = "".join(f"  - {src}/params_layer_{i}.safetensors\n" for i in range(LAYERS))
    (folder / "config.yaml").write_text(
        "model_kind: cross_layer_transcoder\nfeature_input_hook: mlp.hook_in\n"
        f"feature_output_hook: hook_mlp_out\ntranscoders:\n{files}")
    clt, ref = load_clt(folder), load_clt(src)
    assert (clt.cfg.format, clt.cfg.input_hook, clt.cfg.n_layers) == ("gemma_scope_2", "mlp.hook_in", 3)
    torch.testing.assert_close(clt.W_dec[1], ref.W_dec[1], atol=0, rtol=0)
    (folder / "config.yaml").write_text(
        "model_kind: cross_layer_transcoder\nfeature_input_hook: mlp.hook_in\n"
        "feature_output_hook: hook_mlp_out\ntranscoders:\n  - hf://google/x/params_layer_0.safetensors\n")
    with pytest.raises(SAEFormatError, match=r"transcoders\[0\] .* is not a local file"):
        load_clt_config(folder)


# ---------------------------------------------------------------- circuit-tracer transcoder_set

def _transcoder_set(folder, xs, skip: bool, jump: bool):
    from circuit_tracer.transcoder.activation_functions import JumpReLU
    from circuit_tracer.transcoder.single_layer_transcoder import (
        SingleLayerTranscoder,
        TranscoderSet,
    )

    g = torch.Generator().manual_seed(5)
    tcs = {}
    for layer in range(LAYERS):
        d = xs.shape[-1]
        act = JumpReLU(torch.zeros(F), 0.1) if jump else torch.nn.functional.relu
        tc = SingleLayerTranscoder(d, F, act, layer, skip_connection=skip, device=clt_refs.CPU,
                                   dtype=torch.float32)
        with torch.no_grad():
            tc.W_enc.copy_(torch.randn(F, d, generator=g) / d ** 0.5)
            pre = xs[layer] @ tc.W_enc.t()
            tc.b_enc.copy_(-torch.quantile(pre, 0.9, dim=0))
            tc.W_dec.copy_(torch.randn(F, d, generator=g))
            tc.b_dec.copy_(torch.randn(d, generator=g))
            if jump:
                tc.activation_function.threshold.copy_(0.3 * pre.std() * torch.rand(F, generator=g))
            if skip:
                tc.W_skip.copy_(0.05 * torch.randn(d, d, generator=g))
        tcs[layer] = tc
    TranscoderSet(tcs, feature_input_hook="mlp.hook_in", feature_output_hook="hook_mlp_out",
                  scan="test").to_safetensors(str(folder))
    (folder / "config.yaml").write_text("model_name: tiny-llama\nmodel_kind: transcoder_set\n"
                                        "feature_input_hook: mlp.hook_in\n"
                                        "feature_output_hook: hook_mlp_out\n")
    return folder


@pytest.mark.parametrize("jump, skip", [(True, False), (False, True)])
def test_transcoder_set_layers_load_as_circuit_tracer_reads_them(tmp_path, xs, jump, skip):
    folder = _transcoder_set(tmp_path / "set", xs, skip=skip, jump=jump)
    ref = clt_refs.ct_load_transcoder_set(folder, LAYERS, "mlp.hook_in", "hook_mlp_out")
    assert not is_clt(folder)
    for layer in range(LAYERS):
        sae = load_sae(folder, hook_name=f"blocks.{layer}.mlp.hook_in")
        c = sae.cfg
        assert (c.format, c.layer, c.input_site, c.site, c.hook_name_out, c.architecture) == (
            "circuit_tracer", layer, "mlp_in", "mlp_out", f"blocks.{layer}.hook_mlp_out",
            "jumprelu" if jump else "standard")
        with torch.no_grad():
            want = ref[layer].encode(xs[layer])
            assert (want > 0).any()
            _close(ops.encode(sae, xs[layer]), want, f"encode layer {layer}")
            # circuit-tracer's reconstruction without the skip is the SAE decode
            recon = ref[layer].decode(want, xs[layer])
            if skip:
                recon = recon - ref[layer].compute_skip(xs[layer])
            _close(ops.decode(sae, want), recon, f"decode layer {layer}")
    with pytest.raises(SAEFormatError, match=r"a transcoder_set of 3 layers; pick one with "
                                             r"NAME=PATH@blocks\.L\.mlp\.hook_in"):
        load_sae_config(folder)
    with pytest.raises(SAEFormatError, match="does not pick a layer"):
        load_sae_config(folder, hook_name="blocks.3.mlp.hook_in")


# ---------------------------------------------------------------- refusals

def test_a_clt_is_not_an_sae_and_a_transcoder_set_is_not_a_clt(tmp_path, model_dir, xs):
    native = make_clt(tmp_path / "native", model_dir)
    gs2 = make_clt(tmp_path / "gs2", model_dir, fmt="gemma_scope_2")
    for folder in (native, gs2):
        with pytest.raises(SAEFormatError, match="a cross-layer transcoder.*load_clt"):
            load_sae_config(folder)
    tset = _transcoder_set(tmp_path / "set", xs, skip=False, jump=False)
    with pytest.raises(SAEFormatError, match="not a cross-layer transcoder"):
        load_clt(tset)


@pytest.mark.parametrize("damage, message", [
    (lambda d: (d / "W_dec_1.safetensors").unlink(), r"W_dec_1\.safetensors: missing decoder file"),
    (lambda d: (d / "W_enc_1.safetensors").rename(d / "W_enc_7.safetensors"),
     r"missing W_enc_1\.safetensors \(layers must be 0\.\.7"),
    (lambda d: save_file({"W_dec_2": torch.zeros(F, 2, 128)}, str(d / "W_dec_2.safetensors")),
     r"W_dec_2\.safetensors: tensor 'W_dec_2' has shape \(64, 2, 128\), expected \(64, 1, 128\)"),
    (lambda d: (d / "config.yaml").write_text("model_kind: cross_layer_transcoder\n"
                                              "feature_input_hook: hook_mlp_in\n"
                                              "feature_output_hook: hook_mlp_out\n"),
     r"config\.yaml: feature_input_hook 'hook_mlp_in' is not supported"),
    (lambda d: (d / "config.yaml").write_text("model_kind: sae\n"), "model_kind 'sae'"),
])
def test_bad_native_files_are_refused_naming_the_file(tmp_path, model_dir, damage, message):
    folder = make_clt(tmp_path / "clt", model_dir)
    damage(folder)
    with pytest.raises(SAEFormatError, match=message):
        load_clt_config(folder)


def test_bad_gemma_scope_2_files_are_refused_naming_the_file(tmp_path, model_dir):
    folder = make_clt(tmp_path, model_dir, fmt="gemma_scope_2")
    t = load_file(str(folder / "params_layer_1.safetensors"))
    del t["threshold"]
    save_file(t, str(folder / "params_layer_1.safetensors"))
    with pytest.raises(SAEFormatError, match=r"params_layer_1\.safetensors: missing tensor 'threshold'"):
        load_clt_config(folder)
    (folder / "params_layer_1.safetensors").unlink()
    with pytest.raises(SAEFormatError, match=r"missing params_layer_1\.safetensors"):
        load_clt_config(folder)


# ---------------------------------------------------------------- the edit, in a forward pass

@torch.no_grad()
def _ours_steered_logits(model, ids, clt, edits):
    """Our math in the same HF forward: at each source slot's MLP input,
    ``ops.clt_intervention_delta`` gives the deltas of every later slot; each MLP output adds
    its share."""
    from contextlib import ExitStack

    L = clt.cfg.n_layers
    pending = torch.zeros(L, ids.shape[0], model.config.hidden_size)
    with ExitStack() as stack:
        for s in range(L):
            mine = [(f, m, v) for lay, f, m, v in edits if lay == s]

            def grab(x, s=s, mine=mine):
                if mine:
                    n = x.shape[1]
                    feat = torch.tensor([[f for f, _, _ in mine]] * n)
                    mode = torch.tensor([[int(m) for _, m, _ in mine]] * n)
                    value = torch.tensor([[v for _, _, v in mine]] * n)
                    delta = ops.clt_intervention_delta(clt, s, x[0], feat, mode, value)
                    pending[s:] += delta.transpose(0, 1)
                return x

            stack.enter_context(edit_site(model, s, "mlp_in", grab))
            stack.enter_context(edit_site(model, s, "mlp_out", lambda y, s=s: y + pending[s]))
        return model(ids[None]).logits[0]


@pytest.fixture(scope="module")
def hf_model(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


@pytest.mark.parametrize("edits", [
    [(0, "strong", 3.0)],  # one layer-0 feature: writes layers 0, 1, 2
    [(0, "strong", 3.0), (1, "strong", -2.0)],  # the layer-1 one reads the steered forward
    [(1, "strong", 0.0), (2, "weak", 5.0)],
])
def test_clamp_matches_circuit_tracers_intervention_at_every_later_layer(
        tmp_path, model_dir, hf_model, edits):
    folder = make_clt(tmp_path / "clt", model_dir)
    ours, ref = load_clt(folder), clt_refs.ct_load_clt(folder)
    ids = torch.randint(3, 512, (24,), generator=torch.Generator().manual_seed(1))
    xs = torch.stack([_site(hf_model, ids, s) for s in range(LAYERS)])
    f = clt_math.encode(ours, xs)  # [L, T, F]
    pick = {"strong": lambda s: int(f[s].sum(0).argmax()), "weak": lambda s: int(f[s].sum(0).argmin())}
    resolved = [(s, pick[w](s), v) for s, w, v in edits]
    want = clt_refs.hf_clt_steered_logits(hf_model, ids, ref, resolved, LAYERS)
    got = _ours_steered_logits(hf_model, ids, ours, [(s, j, ops.Mode.CLAMP, v) for s, j, v in resolved])
    with torch.no_grad():
        clean = hf_model(ids[None]).logits[0]
    assert float((want - clean).abs().max()) > 1.0, "the edit must move the logits"
    _close(got, want, "steered logits", atol=1e-4)
    # Writing only the source layer (a per-layer transcoder's edit) is not the CLT's edit.
    src_only = _ours_steered_logits_source_only(hf_model, ids, ours, resolved)
    assert float((src_only - want).abs().max()) > 1e-2


@torch.no_grad()
def _site(model, ids, layer):
    from sae_runtime.labels.hf_sites import site_activations

    return site_activations(model, ids[None], layer, "mlp_in")[0]


@torch.no_grad()
def _ours_steered_logits_source_only(model, ids, clt, edits):
    from contextlib import ExitStack

    with ExitStack() as stack:
        for s, j, v in edits:
            seen = {}
            stack.enter_context(edit_site(model, s, "mlp_in", lambda x, seen=seen: seen.setdefault("x", x)))

            def add(y, s=s, j=j, v=v, seen=seen):
                a = clt_math.encode_layer(clt, seen["x"], s)[..., j]
                return y + (v - a)[..., None] * clt.W_dec[s][j, 0]

            stack.enter_context(edit_site(model, s, "mlp_out", add))
        return model(ids[None]).logits[0]


@pytest.mark.parametrize("mode, value", [(ops.Mode.ABLATE, 0.0), (ops.Mode.SCALE, 3.0),
                                         (ops.Mode.ADD, 2.0)])
def test_every_mode_is_a_clamp_to_its_edited_value(tmp_path, model_dir, xs, mode, value):
    clt = load_clt(make_clt(tmp_path / "clt", model_dir))
    s, x = 1, xs[1]
    f = clt_math.encode_layer(clt, x, s)
    j = int(f.sum(0).argmax())
    new = {ops.Mode.ABLATE: 0 * f[:, j], ops.Mode.SCALE: value * f[:, j],
           ops.Mode.ADD: f[:, j] + value}[mode]
    n = x.shape[0]
    got = ops.clt_intervention_delta(clt, s, x, torch.full((n, 1), j), torch.full((n, 1), int(mode)),
                                     torch.full((n, 1), value))
    want = (new - f[:, j])[:, None, None] * clt.W_dec[s][j][None]  # [n, L - s, d]
    _close(got, want, f"{mode.name} delta")
    assert got.shape == (n, LAYERS - s, 128)


def test_flat_feature_index(model_dir, tmp_path):
    cfg = load_clt_config(make_clt(tmp_path / "clt", model_dir))
    assert clt_math.flat_index(cfg, 2, 5) == 2 * F + 5
    assert clt_math.split_index(cfg, 2 * F + 5) == (2, 5)
    assert cfg.n_features == LAYERS * F
    for bad in ((3, 0), (0, F)):
        with pytest.raises(ValueError, match="outside"):
            clt_math.flat_index(cfg, *bad)
    with pytest.raises(ValueError, match="outside"):
        clt_math.split_index(cfg, LAYERS * F)
