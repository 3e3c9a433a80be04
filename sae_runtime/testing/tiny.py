"""Make a tiny Llama model, its tokenizer, and SAEs in the SAELens on-disk format.

Everything is deterministic by seed and needs no network. The model is random, but its
output head is scaled so greedy decoding has clear margins (random init otherwise gives
near-flat logits, where a 1e-6 kernel difference would flip the argmax).
SAE biases are calibrated on the model's own activations so that each feature fires on a
fraction of tokens, like a trained SAE.

    python -m sae_runtime.testing.tiny --out DIR   # DIR/tiny-llama, DIR/saes/<name>
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import torch

log = logging.getLogger(__name__)

MODEL_DIR = "tiny-llama"  # the SAEs' cfg.json records this model name
VOCAB = 512
HIDDEN = 128  # head_dim 64: supported by vLLM's CPU attention backend
LAYERS = 3
WORDS = (
    "the ocean wave ship sail star planet orbit rocket bread oven bake salt music song "
    "guitar drum ball goal team rain cloud storm wind cat dog bird fish code data byte "
    "loop a an and of to in on with under over after before is was will can very quite"
).split()

# name -> (architecture, hook_name, extra cfg)
DEFAULT_SAES: dict[str, tuple[str, str, dict]] = {
    "resid_l1": ("standard", "blocks.1.hook_resid_post", {}),
    "jumprelu_l2pre": ("jumprelu", "blocks.2.hook_resid_pre", {}),
    "topk_l0": ("topk", "blocks.0.hook_resid_post", {"k": 8}),
}


def corpus(n: int = 400, seed: int = 0) -> list[str]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        idx = torch.randint(len(WORDS), (int(torch.randint(5, 15, (1,), generator=g)),), generator=g)
        out.append(" ".join(WORDS[i] for i in idx.tolist()) + ".")
    return out


def make_tokenizer(out: Path, seed: int = 0) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(seed=seed), trainer=trainer)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>",
        "model_max_length": 512, "clean_up_tokenization_spaces": False,
    }, indent=1))


def make_model(out: Path, seed: int = 0, layers: int = LAYERS, head_scale: float = 40.0) -> None:
    """A random fp32 LlamaForCausalLM saved as a Hugging Face directory."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=256,
        num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=2,
        max_position_embeddings=512, rms_norm_eps=1e-5, tie_word_embeddings=False,
        bos_token_id=1, eos_token_id=2, torch_dtype="float32", initializer_range=0.1,
    )
    model = LlamaForCausalLM(cfg).to(torch.float32)
    with torch.no_grad():
        model.lm_head.weight.mul_(head_scale / (HIDDEN ** 0.5 * 0.1))
    model.save_pretrained(out, safe_serialization=True)
    make_tokenizer(out, seed=seed)


FAMILY_CONFIGS = ("llama", "qwen2", "qwen3", "mistral", "gemma2", "gemma3", "gpt2")


