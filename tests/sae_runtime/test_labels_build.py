"""``steerd labels build`` against independent references.

The reference side never touches our loader, encoder or site hooks: the model is the HF
``transformers`` model with a forward hook on its own decoder layer, the SAE is ``sae_lens``'
own ``SAE.load_from_disk(...).encode``, every context runs alone (no batching, no padding),
and logit effects come from the HF model's own final norm and ``lm_head`` modules.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch

from sae_runtime.labels import store as feats
from sae_runtime.labels.build import BuildConfig, LabelsBuildError, auto_label, build
from sae_runtime.labels.logit_effects import LogitEffects
from sae_runtime.loading import load_sae_config
from tests.fixtures.tiny import MODEL_DIR, corpus, make_family_model

TOKENS, CONTEXT = 900, 30


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Two busy cores: torch's own threads fight the other processes (a tiny forward takes
    # 100x longer with 2 threads than with 1 here).
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    p.write_text("\n".join(corpus(150, seed=5)) + "\n")
    return p


def _cfg(tiny_dir, sae: str, corpus_file: Path, out: Path, **kw) -> BuildConfig:
    return BuildConfig(model=tiny_dir / MODEL_DIR, sae=tiny_dir / "saes" / sae, corpus=corpus_file,
                       tokens=kw.pop("tokens", TOKENS), context=CONTEXT, batch=4, n_examples=5,
                       checkpoint_every=8, out=out, **kw)


# --------------------------------------------------------------------------- reference


def _hf(model_dir: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return (AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval(),
            AutoTokenizer.from_pretrained(model_dir))


def reference(model_dir: Path, sae_dir: Path, text: str, tokens: int, context: int) -> dict:
    """Per-token activations with the HF model's own layer hooked and sae_lens encoding."""
    from sae_lens import SAE

    model, tok = _hf(model_dir)
    sae = SAE.load_from_disk(str(sae_dir), device="cpu")
    hook = json.loads((sae_dir / "cfg.json").read_text())["metadata"]["hook_name"]
    _, layer, kind = hook.split(".")
    layer_mod = model.model.layers[int(layer)]
    seen = {}
    if kind == "hook_resid_post":  # the decoder layer's output
        h = layer_mod.register_forward_hook(
            lambda m, a, out: seen.__setitem__("x", out[0] if isinstance(out, tuple) else out))
    else:  # hook_resid_pre: the decoder layer's input
        assert kind == "hook_resid_pre"
        h = layer_mod.register_forward_pre_hook(
            lambda m, a, kw: seen.__setitem__("x", a[0] if a else kw["hidden_states"]), with_kwargs=True)
    ids = tok(text, add_special_tokens=False)["input_ids"][:tokens]
    rows, toks, where = [], [], []
    with torch.no_grad():
        for c, start in enumerate(range(0, len(ids), context)):
            seq = [tok.bos_token_id, *ids[start:start + context]]
            model(torch.tensor([seq]))
            x = seen["x"][0, 1:]
            rows.append(sae.encode(x))
            toks.extend(seq[1:])
            where.extend((c, p) for p in range(1, len(seq)))
    h.remove()
    acts = torch.cat(rows)
    return {"acts": acts, "toks": toks, "where": where, "ids": ids, "tok": tok, "W_dec": sae.W_dec.detach()}


def _separated(vals: list[float], r: int, eps: float) -> bool:
    return all(abs(vals[r] - vals[j]) > eps for j in (r - 1, r + 1) if 0 <= j < len(vals))


# --------------------------------------------------------------------------- stats


