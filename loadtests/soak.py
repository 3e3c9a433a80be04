"""Soak test: steerd under Locust for a fixed time, memory sampled per process.

    python -m loadtests.soak --users 128 --minutes 30               (make soak)
    python -m loadtests.soak --users 64 --minutes 6 --model tiny --out loadtests/reports/diag.md

Starts `steerd serve` on loopback with metrics on (``--model default``: the trained
embedded default, server/embedded with its SAE topics_l1, ``--dtype float32`` as `make
serve`; ``--model tiny``: the tiny random test model with its 3 SAEs), runs Locust
headless (loadtests/locustfile.py, its whole task deck: plain, steered, reading, long,
cancel, Encode; steered and reading requests use the served SAEs) and every
``--interval`` seconds records, for each process of the server's tree (server, engine
core, each worker; named by cmdline), RSS, USS and PSS (psutil ``memory_full_info``),
plus the interval's throughput (deltas of the server's Prometheus counters) and its p99
TPOT (the per-stream TPOTs Locust measured in that interval, from ``--tpot-log``).
Writes a report (``--out``, default docs/soak.md), the raw samples (``--json``) and a plot
(``--png``: RSS per process, throughput and p99 TPOT over time; needs matplotlib).

``--env K=V`` sets a variable for the server (e.g. ``MALLOC_ARENA_MAX=2`` to compare
allocator settings); ``--tracemalloc DIR`` runs the server under tracemalloc and dumps a
snapshot into DIR at every sample (diagnosis only: it slows the server down).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
MODELS = ("default", "tiny")
GROWTH_AFTER_S = 300.0  # growth is measured from the first sample at or after 5 minutes
READ_SEQUENCE = "read sequence:"  # prefix of the locustfile's read-order failures


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_command(model: str, port: int, mport: int) -> list[str]:
    if model == "default":
        e = ROOT / "server" / "embedded"
        return [str(BIN / "steerd"), "serve", "--model", str(e / "model"), "--dtype", "float32",
                "--sae", str(e / "saes" / "topics_l1"),
                "--chat-template", str(e / "chat_template.jinja"),
                "--host", "127.0.0.1", "--port", str(port), "--metrics-port", str(mport)]
    d = ROOT / ".cache" / "default"
    return [str(BIN / "steerd"), "serve", "--model", str(d / "tiny-llama"), "--dtype", "float32",
            "--sae", str(d / "saes" / "resid_l1"), "--sae", str(d / "saes" / "jumprelu_l2pre"),
            "--sae", str(d / "saes" / "topk_l0"), "--host", "127.0.0.1", "--port", str(port),
            "--metrics-port", str(mport)]


def process_name(p: psutil.Process, server_pid: int) -> str:
    """server / engine core / worker TP0 ... from the pid and the cmdline (vLLM sets titles)."""
    if p.pid == server_pid:
        return "server"
    try:
        cmd = " ".join(p.cmdline())
    except psutil.Error:
        return f"pid {p.pid}"
    if "EngineCore" in cmd:
        return "engine core"
    if "Worker" in cmd:
        tail = cmd.split("Worker", 1)[1].lstrip("_").split()
        return f"worker {tail[0]}" if tail else "worker"
    if "resource_tracker" in cmd:
        return "resource tracker"
    return (Path(p.cmdline()[0]).name if p.cmdline() else "?") + f" {p.pid}"


def memory_sample(server_pid: int) -> dict[str, dict[str, float]]:
    """name -> {rss, uss, pss} in MiB for every process of the tree."""
    root = psutil.Process(server_pid)
    out: dict[str, dict[str, float]] = {}
    for p in [root, *root.children(recursive=True)]:
        try:
            name = process_name(p, server_pid)
            try:
                m = p.memory_full_info()
                row = {"rss": m.rss, "uss": m.uss, "pss": getattr(m, "pss", 0.0)}
            except psutil.AccessDenied:
                row = {"rss": p.memory_info().rss, "uss": 0.0, "pss": 0.0}
        except psutil.Error:
            continue  # exited between the listing and the read
        if name in out:
            name = f"{name} ({p.pid})"
        out[name] = {k: v / 2**20 for k, v in row.items()}
    return out


def scrape(url: str) -> dict[str, float]:
    """Prometheus samples 'name{labels}' -> value (labels sorted)."""
    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(url, timeout=10).read().decode()
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


def requests_total(m: dict[str, float]) -> float:
    return sum(v for k, v in m.items() if k.startswith("steerd_requests_total{"))


def p99(values: list[float]) -> float | None:
    if not values:
        return None
    v = sorted(values)
    return v[min(len(v) - 1, int(0.99 * len(v)))]


@dataclass
class Sampler:
    """Every ``interval`` s: per-process memory, server counters (background thread)."""

    server_pid: int
    metrics_url: str
    interval: float
    t0: float
    tracemalloc_dir: Path | None = None
    samples: list[dict] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)

    def take(self) -> None:
        t = time.monotonic() - self.t0
        try:
            m = scrape(self.metrics_url)
        except OSError:
            m = {}
        if self.tracemalloc_dir is not None:
            os.kill(self.server_pid, signal.SIGUSR2)
        self.samples.append({
            "t_s": round(t, 1), "mem": memory_sample(self.server_pid),
            "tokens": m.get("steerd_generated_tokens_total", 0.0),
            "requests": requests_total(m),
            "read_buffers": m.get("steerd_read_buffers", 0.0),
            "active_streams": m.get("steerd_active_streams", 0.0),
            "engine_requests": m.get("steerd_engine_unfinished_requests", 0.0),
        })

    def run(self) -> None:
        self.take()
        while not self._stop.wait(self.interval - (time.monotonic() - self.t0) % self.interval):
            self.take()

    def stop(self) -> None:
        self._stop.set()


def tpot_intervals(path: Path, samples: list[dict], t0_wall: float) -> None:
    """Add each interval's p99 TPOT (ms) and stream count from the Locust log to ``samples``."""
    rows = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                t, v = line.split()
                rows.append((float(t) - t0_wall, float(v)))
            except ValueError:
                continue
    for prev, cur in zip(samples, samples[1:], strict=False):
        vals = [v for t, v in rows if prev["t_s"] <= t < cur["t_s"]]
        cur["p99_tpot_ms"] = p99(vals)
        cur["streams"] = len(vals)