def make_family_model(out: Path, family: str, seed: int = 0, layers: int = LAYERS,
                      head_scale: float = 40.0) -> None:
    """A random fp32 model of ``family`` (head_dim 64), saved with the tiny tokenizer.

    Logits are sharpened for clear greedy margins: the output head is scaled, or, where it
    is tied to the input embedding (Gemma), the final norm's gain (Gemma stores 1 + w).
    """
    import transformers as tf

    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, torch_dtype="float32")
    llama_like = dict(hidden_size=HIDDEN, intermediate_size=256, num_hidden_layers=layers,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=False, initializer_range=0.1, **common)
    if family == "llama":
        model = tf.LlamaForCausalLM(tf.LlamaConfig(rms_norm_eps=1e-5, **llama_like))
    elif family == "qwen2":
        model = tf.Qwen2ForCausalLM(tf.Qwen2Config(**llama_like))
    elif family == "qwen3":
        model = tf.Qwen3ForCausalLM(tf.Qwen3Config(head_dim=64, **llama_like))
    elif family == "mistral":
        model = tf.MistralForCausalLM(tf.MistralConfig(sliding_window=None, **llama_like))
    elif family == "gemma2":
        cfg = dict(llama_like, tie_word_embeddings=True, num_key_value_heads=1)
        model = tf.Gemma2ForCausalLM(tf.Gemma2Config(
            head_dim=64, query_pre_attn_scalar=64, sliding_window=256, final_logit_softcapping=None,
            attn_logit_softcapping=None, layer_types=["full_attention"] * layers, **cfg))
    elif family == "gemma3":
        cfg = dict(llama_like, tie_word_embeddings=True, num_key_value_heads=1)
        model = tf.Gemma3ForCausalLM(tf.Gemma3TextConfig(
            head_dim=64, query_pre_attn_scalar=64, sliding_window=256, final_logit_softcapping=None,
            attn_logit_softcapping=None, layer_types=["full_attention"] * layers, **cfg))
    elif family == "gpt2":
        model = tf.GPT2LMHeadModel(tf.GPT2Config(
            n_embd=HIDDEN, n_layer=layers, n_head=2, n_positions=512, tie_word_embeddings=False,
            initializer_range=0.1, **common))
    else:
        raise ValueError(f"unknown family {family!r}; known: {FAMILY_CONFIGS}")
    model = model.to(torch.float32)
    with torch.no_grad():
        head = model.get_output_embeddings().weight
        gain = head_scale / (HIDDEN ** 0.5 * float(head.std()))
        if model.config.tie_word_embeddings:
            norm = model.model.norm.weight  # Gemma RMSNorm scales by (1 + weight)
            norm.copy_((1 + norm) * gain - 1)
            # With a tied head the token's own embedding dominates the logits; louder
            # post-norms let the layers (and so the SAE edits) matter.
            for layer in model.model.layers:
                layer.post_attention_layernorm.weight.fill_(4.0)
                layer.post_feedforward_layernorm.weight.fill_(4.0)
        else:
            head.mul_(gain)
    model.save_pretrained(out, safe_serialization=True)
    make_tokenizer(out, seed=seed)


def site_samples(model_dir: Path, layer: int, site: str, n_seqs: int = 64, seed: int = 0):
    """Activations at (layer, site) on random token sequences: [N, d]."""
    from transformers import AutoModelForCausalLM

    from sae_runtime.testing.hf_sites import site_activations

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (n_seqs, 32), generator=g)
    x = site_activations(model, ids, layer, site)
    return x.reshape(-1, x.shape[-1])


def make_sae(
    out: Path, model_dir: Path, architecture: str, hook_name: str, d_sae: int = 256,
    seed: int = 0, k: int | None = None, density: float = 0.1,
) -> None:
    """A random SAE whose biases make each feature fire on about ``density`` of tokens."""
    from safetensors.torch import save_file

    from sae_runtime.loading import parse_hook_name

    layer, site = parse_hook_name(hook_name, "make_sae")
    x = site_samples(model_dir, layer, site, seed=seed)
    d_in = x.shape[1]
    g = torch.Generator().manual_seed(seed + 1)
    W_dec = torch.randn(d_sae, d_in, generator=g)
    W_dec /= W_dec.norm(dim=1, keepdim=True)
    W_enc = W_dec.t().clone() * (1.0 + 0.1 * torch.randn(d_in, d_sae, generator=g))
    b_dec = x.mean(0) * 0.5
    pre = (x - b_dec) @ W_enc
    b_enc = -torch.quantile(pre, 1 - density, dim=0)
    tensors = {"W_enc": W_enc, "W_dec": W_dec, "b_enc": b_enc, "b_dec": b_dec}
    cfg = {
        "d_in": d_in, "d_sae": d_sae, "dtype": "float32", "device": "cpu",
        "apply_b_dec_to_input": True, "normalize_activations": "none",
        "reshape_activations": "none", "architecture": architecture,
        "metadata": {"hook_name": hook_name, "model_name": model_dir.name},
    }
    if architecture == "jumprelu":
        # Shift the bias up and put the threshold where the old zero was: same density,
        # but the jump matters (activations just above threshold are not near zero).
        scale = float(pre.std())
        tensors["b_enc"] = b_enc + 0.5 * scale
        tensors["threshold"] = (torch.full((d_sae,), 0.5) + 0.1 * torch.rand(d_sae, generator=g)) * scale
    if architecture == "topk":
        cfg["k"] = k or 8
        cfg["rescale_acts_by_decoder_norm"] = False
    out.mkdir(parents=True, exist_ok=True)
    save_file({n: t.contiguous() for n, t in tensors.items()}, str(out / "sae_weights.safetensors"))
    (out / "cfg.json").write_text(json.dumps(cfg, indent=1))