@pytest.mark.parametrize("sae_name", ["resid_l1", "jumprelu_l2pre"])
def test_statistics_match_hf_hooks_and_sae_lens(tiny_dir, text_file, tmp_path, sae_name):
    out = build(_cfg(tiny_dir, sae_name, text_file, tmp_path / "labels.json"), progress=False)
    doc = json.loads(out.read_text())
    ref = reference(tiny_dir / MODEL_DIR, tiny_dir / "saes" / sae_name, text_file.read_text(),
                    TOKENS, CONTEXT)
    acts, tok = ref["acts"], ref["tok"]
    n = acts.shape[0]
    assert doc["labelling_tokens"] == n == TOKENS
    on = acts != 0
    assert doc["dead_features"] == [f for f in range(acts.shape[1]) if not on[:, f].any()]
    recs = {r["index"]: r for r in doc["features"]}
    assert set(recs) == {f for f in range(acts.shape[1]) if on[:, f].any()}
    assert len(recs) > 100  # the calibrated SAE fires on ~10% of tokens: most features live
    checked_examples = checked_tokens = checked_labels = 0
    count = Counter(ref["toks"])
    for f, rec in recs.items():
        col = acts[:, f]
        fire = on[:, f]
        assert rec["density"] == pytest.approx(float(fire.float().mean()), abs=1e-6)
        assert rec["max_activation"] == pytest.approx(float(col.max()), rel=1e-4, abs=1e-4)
        assert rec["mean_activation"] == pytest.approx(float(col[fire].mean()), rel=1e-4, abs=1e-4)
        # top examples: distinct positions, strongest first
        order = sorted(range(n), key=lambda i: -float(col[i]))[:5]
        order = [i for i in order if col[i] > 0]
        ref_vals = [float(col[i]) for i in order]
        got_vals = [e["activation"] for e in rec["examples"]]
        assert got_vals == pytest.approx(ref_vals, rel=1e-4, abs=1e-4)
        for r, i in enumerate(order):
            if _separated(ref_vals, r, 1e-3):
                c, p = ref["where"][i]
                ctx_ids = ref["ids"][c * CONTEXT:(c + 1) * CONTEXT]
                e = rec["examples"][r]
                assert e["token"] == tok.decode([ctx_ids[p - 1]])
                assert e["context"] == tok.decode(ctx_ids[max(0, p - 1 - 12):p - 1])
                checked_examples += 1
        # top tokens by activation mass
        mass: dict[int, float] = defaultdict(float)
        for i in torch.nonzero(fire)[:, 0].tolist():
            mass[ref["toks"][i]] += float(col[i])
        ranked = sorted(mass.items(), key=lambda kv: -kv[1])
        texts = [tok.decode([t]).strip() or repr(tok.decode([t])) for t, _ in ranked]
        masses = [m for _, m in ranked]
        for r in range(min(3, len(ranked))):
            if not _separated(masses, r, 1e-3) or texts[r] in texts[:r]:
                break
            assert rec["top_tokens"][r] == texts[r]
            checked_tokens += 1
        # the label: tokens with the highest mean activation per occurrence (seen >= 5 times)
        specific = sorted(((m / count[t], t) for t, m in mass.items() if count[t] >= 5), key=lambda x: -x[0])
        spec_vals = [v for v, _ in specific]
        spec_texts = [tok.decode([t]).strip() or repr(tok.decode([t])) for _, t in specific]
        if len(specific) >= 4 and all(_separated(spec_vals, r, 1e-3) for r in range(4)) \
                and len(set(spec_texts[:3])) == 3:
            assert rec["label"] == auto_label(spec_texts[:3], [t["token"] for t in rec["promoted"]])
            checked_labels += 1
    assert checked_examples > 3 * len(recs) and checked_tokens > len(recs) and checked_labels > len(recs) / 2
    # the file loads, and search finds a feature by one of its top tokens
    lab = feats.FeatureLabels.load(out, sae_name, doc["d_sae"])
    f0 = next(r for r in doc["features"] if r["top_tokens"][0].isalpha())
    found = feats.search({sae_name: lab}, f0["top_tokens"][0], 100)
    assert f0["index"] in [f.index for f in found]
    assert doc["site_norm"] > 0


