"""``make gpu-check``: what only a GPU can tell, in one script, on a machine with torch and
Triton only (no vLLM, no network, no virtualenv; run from the repository root with the
machine's ``python3``), in at most about ten minutes.

Parts, in order (each says what it ran and what it found; later parts are skipped, saying
so, when the time budget is spent):

1. ``tests``: the CUDA kernel and table tests (``tests/sae_runtime/test_kernels_cuda.py``,
   ``test_tables.py -m cuda``) through pytest, when pytest is importable (else: skipped,
   saying so; the parts below do not need it).
2. ``replay``: the hook captured in a real CUDA graph (``torch.cuda.graph``) once, with
   empty tables, then replayed over steps whose tables the planner's calls rewrite in place
   (requests joining and leaving, windows, GT / LT conditions, a latch across steps, padding
   rows, a transcoder's stash), with ``torch.cuda.set_sync_debug_mode("error")`` around
   each step's upload and replay (a host sync there raises). Each replay is compared with
   the same hook run eagerly on the device (a twin fed the same steps), and, for the
   element-wise architectures, with the CPU path (``splice_compact``) on the host.
3. ``graph_cost``: what a captured hook costs per replay at decode sizes, with no steered
   row (what a plain step would pay inside a FULL graph) and with every row steered,
   against an empty graph: the numbers docs/gpu.md's full-graph design needs.
4. ``bench``: the kernel grid of ``loadtests/bench_kernels.py`` (splice, read, sparse
   decode: d_sae 16k/65k/131k x k 32/64/128 x tokens 1/64/512), with achieved bandwidth
   against the device's measured copy bandwidth and its nominal peak, and the issue's
   kernel targets (>= 50% of peak HBM bandwidth at 512 tokens for splice and decode,
   >= 10x dense at d_sae >= 65k) marked met or missed.

Writes ``docs/benchmarks_gpu.json`` and ``docs/benchmarks_gpu.md`` (``--out-dir``).

``--dry-run`` (any machine, ``make gpu-check DRY_RUN=1``): prints the plan, imports
everything the real run imports, runs the parts a CPU can run (the replay harness eagerly
on CPU, one small benchmark row per kernel, the report writer into a temporary directory)
and exits 0; it writes nothing under docs/.

    python3 -m loadtests.gpu_check [--dry-run] [--out-dir docs] [--budget-min 9] [--quick]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from loadtests import bench_kernels
from sae_runtime import kernels
from sae_runtime.ops import Mode
from sae_runtime.spec.payloads import EditPayload, RequestPayload
from sae_runtime.step.planner import ScheduledRequest, StepDescription, compile_request, plan_step
from sae_runtime.step.tables import HookTables
from tests.sae_runtime._factories import random_sae
from tests.sae_runtime._steps import fill, make_requests, schedule, transcoder

ROOT = Path(__file__).resolve().parents[1]
TEST_FILES = ["tests/sae_runtime/test_kernels_cuda.py", "tests/sae_runtime/test_tables.py"]
REPLAY_CASES = [("jumprelu", False), ("standard", False), ("topk", False), ("groupmax", False),
                ("jumprelu", True)]
ELEMENTWISE = {"standard", "jumprelu", "gated"}  # no TopK membership to tie between devices

# Vendor HBM bandwidth in GB/s, matched by substring of torch.cuda.get_device_name (first
# match wins, so the specific names come first).
NOMINAL_PEAK_GBPS = [("H200", 4800), ("H100 NVL", 3900), ("H100 PCIe", 2000), ("H100", 3350),
                     ("B200", 8000), ("A100-SXM4-80GB", 2039), ("A100 80GB", 1935),
                     ("A100", 1555), ("L40S", 864), ("A10G", 600), ("A10", 600), ("L4", 300),
                     ("RTX 4090", 1008)]

PLAN = [
    ("tests", "pytest -m cuda " + " ".join(TEST_FILES) + " (needs pytest; skipped without)"),
    ("replay", "torch.cuda.graph capture of HookTables.apply, replayed over changing tables "
               f"({', '.join(a + (' transcoder' if t else '') for a, t in REPLAY_CASES)}; "
               "d_in 576, d_sae 16384, 64 rows), set_sync_debug_mode('error') around "
               "upload + replay"),
    ("graph_cost", "replay time of a captured hook with 0 and all rows steered vs an empty "
                   "graph (jumprelu, topk; d_in 2304; d_sae 16k/65k; 1/8/64/256 rows)"),
    ("bench", "loadtests.bench_kernels grid with bandwidth vs measured copy and nominal "
              "peak; the issue's kernel targets"),
]


def log(msg: str) -> None:
    print(f"gpu-check: {msg}", flush=True)


def environment() -> dict:
    env = {"python": platform.python_version(), "torch": torch.__version__,
           "cuda_available": torch.cuda.is_available(), "machine": platform.machine(),
           "pytest": importlib.util.find_spec("pytest") is not None}
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        env.update(device=p.name, capability=f"{p.major}.{p.minor}",
                   memory_gib=round(p.total_memory / 2**30, 1), cuda=torch.version.cuda,
                   sm_count=p.multi_processor_count)
    env["kernel_backend_cuda"] = (kernels.backend_for(torch.device("cuda"))
                                  if torch.cuda.is_available() else None)
    return env


def nominal_peak(device_name: str) -> float | None:
    for key, gbps in NOMINAL_PEAK_GBPS:
        if key in device_name:
            return float(gbps)
    return None


# ---------------------------------------------------------------------------- 1. tests


def run_tests(dry: bool, timeout_s: float) -> dict:
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=",
           "-m", "cuda", *TEST_FILES]
    out = {"cmd": " ".join(cmd[2:])}
    if importlib.util.find_spec("pytest") is None:
        out["status"] = "skipped: pytest is not installed here, so the CUDA kernel and table " \
                        "tests did not run (the replay and benchmark parts below do not need it)"
        return out
    if dry:
        out["status"] = "dry run: would run it"
        return out
    try:
        p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        out["status"] = f"failed: timed out after {timeout_s:.0f} s"
        return out
    lines = [ln for ln in p.stdout.splitlines() if ln.strip()]
    out["summary"] = lines[-1] if lines else ""
    out["status"] = "passed" if p.returncode == 0 else f"failed (exit {p.returncode})"
    if p.returncode != 0:
        out["tail"] = p.stdout[-4000:] + p.stderr[-2000:]
    return out


# ---------------------------------------------------------------------------- 2. replay


def _sae(arch: str, is_transcoder: bool, d_in: int, d_sae: int):
    return transcoder(arch, d_in, d_sae, 7) if is_transcoder else random_sae(arch, d_in, d_sae, seed=7)


def _body(hook: HookTables, is_transcoder: bool, h: torch.Tensor, x: torch.Tensor):
    """The op's work for one hook (the transcoder stashes its MLP input first)."""
    if is_transcoder:
        hook.stash_input(x)
        return hook.apply(h, None)
    return hook.apply(h, x)


