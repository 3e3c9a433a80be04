"""One hook's per-step cost in the worker, measured in isolation (no engine).

Each cell is a steady stream of steps of ``B`` scheduled requests, each holding one of ``K``
distinct steering configs, at one hooked SAE; each step runs the worker's own per-step
sequence (``sae_runtime.vllm.worker.SteeringState`` on a V1 runner) on the public APIs it
calls, timed piece by piece:

- ``describe``: ``runner_v1.describe_step`` on a stand-in for vLLM's V1 runner holding the
  attributes it reads (request order, ``query_start_loc``, computed tokens, each request's
  ``extra_args`` carrying its msgpack payload, the step's input ids). Payloads are decoded
  and compiled once per request (``RequestPlans``), in the warm-up steps, as in the worker;
  ``compile_us_per_req`` is that one-off cost (decode + ``compile_request``), measured apart;
- ``plan``: ``planner.plan_step`` (fills the hook's tables and uploads them: a no-op on
  CPU, where the kernels read the host tables; ``--staged`` keeps separate device-side
  tables on CPU too, so ``plan`` includes the prefix copies a GPU worker enqueues);
- ``op``: ``HookTables.apply(h, residual)`` on random activations of the step's token rows,
  the call the worker's custom op ``sae_steer::sae_hook`` makes at a residual site (the
  op's dispatch from the compiled graph is not included);
- ``collect``: ``planner.collect_reads`` when the step has read segments (the worker's
  ``publish_reads``; msgpack and the ZMQ send are not included);
- ``clear``: ``HookTables.clear`` (the worker's ``end_step``).

``host`` = describe + plan + collect + clear, ``step`` = host + op; each is the median over
the timed steps (each step timed on its own, after warm-up steps), in microseconds per step
and per scheduled request. Between steps every request advances by the rows it computed, so
decode positions move as in a real run and plans are never replanned from a cache.

Grid: ``B`` in {1, 32, 64, 256}, ``K`` in {1, 16, 64} (``K <= B``; request ``i`` holds config
``i % K``), phases ``decode`` (one row per request) and ``mixed`` (one request in 8, at
least one, prefills a 128-token chunk of a long prompt; the others decode), workloads:

- ``clamp``: one clamp per request, at every position;
- ``cond_window``: one clamp, conditional on another feature (``GT``), in an absolute
  position window (``[4, 2**30)``: the rows here are all inside it, so every row does the work);
- ``token_ids``: one clamp whose selector lists 8 token ids (the step's tokens are drawn from
  16 ids, so about half the rows match);
- ``reads``: one read of the top 16 latents at every position, no edits (``K`` does not
  apply: a read has no config here beyond its ``top_k``, so only ``K = 1`` runs);
- ``unsteered``: the SAE is loaded but no request edits or reads (``K = 0``).

SAEs: ``embedded`` (``server/embedded/saes/topics_l1``: TopK, d_sae 1024, d_model 256) and
``synthetic`` (``--synthetic-arch``, default ``standard`` ReLU, d_sae 65536, d_model 256,
random weights). Tables are sized as an engine with ``max_num_seqs`` 256,
``max_num_batched_tokens`` 8192 and ``--max-interventions`` 8 would size them.

On CPU the TopK pre-activation here goes through torch's matmul; the worker gives CPU SAEs
vLLM's prepacked oneDNN GEMM where it is available (``worker._with_cpu_gemm``; vLLM is not
imported here), so the ``op`` column of a TopK SAE is an upper bound for the worker's.

    python -m loadtests.bench_step [--quick] [--out docs/benchmarks_step.json]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shlex
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from sae_runtime.hw import cpu_info
from sae_runtime.loading import load_sae
from sae_runtime.ops import Cond, Mode
from sae_runtime.saes.base import SAE, SAEConfig
from sae_runtime.spec.payloads import (
    EXTRA_ARGS_KEY,
    CondPayload,
    EditPayload,
    ReadPayload,
    RequestPayload,
    decode_request,
    encode_request,
)
from sae_runtime.spec.selectors import Frame, Range, Selector
from sae_runtime.step.planner import collect_reads, compile_request, plan_step
from sae_runtime.step.tables import HookTables
from sae_runtime.vllm.runner_v1 import RequestPlans, describe_step

ROOT = Path(__file__).resolve().parents[1]
EMBEDDED_SAE = ROOT / "server" / "embedded" / "saes" / "topics_l1"
SYNTHETIC_D_SAE = 65536
D_MODEL = 256  # the embedded model's width (the synthetic SAE uses it too)

MAX_NUM_SEQS = 256
MAX_NUM_BATCHED_TOKENS = 8192
MAX_INTERVENTIONS = 8

PREFILL_CHUNK = 128
PREFILL_EVERY = 8  # mixed steps: request i prefills when i % PREFILL_EVERY == 0
DECODE_PROMPT = 64  # prompt length of a decoding request (it starts at its first generated row)
PREFILL_PROMPT = 1 << 20  # a prefilling request's prompt: long enough to stay in prefill
WINDOW = (4, 1 << 30)  # cond_window's absolute window
TOKEN_POOL = 16  # the step's input ids are drawn from [0, TOKEN_POOL)
TOKEN_SET = 8  # ids a token_ids selector lists
READ_TOP_K = 16
CLAMP_VALUE = 4.0

WORKLOADS = {
    "clamp": "one clamp per request, every position",
    "cond_window": "one clamp, conditional on another feature (GT 0), in an absolute window",
    "token_ids": f"one clamp whose selector lists {TOKEN_SET} of the {TOKEN_POOL} token ids "
                 "the step's rows consume",
    "reads": f"one top-{READ_TOP_K} read per request, every position, no edits",
    "unsteered": "SAE loaded, no request edits or reads",
}
PHASES = {"decode": "every request decodes one row",
          "mixed": f"one request in {PREFILL_EVERY} (at least one) prefills a "
                   f"{PREFILL_CHUNK}-token chunk, the others decode"}
FULL = {"b": (1, 32, 64, 256), "k": (1, 16, 64), "warmup": 3, "min_reps": 5, "max_reps": 200,
        "cell_s": 2.0}
QUICK = {"b": (1, 64), "k": (1, 16), "warmup": 1, "min_reps": 3, "max_reps": 10, "cell_s": 0.5}
PARTS = ("describe", "plan", "op", "collect", "clear")


# --------------------------------------------------------------------------- inputs


def synthetic_sae(arch: str, d_sae: int = SYNTHETIC_D_SAE, d_in: int = D_MODEL,
                  seed: int = 0) -> SAE:
    """A random ``arch`` (``standard`` or ``topk``) SAE; decoder rows of unit-ish norm,
    tied encoder, zero biases."""
    g = torch.Generator().manual_seed(seed)
    cfg = SAEConfig(arch, d_in, d_sae, "blocks.1.hook_resid_post", 1, "resid_post",
                    k=32 if arch == "topk" else None)
    W_dec = torch.randn(d_sae, d_in, generator=g) / d_in**0.5
    return SAE(cfg, W_dec.t().contiguous(), W_dec, torch.zeros(d_sae), torch.zeros(d_in))


def sae_named(name: str, synthetic_arch: str, device: str) -> tuple[SAE, dict]:
    if name == "embedded":
        sae = load_sae(EMBEDDED_SAE)
        where = str(EMBEDDED_SAE.relative_to(ROOT))
    else:
        sae = synthetic_sae(synthetic_arch)
        where = "random weights"
    c = sae.cfg
    return sae.to(device), {"source": where, "architecture": c.architecture, "d_in": c.d_in,
                            "d_sae": c.d_sae, "k": c.k}


def configs(workload: str, k: int, d_sae: int, seed: int = 0) -> list[RequestPayload | None]:
    """``k`` distinct payloads of ``workload`` at hook 0 (None: a plain request); the rid is
    set per request (``payload_of``)."""
    if workload == "unsteered":
        return [None]
    g = np.random.default_rng(seed)
    feats = g.choice(d_sae, size=2 * k, replace=False)
    out = []
    for j in range(k):
        f, other = int(feats[j]), int(feats[k + j])
        if workload == "clamp":
            edits = (EditPayload(0, f, int(Mode.CLAMP), CLAMP_VALUE),)
        elif workload == "cond_window":
            sel = Selector(ranges=(Range(Frame.ABSOLUTE, *WINDOW),))
            edits = (EditPayload(0, f, int(Mode.CLAMP), CLAMP_VALUE, sel,
                                 CondPayload(other, int(Cond.GT), 0.0)),)
        elif workload == "token_ids":
            ids = tuple(sorted(int(t) for t in g.choice(TOKEN_POOL, size=TOKEN_SET, replace=False)))
            edits = (EditPayload(0, f, int(Mode.CLAMP), CLAMP_VALUE, Selector(token_ids=ids)),)
        elif workload == "reads":
            out.append(RequestPayload(reads=(ReadPayload(0, READ_TOP_K, ()),)))
            continue
        else:
            raise ValueError(f"unknown workload {workload!r}")
        out.append(RequestPayload(edits=edits))
    return out


def payload_of(cfg: RequestPayload | None, rid: str) -> dict | None:
    """The ``extra_args`` the server would send for one request holding ``cfg``."""
    if cfg is None:
        return None
    return {EXTRA_ARGS_KEY: encode_request(RequestPayload(rid=rid, edits=cfg.edits,
                                                          reads=cfg.reads))}


@dataclass
class Runner:
    """The attributes of vLLM's V1 model runner that ``describe_step`` reads."""

    device: torch.device
    input_batch: SimpleNamespace  # req_ids, num_reqs, num_computed_tokens_cpu
    requests: dict[str, SimpleNamespace]  # req_id -> sampling_params.extra_args, num_prompt_tokens
    query_start_loc: SimpleNamespace  # .np: [num_reqs + 1] row offsets
    input_ids: SimpleNamespace  # .np (host), .gpu (the device copy)
    chunk: np.ndarray  # rows each request computes per step

    @property
    def n_rows(self) -> int:
        return int(self.query_start_loc.np[-1])

    def advance(self) -> None:
        """The step ran: every request moves on by the rows it computed."""
        self.input_batch.num_computed_tokens_cpu += self.chunk


