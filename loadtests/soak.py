"""Soak test: the tiny random test model (.cache/default) under Locust for a fixed time; writes docs/soak.md.

    python -m loadtests.soak --users 64 --minutes 10      (make soak)

Starts `steerd serve` on loopback with metrics on, records the resident memory of the
server's whole process tree (server, engine core, worker) before and after, runs Locust
headless (loadtests/locustfile.py), and summarises failures, TTFT, TPOT and tokens/s from
Locust's CSV and the server's own Prometheus histograms.
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tree_rss_mb(pid: int) -> float:
    p = psutil.Process(pid)
    return sum(q.memory_info().rss for q in [p, *p.children(recursive=True)]) / 2**20


def metric(url: str, name: str) -> float:
    for line in urllib.request.urlopen(url, timeout=10).read().decode().splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--users", type=int, default=64)
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--default-dir", type=Path, default=ROOT / ".cache" / "default")
    ap.add_argument("--reports", type=Path, default=ROOT / "loadtests" / "reports")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "soak.md")
    args = ap.parse_args()
    args.reports.mkdir(parents=True, exist_ok=True)
    port, mport = free_port(), free_port()
    d = args.default_dir
    cmd = [str(BIN / "steerd"), "serve", "--model", str(d / "tiny-llama"), "--dtype", "float32",
           "--sae", str(d / "saes" / "resid_l1"), "--sae", str(d / "saes" / "jumprelu_l2pre"),
           "--sae", str(d / "saes" / "topk_l0"), "--port", str(port), "--metrics-port", str(mport)]
    log = open(args.reports / "soak-steerd.log", "wb")
    server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    murl = f"http://127.0.0.1:{mport}/metrics"
    try:
        for _ in range(400):
            try:
                urllib.request.urlopen(murl, timeout=2)
                break
            except OSError:
                if server.poll() is not None:
                    raise SystemExit(f"steerd exited {server.returncode}; see {log.name}") from None
                time.sleep(1)
        time.sleep(2)
        rss0 = tree_rss_mb(server.pid)
        t0 = time.monotonic()
        locust = subprocess.run(
            [str(BIN / "locust"), "-f", str(ROOT / "loadtests" / "locustfile.py"), "--headless",
             "-u", str(args.users), "-r", str(max(1, args.users // 8)), "-t", f"{int(args.minutes * 60)}s",
             "--stop-timeout", "30", "--host", f"127.0.0.1:{port}", "--only-summary",
             "--csv", str(args.reports / "soak")], capture_output=True, text=True)
        wall = time.monotonic() - t0
        rss1 = tree_rss_mb(server.pid)
        gen_tokens = metric(murl, "steerd_generated_tokens_total")
        alive = server.poll() is None
    finally:
        server.send_signal(signal.SIGTERM)
        rc = server.wait(120)
    rows = {r["Name"]: r for r in csv.DictReader(open(args.reports / "soak_stats.csv"))}
    agg = {k: v for k, v in rows.items() if k != "Aggregated"}
    rpcs = {k: v for k, v in agg.items() if rows[k]["Type"] != "METRIC"}
    n_req = sum(int(r["Request Count"]) for r in rpcs.values())
    n_fail = sum(int(r["Failure Count"]) for r in rpcs.values())

    def pct(name: str, col: str) -> str:
        r = rows.get(name)
        return f"{float(r[col]):.0f}" if r and r["Request Count"] != "0" else "n/a"

    lines = [
        "# Soak test", "",
        f"Command: `python -m loadtests.soak --users {args.users} --minutes {args.minutes:g}` "
        f"(`make soak`). Machine: {platform.machine()}, {os.cpu_count()} cores, CPU only. Server: "
        "the tiny random test model from `make default-artifacts` (tiny Llama, 3 SAEs; not "
        "the trained embedded default), compiled mode, defaults otherwise; Locust's "
        "mixed task deck (plain, steered, reading, long prompt, cancel mid-stream, Encode) on "
        "loopback.", "",
        f"- users: {args.users} concurrent, for {wall / 60:.1f} min; Locust exit code {locust.returncode}",
        f"- requests: {n_req}, failures: {n_fail}",
        f"- TTFT ms p50 / p99: {pct('TTFT', '50%')} / {pct('TTFT', '99%')}",
        f"- TPOT ms p50 / p99: {pct('TPOT', '50%')} / {pct('TPOT', '99%')}",
        f"- tokens/s: {gen_tokens / wall:.1f} generated tokens per second over the run (server counter); "
        f"per stream p50 {pct('tokens/s', '50%')}",
        f"- RSS of the server process tree: {rss0:.0f} MiB at start, {rss1:.0f} MiB at end",
        f"- server alive at the end: {alive}; exit code after SIGTERM: {rc}", "",
        "| request | count | failures | p50 ms | p99 ms |", "| --- | ---: | ---: | ---: | ---: |",
    ]
    for name, r in sorted(agg.items()):
        lines.append(f"| {r['Type']} {name} | {r['Request Count']} | {r['Failure Count']} | "
                     f"{pct(name, '50%')} | {pct(name, '99%')} |")
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
