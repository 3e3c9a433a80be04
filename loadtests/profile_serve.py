"""Profile steerd's front end under the `bench_serve` load, one door at a time.

Starts `steerd serve` on the embedded default (the engine settings of ``bench_serve``),
drives closed-loop streaming requests through gRPC and HTTP in alternation, and prints, per
door and round: tokens/s, TTFT/TPOT p50/p99 and the front-end process's CPU seconds per
1,000 tokens. With ``--py-spy OUT`` it also records the front-end process with py-spy
during the gRPC rounds (collapsed stacks, for ``--top``-style reading or flame graphs).

    python -m loadtests.profile_serve --rounds 3 [--py-spy /tmp/grpc.txt]

A development tool: ``bench_serve`` is the measurement of record (against ``vllm serve``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from loadtests.bench_serve import Driver, Proc, free_port, server_env, summarise

ROOT = Path(__file__).resolve().parent.parent


async def main_async(args, ours: Proc) -> None:
    async with Driver(args, "", ours.extra["url"], ours.extra["grpc"]) as d:
        for m in ("ours", "ours_grpc"):
            await d.round(m, -1, args.concurrency, args.concurrency)
        for r in range(args.rounds):
            for m in ("ours_grpc", "ours"):
                await asyncio.sleep(1.0)
                spy = None
                if args.py_spy and m == "ours_grpc" and r == 0:
                    spy = subprocess.Popen(
                        [str(Path(sys.executable).with_name("py-spy")), "record", "-p",
                         str(ours.proc.pid), "-r", "200", "-f", "raw", "-o", args.py_spy,
                         "--nonblocking"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                    await asyncio.sleep(1.0)
                c0 = ours.cpu_s()
                rd = await d.round(m, r, args.requests, args.concurrency)
                c1 = ours.cpu_s()
                if spy is not None:
                    spy.send_signal(2)
                    spy.wait(30)
                rd["cpu_s"] = {"front_end": c1[0] - c0[0], "engine": c1[1] - c0[1]}
                s = summarise([rd])
                door = "grpc" if m == "ours_grpc" else "http"
                print(f"round {r} {door}: {s['tok_s']:7.1f} tok/s  TTFT p50/p99 "
                      f"{s['ttft_ms_p50']:.0f}/{s['ttft_ms_p99']:.0f} ms  TPOT p50/p99 "
                      f"{s['tpot_ms_p50']:.1f}/{s['tpot_ms_p99']:.1f} ms  front end "
                      f"{s['cpu_s_per_1k_tok']['front_end']:.3f} CPU-s/1k tok  engine "
                      f"{s['cpu_s_per_1k_tok']['engine']:.3f}", flush=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--requests", type=int, default=96)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--prompt", type=int, default=32)
    p.add_argument("--gen", type=int, default=128)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--py-spy", default=None, help="record the gRPC rounds to this file")
    args = p.parse_args()
    args.vocab = json.loads((ROOT / "server/embedded/model/config.json").read_text())["vocab_size"]
    logs = Path(tempfile.mkdtemp(prefix="profile_serve-"))
    hport, gport = free_port(), free_port()
    ours = Proc("steerd serve", [str(Path(sys.executable).with_name("steerd")), "serve",
                                 "--model", "server/embedded/model", "--dtype", args.dtype,
                                 "--sae", "server/embedded/saes/topics_l1", "--host", "127.0.0.1",
                                 "--port", str(gport), "--http-port", str(hport)],
                logs / "steerd.log", f"http://127.0.0.1:{hport}/health")
    ours.extra.update(url=f"http://127.0.0.1:{hport}", grpc=f"127.0.0.1:{gport}")
    env, _ = server_env()
    ours.start(env)
    try:
        ours.wait_healthy(600)
        asyncio.run(main_async(args, ours))
    finally:
        ours.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