def make_runner(b: int, k: int, phase: str, workload: str, d_sae: int, device: str,
                seed: int = 0) -> Runner:
    """``b`` requests in one batch: request ``i`` holds config ``i % k`` and, in a mixed
    step, prefills a chunk when ``i % PREFILL_EVERY == 0`` (else it decodes)."""
    cfgs = configs(workload, k, d_sae, seed)
    prefill = np.zeros(b, dtype=bool)
    if phase == "mixed":
        prefill[::PREFILL_EVERY] = True
    chunk = np.where(prefill, PREFILL_CHUNK, 1).astype(np.int64)
    prompt = np.where(prefill, PREFILL_PROMPT, DECODE_PROMPT).astype(np.int64)
    computed = np.where(prefill, 0, DECODE_PROMPT).astype(np.int64)
    qsl = np.zeros(b + 1, dtype=np.int32)
    qsl[1:] = np.cumsum(chunk)
    ids = [f"req-{i}" for i in range(b)]
    requests = {rid: SimpleNamespace(
        sampling_params=SimpleNamespace(extra_args=payload_of(cfgs[i % len(cfgs)], f"rid-{i}")),
        num_prompt_tokens=int(prompt[i])) for i, rid in enumerate(ids)}
    tokens = np.random.default_rng(seed).integers(0, TOKEN_POOL, MAX_NUM_BATCHED_TOKENS)
    return Runner(torch.device(device),
                  SimpleNamespace(req_ids=ids, num_reqs=b, num_computed_tokens_cpu=computed),
                  requests, SimpleNamespace(np=qsl),
                  SimpleNamespace(np=tokens, gpu=torch.from_numpy(tokens).to(device)), chunk)