def replay_case(arch: str, is_transcoder: bool, device: str, d_in: int = 576,
                d_sae: int = 16384, rows: int = 64, steps: int = 6) -> dict:
    """One SAE: capture once, replay over ``steps`` steps (see the module doc). On CPU
    (the dry run) the same loop runs the body eagerly: it checks the harness, not a graph."""
    cuda = device == "cuda"
    sae_host = _sae(arch, is_transcoder, d_in, d_sae)
    sae = sae_host.to(device)
    slots, feats = 8, 4
    hook = HookTables(sae, rows, slots, feats)  # on CUDA: staged, pinned host tables
    twin = HookTables(sae, rows, slots, feats)  # the same device, run eagerly
    host = HookTables(sae_host, rows, slots, feats)  # the CPU path on the host
    rng = np.random.default_rng(0)
    requests = make_requests(rng, d_sae, feats, n=4)
    h_in = torch.zeros(rows, d_in, device=device)
    x_in = torch.zeros(rows, d_in, device=device)
    graph = None
    if cuda:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # Triton compiles outside the capture
            for _ in range(2):
                _body(hook, is_transcoder, h_in, x_in)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = _body(hook, is_transcoder, h_in, x_in)
    g = torch.Generator().manual_seed(0)
    worst_twin = worst_host = 0.0
    steered = 0
    for _ in range(steps):
        step = schedule(rng, requests, rows)
        for t in (twin, host):
            fill(t, step)
        fill(hook, step)  # the planner's writes and its upload, as the worker runs them
        h = torch.randn(rows, d_in, generator=g)
        x = torch.randn(rows, d_in, generator=g)
        h_in.copy_(h)
        x_in.copy_(x)
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
            try:
                hook.upload()  # again, under the check: a copy into the fixed mirrors
                graph.replay()
            finally:
                torch.cuda.set_sync_debug_mode("default")
            torch.cuda.synchronize()
        else:
            out = _body(hook, is_transcoder, h_in, x_in)
        want = _body(twin, is_transcoder, h_in.clone(), x_in.clone())
        worst_twin = max(worst_twin, float((out - want).abs().max()))
        if arch in ELEMENTWISE:
            ref = _body(host, is_transcoder, h, x)
            worst_host = max(worst_host, float((out.cpu() - ref).abs().max()))
        steered += int(not torch.equal(out.cpu(), h))
    tol = 1e-3
    ok = worst_twin <= tol and steered > 0 and (arch not in ELEMENTWISE or worst_host <= tol)
    return {"arch": arch, "transcoder": is_transcoder, "device": device, "captured": cuda,
            "steps": steps, "steered_steps": steered, "max_abs_err_vs_eager": worst_twin,
            "max_abs_err_vs_cpu_path": worst_host if arch in ELEMENTWISE else None,
            "sync_debug_error_mode": cuda, "ok": ok}