def make_transcoder(
    out: Path, model_dir: Path, layer: int, architecture: str = "jumprelu_transcoder",
    fmt: str = "saelens", d_sae: int = 256, seed: int = 0, density: float = 0.1,
) -> Path:
    """A random MLP transcoder of block ``layer`` calibrated on the model's MLP inputs.

    ``fmt``: ``saelens`` writes ``out/cfg.json + sae_weights.safetensors`` (SAELens 6
    transcoder classes: ``transcoder``, ``skip_transcoder``, ``jumprelu_transcoder``,
    ``jumprelu_skip_transcoder``); ``gemma_scope_2`` writes Gemma Scope 2's layout,
    ``out/transcoder/layer_L_width_N_l0_small[_affine]/params.safetensors + config.json``
    (``affine_skip_connection`` when the architecture has ``skip``). Returns the folder.
    """
    from safetensors.torch import save_file

    x = site_samples(model_dir, layer, "mlp_in", seed=seed)
    y = site_samples(model_dir, layer, "mlp_out", seed=seed)
    d = x.shape[1]
    g = torch.Generator().manual_seed(seed + 7)
    W_enc = torch.randn(d, d_sae, generator=g) / d ** 0.5
    W_dec = torch.randn(d_sae, d, generator=g)
    W_dec *= float(y.norm(dim=1).mean()) / W_dec.norm(dim=1, keepdim=True)
    pre = x @ W_enc
    b_enc = -torch.quantile(pre, 1 - density, dim=0)
    b_dec = y.mean(0)
    jump = architecture.startswith("jumprelu")
    skip = "skip" in architecture
    threshold = None
    if jump:  # same density, but the jump matters (as make_sae does)
        scale = float(pre.std())
        b_enc = b_enc + 0.5 * scale
        threshold = (torch.full((d_sae,), 0.5) + 0.1 * torch.rand(d_sae, generator=g)) * scale
    W_skip = 0.05 * torch.randn(d, d, generator=g) if skip else None  # [d_out, d_in]
    if fmt == "saelens":
        tensors = {"W_enc": W_enc, "W_dec": W_dec, "b_enc": b_enc, "b_dec": b_dec}
        if threshold is not None:
            tensors["threshold"] = threshold
        if W_skip is not None:
            tensors["W_skip"] = W_skip
        cfg = {
            "architecture": architecture, "d_in": d, "d_out": d, "d_sae": d_sae,
            "dtype": "float32", "device": "cpu", "apply_b_dec_to_input": False,
            "normalize_activations": "none", "reshape_activations": "none",
            "metadata": {"hook_name": f"blocks.{layer}.ln2.hook_normalized",
                         "hook_name_out": f"blocks.{layer}.hook_mlp_out",
                         "model_name": model_dir.name, "sae_lens_version": "6.54.12"},
        }
        folder = out
        folder.mkdir(parents=True, exist_ok=True)
        save_file({n: t.contiguous() for n, t in tensors.items()}, str(folder / "sae_weights.safetensors"))
        (folder / "cfg.json").write_text(json.dumps(cfg, indent=1))
        return folder
    if fmt != "gemma_scope_2" or not jump:
        raise ValueError(f"unknown transcoder format {fmt!r} for {architecture!r}")
    folder = out / "transcoder" / f"layer_{layer}_width_{d_sae}_l0_small{'_affine' if skip else ''}"
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {"w_enc": W_enc, "w_dec": W_dec, "b_enc": b_enc, "b_dec": b_dec, "threshold": threshold}
    if W_skip is not None:
        tensors["affine_skip_connection"] = W_skip.t()  # stored [d_in, d_out]
    save_file({n: t.contiguous() for n, t in tensors.items()}, str(folder / "params.safetensors"))
    (folder / "config.json").write_text(json.dumps({
        "architecture": "jump_relu", "model_name": model_dir.name,
        "hf_hook_point_in": f"model.layers.{layer}.pre_feedforward_layernorm.output",
        "hf_hook_point_out": f"model.layers.{layer}.post_feedforward_layernorm.output",
        "affine_connection": skip,
    }, indent=1))
    return folder


