"""Train a TopK SAE on one residual-stream site and save it in the SAELens on-disk format.

The math is SAELens' ``topk`` architecture exactly (``sae_lens/saes/topk_sae.py``):

    pre  = (x - b_dec) @ W_enc + b_enc          # [N, d_sae]
    f    = relu(topk(pre, k))                   # k largest kept, the rest 0
    x^   = f @ W_dec + b_dec

Training follows Gao et al. (2024) / EleutherAI sparsify: decoder rows kept unit-norm,
encoder initialised as the decoder's transpose, ``b_dec`` at the data mean, and an AuxK loss
(reconstruct the residual error with the top ``k_aux`` *dead* features) so that few features
die. Adam, constant LR with a linear decay over the last 20% of steps.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SAETrainConfig:
    d_sae: int = 1024
    k: int = 16
    steps: int = 2000
    batch: int = 4096
    lr: float = 1e-3
    dead_after_tokens: int = 2_000_000
    """A feature that has not fired for this many training tokens counts as dead for AuxK."""
    aux_k: int = 128
    aux_coef: float = 1 / 32


def encode(params: dict[str, torch.Tensor], x: torch.Tensor, k: int):
    pre = (x - params["b_dec"]) @ params["W_enc"] + params["b_enc"]
    vals, idx = pre.topk(k, dim=-1)
    return pre, vals.relu(), idx


def decode(params: dict[str, torch.Tensor], vals: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    # embedding-bag style: sum of k decoder rows weighted by their activations
    return torch.nn.functional.embedding_bag(idx, params["W_dec"], per_sample_weights=vals,
                                             mode="sum") + params["b_dec"]


def train_sae(acts: torch.Tensor, cfg: SAETrainConfig, seed: int) -> tuple[dict, dict]:
    """Train on ``acts [N, d_in]`` (fp32). Returns (fp32 parameters, training stats)."""
    g = torch.Generator().manual_seed(seed)
    n, d_in = acts.shape
    W_dec = torch.randn(cfg.d_sae, d_in, generator=g)
    W_dec /= W_dec.norm(dim=1, keepdim=True)
    params = {
        "W_enc": W_dec.t().clone().requires_grad_(),
        "W_dec": W_dec.clone().requires_grad_(),
        "b_enc": torch.zeros(cfg.d_sae, requires_grad=True),
        "b_dec": acts[:100_000].mean(0).clone().requires_grad_(),
    }
    opt = torch.optim.Adam(params.values(), lr=cfg.lr, betas=(0.9, 0.999))
    var = acts[:100_000].var(0).sum()
    since_fired = torch.zeros(cfg.d_sae, dtype=torch.int64)
    t0 = time.time()
    for step in range(cfg.steps):
        lr = cfg.lr * min(1.0, (cfg.steps - step) / (0.2 * cfg.steps))
        for group in opt.param_groups:
            group["lr"] = lr
        x = acts[torch.randint(0, n, (cfg.batch,), generator=g)]
        pre, vals, idx = encode(params, x, cfg.k)
        recon = decode(params, vals, idx)
        err = x - recon
        loss = err.pow(2).sum(-1).mean() / var
        fired = torch.zeros(cfg.d_sae, dtype=torch.bool)
        fired[idx[vals > 0]] = True
        since_fired += cfg.batch
        since_fired[fired] = 0
        dead = since_fired > cfg.dead_after_tokens
        aux = torch.zeros(())
        if dead.any():
            k_aux = min(cfg.aux_k, int(dead.sum()))
            dead_pre = pre.masked_fill(~dead, float("-inf"))
            a_vals, a_idx = dead_pre.topk(k_aux, dim=-1)
            a_recon = torch.nn.functional.embedding_bag(
                a_idx, params["W_dec"], per_sample_weights=a_vals.relu(), mode="sum")
            aux = (err.detach() - a_recon).pow(2).sum(-1).mean() / var
        total = loss + cfg.aux_coef * aux
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()
        with torch.no_grad():
            params["W_dec"] /= params["W_dec"].norm(dim=1, keepdim=True)
        if step % 250 == 0 or step == cfg.steps - 1:
            log.info("sae step %d/%d fvu %.4f aux %.4f dead %d (%.0fs)", step, cfg.steps,
                     loss.item(), aux.item(), int(dead.sum()), time.time() - t0)
    out = {name: p.detach().clone() for name, p in params.items()}
    return out, {"train_seconds": round(time.time() - t0, 1), "final_train_fvu": round(loss.item(), 4)}


@torch.no_grad()
def evaluate(params: dict[str, torch.Tensor], acts: torch.Tensor, k: int) -> dict:
    """FVU, mean L0 and the fraction of features that never fire on ``acts``."""
    fired = torch.zeros(params["W_enc"].shape[1], dtype=torch.bool)
    se = l0 = 0.0
    for chunk in acts.split(16384):
        _, vals, idx = encode(params, chunk, k)
        recon = decode(params, vals, idx)
        se += float((chunk - recon).pow(2).sum())
        l0 += float((vals > 0).sum())
        fired[idx[vals > 0]] = True
    total = float((acts - acts.mean(0)).pow(2).sum())
    return {"fvu": round(se / total, 4), "l0": round(l0 / acts.shape[0], 2),
            "dead_fraction": round(1 - float(fired.float().mean()), 4)}


def save_saelens(params: dict[str, torch.Tensor], out: Path, *, k: int, hook_name: str,
                 model_name: str, dtype: torch.dtype = torch.float32, extra: dict | None = None) -> None:
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    save_file({n: params[n].to(dtype).contiguous() for n in ("W_enc", "W_dec", "b_enc", "b_dec")},
              str(out / "sae_weights.safetensors"))
    d_in, d_sae = params["W_enc"].shape
    cfg = {
        "architecture": "topk", "d_in": d_in, "d_sae": d_sae, "k": k,
        "dtype": str(dtype).removeprefix("torch."), "device": "cpu",
        "apply_b_dec_to_input": True, "normalize_activations": "none",
        "rescale_acts_by_decoder_norm": False, "reshape_activations": "none",
        "metadata": {"hook_name": hook_name, "model_name": model_name, **(extra or {})},
    }
    (out / "cfg.json").write_text(json.dumps(cfg, indent=1))
