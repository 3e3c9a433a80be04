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


def residual_samples(model_dir: Path, hook_layer_out: int, n_seqs: int = 64, seed: int = 0):
    """Residual stream after block ``hook_layer_out`` on random token sequences: [N, d]."""
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (n_seqs, 32), generator=g)
    with torch.no_grad():
        hs = model(ids, output_hidden_states=True).hidden_states
    # hidden_states[0] is the embedding output, hidden_states[L+1] the output of block L
    return hs[hook_layer_out + 1].reshape(-1, HIDDEN)


def make_sae(
    out: Path, model_dir: Path, architecture: str, hook_name: str, d_sae: int = 256,
    seed: int = 0, k: int | None = None, density: float = 0.1,
) -> None:
    """A random SAE whose biases make each feature fire on about ``density`` of tokens."""
    from safetensors.torch import save_file

    from sae_runtime.loading import parse_hook_name

    layer, site = parse_hook_name(hook_name, "make_sae")
    block_out = layer if site == "resid_post" else layer - 1
    x = residual_samples(model_dir, block_out, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    W_dec = torch.randn(d_sae, HIDDEN, generator=g)
    W_dec /= W_dec.norm(dim=1, keepdim=True)
    W_enc = W_dec.t().clone() * (1.0 + 0.1 * torch.randn(HIDDEN, d_sae, generator=g))
    b_dec = x.mean(0) * 0.5
    pre = (x - b_dec) @ W_enc
    b_enc = -torch.quantile(pre, 1 - density, dim=0)
    tensors = {"W_enc": W_enc, "W_dec": W_dec, "b_enc": b_enc, "b_dec": b_dec}
    cfg = {
        "d_in": HIDDEN, "d_sae": d_sae, "dtype": "float32", "device": "cpu",
        "apply_b_dec_to_input": True, "normalize_activations": "none",
        "reshape_activations": "none", "architecture": architecture,
        "metadata": {"hook_name": hook_name, "model_name": "tiny-llama"},
    }
    if architecture == "jumprelu":
        # Shift the bias up and put the threshold where the old zero was: same density,
        # but the jump matters (activations just above threshold are not near zero).
        tensors["b_enc"] = b_enc + 0.5
        tensors["threshold"] = torch.full((d_sae,), 0.5) + 0.1 * torch.rand(d_sae, generator=g)
    if architecture == "topk":
        cfg["k"] = k or 8
        cfg["rescale_acts_by_decoder_norm"] = False
    out.mkdir(parents=True, exist_ok=True)
    save_file({n: t.contiguous() for n, t in tensors.items()}, str(out / "sae_weights.safetensors"))
    (out / "cfg.json").write_text(json.dumps(cfg, indent=1))


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
