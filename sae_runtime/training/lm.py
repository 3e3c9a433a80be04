"""Tokenizer and language model for the embedded default, trained on the synthetic corpus.

The model is a small ``LlamaForCausalLM`` (head_dim 64, which vLLM's CPU attention backend
supports), trained with plain PyTorch (AdamW, cosine schedule) on packed 128-token windows.
Matmuls run under bf16 autocast on CPU (about 3x faster than fp32 here); weights stay fp32
during training and are saved in bf16, a normal Hugging Face directory vLLM loads.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)

BOS, EOS, UNK = "<s>", "</s>", "<unk>"


@dataclass(frozen=True)
class LMConfig:
    vocab: int = 2048
    """BPE vocabulary size (the corpus has about 700 distinct words)."""
    hidden: int = 256
    """Residual width; 4 heads of 64."""
    layers: int = 4
    intermediate: int = 768
    seq_len: int = 128
    batch: int = 32
    steps: int = 600
    lr: float = 3e-3
    warmup: int = 40
    weight_decay: float = 0.05


def train_tokenizer(texts: list[str], out: Path, vocab: int) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab, special_tokens=[UNK, BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    # Prompts get a BOS, as every training document starts with one.
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, tok.token_to_id(BOS))])
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "unk_token": UNK, "bos_token": BOS,
        "eos_token": EOS, "model_max_length": 512, "clean_up_tokenization_spaces": False,
    }, indent=1))


def load_tokenizer(model_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir))


def pack(texts: list[str], tokenizer) -> torch.Tensor:
    """Every document as BOS + tokens + EOS, concatenated into one 1-D stream."""
    eos = tokenizer.convert_tokens_to_ids(EOS)
    ids: list[int] = []
    for enc in tokenizer(texts, add_special_tokens=True)["input_ids"]:
        ids.extend(enc)
        ids.append(eos)
    return torch.tensor(ids, dtype=torch.int64)


def build_model(cfg: LMConfig, tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    hf = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=cfg.hidden, intermediate_size=cfg.intermediate,
        num_hidden_layers=cfg.layers, num_attention_heads=cfg.hidden // 64,
        num_key_value_heads=cfg.hidden // 64, max_position_embeddings=512, rms_norm_eps=1e-5,
        tie_word_embeddings=True, bos_token_id=tokenizer.convert_tokens_to_ids(BOS),
        eos_token_id=tokenizer.convert_tokens_to_ids(EOS), initializer_range=0.02,
    )
    return LlamaForCausalLM(hf)


def windows(stream: torch.Tensor, seq_len: int, batch: int, g: torch.Generator) -> torch.Tensor:
    starts = torch.randint(0, stream.numel() - seq_len - 1, (batch,), generator=g)
    return torch.stack([stream[s:s + seq_len + 1] for s in starts.tolist()])  # [B, L+1]


def train_lm(cfg: LMConfig, stream: torch.Tensor, tokenizer, out: Path, seed: int,
             held_out: torch.Tensor) -> dict:
    torch.manual_seed(seed)
    model = build_model(cfg, tokenizer)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr,
                            betas=(0.9, 0.95))
    g = torch.Generator().manual_seed(seed)
    model.train()
    t0 = time.time()
    for step in range(cfg.steps):
        lr = cfg.lr * min(1.0, (step + 1) / cfg.warmup) * (
            0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / cfg.steps)))
        for group in opt.param_groups:
            group["lr"] = lr
        batch = windows(stream, cfg.seq_len, cfg.batch, g)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(input_ids=batch[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 100 == 0 or step == cfg.steps - 1:
            log.info("lm step %d/%d loss %.3f lr %.2e (%.0fs)", step, cfg.steps, loss.item(), lr,
                     time.time() - t0)
    model.eval()
    model = model.to(torch.bfloat16)
    model.config.torch_dtype = "bfloat16"
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    held = heldout_loss(model, held_out, cfg.seq_len)
    return {"train_seconds": round(time.time() - t0, 1), "final_train_loss": round(loss.item(), 4),
            "heldout_loss": round(held, 4), "parameters": sum(p.numel() for p in model.parameters())}


@torch.no_grad()
def heldout_loss(model, stream: torch.Tensor, seq_len: int, max_windows: int = 64) -> float:
    n = min(max_windows, (stream.numel() - 1) // seq_len)
    x = stream[: n * seq_len + 1]
    inp = x[:-1].view(n, seq_len)
    tgt = x[1:].view(n, seq_len)
    logits = model(input_ids=inp).logits.float()
    return float(torch.nn.functional.cross_entropy(logits.flatten(0, 1), tgt.flatten()))