# ---------------------------------------------------------------------------- 3. graph cost


def graph_cost(device: str, quick: bool) -> list[dict]:
    """Microseconds per replay of: an empty graph (one copy), the hook with no steered row,
    the hook with every row steered (4 edits each)."""
    d_in = 2304
    out = []
    for arch in ("jumprelu", "topk"):
        for d_sae in ((16384,) if quick else (16384, 65536)):
            sae = random_sae(arch, d_in, d_sae, seed=1).to(device)
            for rows in (1, 8, 64, 256):
                out.append(_graph_cost_row(sae, arch, d_sae, rows, device))
                log(f"graph_cost {arch} d_sae={d_sae} rows={rows}: " + ", ".join(
                    f"{k} {out[-1][k]:.1f} us" for k in ("empty_us", "plain_us", "steered_us")))
    return out


def _graph_cost_row(sae, arch: str, d_sae: int, rows: int, device: str) -> dict:
    hook = HookTables(sae, rows, rows, 4)
    h = torch.randn(rows, sae.cfg.d_in, device=device)
    r = torch.randn(rows, sae.cfg.d_in, device=device)

    def captured(fn):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                fn()
        torch.cuda.current_stream().wait_stream(side)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            fn()
        return g

    empty = captured(lambda: h.clone())
    hooked = captured(lambda: hook.apply(h, r))

    def us(g) -> float:
        return bench_kernels._time(g.replay, 20, True) * 1000

    res = {"arch": arch, "d_in": sae.cfg.d_in, "d_sae": d_sae, "rows": rows,
           "empty_us": us(empty)}
    res["plain_us"] = us(hooked)  # tables clear: every row tok_slot -1
    rng = np.random.default_rng(0)
    clamps = RequestPayload(rid="c", edits=tuple(  # 4 unconditional clamps
        EditPayload(0, int(f), int(Mode.CLAMP), 3.0) for f in rng.choice(d_sae, 4, replace=False)))
    plan = compile_request(clamps, 4)
    hook.clear()
    plan_step([hook], StepDescription([ScheduledRequest(f"r{a}", a, a + 1, 10, plan)
                                       for a in range(rows)]))  # one request per row
    res["steered_us"] = us(hooked)
    hook.clear()
    return res


# ---------------------------------------------------------------------------- 4. bench


def bench(device: str, quick: bool, dry: bool) -> tuple[list[dict], float | None]:
    peak = bench_kernels.peak_copy_gbps() if device == "cuda" else None
    if dry:  # one small row per kernel: the runners and the report run, nothing is measured
        sae = bench_kernels._sae(64, 512, device)
        return [fn(sae, 8, 4, 1, device, peak) for fn in bench_kernels.RUNNERS.values()], peak
    d_saes = [16384, 65536] if quick else [16384, 65536, 131072]
    ks = [32, 128] if quick else [32, 64, 128]
    rows = []
    for name, fn in bench_kernels.RUNNERS.items():
        for d_sae in d_saes:
            sae = bench_kernels._sae(576, d_sae, device)
            for k in ks:
                for T in (1, 64, 512):
                    rows.append(fn(sae, k, T, 3 if quick else 5, device, peak))
        log(f"bench {name}: {sum(r['kernel'] == name for r in rows)} rows")
    return rows, peak