def make_all(out: Path, seed: int = 0) -> None:
    """Model under out/tiny-llama and every DEFAULT_SAES entry under out/saes/<name>."""
    marker = out / ".complete"
    if marker.exists():
        log.info("tiny artifacts already in %s", out)
        return
    make_model(out / MODEL_DIR, seed=seed)
    for name, (arch, hook, extra) in DEFAULT_SAES.items():
        make_sae(out / "saes" / name, out / MODEL_DIR, arch, hook, seed=seed, **extra)
    marker.write_text("ok\n")


# Sites each family test hooks: name -> (architecture, hook_name, extra cfg)
FAMILY_SAES: dict[str, tuple[str, str, dict]] = {
    "resid": ("standard", "blocks.1.hook_resid_post", {}),
    "attn": ("jumprelu", "blocks.1.hook_attn_out", {}),
    "mlp": ("topk", "blocks.0.hook_mlp_out", {"k": 8}),
    "z": ("standard", "blocks.2.attn.hook_z", {}),
    # a transcoder on block 0's MLP, beside the mlp_out SAE there (FAMILY_TRANSCODERS: which
    # transcoder class and format each family gets)
    "tc": ("transcoder", "blocks.0.ln2.hook_normalized", {}),
}
FAMILY_TRANSCODERS: dict[str, tuple[str, str]] = {
    "llama": ("jumprelu_transcoder", "saelens"), "qwen2": ("transcoder", "saelens"),
    "qwen3": ("skip_transcoder", "saelens"), "mistral": ("jumprelu_skip_transcoder", "saelens"),
    "gemma2": ("jumprelu_transcoder", "saelens"),
    "gemma3": ("jumprelu_skip_transcoder", "gemma_scope_2"), "gpt2": ("transcoder", "saelens"),
}


def make_family_set(out: Path, family: str, seed: int = 0) -> Path:
    """out/<family> model plus out/saes/<site name> SAEs at every supported site (a Gemma
    Scope 2 transcoder lives in its own folder layout; out/saes/tc links to it)."""
    from sae_runtime.loading import is_transcoder_input

    model = out / family
    make_family_model(model, family, seed=seed)
    for name, (arch, hook, extra) in FAMILY_SAES.items():
        if not is_transcoder_input(hook):
            make_sae(out / "saes" / name, model, arch, hook, seed=seed, **extra)
            continue
        arch, fmt = FAMILY_TRANSCODERS[family]
        layer = int(hook.split(".")[1])
        if fmt == "saelens":
            make_transcoder(out / "saes" / name, model, layer, arch, seed=seed)
        else:
            folder = make_transcoder(out / "gemma-scope-2", model, layer, arch, fmt, seed=seed)
            (out / "saes" / name).symlink_to(folder, target_is_directory=True)
    return model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="output directory")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO)
    make_all(args.out, seed=args.seed)
    print(f"tiny model and SAEs ready in {args.out}")


if __name__ == "__main__":
    main()