def test_logit_effects_in_the_file_match_the_hf_head(tiny_dir, text_file, tmp_path):
    out = build(_cfg(tiny_dir, "resid_l1", text_file, tmp_path / "l.json", tokens=200), progress=False)
    doc = json.loads(out.read_text())
    model, tok = _hf(tiny_dir / MODEL_DIR)
    from sae_lens import SAE

    w_dec = SAE.load_from_disk(str(tiny_dir / "saes" / "resid_l1"), device="cpu").W_dec.detach()
    for rec in doc["features"][:20]:
        with torch.no_grad():  # the brief's formula, through the HF model's own modules
            ref = model.lm_head(model.model.norm.weight * w_dec[rec["index"]])
        top = ref.topk(10)
        assert [t["token_id"] for t in rec["promoted"]][:3] == top.indices.tolist()[:3]
        assert [t["logit"] for t in rec["promoted"]] == pytest.approx(top.values.tolist(), rel=1e-4, abs=1e-4)
        assert [t["token"] for t in rec["promoted"]] == [tok.decode([i]) for i in top.indices.tolist()]
        low = ref.topk(10, largest=False)
        assert [t["logit"] for t in rec["suppressed"]] == pytest.approx(low.values.tolist(), rel=1e-4, abs=1e-4)


# --------------------------------------------------------------------------- logit effects per family


def write_saelens_sae(out: Path, d_in: int, hook: str, d_sae: int = 32, seed: int = 0) -> Path:
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    w_dec = torch.randn(d_sae, d_in, generator=g)
    out.mkdir(parents=True, exist_ok=True)
    save_file({"W_enc": w_dec.t().contiguous(), "W_dec": w_dec, "b_enc": torch.zeros(d_sae),
               "b_dec": torch.zeros(d_in)}, str(out / "sae_weights.safetensors"))
    (out / "cfg.json").write_text(json.dumps({
        "d_in": d_in, "d_sae": d_sae, "dtype": "float32", "device": "cpu", "architecture": "standard",
        "apply_b_dec_to_input": False, "normalize_activations": "none",
        "metadata": {"hook_name": hook, "model_name": "m"}}))
    return out


def _hf_logits_of(model, d: torch.Tensor) -> torch.Tensor:
    """Direct logit effect of direction ``d`` through the HF model's own final norm and head.

    The norm is scale-invariant, so feeding it ``s * d`` and undoing the per-token scale
    (rms for RMSNorm, std for LayerNorm, and LayerNorm's bias) leaves ``g * P d``: whatever
    the module does with its weight (Gemma's ``1 + w``, GPT-2's centring) is the module's own.
    """
    base = model.transformer if hasattr(model, "transformer") else model.model
    norm = base.ln_f if hasattr(base, "ln_f") else base.norm
    head = model.lm_head
    big = 1000.0 * d
    with torch.no_grad():
        if isinstance(norm, torch.nn.LayerNorm):
            return (head(norm(big)) - head(norm.bias)) * (d - d.mean()).pow(2).mean().sqrt()
        return head(norm(big)) * d.pow(2).mean().sqrt()