def targets(rows: list[dict], nominal: float | None) -> list[dict]:
    """The issue's kernel targets, met or missed (never weakened)."""
    out = []
    for kernel in ("splice", "decode"):
        at512 = [r for r in rows if r["kernel"] == kernel and r["tokens"] == 512 and "gbps" in r]
        if at512:
            peak = nominal or at512[0]["peak_gbps"]
            worst = min(r["gbps"] / peak for r in at512)
            out.append({"target": f"{kernel} >= 50% of peak HBM bandwidth at 512 tokens",
                        "peak": "nominal" if nominal else "measured copy",
                        "value": round(worst, 3), "met": worst >= 0.5})
    for kernel in ("splice", "read", "decode"):
        big = [r for r in rows if r["kernel"] == kernel and r["d_sae"] >= 65536 and "triton_ms" in r]
        if big:
            worst = min(r["dense_ms"] / r["triton_ms"] for r in big)
            out.append({"target": f"{kernel} >= 10x faster than dense at d_sae >= 65k",
                        "value": round(worst, 2), "met": worst >= 10})
    return out


# ---------------------------------------------------------------------------- report


def markdown(res: dict) -> str:
    env = res["environment"]
    lines = ["# GPU check (`make gpu-check`)", "",
             f"Command: `{res['command']}`; {res['started']}; {res['elapsed_s']:.0f} s.", "",
             f"Device: {env.get('device', 'none')} (capability {env.get('capability', '-')}, "
             f"{env.get('memory_gib', '-')} GiB); torch {env['torch']}, CUDA "
             f"{env.get('cuda', '-')}, Triton {env['triton']}, Python {env['python']}; "
             f"kernel backend on CUDA: {env.get('kernel_backend_cuda')}. No vLLM on this "
             "machine: nothing here ran the engine.", "",
             "## Tests", "", f"- `{res['tests']['cmd']}`: {res['tests']['status']}"
             + (f" ({res['tests']['summary']})" if res["tests"].get("summary") else ""), "",
             "## CUDA graph capture and replay of the hook", ""]
    if res["replay"]:
        lines += ["Steps with windows, GT / LT conditions and a latch across steps; outputs "
                  "compared (the latch through its effect).", "",
                  "| SAE | captured | steps (steered) | max abs err vs eager | vs CPU path | ok |",
                  "| --- | --- | --- | --- | --- | --- |"]
        for r in res["replay"]:
            host = "-" if r["max_abs_err_vs_cpu_path"] is None else f"{r['max_abs_err_vs_cpu_path']:.2e}"
            lines.append(f"| {r['arch']}{' transcoder' if r['transcoder'] else ''} | "
                         f"{r['captured']} | {r['steps']} ({r['steered_steps']}) | "
                         f"{r['max_abs_err_vs_eager']:.2e} | {host} | {r['ok']} |")
    else:
        lines.append(f"not run: {res.get('replay_skipped', '')}")
    lines += ["", "## Cost of a captured hook per replay (us)", ""]
    if res["graph_cost"]:
        lines += ["| SAE | d_sae | rows | empty graph | hook, no row steered | hook, all rows "
                  "steered |", "| --- | --- | --- | --- | --- | --- |"]
        for r in res["graph_cost"]:
            lines.append(f"| {r['arch']} | {r['d_sae']} | {r['rows']} | {r['empty_us']:.1f} | "
                         f"{r['plain_us']:.1f} | {r['steered_us']:.1f} |")
    else:
        lines.append(f"not run: {res.get('graph_cost_skipped', '')}")
    lines += ["", "## Kernels", ""]
    peak = res.get("peak_copy_gbps")
    nominal = res.get("nominal_peak_gbps")
    lines.append(f"Measured copy bandwidth {peak:.0f} GB/s; nominal peak "
                 f"{nominal if nominal else 'unknown'} GB/s." if peak else
                 "No CUDA device: no bandwidth.")
    lines += ["", "| kernel | d_sae | k | tokens | ms (columns) | GB/s | of copy | of nominal |",
              "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in res["bench"]:
        cols = bench_kernels.COLUMNS[r["kernel"]]
        cells = ", ".join(f"{c[:-3]} {r[c]:.3f}" for c in cols if c in r)
        bw = (f"{r['gbps']:.0f} | {r['frac_peak']:.0%} | "
              + (f"{r['gbps'] / nominal:.0%}" if nominal else "-")) if "gbps" in r else "- | - | -"
        lines.append(f"| {r['kernel']} | {r['d_sae']} | {r['k']} | {r['tokens']} | {cells} | {bw} |")
    lines += ["", "## Targets (issue 26)", ""]
    for t in res["targets"]:
        lines.append(f"- {t['target']}: {t['value']} ({'met' if t['met'] else 'MISSED'})")
    if not res["targets"]:
        lines.append("- not evaluated (no CUDA measurements)")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dry-run", action="store_true")
    ap.add_argument("--out-dir", type=Path, default=ROOT / "docs")
    ap.add_argument("--budget-min", type=float, default=9.0,
                    help="skip the remaining parts, saying so, once this is spent")
    ap.add_argument("--quick", action="store_true", help="a smaller benchmark grid")
    args = ap.parse_args(argv)
    t0 = time.monotonic()
    cuda = torch.cuda.is_available()
    dry = args.dry_run
    log("plan:")
    for name, what in PLAN:
        log(f"  {name}: {what}")
    if not cuda and not dry:
        log("error: no CUDA device (torch.cuda.is_available() is False); use --dry-run")
        return 2
    device = "cuda" if cuda and not dry else "cpu"
    env = environment()
    if dry:  # the real run imports these lazily, on its first CUDA call
        import sae_runtime.kernels.triton_decode  # noqa: F401
        import sae_runtime.kernels.triton_splice  # noqa: F401
        import sae_runtime.kernels.triton_topk_read  # noqa: F401

        log("imports: the Triton kernel modules import")
    log("environment: " + json.dumps(env))
    res: dict = {"command": "python3 -m loadtests.gpu_check" + (" --dry-run" if dry else ""),
                 "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "environment": env,
                 "dry_run": dry}

    def left() -> float:
        return args.budget_min * 60 - (time.monotonic() - t0)

    res["tests"] = run_tests(dry, timeout_s=min(300.0, max(left() - 240, 30)))
    log(f"tests: {res['tests']['status']} {res['tests'].get('summary', '')}")
    res["replay"] = []
    for arch, tc in REPLAY_CASES if not dry else REPLAY_CASES[:1] + REPLAY_CASES[-1:]:
        kw = {} if not dry else {"d_in": 32, "d_sae": 64, "rows": 16, "steps": 3}
        r = replay_case(arch, tc, device, **kw)
        res["replay"].append(r)
        log(f"replay {arch}{' transcoder' if tc else ''} ({'captured' if r['captured'] else 'eager, dry run'}): "
            f"err vs eager {r['max_abs_err_vs_eager']:.2e}, ok {r['ok']}")
    res["graph_cost"] = []
    if dry:
        res["graph_cost_skipped"] = "dry run (needs CUDA graphs)"
    elif left() < 180:
        res["graph_cost_skipped"] = "time budget spent"
    else:
        res["graph_cost"] = graph_cost(device, quick=args.quick or left() < 300)
    res["bench"], res["peak_copy_gbps"] = ([], None)
    if dry or left() > 60:
        res["bench"], res["peak_copy_gbps"] = bench(device, args.quick or (not dry and left() < 240), dry)
    res["nominal_peak_gbps"] = nominal_peak(env.get("device", "")) if cuda and not dry else None
    res["targets"] = targets(res["bench"], res["nominal_peak_gbps"]) if not dry else []
    res["elapsed_s"] = time.monotonic() - t0
    res["vllm_imported"] = "vllm" in sys.modules
    out_dir = Path(tempfile.mkdtemp(prefix="gpu_check_")) if dry else args.out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "benchmarks_gpu.json").write_text(json.dumps(res, indent=1, default=str))
    (out_dir / "benchmarks_gpu.md").write_text(markdown(res))
    log(f"wrote {out_dir / 'benchmarks_gpu.json'} and benchmarks_gpu.md")
    log(f"vLLM imported: {'yes' if res['vllm_imported'] else 'no'}")
    failed = [r for r in res["replay"] if not r["ok"]]
    if dry:
        log(f"dry run done in {res['elapsed_s']:.0f} s; nothing under docs/ was written")
        return 0 if not failed else 1
    bad = failed or res["tests"]["status"].startswith("failed")
    log("done: " + ("FAILED" if bad else "ok") + f" in {res['elapsed_s']:.0f} s")
    return 1 if bad else 0


if __name__ == "__main__":
    os.chdir(ROOT)
    sys.exit(main())