def growth(samples: list[dict], name: str, key: str = "rss") -> tuple[float, float, float, float]:
    """first, at 5 min, end (MiB) and growth after 5 min in % for one process."""
    have = [s for s in samples if name in s["mem"]]
    first = have[0]["mem"][name][key]
    at5 = next((s for s in have if s["t_s"] >= GROWTH_AFTER_S), have[-1])["mem"][name][key]
    end = have[-1]["mem"][name][key]
    return first, at5, end, (100.0 * (end - at5) / at5 if at5 else 0.0)


def tree(sample: dict, key: str = "rss") -> float:
    return sum(v[key] for v in sample["mem"].values())


def traced_serve(argv: list[str], snap_dir: Path) -> int:
    """Run steerd's CLI under tracemalloc; SIGUSR2 writes a snapshot (diagnosis only)."""
    import tracemalloc

    tracemalloc.start(16)
    snap_dir.mkdir(parents=True, exist_ok=True)
    n = [0]

    def dump(*_):
        n[0] += 1
        tracemalloc.take_snapshot().dump(str(snap_dir / f"snap-{n[0]:03d}.pickle"))

    signal.signal(signal.SIGUSR2, dump)
    from server.cli import main as cli_main

    return cli_main(argv)


def plot(samples: list[dict], path: Path, title: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)", file=sys.stderr)
        return False
    names = list(samples[-1]["mem"])
    at5 = next((s for s in samples if s["t_s"] >= GROWTH_AFTER_S), samples[-1])
    fig, ax = plt.subplots(4, 1, figsize=(9, 11), sharex=True)
    for name in names:
        pts = [(s["t_s"] / 60, s["mem"][name]["rss"]) for s in samples if name in s["mem"]]
        ax[0].plot(*zip(*pts, strict=True), marker=".", label=name)
        base = at5["mem"].get(name, {}).get("rss")
        if base and base > 100:  # the small helper processes would only add noise
            ax[1].plot([t for t, _ in pts], [100.0 * (v - base) / base for _, v in pts],
                       marker=".", label=name)
    ax[0].set_ylabel("RSS (MiB)")
    ax[0].legend(fontsize=8)
    ax[1].axhspan(-2, 2, color="0.9")
    ax[1].axvline(at5["t_s"] / 60, color="0.6", lw=0.8)
    ax[1].set_ylabel(f"RSS vs {at5['t_s'] / 60:.1f} min (%)")
    ax[1].legend(fontsize=8)
    iv = samples[1:-1] or samples[1:]  # intervals under load (the last sample is idle)
    ts = [s["t_s"] / 60 for s in iv]
    ax[2].plot(ts, [s.get("tokens_per_s", 0) for s in iv], marker=".", label="generated tokens/s")
    ax[2].plot(ts, [s.get("requests_per_s", 0) * 10 for s in iv], marker=".",
               label="requests/s x 10")
    ax[2].set_ylabel("throughput")
    ax[2].legend(fontsize=8)
    ax[3].plot(ts, [s.get("p99_tpot_ms") or float("nan") for s in iv], marker=".", color="C3")
    ax[3].set_ylabel("p99 TPOT (ms)")
    ax[3].set_xlabel("minutes")
    for a in ax:
        a.grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    return True


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--traced-serve":  # the server under tracemalloc
        sys.exit(traced_serve(sys.argv[3:], Path(sys.argv[2])))
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--users", type=int, default=128)
    ap.add_argument("--minutes", type=float, default=30.0)
    ap.add_argument("--model", choices=MODELS, default="default",
                    help="default: the trained embedded default (server/embedded, SAE "
                         "topics_l1, float32); tiny: the random test model (.cache/default)")
    ap.add_argument("--interval", type=float, default=30.0, help="seconds between samples")
    ap.add_argument("--env", action="append", default=[], metavar="K=V",
                    help="environment variable for the server (repeatable)")
    ap.add_argument("--tracemalloc", type=Path, default=None, metavar="DIR",
                    help="run the server under tracemalloc, a snapshot into DIR per sample")
    ap.add_argument("--reports", type=Path, default=ROOT / "loadtests" / "reports")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "soak.md")
    ap.add_argument("--json", type=Path, default=None, help="raw samples (default: --out with .json)")
    ap.add_argument("--png", type=Path, default=None, help="plot (default: --out with .png)")
    args = ap.parse_args()
    args.json = args.json or args.out.with_suffix(".json")
    args.png = args.png or args.out.with_suffix(".png")
    args.reports.mkdir(parents=True, exist_ok=True)
    port, mport = free_port(), free_port()
    cmd = server_command(args.model, port, mport)
    if args.tracemalloc is not None:
        cmd = [sys.executable, "-m", "loadtests.soak", "--traced-serve", str(args.tracemalloc),
               *cmd[1:]]
    env = dict(os.environ)
    env.update(kv.split("=", 1) for kv in args.env)
    log = open(args.reports / "soak-steerd.log", "wb")
    server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    murl = f"http://127.0.0.1:{mport}/metrics"
    tpot_log = args.reports / "soak-tpot.log"
    tpot_log.unlink(missing_ok=True)
    try:
        for _ in range(600):
            try:
                urllib.request.urlopen(murl, timeout=2)
                break
            except OSError:
                if server.poll() is not None:
                    raise SystemExit(f"steerd exited {server.returncode}; see {log.name}") from None
                time.sleep(1)
        time.sleep(2)
        t0, t0_wall = time.monotonic(), time.time()
        sampler = Sampler(server.pid, murl, args.interval, t0, args.tracemalloc)
        thread = threading.Thread(target=sampler.run, daemon=True)
        thread.start()
        locust_env = {k: v for k, v in os.environ.items() if not k.startswith("LOCUST_")}
        locust = subprocess.run(
            [str(BIN / "locust"), "-f", str(ROOT / "loadtests" / "locustfile.py"), "--headless",
             "-u", str(args.users), "-r", str(max(1, args.users // 8)),
             "-t", f"{int(args.minutes * 60)}s", "--stop-timeout", "30",
             "--host", f"127.0.0.1:{port}", "--only-summary", "--tpot-log", str(tpot_log),
             "--csv", str(args.reports / "soak")], capture_output=True, text=True,
            env=locust_env, cwd=ROOT)
        (args.reports / "soak-locust.log").write_text(locust.stdout + locust.stderr)
        sampler.stop()
        thread.join(60)
        time.sleep(5)  # streams Locust stopped have been torn down: the idle picture
        sampler.take()
        wall = time.monotonic() - t0
        alive = server.poll() is None
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            rc = server.wait(120)
        except subprocess.TimeoutExpired:
            server.kill()
            rc = "killed after 120 s"
    samples = sampler.samples
    for prev, cur in zip(samples, samples[1:], strict=False):
        dt = cur["t_s"] - prev["t_s"]
        cur["tokens_per_s"] = (cur["tokens"] - prev["tokens"]) / dt if dt > 0 else 0.0
        cur["requests_per_s"] = (cur["requests"] - prev["requests"]) / dt if dt > 0 else 0.0
    tpot_intervals(tpot_log, samples, t0_wall)
    report(args, samples, wall, locust.returncode, alive, rc, cmd, env)


def report(args, samples: list[dict], wall: float, locust_rc: int, alive: bool, rc, cmd,
           env) -> None:
    rows = {r["Name"]: r for r in csv.DictReader(open(args.reports / "soak_stats.csv"))}
    agg = {k: v for k, v in rows.items() if k != "Aggregated"}
    rpcs = {k: v for k, v in agg.items() if rows[k]["Type"] != "METRIC"}
    n_req = sum(int(r["Request Count"]) for r in rpcs.values())
    n_fail = sum(int(r["Failure Count"]) for r in rpcs.values())
    failures = list(csv.DictReader(open(args.reports / "soak_failures.csv")))
    n_seq = sum(int(f["Occurrences"]) for f in failures if READ_SEQUENCE in f["Error"])

    def pct(name: str, col: str) -> str:
        r = rows.get(name)
        return f"{float(r[col]):.0f}" if r and r["Request Count"] != "0" else "n/a"

    names = list(samples[-1]["mem"])
    g_tree = [tree(s) for s in samples]
    at5 = next((s for s in samples if s["t_s"] >= GROWTH_AFTER_S), samples[-1])
    tree_growth = 100.0 * (tree(samples[-1]) - tree(at5)) / tree(at5)
    load = samples[1:-1] or samples[1:]  # the intervals under load (the last is the idle one)
    env_set = [kv for kv in args.env]
    what = ("the trained embedded default (server/embedded/model, SAE topics_l1, "
            "--dtype float32, as `make serve`)" if args.model == "default" else
            "the tiny random test model from `make default-artifacts` (tiny Llama, 3 SAEs)")
    cmdline = (f"python -m loadtests.soak --users {args.users} --minutes {args.minutes:g} "
               f"--model {args.model}" + "".join(f" --env {kv}" for kv in env_set))
    arena = env.get("MALLOC_ARENA_MAX")
    lines = [
        "# Soak test", "",
        f"Command: `{cmdline}` (`make soak`). Machine: {platform.machine()}, "
        f"{os.cpu_count()} cores, CPU only. Server: {what}; compiled mode, defaults "
        "otherwise" + (f", MALLOC_ARENA_MAX={arena} in the server's environment"
                       if arena else "") +
        ". Locust's mixed task deck (plain, steered, reading, long prompt, cancel "
        "mid-stream, Encode) on loopback; every reading stream is checked position by "
        "position (each selected position exactly once, in order, with its token id).", "",
        f"- users: {args.users} concurrent, for {wall / 60:.1f} min; Locust exit code {locust_rc}",
        f"- requests: {n_req}, failures: {n_fail}",
        f"- read-sequence violations: {n_seq}",
        f"- TTFT ms p50 / p99: {pct('TTFT', '50%')} / {pct('TTFT', '99%')}",
        f"- TPOT ms p50 / p99: {pct('TPOT', '50%')} / {pct('TPOT', '99%')}",
        f"- tokens/s: {(samples[-1]['tokens'] - samples[0]['tokens']) / wall:.1f} generated "
        f"tokens per second over the run (server counter); per stream p50 {pct('tokens/s', '50%')}",
        f"- RSS of the whole process tree: {g_tree[0]:.0f} MiB first, {tree(at5):.0f} MiB at "
        f"{at5['t_s'] / 60:.1f} min, {g_tree[-1]:.0f} MiB at the end: "
        f"**{tree_growth:+.2f}%** after the first 5 minutes (peak {max(g_tree):.0f} MiB)",
        f"- server alive at the end: {alive}; exit code after SIGTERM: {rc}",
        f"- after the load stopped: {samples[-1]['active_streams']:.0f} active streams, "
        f"{samples[-1]['read_buffers']:.0f} read buffers, "
        f"{samples[-1]['engine_requests']:.0f} unfinished engine requests", "",
        "## Memory per process", "",
        f"Sampled every {args.interval:g} s (psutil `memory_full_info`; USS = pages only this "
        "process maps, PSS = shared pages split between their users). The last sample is "
        "taken 5 s after Locust stopped. Plot: [soak.png](soak.png); raw samples: "
        f"[{args.json.name}]({args.json.name}).", "",
        "| process | RSS first | RSS at 5 min | RSS end | growth after 5 min | USS at 5 min "
        "| USS end | USS growth |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name in names:
        f, a, e, gr = growth(samples, name)
        _, ua, ue, ug = growth(samples, name, "uss")
        lines.append(f"| {name} | {f:.0f} | {a:.0f} | {e:.0f} | {gr:+.2f}% | {ua:.0f} | "
                     f"{ue:.0f} | {ug:+.2f}% |")
    lines += ["", "## Per interval", "",
              "| minute | " + " | ".join(f"RSS {n}" for n in names) +
              " | tokens/s | requests/s | p99 TPOT ms | streams |",
              "| ---: | " + " | ".join("---:" for _ in names) + " | ---: | ---: | ---: | ---: |"]
    for s in load:
        mem = " | ".join(f"{s['mem'][n]['rss']:.0f}" if n in s["mem"] else "" for n in names)
        tp = s.get("p99_tpot_ms")
        lines.append(f"| {s['t_s'] / 60:.1f} | {mem} | {s.get('tokens_per_s', 0):.0f} | "
                     f"{s.get('requests_per_s', 0):.1f} | {'' if tp is None else f'{tp:.0f}'} | "
                     f"{s.get('streams', 0)} |")
    lines += ["", "## Requests", "",
              "| request | count | failures | p50 ms | p99 ms |", "| --- | ---: | ---: | ---: | ---: |"]
    for name, r in sorted(agg.items()):
        lines.append(f"| {r['Type']} {name} | {r['Request Count']} | {r['Failure Count']} | "
                     f"{pct(name, '50%')} | {pct(name, '99%')} |")
    if failures:
        lines += ["", "## Failures", "", "| request | error | count |", "| --- | --- | ---: |"]
        for f in failures:
            lines.append(f"| {f['Name']} | {f['Error'][:200]} | {f['Occurrences']} |")
    args.out.write_text("\n".join(lines) + "\n")
    args.json.write_text(json.dumps({"command": cmdline, "server": cmd, "users": args.users,
                                     "minutes": args.minutes, "model": args.model,
                                     "env": env_set, "wall_s": wall, "requests": n_req,
                                     "failures": n_fail, "read_sequence_violations": n_seq,
                                     "samples": samples}, indent=1))
    plot(samples, args.png, f"steerd soak: {args.users} users, {args.minutes:g} min, "
                            f"{args.model} model")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