@pytest.mark.parametrize("family", ["llama", "gemma2", "gpt2"])
def test_logit_effects_match_the_models_own_norm_and_head(tmp_path, family):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    mdir = tmp_path / family
    make_family_model(mdir, family, layers=2)
    model = AutoModelForCausalLM.from_pretrained(mdir, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(mdir)
    sae = write_saelens_sae(tmp_path / "sae", 128, "blocks.1.hook_resid_post")
    cfg = load_sae_config(sae)
    eff = LogitEffects(mdir, {"s": (sae, None)}, {"s": cfg}, lambda t: tok.decode([t]), k=8)
    from safetensors.torch import load_file

    w_dec = load_file(str(sae / "sae_weights.safetensors"))["W_dec"]
    for i in (0, 5, 31):
        ref = _hf_logits_of(model, w_dec[i])
        e = eff.get("s", i)
        assert e.unavailable == ""
        hi, lo = ref.topk(8), ref.topk(8, largest=False)
        assert [t.logit for t in e.promoted] == pytest.approx(hi.values.tolist(), rel=1e-3, abs=1e-3)
        assert [t.logit for t in e.suppressed] == pytest.approx(lo.values.tolist(), rel=1e-3, abs=1e-3)
        assert [t.token_id for t in e.promoted][:2] == hi.indices.tolist()[:2]
        assert e.promoted[0].token == tok.decode([hi.indices[0].item()])
    if family == "gemma2":  # tied head: the unembedding is the input embedding
        assert eff.unembedding.head_name == "model.embed_tokens.weight"


def test_sites_that_do_not_write_the_stream_get_a_reason(tiny_dir, tmp_path):
    mdir = tiny_dir / MODEL_DIR
    z = write_saelens_sae(tmp_path / "z", 128, "blocks.1.attn.hook_z")
    narrow = write_saelens_sae(tmp_path / "narrow", 64, "blocks.1.hook_mlp_out")
    cfgs = {"z": load_sae_config(z), "narrow": load_sae_config(narrow)}
    eff = LogitEffects(mdir, {"z": (z, None), "narrow": (narrow, None)}, cfgs, str)
    assert eff.get("z", 0).promoted == () and "hook_z" in eff.get("z", 0).unavailable
    assert "d_in=64" in eff.get("narrow", 3).unavailable and "128" in eff.get("narrow", 3).unavailable


# --------------------------------------------------------------------------- resume


def test_an_interrupted_run_resumes_to_the_uninterrupted_result(tiny_dir, text_file, tmp_path):
    whole = build(_cfg(tiny_dir, "topk_l0", text_file, tmp_path / "a" / "l.json"), progress=False)
    cfg = _cfg(tiny_dir, "topk_l0", text_file, tmp_path / "b" / "l.json")
    assert build(cfg, progress=False, stop_after=12) is None
    assert cfg.partial_path.is_file() and not cfg.out_path.exists()
    with np.load(cfg.partial_path) as z:
        assert int(z["counters"][0]) == 12  # contexts done when it stopped
    resumed = build(cfg, progress=False)
    assert not cfg.partial_path.exists()
    assert json.loads(resumed.read_text()) == json.loads(whole.read_text())


def test_a_checkpoint_of_other_arguments_is_refused(tiny_dir, text_file, tmp_path):
    cfg = _cfg(tiny_dir, "resid_l1", text_file, tmp_path / "l.json")
    assert build(cfg, progress=False, stop_after=4) is None
    other_tokens = _cfg(tiny_dir, "resid_l1", text_file, tmp_path / "l.json", tokens=600)
    with pytest.raises(LabelsBuildError, match=r"different build \(tokens: checkpoint has 900, this run 600\).*--restart"):
        build(other_tokens, progress=False)
    edited = tmp_path / "corpus.txt"
    edited.write_text(text_file.read_text() + "one more line\n")
    with pytest.raises(LabelsBuildError, match="corpus_sha256"):
        build(_cfg(tiny_dir, "resid_l1", edited, tmp_path / "l.json"), progress=False)
    with pytest.raises(LabelsBuildError, match="sae:"):
        build(_cfg(tiny_dir, "jumprelu_l2pre", text_file, tmp_path / "l.json"), progress=False)
    out = build(other_tokens, progress=False, restart=True)
    assert json.loads(out.read_text())["labelling_tokens"] == 600


# --------------------------------------------------------------------------- errors


def test_clear_errors(tiny_dir, text_file, tmp_path):
    with pytest.raises(LabelsBuildError, match="--corpus .*nope.txt: no such file"):
        build(_cfg(tiny_dir, "resid_l1", tmp_path / "nope.txt", tmp_path / "l.json"), progress=False)
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(LabelsBuildError, match="no tokens"):
        build(_cfg(tiny_dir, "resid_l1", empty, tmp_path / "l.json"), progress=False)
    narrow = write_saelens_sae(tmp_path / "narrow", 64, "blocks.1.hook_resid_post")
    cfg = _cfg(tiny_dir, "resid_l1", text_file, tmp_path / "l.json", tokens=60)
    from dataclasses import replace

    with pytest.raises(LabelsBuildError, match="d_in=64 .* is 128 wide"):
        build(replace(cfg, sae=narrow), progress=False)
    deep = write_saelens_sae(tmp_path / "deep", 128, "blocks.7.hook_resid_post")
    with pytest.raises(LabelsBuildError, match="layer 7 .* the model has 3 layers"):
        build(replace(cfg, sae=deep), progress=False)


def test_auto_label():
    assert auto_label(["whale", "reef", "ship", "sea"], [" sail", " whale", " wave", " x"]) == \
        "whale, reef, ship → sail, wave"
    assert auto_label(["whale"], []) == "whale"
    assert auto_label([], [" sail"]) == "→ sail"
