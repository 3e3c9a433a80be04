"""Kernels side by side: fused/compact vs reference vs dense, per operation.

Operations (each row of the output names its ``kernel``):

- ``splice``: every token edits ``k`` features. ``compact`` is the CPU path the engine
  uses, ``reference`` the fixed-shape specification, ``dense`` the textbook way (encode
  every feature, edit, decode everything, add the difference), ``triton`` the fused CUDA
  kernel.
- ``read``: top-``k`` latents of every token (4 edits per token, as a steered read has).
  ``fused`` is what the engine runs on CPU (``topk_read.read_tiled`` with its default tile,
  which is the dense path when ``[tokens, d_sae]`` fits one tile's budget), ``tiled`` the
  same walk forced into 4096-column tiles, ``dense`` the reference (``ops.read_latents``
  then ``topk``), ``triton`` the CUDA kernel.
- ``decode``: ``k`` codes per token to ``[tokens, d_in]``. ``sparse`` is the embedding-bag,
  ``reference`` the gather-sum, ``dense`` a scatter into ``[tokens, d_sae]`` and a matmul,
  ``triton`` the CUDA kernel.

Times are medians of repeated runs (ms). On CUDA each row also gets the bytes the fastest
kernel must move at least, its achieved bandwidth and that as a fraction of the device's
measured copy bandwidth (``peak_gbps``).

    python -m loadtests.bench_kernels [--quick] [--device cuda] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import torch

from sae_runtime import kernels, ops
from sae_runtime.kernels import (
    read_reference,
    read_tiled,
    sparse_decode_reference,
    sparse_decode_torch,
    splice_compact,
    splice_reference,
)
from sae_runtime.saes.base import SAE, SAEConfig
from sae_runtime.step.edits import POS_INF, EditTables

READ_EDITS = 4  # edits per reading token (a steered request that also reads)
FORCED_TILE = 4096  # `tiled` column: always walk tiles this wide (the engine's default may not)


def _sae(d_in: int, d_sae: int, device: str) -> SAE:
    cfg = SAEConfig("standard", d_in, d_sae, "blocks.1.hook_resid_post", 1, "resid_post")
    W_dec = torch.randn(d_sae, d_in) / d_in**0.5
    return SAE(cfg, W_dec.t().contiguous(), W_dec, torch.zeros(d_sae), torch.zeros(d_in)).to(device)


def _time(fn: Callable[[], object], reps: int, cuda: bool) -> float:
    fn()
    ts = []
    for _ in range(reps):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts) * 1000


def peak_copy_gbps() -> float:
    """Device-to-device copy bandwidth of a 512 MiB tensor (reads + writes), GB/s."""
    x = torch.empty(128 * 2**20, dtype=torch.float32, device="cuda")
    y = torch.empty_like(x)
    ms = _time(lambda: y.copy_(x), 10, True)
    return 2 * x.numel() * 4 / (ms / 1000) / 1e9


def dense_splice(h, sae, feat, mode, val):
    f = ops.encode(sae, h)
    new = f.clone()
    rows = torch.arange(h.shape[0], device=h.device)[:, None].expand_as(feat)
    new[rows, feat] = ops.edited_values(mode, val, f[rows, feat])
    return h + (new - f) @ sae.W_dec


def dense_decode(vals, idx, W_dec):
    acts = vals.new_zeros(vals.shape[0], W_dec.shape[0]).scatter_add_(1, idx, vals)
    return acts @ W_dec


def _with_bandwidth(res: dict, best_ms: float, nbytes: int, peak: float | None) -> dict:
    if peak is not None:
        gbps = nbytes / (best_ms / 1000) / 1e9
        res.update(bytes=nbytes, gbps=gbps, peak_gbps=peak, frac_peak=gbps / peak)
    return res


def run_splice(sae: SAE, k: int, T: int, reps: int, device: str, peak: float | None) -> dict:
    d_in, d_sae = sae.cfg.d_in, sae.cfg.d_sae
    cuda = device == "cuda"
    h = torch.randn(T, d_in, device=device)
    feat = torch.randint(0, d_sae, (1, k), device=device)
    mode = torch.full((1, k), int(ops.Mode.CLAMP), dtype=torch.int32, device=device)
    val = torch.full((1, k), 3.0, device=device)
    tok_slot = torch.zeros(T, dtype=torch.long, device=device)
    rows = torch.arange(T, device=device)
    tables = EditTables.build(  # one slot of k edits at every position, every token in it
        tok_slot, torch.zeros_like(tok_slot), torch.zeros(1, dtype=torch.long, device=device),
        torch.full((1,), k, dtype=torch.long, device=device),
        {"feature": feat[0], "mode": mode[0], "value": val[0],
         "pos_lo": torch.zeros(k, dtype=torch.long, device=device),
         "pos_hi": torch.full((k,), POS_INF, dtype=torch.long, device=device)}, k)
    res = {"kernel": "splice", "device": device, "d_in": d_in, "d_sae": d_sae, "k": k, "tokens": T}
    res["compact_ms"] = _time(lambda: splice_compact(h, h, sae, rows, tables), reps, cuda)
    res["reference_ms"] = _time(lambda: splice_reference(h, h, sae, tables), reps, cuda)
    res["dense_ms"] = _time(lambda: dense_splice(h, sae, feat.expand(T, k), mode.expand(T, k),
                                                 val.expand(T, k)), reps, cuda)
    if cuda and kernels.triton_available():
        from sae_runtime.kernels.triton_splice import splice_triton

        res["triton_ms"] = _time(lambda: splice_triton(h, h, sae, tables), reps, cuda)
        # h read + out written per token; one encoder column and one decoder row per edit.
        nbytes = 4 * (2 * T * d_in + 2 * T * k * d_in)
        _with_bandwidth(res, res["triton_ms"], nbytes, peak)
    return res


def run_read(sae: SAE, k: int, T: int, reps: int, device: str, peak: float | None) -> dict:
    d_in, d_sae = sae.cfg.d_in, sae.cfg.d_sae
    cuda = device == "cuda"
    x = torch.randn(T, d_in, device=device)
    feat = torch.randint(0, d_sae, (T, READ_EDITS), device=device)
    mode = torch.full((T, READ_EDITS), int(ops.Mode.CLAMP), dtype=torch.int32, device=device)
    val = torch.full((T, READ_EDITS), 3.0, device=device)
    watch = torch.zeros(T, 0, dtype=torch.long, device=device)
    res = {"kernel": "read", "device": device, "d_in": d_in, "d_sae": d_sae, "k": k, "tokens": T}
    res["fused_ms"] = _time(lambda: read_tiled(sae, x, feat, mode, val, k, watch), reps, cuda)
    res["tiled_ms"] = _time(lambda: read_tiled(sae, x, feat, mode, val, k, watch,
                                               tile=FORCED_TILE), reps, cuda)
    res["dense_ms"] = _time(lambda: read_reference(sae, x, feat, mode, val, k, watch), reps, cuda)
    if cuda and kernels.triton_available():
        from sae_runtime.kernels.triton_topk_read import read_triton

        res["triton_ms"] = _time(lambda: read_triton(sae, x, feat, mode, val, k, watch), reps, cuda)
        # The encoder once, the rows in, k values and ids out.
        nbytes = 4 * (d_in * d_sae + T * d_in) + 12 * T * k
        _with_bandwidth(res, res["triton_ms"], nbytes, peak)
    return res


def run_decode(sae: SAE, k: int, T: int, reps: int, device: str, peak: float | None) -> dict:
    d_in, d_sae = sae.cfg.d_in, sae.cfg.d_sae
    cuda = device == "cuda"
    idx = torch.randint(0, d_sae, (T, k), device=device)
    vals = torch.randn(T, k, device=device)
    W = sae.W_dec
    res = {"kernel": "decode", "device": device, "d_in": d_in, "d_sae": d_sae, "k": k, "tokens": T}
    res["sparse_ms"] = _time(lambda: sparse_decode_torch(vals, idx, W), reps, cuda)
    res["reference_ms"] = _time(lambda: sparse_decode_reference(vals, idx, W), reps, cuda)
    res["dense_ms"] = _time(lambda: dense_decode(vals, idx, W), reps, cuda)
    if cuda and kernels.triton_available():
        from sae_runtime.kernels.triton_decode import sparse_decode_triton

        res["triton_ms"] = _time(lambda: sparse_decode_triton(vals, idx, W), reps, cuda)
        nbytes = 4 * (T * k * d_in + T * d_in) + 12 * T * k
        _with_bandwidth(res, res["triton_ms"], nbytes, peak)
    return res


RUNNERS = {"splice": run_splice, "read": run_read, "decode": run_decode}
COLUMNS = {"splice": ("compact_ms", "reference_ms", "dense_ms", "triton_ms"),
           "read": ("fused_ms", "tiled_ms", "dense_ms", "triton_ms"),
           "decode": ("sparse_ms", "reference_ms", "dense_ms", "triton_ms")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--d-in", type=int, default=576)
    ap.add_argument("--quick", action="store_true",
                    help="d_sae 16k/65k, k 32/128, 3 repetitions (a few minutes on 2 cores)")
    ap.add_argument("--kernels", default="splice,read,decode", help="comma-separated subset")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=None, help="write the rows as JSON (loadtests.report reads it)")
    args = ap.parse_args()
    torch.manual_seed(0)
    d_saes = [16384, 65536] if args.quick else [16384, 65536, 131072]
    ks = [32, 128] if args.quick else [32, 64, 128]
    toks = [1, 64, 512]
    reps = 3 if args.quick else 5
    peak = peak_copy_gbps() if args.device == "cuda" else None
    rows = []
    for name in args.kernels.split(","):
        cols = COLUMNS[name]
        print(f"\n{name}: " + " ".join(f"{c[:-3]:>10}" for c in cols) + "   (ms)", flush=True)
        for d_sae in d_saes:
            sae = _sae(args.d_in, d_sae, args.device)
            for k in ks:
                for T in toks:
                    r = RUNNERS[name](sae, k, T, reps, args.device, peak)
                    rows.append(r)
                    cells = " ".join(f"{r[c]:>10.2f}" if c in r else f"{'-':>10}" for c in cols)
                    bw = f"  {r['gbps']:.0f} GB/s ({r['frac_peak']:.0%} of copy)" if "gbps" in r else ""
                    print(f"  d_sae={d_sae:>6} k={k:>3} tokens={T:>3}: {cells}{bw}", flush=True)
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(rows, fh, indent=1)


if __name__ == "__main__":
    main()