# --------------------------------------------------------------------------- timing


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def run_step(hook: HookTables, runner: Runner, plans: RequestPlans, h: torch.Tensor,
             residual: torch.Tensor, device: str) -> tuple[dict[str, float], dict[str, int]]:
    """One step, as the worker runs it; ``(seconds per part, what was planned)``."""
    hooks = [hook]
    t0 = time.perf_counter()
    step = describe_step(runner, plans)
    t1 = time.perf_counter()
    segments = plan_step(hooks, step)
    t2 = time.perf_counter()
    _sync(device)
    t2s = time.perf_counter()
    hook.apply(h, residual)
    _sync(device)
    t3 = time.perf_counter()
    if segments:
        collect_reads(hooks, segments)
    t4 = time.perf_counter()
    planned = {"scheduled": len(step.requests), "edit_rows": hook.n_edits,
               "edit_slots": hook.n_slots, "edited_token_rows": hook.n_rows,
               "read_rows": hook.n_read, "segments": len(segments)}
    hook.clear()
    t5 = time.perf_counter()
    runner.advance()
    return ({"describe": t1 - t0, "plan": t2 - t1, "op": t3 - t2s, "collect": t4 - t3,
             "clear": t5 - t4}, planned)


def compile_cost(runner: Runner) -> float:
    """Seconds per request to decode and compile every payload once (admission cost)."""
    reqs = list(runner.requests.values())
    t0 = time.perf_counter()
    for r in reqs:
        compile_request(decode_request(r.sampling_params.extra_args), r.num_prompt_tokens)
    return (time.perf_counter() - t0) / len(reqs)


