"""Train a ReLU cross-layer transcoder (CLT) of the embedded default model and save it in
circuit-tracer's format.

    python -m sae_runtime.training.clt_train --out server/embedded --seed 0 --threads 1

Slot ``s`` (one per decoder layer) reads the MLP input of layer ``s`` (HF: the input of
``model.layers[s].mlp``, the output of ``post_attention_layernorm`` with its weight;
circuit-tracer ``mlp.hook_in``) and its features write the MLP output (``hook_mlp_out``) of
layer ``s`` and of every later layer. The math is circuit-tracer's ``CrossLayerTranscoder``
with ReLU (``sae_runtime.saes.clt``)::

    f_s = relu(x_s @ W_enc[s] + b_enc[s])                             # [N, d_sae]
    y_l = b_dec[l] + sum_{s <= l} f_s @ W_dec[s][:, l - s]             # [N, d_model]

Training follows ``transcoder_train`` (its data pipeline and loop shape): the mean over
layers of each layer's MSE normalised by the variance of its MLP output, plus an L1 penalty
on ``f_si * ||W_dec[s][i]||`` (the norm of the feature's decoder vectors to every later
layer, concatenated, as Anthropic's CLTs do; divided by the RMS norm of the centred
targets, so the coefficient is dimensionless) warmed up over the first 5% of steps; Adam;
linear LR decay over the last 20% of steps; dead features resampled onto high-error
inputs a few times. At the end the decoder norms are folded into the encoder, so each
feature's concatenated decoder has unit norm (a clamp value is a length along it).

Writes ``OUT/saes/topics_clt/`` (circuit-tracer's files: ``config.yaml``,
``W_enc_{i}.safetensors``, ``W_dec_{i}.safetensors`` in bfloat16, the model's dtype, and
``feature_labels.json`` with one flat index ``layer * d_sae + index`` per feature) and
``OUT/clt_report.json``: FVU per layer, L0 per layer, dead features, the next-token loss
with every MLP replaced by the CLT, and a steering check of each topic's best feature per
layer (the clamp written into every later layer's MLP output, against the same clamp
written into its own layer only). Data seeds as in ``transcoder_train``.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace

import torch

from sae_runtime.training import calibrate, corpus, labels, lm
from sae_runtime.training.transcoder_train import best_per_topic, cpu_model

log = logging.getLogger("sae_runtime.training.clt_train")

NAME = "topics_clt"
INPUT_HOOK, OUTPUT_HOOK = "mlp.hook_in", "hook_mlp_out"


@dataclass(frozen=True)
class CLTTrainConfig:
    d_sae: int = 512
    """Features per layer."""
    train_docs: int = 3000
    heldout_docs: int = 500
    label_docs: int = 1000
    steps: int = 2000
    batch: int = 1024
    lr: float = 1e-3
    l1: float = 0.1
    """L1 coefficient on sum_{s,i} f_si ||W_dec[s][i]|| / RMS(||y - mean y||)."""
    l1_warmup: float = 0.05
    dead_after_tokens: int = 1_000_000
    resample_at: tuple[int, ...] = (500, 1000, 1500)
    save_dtype: str = "bfloat16"
    steer_multiples: tuple[float, ...] = (2.0, 4.0, 6.0, 8.0, 10.0, 12.0)
    steer_prompts: int = 16
    steer_tokens: int = 24


# ---------------------------------------------------------------- activations at the MLPs

@torch.no_grad()
def mlp_io_all(model, batch_ids: list[list[int]]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(mlp_in [T, L, d], mlp_out [T, L, d]) per sequence of ``batch_ids`` (right-padded)."""
    inp, mask = labels.pad_batch(batch_ids)
    layers = model.model.layers
    got: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def hook(layer):
        def fn(_mod, args, output):
            got[layer] = (args[0].float(), output.float())
        return fn

    handles = [layer.mlp.register_forward_hook(hook(i)) for i, layer in enumerate(layers)]
    try:
        model(input_ids=inp, attention_mask=mask)
    finally:
        for h in handles:
            h.remove()
    x = torch.stack([got[i][0] for i in range(len(layers))], dim=2)  # [B, T, L, d]
    y = torch.stack([got[i][1] for i in range(len(layers))], dim=2)
    return ([x[r, : len(ids)] for r, ids in enumerate(batch_ids)],
            [y[r, : len(ids)] for r, ids in enumerate(batch_ids)])


