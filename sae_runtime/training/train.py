"""Regenerate the embedded default from scratch: corpus -> tokenizer -> model -> SAE -> labels.

    python -m sae_runtime.training.train --out server/embedded          # full (~20 min, 2 cores)
    python -m sae_runtime.training.train --out /tmp/toy --size toy       # seconds; the smoke test

Writes ``OUT/model`` (Hugging Face Llama directory, bf16), ``OUT/saes/<name>`` (SAELens
``cfg.json`` + ``sae_weights.safetensors`` + ``feature_labels.json``) and
``OUT/training_report.json`` (configs, losses, SAE quality, timings). Deterministic by
``--seed`` for a given CPU architecture and ``--threads`` (default 1).
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from sae_runtime.training import calibrate, corpus, labels, lm, sae_train

log = logging.getLogger("sae_runtime.training.train")

SAE_NAME = "topics_l1"


@dataclass(frozen=True)
class Size:
    lm_docs: int
    heldout_docs: int
    sae_docs: int
    label_docs: int
    lm: lm.LMConfig
    sae: sae_train.SAETrainConfig
    layer: int
    sae_dtype: str = "float32"
    calibration: dict = field(default_factory=dict)
    """Overrides of ``calibrate.calibrate``'s sweep (the toy size keeps it to seconds)."""


SIZES = {
    "full": Size(lm_docs=40_000, heldout_docs=500, sae_docs=8_000, label_docs=3_000,
                 lm=lm.LMConfig(), sae=sae_train.SAETrainConfig(), layer=1),
    "toy": Size(lm_docs=300, heldout_docs=20, sae_docs=60, label_docs=40,
                lm=lm.LMConfig(hidden=128, layers=2, intermediate=256, seq_len=64, batch=8,
                               steps=15, warmup=5),
                sae=sae_train.SAETrainConfig(d_sae=128, k=8, steps=30, batch=256,
                                             dead_after_tokens=2_000),
                layer=0, calibration={"candidates": 1, "multiples": (1.0, 2.0), "n_prompts": 4,
                                      "new_tokens": 8}),
}


def _docs(n: int, seed: int) -> list[tuple[str, list[str]]]:
    return list(corpus.documents(n, seed))


@torch.no_grad()
def collect(model, tokenizer, docs, layer: int) -> torch.Tensor:
    """Residual activations at the SAE site for every non-BOS token of ``docs``: [N, d]."""
    data = labels.tokenize_labelled(docs, tokenizer)
    return torch.cat([h[torch.tensor(cats) >= 0]
                      for _, (_, cats), h in labels.activations(model, data, layer)])