def run_cell(hook: HookTables, sae_name: str, phase: str, workload: str, b: int, k: int,
             device: str, grid: dict, seed: int = 0) -> dict:
    """Warm-up steps, then timed steps until ``cell_s`` seconds (between ``min_reps`` and
    ``max_reps`` steps); medians in microseconds."""
    d_sae, d_in = hook.sae.cfg.d_sae, hook.sae.cfg.d_in
    runner = make_runner(b, k, phase, workload, d_sae, device, seed)
    n = runner.n_rows
    g = torch.Generator().manual_seed(seed)
    dtype = hook.sae.W_enc.dtype
    h = torch.randn(n, d_in, generator=g).to(device, dtype)
    residual = torch.randn(n, d_in, generator=g).to(device, dtype)
    compile_s = compile_cost(runner)
    plans = RequestPlans()
    gc.collect()
    for _ in range(grid["warmup"]):
        run_step(hook, runner, plans, h, residual, device)
    times: list[dict[str, float]] = []
    planned: dict[str, int] = {}
    t_end = time.perf_counter() + grid["cell_s"]
    while len(times) < grid["min_reps"] or (len(times) < grid["max_reps"]
                                            and time.perf_counter() < t_end):
        t, planned = run_step(hook, runner, plans, h, residual, device)
        times.append(t)
    med = {f"{p}_us": statistics.median(t[p] for t in times) * 1e6 for p in PARTS}
    host = [sum(t[p] for p in PARTS if p != "op") for t in times]
    step = [sum(t.values()) for t in times]
    res = {"sae": sae_name, "phase": phase, "workload": workload, "B": b, "K": k,
           "rows": n, "prefill_requests": int((runner.chunk > 1).sum()), "reps": len(times),
           **planned, **med,
           "host_us": statistics.median(host) * 1e6, "step_us": statistics.median(step) * 1e6,
           "compile_us_per_req": compile_s * 1e6 if workload != "unsteered" else 0.0}
    res["host_us_per_req"] = res["host_us"] / b
    res["op_us_per_req"] = res["op_us"] / b
    return res