@torch.no_grad()
def collect(model, tokenizer, docs, batch: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """(mlp_in [N, L, d], mlp_out [N, L, d]) for every non-BOS token of ``docs``."""
    data = labels.tokenize_labelled(docs, tokenizer)
    xs, ys = [], []
    for start in range(0, len(data), batch):
        chunk = data[start:start + batch]
        ins, outs = mlp_io_all(model, [ids for ids, _ in chunk])
        for (_, cats), x, y in zip(chunk, ins, outs, strict=True):
            keep = torch.tensor(cats) >= 0
            xs.append(x[keep])
            ys.append(y[keep])
    return torch.cat(xs), torch.cat(ys)


# ---------------------------------------------------------------- the CLT

def encode(p: dict, x: torch.Tensor) -> torch.Tensor:
    """``x [N, L, d]`` -> features ``[N, L, F]``."""
    return torch.relu(torch.einsum("nld,ldf->nlf", x, p["W_enc"]) + p["b_enc"])


def decode(p: dict, f: torch.Tensor) -> torch.Tensor:
    """Features ``[N, L, F]`` -> every layer's MLP output ``[N, L, d]``."""
    L = f.shape[1]
    out = [p["b_dec"][i].expand(f.shape[0], -1) for i in range(L)]
    for s in range(L):
        contrib = torch.einsum("nf,fkd->nkd", f[:, s], p[f"W_dec_{s}"])  # [N, L - s, d]
        for k in range(L - s):
            out[s + k] = out[s + k] + contrib[:, k]
    return torch.stack(out, dim=1)


def decoder_norms(p: dict, L: int) -> torch.Tensor:
    """``[L, F]``: each feature's decoder vectors to every later layer, concatenated, L2 norm."""
    return torch.stack([p[f"W_dec_{s}"].pow(2).sum((1, 2)).sqrt() for s in range(L)])


def train_clt(x_all: torch.Tensor, y_all: torch.Tensor, cfg: CLTTrainConfig, seed: int) -> tuple[dict, dict]:
    """Train on ``x_all [N, L, d] -> y_all [N, L, d]`` (fp32). Returns (params, stats)."""
    g = torch.Generator().manual_seed(seed)
    n, L, d = x_all.shape
    F = cfg.d_sae
    sample = slice(0, 100_000)
    x_rms = x_all[sample].norm(dim=-1).pow(2).mean(0).sqrt()  # [L]
    W_enc = torch.randn(L, d, F, generator=g)
    W_enc /= W_enc.norm(dim=1, keepdim=True) * x_rms[:, None, None]
    p = {"W_enc": W_enc.requires_grad_(), "b_enc": torch.zeros(L, F, requires_grad=True),
         "b_dec": y_all[sample].mean(0).clone().requires_grad_()}
    for s in range(L):
        w = torch.randn(F, L - s, d, generator=g)
        p[f"W_dec_{s}"] = (w * 0.1 / w.pow(2).sum((1, 2), keepdim=True).sqrt()).requires_grad_()
    opt = torch.optim.Adam(p.values(), lr=cfg.lr, betas=(0.9, 0.999))
    ys = y_all[sample]
    var = (ys - ys.mean(0)).pow(2).sum((0, 2)) / (ys.shape[0] - 1)  # [L] (torch.var(0) is slow here)
    y_scale = float(var.mean()) ** 0.5
    since_fired = torch.zeros(L, F, dtype=torch.int64)
    resampled = 0
    t0 = time.time()
    for step in range(cfg.steps):
        lr = cfg.lr * min(1.0, (cfg.steps - step) / (0.2 * cfg.steps))
        for group in opt.param_groups:
            group["lr"] = lr
        l1 = cfg.l1 * min(1.0, step / max(1.0, cfg.l1_warmup * cfg.steps))
        i = torch.randint(0, n, (cfg.batch,), generator=g)
        x, y = x_all[i], y_all[i]
        f = encode(p, x)
        err = y - decode(p, f)
        fvu = (err.pow(2).sum(-1).mean(0) / var)  # [L]
        sparsity = (f * decoder_norms(p, L)).sum((1, 2)).mean() / y_scale
        loss = fvu.mean() + l1 * sparsity
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            since_fired += cfg.batch
            since_fired[(f > 0).any(0)] = 0
            if step in cfg.resample_at:
                dead = since_fired > cfg.dead_after_tokens
                resampled += _resample(p, opt, dead, x, err.detach(), x_rms, g)
                since_fired[dead] = 0
        if step % 250 == 0 or step == cfg.steps - 1:
            log.info("clt step %d/%d fvu %s l0 %s l1 %.4f dead %d (%.0fs)", step, cfg.steps,
                     [round(v, 3) for v in fvu.tolist()],
                     [round(v, 1) for v in (f > 0).float().sum(-1).mean(0).tolist()],
                     sparsity.item(), int((since_fired > cfg.dead_after_tokens).sum()),
                     time.time() - t0)
    out = {k: v.detach().clone() for k, v in p.items()}
    # Fold the decoder norms into the encoder: same y^, unit-norm concatenated decoders.
    norms = decoder_norms(out, L).clamp(min=1e-8)  # [L, F]
    out["W_enc"] *= norms[:, None, :]
    out["b_enc"] *= norms
    for s in range(L):
        out[f"W_dec_{s}"] /= norms[s][:, None, None]
    return out, {"train_seconds": round(time.time() - t0, 1),
                 "final_train_fvu": [round(v, 4) for v in fvu.tolist()], "resampled": resampled}


def _resample(p, opt, dead: torch.Tensor, x: torch.Tensor, err: torch.Tensor, x_rms: torch.Tensor,
              g: torch.Generator) -> int:
    """Point dead features of each layer at high-error inputs of the batch, small scale."""
    total = 0
    L = dead.shape[0]
    for s in range(L):
        idx = dead[s].nonzero()[:, 0]
        if idx.numel() == 0:
            continue
        e = err[:, s:]  # what slot s can write
        w = e.pow(2).sum((1, 2))
        pick = torch.multinomial(w / w.sum(), idx.numel(), replacement=True, generator=g)
        xs, es = x[pick, s], e[pick]
        live = ~dead[s]
        enc_norm = (float(p["W_enc"][s][:, live].norm(dim=0).mean()) if live.any()
                    else 1 / float(x_rms[s]))
        p["W_enc"][s][:, idx] = (xs / xs.norm(dim=1, keepdim=True)).t() * enc_norm * 0.2
        p["b_enc"][s][idx] = 0.0
        p[f"W_dec_{s}"][idx] = es / es.pow(2).sum((1, 2), keepdim=True).sqrt() * 0.1
        for key in ("exp_avg", "exp_avg_sq"):  # reset Adam moments of the resampled entries
            opt.state[p["W_enc"]][key][s][:, idx] = 0.0
            opt.state[p["b_enc"]][key][s][idx] = 0.0
            opt.state[p[f"W_dec_{s}"]][key][idx] = 0.0
        total += int(idx.numel())
    log.info("resampled %d dead features", total)
    return total


def cast(p: dict, dtype: torch.dtype) -> dict:
    """The parameters as they are saved (and served): rounded to ``dtype``, computed in fp32."""
    return {k: v.to(dtype).float() for k, v in p.items()}


@torch.no_grad()
def evaluate(p: dict, x_all: torch.Tensor, y_all: torch.Tensor) -> dict:
    """FVU of each layer's MLP output (and of all together), L0 per layer, dead features."""
    L, F = p["b_enc"].shape
    fired = torch.zeros(L, F, dtype=torch.bool)
    se, l0 = torch.zeros(L), torch.zeros(L)
    for x, y in zip(x_all.split(8192), y_all.split(8192), strict=True):
        f = encode(p, x)
        se += (y - decode(p, f)).pow(2).sum((0, 2))
        l0 += (f > 0).float().sum((0, 2))
        fired |= (f > 0).any(0)
    total = (y_all - y_all.mean(0)).pow(2).sum((0, 2))
    return {"fvu_per_layer": [round(float(v), 4) for v in se / total],
            "fvu": round(float(se.sum() / total.sum()), 4),
            "l0_per_layer": [round(float(v), 2) for v in l0 / x_all.shape[0]],
            "l0": round(float(l0.sum() / x_all.shape[0]), 2),
            "dead_fraction_per_layer": [round(1 - float(v), 4) for v in fired.float().mean(1)]}


@torch.no_grad()
def spliced_loss(model, stream: torch.Tensor, seq_len: int, p: dict, bos_id: int,
                 max_windows: int = 64) -> dict:
    """Next-token loss clean vs with every MLP output replaced by the CLT's prediction (the
    replacement model: slot ``s`` encodes the MLP input of the replaced forward; BOS positions
    kept clean), with one layer's MLP output replaced at a time (``spliced_loss_per_layer``,
    as ``transcoder_train.spliced_loss`` measures its layer), and with every MLP output
    zeroed."""
    n = min(max_windows, (stream.numel() - 1) // seq_len)
    x = stream[: n * seq_len + 1]
    inp, tgt = x[:-1].view(n, seq_len), x[1:].view(n, seq_len)
    keep = inp != bos_id
    layers = model.model.layers
    L = len(layers)

    def loss() -> float:
        logits = model(input_ids=inp).logits.float()
        return float(torch.nn.functional.cross_entropy(logits.flatten(0, 1), tgt.flatten()))

    feats: dict[int, torch.Tensor] = {}

    def replace(layer):
        def fn(_mod, args, output):
            xs = args[0].float()
            feats[layer] = torch.relu(xs @ p["W_enc"][layer] + p["b_enc"][layer])
            pred = p["b_dec"][layer] + sum(feats[s] @ p[f"W_dec_{s}"][:, layer - s]
                                           for s in range(layer + 1))
            return torch.where(keep[..., None], pred.to(output.dtype), output)
        return fn

    def with_hooks(make) -> float:
        handles = [layer.mlp.register_forward_hook(make(i)) for i, layer in enumerate(layers)]
        try:
            return loss()
        finally:
            for h in handles:
                h.remove()

    def replace_one(target):
        # Only layer ``target``'s MLP output is replaced; slots <= target encode the clean
        # forward's MLP inputs (the replacement changes nothing before it).
        def make(layer):
            def fn(_mod, args, output):
                feats[layer] = torch.relu(args[0].float() @ p["W_enc"][layer] + p["b_enc"][layer])
                if layer != target:
                    return output
                pred = p["b_dec"][layer] + sum(feats[s] @ p[f"W_dec_{s}"][:, layer - s]
                                               for s in range(layer + 1))
                return torch.where(keep[..., None], pred.to(output.dtype), output)
            return fn
        return make

    clean = loss()
    spliced = with_hooks(replace)
    per_layer = [with_hooks(replace_one(t)) for t in range(L)]
    ablated = with_hooks(lambda _i: lambda _m, _a, o: torch.where(keep[..., None],
                                                                    torch.zeros_like(o), o))
    assert len(feats) == L
    return {"clean_loss": round(clean, 4), "spliced_loss": round(spliced, 4),
            "loss_increase": round(spliced - clean, 4),
            "spliced_loss_per_layer": [round(v, 4) for v in per_layer],
            "mlp_zero_ablation_loss": round(ablated, 4)}


# ---------------------------------------------------------------- saving and labels

def save_circuit_tracer(p: dict, out: Path, *, model_name: str, dtype: torch.dtype,
                        extra: dict | None = None) -> None:
    """circuit-tracer's files, as ``CrossLayerTranscoder.to_safetensors`` writes them (ReLU:
    no threshold), and the ``config.yaml`` its loader reads."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    L = p["b_enc"].shape[0]
    for i in range(L):
        save_file({f"W_enc_{i}": p["W_enc"][i].t().to(dtype).contiguous(),
                   f"b_enc_{i}": p["b_enc"][i].to(dtype).contiguous(),
                   f"b_dec_{i}": p["b_dec"][i].to(dtype).contiguous()},
                  str(out / f"W_enc_{i}.safetensors"))
        save_file({f"W_dec_{i}": p[f"W_dec_{i}"].to(dtype).contiguous()},
                  str(out / f"W_dec_{i}.safetensors"))
    lines = [f"model_name: {model_name}", "model_kind: cross_layer_transcoder",
             f"feature_input_hook: {INPUT_HOOK}", f"feature_output_hook: {OUTPUT_HOOK}"]
    lines += [f"{k}: {json.dumps(v)}" for k, v in (extra or {}).items()]
    (out / "config.yaml").write_text("\n".join(lines) + "\n")


class MLPInputSite:
    """Adapter for ``labels.label_features``: ``hidden_states[layer + 1]`` is the input of
    ``layers[layer].mlp`` (circuit-tracer ``mlp.hook_in``)."""

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


def label(model, tokenizer, p: dict, docs) -> dict:
    """One ``feature_labels.json`` for every layer's features, flat index ``layer * d_sae +
    index``; each feature also records its ``layer`` and per-layer ``layer_index``."""
    L, F = p["b_enc"].shape
    ar = torch.arange(F)
    merged: dict = {}
    for s in range(L):
        def encode_fn(x, s=s):
            f = torch.relu(x @ p["W_enc"][s] + p["b_enc"][s])
            return f, ar.expand_as(f)

        lab = labels.label_features(MLPInputSite(model, s), tokenizer, encode_fn, docs, s, F, NAME)
        for f in lab["features"]:
            f["layer"], f["layer_index"] = s, f["index"]
            f["index"] = s * F + f["index"]
        if not merged:
            merged = {**lab, "d_sae": L * F, "features": [], "dead_features": [],
                      "site_norm_per_layer": []}
        merged["features"] += lab["features"]
        merged["dead_features"] += [s * F + i for i in lab["dead_features"]]
        merged["site_norm_per_layer"].append(lab["site_norm"])
    merged["site_norm"] = round(sum(merged["site_norm_per_layer"]) / L, 4)
    merged["method"] += "; a cross-layer transcoder: index = layer * d_sae + index in the layer"
    return merged


@torch.no_grad()
def steer_check(model, tokenizer, p: dict, lab: dict, cfg: CLTTrainConfig, seed: int) -> dict:
    """Per topic and layer, its best feature clamped at every position (as steerd clamps) to
    ``m * site_norm`` for each ``m`` in ``steer_multiples``: the rate of greedy continuations
    of neutral prompts that land on the topic (``calibrate.topic_of``), with the CLT's edit
    (every later layer's MLP output gets ``(v - f) W_dec[s][j, l - s]``) and with the same
    clamp written into the source layer only. Adds ``steer_value``/``steer_success`` to those
    features' labels (in place) and returns one example per topic."""
    L, F = p["b_enc"].shape
    vocab = {t: corpus.topic_words(t) for t in corpus.TOPICS}
    prompts = calibrate.neutral_prompts(seed, cfg.steer_prompts)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    enc = tokenizer(prompts, return_tensors="pt", padding=True)
    edit: dict = {}
    pending: dict[int, torch.Tensor] = {}

    def hook(layer):
        def fn(_mod, args, output):
            if not edit:
                return output
            s, j, v = edit["s"], edit["j"], edit["v"]
            if layer == s:
                a = torch.relu(args[0].float() @ p["W_enc"][s][:, j] + p["b_enc"][s][j])
                pending.clear()
                last = L if edit["cross"] else s + 1
                for k in range(last - s):
                    pending[s + k] = (v - a)[..., None] * p[f"W_dec_{s}"][j, k]
            if layer in pending:
                return output + pending[layer].to(output.dtype)
            return output
        return fn

    handles = [layer.mlp.register_forward_hook(hook(i)) for i, layer in enumerate(model.model.layers)]
    norms = lab["site_norm_per_layer"]
    by_index = {f["index"]: f for f in lab["features"]}
    result: dict = {}

    def rate(texts: list[str], topic: str) -> float:
        return sum(calibrate.topic_of(t, vocab) == topic for t in texts) / len(texts)

    def generate() -> list[str]:
        out = model.generate(**enc, max_new_tokens=cfg.steer_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
        return tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)

    try:
        clean = generate()
        for topic in corpus.TOPICS:
            result[topic] = {}
            for s in range(L):
                cands = [f for f in lab["features"] if f["layer"] == s and f["topic"] == topic
                         and f["label"].startswith(topic)]
                if not cands:
                    continue
                best = max(cands, key=lambda f: f["score"])
                rows = []
                for m in cfg.steer_multiples:
                    v = m * norms[s]
                    row = {"multiple": m, "value": round(v, 3)}
                    for cross in (True, False):
                        edit.update(s=s, j=best["layer_index"], v=v, cross=cross)
                        texts = generate()
                        row["cross_layer" if cross else "source_layer_only"] = round(rate(texts, topic), 4)
                        if cross:
                            row["example"] = f"{prompts[0]} ->{texts[0]}"
                    edit.clear()
                    rows.append(row)
                top = max(rows, key=lambda r: (r["cross_layer"], -r["multiple"]))
                f = by_index[best["index"]]
                f["steer_value"] = top["value"] if top["cross_layer"] > 0 else 0.0
                f["steer_success"] = top["cross_layer"]
                result[topic][f"layer_{s}"] = {"index": best["index"], "label": best["label"],
                                               "rates": rows}
                log.info("steer %s layer %d feature %d: %s", topic, s, best["index"],
                         [(r["multiple"], r["cross_layer"], r["source_layer_only"]) for r in rows])
    finally:
        for h in handles:
            h.remove()
        edit.clear()
    return {"prompts": cfg.steer_prompts, "new_tokens": cfg.steer_tokens, "greedy": True,
            "clean_example": f"{prompts[0]} ->{clean[0]}",
            "clean_rate": {t: round(rate(clean, t), 4) for t in corpus.TOPICS}, "topics": result}


def run(out: Path, seed: int, cfg: CLTTrainConfig) -> dict:
    from transformers import AutoModelForCausalLM

    from sae_runtime.loading import load_clt
    from sae_runtime.saes import clt as clt_math

    t0 = time.time()
    timings = {}
    model_dir = out / "model"
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    tokenizer = lm.load_tokenizer(model_dir)
    held_docs = list(corpus.documents(cfg.heldout_docs, seed + 1))
    x, y = collect(model, tokenizer, list(corpus.documents(cfg.train_docs, seed + 2)))
    ex, ey = collect(model, tokenizer, held_docs)
    timings["collect_s"] = round(time.time() - t0, 1)
    log.info("CLT data: %d tokens x %d layers x %d", *x.shape)
    params, stats = train_clt(x, y, cfg, seed)
    timings["train_s"] = stats["train_seconds"]
    dtype = getattr(torch, cfg.save_dtype)
    saved = cast(params, dtype)  # report what is served
    quality = evaluate(saved, ex, ey)
    held = lm.pack([t for t, _ in held_docs], tokenizer)
    quality.update(spliced_loss(model, held, lm.LMConfig().seq_len, saved, tokenizer.bos_token_id))
    log.info("CLT quality: %s", quality)  # before anything below can fail
    clt_dir = out / "saes" / NAME
    save_circuit_tracer(saved, clt_dir, model_name=model_dir.name, dtype=dtype,
                        extra={"trained_by": "sae_runtime.training.clt_train", "seed": seed})
    loaded = load_clt(clt_dir)
    assert all(torch.equal(loaded.W_dec[s], saved[f"W_dec_{s}"]) for s in range(loaded.cfg.n_layers))
    t1 = time.time()
    lab = label(model, tokenizer, saved, list(corpus.documents(cfg.label_docs, seed + 3)))
    timings["labels_s"] = round(time.time() - t1, 1)
    t1 = time.time()
    steer = steer_check(model, tokenizer, saved, lab, cfg, seed)
    timings["steer_s"] = round(time.time() - t1, 1)
    labels.write(lab, clt_dir)
    timings["total_s"] = round(time.time() - t0, 1)
    L = loaded.cfg.n_layers
    best = {f"layer_{s}": best_per_topic({"features": [f for f in lab["features"] if f["layer"] == s]})
            for s in range(L)}
    report = {
        "command": (f"python -m sae_runtime.training.clt_train --out {out} --seed {seed} "
                    f"--threads {torch.get_num_threads()}"),
        "seed": seed, "machine": f"{cpu_model()}, {torch.get_num_threads()} threads",
        "torch": torch.__version__,
        "clt": {"name": NAME, "format": "circuit_tracer", "feature_input_hook": INPUT_HOOK,
                "feature_output_hook": OUTPUT_HOOK, "n_layers": L,
                "features": L * cfg.d_sae, "feature_index": "layer * d_sae + index",
                "decoder_bytes": clt_math.decoder_bytes(loaded.cfg, dtype),
                "weight_bytes": clt_math.weight_bytes(loaded.cfg, dtype),
                "train_tokens": x.shape[0], "eval_tokens": ex.shape[0],
                **asdict(cfg), **stats, **quality,
                "live_features": len(lab["features"]), "dead_features": len(lab["dead_features"])},
        "best_feature_per_topic": best,
        "steering": steer,
        "timings": timings,
    }
    (out / "clt_report.json").write_text(json.dumps(report, indent=1))
    return report


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="directory holding model/ (e.g. server/embedded)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--l1", type=float, default=CLTTrainConfig.l1)
    ap.add_argument("--steps", type=int, default=CLTTrainConfig.steps)
    ap.add_argument("--d-sae", type=int, default=CLTTrainConfig.d_sae)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    cfg = CLTTrainConfig(l1=args.l1, steps=args.steps, d_sae=args.d_sae)
    report = run(args.out, args.seed, cfg)
    c = report["clt"]
    print(json.dumps({k: c[k] for k in ("fvu", "fvu_per_layer", "l0_per_layer", "clean_loss",
                                        "spliced_loss", "loss_increase", "live_features",
                                        "train_seconds", "decoder_bytes")}, indent=1))


if __name__ == "__main__":
    main()