@torch.no_grad()
def spliced_loss(model, stream: torch.Tensor, seq_len: int, layer: int, params, k: int,
                 bos_id: int, max_windows: int = 64) -> dict:
    """Next-token loss clean vs with the SAE's reconstruction spliced in at the site."""
    n = min(max_windows, (stream.numel() - 1) // seq_len)
    x = stream[: n * seq_len + 1]
    inp, tgt = x[:-1].view(n, seq_len), x[1:].view(n, seq_len)
    keep = inp != bos_id

    def hook(_mod, _args, output):
        h = output[0] if isinstance(output, tuple) else output
        _, vals, idx = sae_train.encode(params, h.float(), k)
        recon = sae_train.decode(params, vals.flatten(0, 1), idx.flatten(0, 1)).view_as(h)
        new = torch.where(keep[..., None], recon.to(h.dtype), h)
        return (new, *output[1:]) if isinstance(output, tuple) else new

    def loss() -> float:
        logits = model(input_ids=inp).logits.float()
        return float(torch.nn.functional.cross_entropy(logits.flatten(0, 1), tgt.flatten()))

    clean = loss()
    handle = model.model.layers[layer].register_forward_hook(hook)
    try:
        spliced = loss()
    finally:
        handle.remove()
    return {"clean_loss": round(clean, 4), "spliced_loss": round(spliced, 4),
            "loss_increase": round(spliced - clean, 4)}


def label(out: Path, size_name: str, seed: int, model=None, tokenizer=None) -> dict:
    """The labelling stage alone: label the SAE saved under ``out`` (as served) in place."""
    from transformers import AutoModelForCausalLM

    size = SIZES[size_name]
    if model is None:
        model = AutoModelForCausalLM.from_pretrained(str(out / "model"), dtype=torch.float32).eval()
        tokenizer = lm.load_tokenizer(out / "model")
    sae_dir = out / "saes" / SAE_NAME
    from safetensors.torch import load_file

    saved = {n: t.float() for n, t in load_file(str(sae_dir / "sae_weights.safetensors")).items()}
    lab = labels.label_features(
        model, tokenizer, lambda x: sae_train.encode(saved, x, size.sae.k)[1:],
        _docs(size.label_docs, seed + 3), size.layer, size.sae.d_sae, SAE_NAME)
    calibrate.calibrate(model, tokenizer, saved, size.sae.k, size.layer, lab["features"],
                        lab["site_norm"], seed + 4, **size.calibration)
    labels.write(lab, sae_dir)
    return lab


def run(out: Path, size_name: str, seed: int) -> dict:
    from transformers import AutoModelForCausalLM

    size = SIZES[size_name]
    t0 = time.time()
    timings = {}
    model_dir = out / "model"
    lm_docs = _docs(size.lm_docs, seed)
    held_docs = _docs(size.heldout_docs, seed + 1)
    texts = [t for t, _ in lm_docs]
    lm.train_tokenizer(texts, model_dir, size.lm.vocab)
    tokenizer = lm.load_tokenizer(model_dir)
    stream = lm.pack(texts, tokenizer)
    held = lm.pack([t for t, _ in held_docs], tokenizer)
    timings["corpus_and_tokenizer_s"] = round(time.time() - t0, 1)
    log.info("corpus: %d docs, %d tokens; vocab %d", len(texts), stream.numel(), len(tokenizer))

    lm_stats = lm.train_lm(size.lm, stream, tokenizer, model_dir, seed, held)
    timings["lm_s"] = lm_stats["train_seconds"]

    # The SAE learns the activations of the model as saved (bf16 weights), computed in fp32.
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    t1 = time.time()
    acts = collect(model, tokenizer, _docs(size.sae_docs, seed + 2), size.layer)
    eval_acts = collect(model, tokenizer, held_docs, size.layer)
    timings["collect_s"] = round(time.time() - t1, 1)
    log.info("SAE data: %d tokens x %d", *acts.shape)
    params, sae_stats = sae_train.train_sae(acts, size.sae, seed)
    timings["sae_s"] = sae_stats["train_seconds"]
    quality = sae_train.evaluate(params, eval_acts, size.sae.k)
    quality.update(spliced_loss(model, held, size.lm.seq_len, size.layer, params, size.sae.k,
                                tokenizer.bos_token_id))
    hook_name = f"blocks.{size.layer}.hook_resid_post"
    sae_dir = out / "saes" / SAE_NAME
    dtype = getattr(torch, size.sae_dtype)
    # model_name = the served directory's name, so steerd sees no model mismatch to warn about
    sae_train.save_saelens(params, sae_dir, k=size.sae.k, hook_name=hook_name,
                           model_name=model_dir.name, dtype=dtype,
                           extra={"trained_by": "sae_runtime.training.train", "seed": seed})
    log.info("SAE quality: %s", quality)

    t2 = time.time()
    lab = label(out, size_name, seed, model, tokenizer)
    timings["labels_s"] = round(time.time() - t2, 1)
    timings["total_s"] = round(time.time() - t0, 1)
    report = {
        "command": (f"python -m sae_runtime.training.train --out {out} --size {size_name} --seed {seed}"
                    f" --threads {torch.get_num_threads()}"),
        "seed": seed, "size": size_name, "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
        "torch": torch.__version__,
        "corpus": {"lm_docs": size.lm_docs, "lm_tokens": stream.numel(), "topics": list(corpus.TOPICS),
                   "vocab": len(tokenizer)},
        "lm": {**asdict(size.lm), **lm_stats},
        "sae": {"name": SAE_NAME, "hook_name": hook_name, "train_tokens": acts.shape[0],
                **asdict(size.sae), **sae_stats, **quality,
                "live_features": len(lab["features"]), "dead_features": len(lab["dead_features"])},
        "timings": timings,
    }
    (out / "training_report.json").write_text(json.dumps(report, indent=1))
    return report


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="output directory")
    ap.add_argument("--size", choices=sorted(SIZES), default="full")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--stage", choices=["all", "labels"], default="all",
                    help="'labels' relabels the SAE already under --out (no training)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (default 1: float reductions, so the artifacts, do "
                    "not depend on the machine's core count, and a busy machine does not stall "
                    "a multi-threaded step)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.stage == "labels":
        lab = label(args.out, args.size, args.seed)
        path = args.out / "training_report.json"
        if path.is_file():
            report = json.loads(path.read_text())
            report["sae"].update(live_features=len(lab["features"]),
                                 dead_features=len(lab["dead_features"]))
            path.write_text(json.dumps(report, indent=1))
        print(f"labelled {len(lab['features'])} live features")
        return
    report = run(args.out, args.size, args.seed)
    print(json.dumps({"sae": {k: report["sae"][k] for k in (
        "fvu", "l0", "dead_fraction", "loss_increase", "live_features")},
        "lm_heldout_loss": report["lm"]["heldout_loss"], "timings": report["timings"]}, indent=1))


if __name__ == "__main__":
    main()