def cells(grid: dict, workloads: list[str], phases: list[str]) -> list[tuple[str, str, int, int]]:
    """``(phase, workload, B, K)`` in run order."""
    out = []
    for phase in phases:
        for b in grid["b"]:
            for w in workloads:
                ks = [0] if w == "unsteered" else [1] if w == "reads" else \
                    [k for k in grid["k"] if k <= b]
                out += [(phase, w, b, k) for k in ks]
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="B 1/64, K 1/16, 1 warm-up step, 3-10 timed steps per cell")
    ap.add_argument("--saes", default="embedded,synthetic")
    ap.add_argument("--synthetic-arch", default="standard", choices=("standard", "topk"))
    ap.add_argument("--workloads", default=",".join(WORKLOADS))
    ap.add_argument("--phases", default=",".join(PHASES))
    ap.add_argument("--b", default=None, help="comma-separated request counts (overrides the mode)")
    ap.add_argument("--k", default=None, help="comma-separated config counts (overrides the mode)")
    ap.add_argument("--reps", type=int, default=None,
                    help="timed steps per cell, exactly (overrides the mode's time budget)")
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (default 1: the planner is single-threaded Python, and "
                         "a shared machine's other cores are not ours)")
    ap.add_argument("--staged", action="store_true",
                    help="separate device tables on CPU too (plan then includes the upload "
                         "copies; on a GPU the tables are always staged)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=None, help="write the results as JSON (loadtests.report "
                                                "renders docs/benchmarks_step.json)")
    args = ap.parse_args(argv)
    grid = dict(QUICK if args.quick else FULL)
    if args.b:
        grid["b"] = tuple(int(v) for v in args.b.split(","))
    if args.k:
        grid["k"] = tuple(int(v) for v in args.k.split(","))
    if args.reps is not None:
        grid.update(min_reps=args.reps, max_reps=args.reps)
    if args.warmup is not None:
        grid["warmup"] = args.warmup
    workloads = args.workloads.split(",")
    phases = args.phases.split(",")
    unknown = (set(workloads) - set(WORKLOADS)) | (set(phases) - set(PHASES))
    if unknown:
        ap.error(f"unknown workload or phase: {', '.join(sorted(unknown))}")
    torch.set_num_threads(args.threads)
    cpu = cpu_info()
    started = time.time()
    load0 = os.getloadavg()
    rows, saes = [], {}
    staged = False
    for name in args.saes.split(","):
        sae, saes[name] = sae_named(name, args.synthetic_arch, args.device)
        hook = HookTables(sae, MAX_NUM_BATCHED_TOKENS, MAX_NUM_SEQS, MAX_INTERVENTIONS,
                          staged=True if args.staged else None)
        staged = hook.staged
        print(f"\n{name}: {saes[name]}", flush=True)
        print(f"  {'phase':<7} {'workload':<12} {'B':>4} {'K':>3} {'rows':>5}"
              f" {'host us/step':>13} {'host us/req':>12} {'op us/step':>11} {'step us':>10}",
              flush=True)
        for phase, w, b, k in cells(grid, workloads, phases):
            with torch.inference_mode():  # as vLLM's worker runs the model
                r = run_cell(hook, name, phase, w, b, k, args.device, grid)
            rows.append(r)
            print(f"  {phase:<7} {w:<12} {b:>4} {k:>3} {r['rows']:>5} {r['host_us']:>13.1f}"
                  f" {r['host_us_per_req']:>12.2f} {r['op_us']:>11.1f} {r['step_us']:>10.1f}",
                  flush=True)
        del hook, sae
    cmd = "python -m loadtests.bench_step " + " ".join(
        shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    out = {"command": cmd.strip(), "wall_s": time.time() - started,
           "device": cpu.describe() if args.device == "cpu" else torch.cuda.get_device_name(),
           "cpu": cpu.as_dict(), "torch": torch.__version__,
           "python": platform.python_version(), "threads": torch.get_num_threads(),
           "load_avg": {"start": list(load0), "end": list(os.getloadavg())},
           "mode": "quick" if args.quick else "full", "staged": staged,
           "grid": {k: list(v) if isinstance(v, tuple) else v for k, v in grid.items()},
           "tables": {"max_num_seqs": MAX_NUM_SEQS, "max_num_batched_tokens":
                      MAX_NUM_BATCHED_TOKENS, "max_interventions": MAX_INTERVENTIONS},
           "saes": saes, "workloads": {w: WORKLOADS[w] for w in workloads},
           "phases": {p: PHASES[p] for p in phases}, "rows": rows}
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    return out


if __name__ == "__main__":
    main()
