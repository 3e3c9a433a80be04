"""Train a ReLU MLP transcoder for the embedded default model and save it in SAELens 6 format.

    python -m sae_runtime.training.transcoder_train --out server/embedded --layer 1 --seed 0 --threads 1

A transcoder reads the MLP's *input* of decoder layer ``L`` (HF: the input of
``model.layers[L].mlp``, the output of ``post_attention_layernorm`` with its weight;
circuit-tracer and SAELens' mwhanna loader: ``blocks.L.mlp.hook_in``, which SAELens reads
with ``fold_ln: false``; TransformerLens' ``ln2.hook_normalized`` would be the same without
the norm's weight) and predicts the MLP's *output* (``blocks.L.hook_mlp_out``).
The math is SAELens' ``transcoder`` architecture (``sae_lens/saes/transcoder.py``):

    f  = relu(x_in @ W_enc + b_enc)             # [N, d_sae]; no b_dec subtraction on the input
    y^ = f @ W_dec + b_dec                      # [N, d_out]

Training (Dunefsky et al. 2024 / Anthropic's April 2024 SAE recipe): MSE of ``y^`` normalised
by the variance of ``y`` plus an L1 penalty on ``f_i * ||W_dec[i]||`` (normalised by the RMS
norm of the centred target, so the coefficient is dimensionless) warmed up over the first 5%
of steps; Adam; linear LR decay over the last 20% of steps; dead features (no firing for
``dead_after_tokens``) resampled onto high-error inputs a few times. At the end decoder norms
are folded into the encoder, so every ``W_dec`` row has unit norm and feature activations are
comparable across features (a clamp value is a length along a unit direction).

Writes ``OUT/saes/topics_tc{L}/`` (``cfg.json``, ``sae_weights.safetensors``,
``feature_labels.json`` from ``sae_runtime.training.labels``) and ``OUT/transcoder_report.json``.
Data come from the same corpus generator as ``sae_runtime.training.train`` (its SAE data seed
``seed + 2``, held-out seed ``seed + 1``, labelling seed ``seed + 3``).
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace

import torch

from sae_runtime.training import corpus, labels, lm

log = logging.getLogger("sae_runtime.training.transcoder_train")

SAE_LENS_VERSION = "6.54.12"


@dataclass(frozen=True)
class TCConfig:
    d_sae: int = 1024
    train_docs: int = 4000
    """Documents of the training corpus (~290k non-BOS tokens)."""
    heldout_docs: int = 500
    label_docs: int = 2000
    steps: int = 2000
    batch: int = 2048
    lr: float = 1e-3
    l1: float = 0.8
    """L1 coefficient on sum_i f_i ||W_dec[i]|| / RMS(||y - mean y||)."""
    l1_warmup: float = 0.05
    dead_after_tokens: int = 1_000_000
    resample_at: tuple[int, ...] = (500, 1000, 1500)


def sae_name(layer: int) -> str:
    return f"topics_tc{layer}"


# ---------------------------------------------------------------- activations at the MLP

@torch.no_grad()
def mlp_io(model, batch_ids: list[list[int]], layer: int, edit=None):
    """(mlp_in, mlp_out, logits) per sequence of ``batch_ids`` (right-padded batch).

    ``edit(mlp_in, mlp_out) -> new mlp_out`` (optional) replaces the MLP's output in the
    forward pass (the returned ``mlp_out`` is the clean one).
    """
    inp, mask = labels.pad_batch(batch_ids)
    got = {}

    def hook(_mod, args, output):
        got["in"], got["out"] = args[0].float(), output.float()
        if edit is not None:
            return edit(got["in"], got["out"]).to(output.dtype)
        return None

    handle = model.model.layers[layer].mlp.register_forward_hook(hook)
    try:
        logits = model(input_ids=inp, attention_mask=mask).logits
    finally:
        handle.remove()
    return ([got["in"][r, : len(ids)] for r, ids in enumerate(batch_ids)],
            [got["out"][r, : len(ids)] for r, ids in enumerate(batch_ids)],
            logits)


@torch.no_grad()
def collect(model, tokenizer, docs, layer: int, batch: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """(mlp_in [N, d], mlp_out [N, d]) for every non-BOS token of ``docs``."""
    data = labels.tokenize_labelled(docs, tokenizer)
    xs, ys = [], []
    for start in range(0, len(data), batch):
        chunk = data[start:start + batch]
        ins, outs, _ = mlp_io(model, [ids for ids, _ in chunk], layer)
        for (_, cats), x, y in zip(chunk, ins, outs, strict=True):
            keep = torch.tensor(cats) >= 0
            xs.append(x[keep])
            ys.append(y[keep])
    return torch.cat(xs), torch.cat(ys)


class MLPInputSite:
    """Adapter for ``labels.label_features``: a model whose ``hidden_states[layer + 1]`` is the
    input of ``layers[layer].mlp`` (``blocks.L.mlp.hook_in``) instead of the residual."""

    def __init__(self, model, layer: int):
        self.model, self.layer = model, layer

    def __call__(self, input_ids, attention_mask, output_hidden_states=True):
        got = {}

        def hook(_mod, args, _output):
            got["in"] = args[0]

        handle = self.model.model.layers[self.layer].mlp.register_forward_hook(hook)
        try:
            self.model(input_ids=input_ids, attention_mask=attention_mask)
        finally:
            handle.remove()
        return SimpleNamespace(hidden_states=[None] * (self.layer + 1) + [got["in"]])


# ---------------------------------------------------------------- the transcoder

def encode(params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    return torch.relu(x @ params["W_enc"] + params["b_enc"])


def decode(params: dict[str, torch.Tensor], f: torch.Tensor) -> torch.Tensor:
    return f @ params["W_dec"] + params["b_dec"]


def train_transcoder(x_all: torch.Tensor, y_all: torch.Tensor, cfg: TCConfig, seed: int) -> tuple[dict, dict]:
    """Train on ``x_all [N, d_in] -> y_all [N, d_out]`` (fp32). Returns (params, stats)."""
    g = torch.Generator().manual_seed(seed)
    n, d_in = x_all.shape
    d_out = y_all.shape[1]
    W_dec = torch.randn(cfg.d_sae, d_out, generator=g)
    W_dec *= 0.1 / W_dec.norm(dim=1, keepdim=True)
    x_rms = float(x_all[:100_000].norm(dim=1).pow(2).mean().sqrt())
    W_enc = torch.randn(d_in, cfg.d_sae, generator=g)
    W_enc /= W_enc.norm(dim=0, keepdim=True) * x_rms  # unit-norm directions, pre ~ N(0, 1/d)
    params = {
        "W_enc": W_enc.requires_grad_(),
        "W_dec": W_dec.requires_grad_(),
        "b_enc": torch.zeros(cfg.d_sae, requires_grad=True),
        "b_dec": y_all[:100_000].mean(0).clone().requires_grad_(),
    }
    opt = torch.optim.Adam(params.values(), lr=cfg.lr, betas=(0.9, 0.999))
    var = float(y_all[:100_000].var(0).sum())
    y_scale = var ** 0.5
    since_fired = torch.zeros(cfg.d_sae, dtype=torch.int64)
    resampled = 0
    t0 = time.time()
    for step in range(cfg.steps):
        lr = cfg.lr * min(1.0, (cfg.steps - step) / (0.2 * cfg.steps))
        for group in opt.param_groups:
            group["lr"] = lr
        l1 = cfg.l1 * min(1.0, step / max(1.0, cfg.l1_warmup * cfg.steps))
        i = torch.randint(0, n, (cfg.batch,), generator=g)
        x, y = x_all[i], y_all[i]
        f = encode(params, x)
        err = y - decode(params, f)
        mse = err.pow(2).sum(-1).mean() / var
        sparsity = (f * params["W_dec"].norm(dim=1)).sum(-1).mean() / y_scale
        loss = mse + l1 * sparsity
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            since_fired += cfg.batch
            since_fired[(f > 0).any(0)] = 0
            if step in cfg.resample_at:
                resampled += _resample(params, opt, since_fired > cfg.dead_after_tokens,
                                       x, err.detach(), x_rms, g)
                since_fired[since_fired > cfg.dead_after_tokens] = 0
        if step % 250 == 0 or step == cfg.steps - 1:
            log.info("tc step %d/%d fvu %.4f l0 %.1f l1 %.4f dead %d (%.0fs)", step, cfg.steps,
                     mse.item(), float((f > 0).float().sum(-1).mean()), sparsity.item(),
                     int((since_fired > cfg.dead_after_tokens).sum()), time.time() - t0)
    out = {name: p.detach().clone() for name, p in params.items()}
    # Fold decoder norms into the encoder: same y^, unit-norm decoder rows.
    norms = out["W_dec"].norm(dim=1).clamp(min=1e-8)
    out["W_enc"] *= norms
    out["b_enc"] *= norms
    out["W_dec"] /= norms[:, None]
    return out, {"train_seconds": round(time.time() - t0, 1), "final_train_fvu": round(mse.item(), 4),
                 "resampled": resampled}


def _resample(params, opt, dead: torch.Tensor, x: torch.Tensor, err: torch.Tensor, x_rms: float,
              g: torch.Generator) -> int:
    """Point dead features at high-error inputs of the batch (Anthropic, 2023), small scale."""
    idx = dead.nonzero()[:, 0]
    if idx.numel() == 0:
        return 0
    p = err.pow(2).sum(-1)
    pick = torch.multinomial(p / p.sum(), idx.numel(), replacement=True, generator=g)
    xs, es = x[pick], err[pick]
    live = ~dead
    enc_norm = float(params["W_enc"][:, live].norm(dim=0).mean()) if live.any() else 1 / x_rms
    params["W_enc"][:, idx] = (xs / xs.norm(dim=1, keepdim=True)).t() * enc_norm * 0.2
    params["b_enc"][idx] = 0.0
    params["W_dec"][idx] = es / es.norm(dim=1, keepdim=True) * 0.1
    for name in ("W_enc", "b_enc", "W_dec"):  # reset Adam moments of the resampled entries
        st = opt.state[params[name]]
        for key in ("exp_avg", "exp_avg_sq"):
            if name == "W_enc":
                st[key][:, idx] = 0.0
            else:
                st[key][idx] = 0.0
    log.info("resampled %d dead features", idx.numel())
    return int(idx.numel())


@torch.no_grad()
def evaluate(params: dict[str, torch.Tensor], x_all: torch.Tensor, y_all: torch.Tensor) -> dict:
    """FVU of the MLP output, mean L0 and the fraction of features that never fire."""
    fired = torch.zeros(params["W_enc"].shape[1], dtype=torch.bool)
    se = l0 = 0.0
    for x, y in zip(x_all.split(16384), y_all.split(16384), strict=True):
        f = encode(params, x)
        se += float((y - decode(params, f)).pow(2).sum())
        l0 += float((f > 0).sum())
        fired |= (f > 0).any(0)
    total = float((y_all - y_all.mean(0)).pow(2).sum())
    return {"fvu": round(se / total, 4), "l0": round(l0 / x_all.shape[0], 2),
            "dead_fraction": round(1 - float(fired.float().mean()), 4)}


@torch.no_grad()
def spliced_loss(model, stream: torch.Tensor, seq_len: int, layer: int, params, bos_id: int,
                 max_windows: int = 64) -> dict:
    """Next-token loss clean vs with the MLP's output replaced by the transcoder's prediction
    (BOS positions kept clean, as ``train.spliced_loss`` does)."""
    n = min(max_windows, (stream.numel() - 1) // seq_len)
    x = stream[: n * seq_len + 1]
    inp, tgt = x[:-1].view(n, seq_len), x[1:].view(n, seq_len)
    keep = inp != bos_id

    def hook(_mod, args, output):
        pred = decode(params, encode(params, args[0].float()))
        return torch.where(keep[..., None], pred.to(output.dtype), output)

    def loss() -> float:
        logits = model(input_ids=inp).logits.float()
        return float(torch.nn.functional.cross_entropy(logits.flatten(0, 1), tgt.flatten()))

    clean = loss()
    handle = model.model.layers[layer].mlp.register_forward_hook(hook)
    try:
        spliced = loss()
    finally:
        handle.remove()
    # zero-ablation reference: how much the MLP matters at all
    handle = model.model.layers[layer].mlp.register_forward_hook(
        lambda _m, _a, o: torch.where(keep[..., None], torch.zeros_like(o), o))
    try:
        ablated = loss()
    finally:
        handle.remove()
    return {"clean_loss": round(clean, 4), "spliced_loss": round(spliced, 4),
            "loss_increase": round(spliced - clean, 4), "mlp_zero_ablation_loss": round(ablated, 4)}


def save_saelens(params: dict[str, torch.Tensor], out: Path, *, layer: int, model_name: str,
                 extra: dict | None = None) -> None:
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    save_file({n: params[n].float().contiguous() for n in ("W_enc", "W_dec", "b_enc", "b_dec")},
              str(out / "sae_weights.safetensors"))
    d_in, d_sae = params["W_enc"].shape
    cfg = {
        "architecture": "transcoder", "d_in": d_in, "d_out": params["W_dec"].shape[1],
        "d_sae": d_sae, "dtype": "float32", "device": "cpu", "apply_b_dec_to_input": False,
        "normalize_activations": "none", "reshape_activations": "none",
        "metadata": {"hook_name": f"blocks.{layer}.mlp.hook_in",
                     "hook_name_out": f"blocks.{layer}.hook_mlp_out", "model_name": model_name,
                     "model_from_pretrained_kwargs": {"fold_ln": False},
                     "sae_lens_version": SAE_LENS_VERSION, **(extra or {})},
    }
    (out / "cfg.json").write_text(json.dumps(cfg, indent=1))


def label(model, tokenizer, params, docs, layer: int) -> dict:
    """``labels.label_features`` on the transcoder latents of the MLP input."""
    d_sae = params["W_enc"].shape[1]
    ar = torch.arange(d_sae)

    def encode_fn(x):  # dense codes as (values, indices); labels keeps the values > 0
        f = encode(params, x)
        return f, ar.expand_as(f)

    return labels.label_features(MLPInputSite(model, layer), tokenizer, encode_fn, docs, layer,
                                 d_sae, sae_name(layer))


def best_per_topic(lab: dict) -> dict:
    """Per topic, the labelled feature of that topic with the highest score."""
    out = {}
    for topic in corpus.TOPICS:
        cands = [f for f in lab["features"] if f["topic"] == topic and f["label"].startswith(topic)]
        if not cands:
            out[topic] = None
            continue
        f = max(cands, key=lambda f: f["score"])
        out[topic] = {"index": f["index"], "label": f["label"], "score": f["score"],
                      "selectivity": f["topic_selectivity"], "coverage": f["topic_coverage"],
                      "n_topic_features": len(cands)}
    return out


def cpu_model() -> str:
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return platform.processor() or platform.machine()


def run(out: Path, layer: int, seed: int, cfg: TCConfig) -> dict:
    from transformers import AutoModelForCausalLM

    t0 = time.time()
    timings = {}
    model_dir = out / "model"
    # activations of the model as saved (bf16 weights), computed in fp32, as train.py does
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    tokenizer = lm.load_tokenizer(model_dir)
    held_docs = list(corpus.documents(cfg.heldout_docs, seed + 1))
    x, y = collect(model, tokenizer, list(corpus.documents(cfg.train_docs, seed + 2)), layer)
    ex, ey = collect(model, tokenizer, held_docs, layer)
    timings["collect_s"] = round(time.time() - t0, 1)
    log.info("transcoder data: %d tokens x %d -> %d", x.shape[0], x.shape[1], y.shape[1])
    params, stats = train_transcoder(x, y, cfg, seed)
    timings["train_s"] = stats["train_seconds"]
    quality = evaluate(params, ex, ey)
    held = lm.pack([t for t, _ in held_docs], tokenizer)
    quality.update(spliced_loss(model, held, lm.LMConfig().seq_len, layer, params,
                                tokenizer.bos_token_id))
    log.info("transcoder quality: %s", quality)
    name = sae_name(layer)
    sae_dir = out / "saes" / name
    save_saelens(params, sae_dir, layer=layer, model_name=model_dir.name,
                 extra={"trained_by": "sae_runtime.training.transcoder_train", "seed": seed})
    t1 = time.time()
    lab = label(model, tokenizer, params, list(corpus.documents(cfg.label_docs, seed + 3)), layer)
    labels.write(lab, sae_dir)
    timings["labels_s"] = round(time.time() - t1, 1)
    timings["total_s"] = round(time.time() - t0, 1)
    best = best_per_topic(lab)
    report = {
        "command": (f"python -m sae_runtime.training.transcoder_train --out {out} --layer {layer}"
                    f" --seed {seed} --threads {torch.get_num_threads()}"),
        "seed": seed, "machine": f"{cpu_model()}, {torch.get_num_threads()} threads",
        "torch": torch.__version__,
        "transcoder": {"name": name, "hook_name": f"blocks.{layer}.mlp.hook_in",
                       "hook_name_out": f"blocks.{layer}.hook_mlp_out", "layer": layer,
                       "train_tokens": x.shape[0], "eval_tokens": ex.shape[0],
                       **asdict(cfg), **stats, **quality,
                       "live_features": len(lab["features"]),
                       "dead_features": len(lab["dead_features"])},
        "best_feature_per_topic": best,
        "mean_best_topic_score": round(sum(b["score"] for b in best.values() if b) / len(best), 4),
        "timings": timings,
    }
    (out / "transcoder_report.json").write_text(json.dumps(report, indent=1))
    return report


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="directory holding model/ (e.g. server/embedded)")
    ap.add_argument("--layer", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--l1", type=float, default=TCConfig.l1)
    ap.add_argument("--steps", type=int, default=TCConfig.steps)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    cfg = TCConfig(l1=args.l1, steps=args.steps)
    report = run(args.out, args.layer, args.seed, cfg)
    tc = report["transcoder"]
    print(json.dumps({k: tc[k] for k in ("fvu", "l0", "dead_fraction", "clean_loss", "spliced_loss",
                                         "loss_increase", "live_features", "train_seconds")}
                     | {"mean_best_topic_score": report["mean_best_topic_score"]}, indent=1))


if __name__ == "__main__":
    main()
