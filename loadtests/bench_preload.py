"""Does preloading tcmalloc and Intel OpenMP help? Throughput and RSS, side by side.

vLLM's CPU guide asks for ``LD_PRELOAD`` of tcmalloc and Intel OpenMP (``libiomp5``). This
measures it instead of assuming it: our engine (the ``bench_e2e`` model and SAEs) runs the
``clamp16`` and ``reads16`` mixes under each preload variant; the engine's processes
(EngineCore and workers, started by spawn) inherit ``LD_PRELOAD`` from this process, so one
run can compare variants. Order: none, tcmalloc, iomp, tcmalloc+iomp, none again (drift);
``--quick`` runs none, tcmalloc+iomp, none again.
RSS is the engine's processes summed after the rounds.

    python -m loadtests.bench_preload --out docs/preload.json    (make bench-preload)
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from loadtests import bench_e2e as be
from loadtests.preload import find_libs


def rss_mib(pid: int) -> float:
    import psutil

    procs = psutil.Process(pid).children(recursive=True)
    return sum(p.memory_info().rss for p in procs if p.is_running()) / 2**20


async def run(args) -> dict:
    from sae_runtime.hw import cpu_info
    from server.core.reads import ReadRouter

    cpu = cpu_info()
    if args.model_dtype == "auto":
        args.model_dtype = "bfloat16" if cpu.native_bf16 else "float32"
    libs = find_libs()
    variants = [("none", [])]
    if "tcmalloc" in libs and not args.quick:
        variants.append(("tcmalloc", [libs["tcmalloc"]]))
    if "iomp" in libs and not args.quick:
        variants.append(("iomp", [libs["iomp"]]))
    if len(libs) == 2:
        variants.append(("tcmalloc+iomp", [libs["tcmalloc"], libs["iomp"]]))
    variants.append(("none", []))
    root = Path(tempfile.mkdtemp(prefix="steer-preload-"))
    model, saes = be.make_artifacts(root, args.d_sae, args.model_dtype)
    router = ReadRouter()
    router.start()
    args.reads_addr = router.addr
    base_preload = os.environ.get("LD_PRELOAD", "")
    out: dict[str, dict] = {}
    for name, paths in variants:
        os.environ["LD_PRELOAD"] = ":".join([*paths, base_preload] if base_preload else paths)
        engine = be.build(model, saes, args)
        try:
            runners = {}
            for mix in ("clamp16", "reads16"):
                if mix == "reads16":
                    for i in range(args.requests + 8):
                        router.register(f"reads16-{i}")
                runners[mix] = await be.mix_runner(engine, mix, args)
            rates: dict[str, list[float]] = {"clamp16": [], "reads16": []}
            for _ in range(args.rounds):
                for mix, fn in runners.items():
                    await asyncio.sleep(be.SETTLE_S)
                    rates[mix].append((await fn())[0])
            row = {mix: statistics.median(r) for mix, r in rates.items()}
            row["rss_mib"] = round(rss_mib(os.getpid()), 1)
            row["preload"] = os.environ["LD_PRELOAD"]
            key = name if name not in out else f"{name} (again)"
            out[key] = row
            print(f"{key:16s} clamp16 {row['clamp16']:7.1f} tok/s  reads16 {row['reads16']:7.1f} "
                  f"tok/s  RSS {row['rss_mib']:.0f} MiB", flush=True)
        finally:
            engine.shutdown()
            del engine
            gc.collect()
    os.environ["LD_PRELOAD"] = base_preload
    router.close()
    return {"device": f"cpu: {cpu.describe()}", "cpu": cpu.as_dict(),
            "model": f"bench_e2e model, dummy {args.model_dtype} weights, 4 SAEs d_sae {args.d_sae}",
            "workload": f"{args.requests} requests x {args.rounds} rounds per mix, generate {args.gen}",
            "command": "python -m loadtests.bench_preload " + " ".join(sys.argv[1:]),
            "libs": libs, "variants": out}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--gen", type=int, default=64)
    ap.add_argument("--d-sae", type=int, default=16384)
    ap.add_argument("--model-dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    ap.add_argument("--quick", action="store_true",
                    help="only none, tcmalloc+iomp, none again (3 engine starts instead of 5)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    t0 = time.perf_counter()
    res = asyncio.run(run(args))
    res["wall_s"] = round(time.perf_counter() - t0, 1)
    print(json.dumps({k: {m: v[m] for m in ("clamp16", "reads16", "rss_mib")}
                      for k, v in res["variants"].items()}))
    if args.out:
        args.out.write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
