"""Splice kernels side by side: compact (CPU path) vs reference (fixed-shape) vs dense.

"dense" is the textbook way: encode every feature, edit, decode everything, add the
difference (``x + decode(f') - decode(f)``). Each row edits ``k`` features per token for
every token. Times are medians of repeated runs on this machine's CPU.

    python -m loadtests.bench_kernels [--quick]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from sae_runtime import ops
from sae_runtime.kernels import splice_compact, splice_reference
from sae_runtime.saes.base import SAE, SAEConfig


def _sae(d_in: int, d_sae: int) -> SAE:
    cfg = SAEConfig("standard", d_in, d_sae, "blocks.1.hook_resid_post", 1, "resid_post")
    W_dec = torch.randn(d_sae, d_in) / d_in**0.5
    return SAE(cfg, W_dec.t().contiguous(), W_dec, torch.zeros(d_sae), torch.zeros(d_in))


def _time(fn, reps: int) -> float:
    fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts) * 1000


def dense_splice(h, sae, feat, mode, val):
    f = ops.encode(sae, h)
    new = f.clone()
    rows = torch.arange(h.shape[0])[:, None].expand_as(feat)
    new[rows, feat] = ops.edited_values(mode, val, f[rows, feat])
    return h + (new - f) @ sae.W_dec


def run(d_in: int, d_sae: int, k: int, T: int, reps: int) -> dict:
    sae = _sae(d_in, d_sae)
    h = torch.randn(T, d_in)
    feat = torch.randint(0, d_sae, (1, k))
    mode = torch.full((1, k), int(ops.Mode.CLAMP), dtype=torch.int32)
    val = torch.full((1, k), 3.0)
    tok_slot = torch.zeros(T, dtype=torch.long)
    rows = torch.arange(T)
    res = {"d_in": d_in, "d_sae": d_sae, "k": k, "tokens": T}
    res["compact_ms"] = _time(lambda: splice_compact(h, h, sae, rows, tok_slot, feat, mode, val), reps)
    res["reference_ms"] = _time(lambda: splice_reference(h, h, sae, tok_slot, feat, mode, val), reps)
    res["dense_ms"] = _time(lambda: dense_splice(h, sae, feat.expand(T, k), mode.expand(T, k), val.expand(T, k)), reps)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--d-in", type=int, default=576)
    ap.add_argument("--quick", action="store_true", help="fewer shapes and repetitions")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.manual_seed(0)
    d_saes = [16384, 65536] if args.quick else [16384, 65536, 131072]
    ks = [32, 128] if args.quick else [32, 64, 128]
    toks = [1, 64, 512]
    rows = []
    print(f"{'d_sae':>7} {'k':>4} {'tokens':>6} {'compact':>9} {'reference':>10} {'dense':>9} {'dense/compact':>13}")
    for d_sae in d_saes:
        for k in ks:
            for T in toks:
                r = run(args.d_in, d_sae, k, T, reps=3 if args.quick else 5)
                rows.append(r)
                print(f"{d_sae:>7} {k:>4} {T:>6} {r['compact_ms']:>8.2f}m {r['reference_ms']:>9.2f}m "
                      f"{r['dense_ms']:>8.2f}m {r['dense_ms'] / r['compact_ms']:>12.1f}x", flush=True)
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(rows, fh, indent=1)


if __name__ == "__main__":
    main()
