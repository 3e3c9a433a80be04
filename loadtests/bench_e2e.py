"""End-to-end throughput: our engine vs plain vLLM, measured side by side in one run.

Both engines use the same vLLM settings (compiled mode, same batch limits). "plain" is
vLLM without the worker extension and without SAEs; the other rows are our engine with
four SAEs hooked (layers 15, 5, 10 and 25 of 30), under different request mixes. Each
row's ratio is its tokens/s divided by plain's tokens/s at the same load and parallelism
from the same run (``plain`` for 32 requests, ``plain128`` for the 128-request mixes).

Mixes: ``idle`` (no edits), ``clamp1`` (one clamp config for all), ``clamp16`` (16 distinct
configs), ``cond16`` (16 distinct configs, each a clamp inside a generation window and
conditional on another feature of the same SAE), ``reads16`` (every request reads top-16),
``acts1`` (16 of the 32 requests read one layer's raw activations, ``blocks.15.hook_resid_post``,
per token: ``activation_reads``; the other 16 are plain), ``sae4x16`` (16 configs, each
clamping one feature in each of the 4 SAEs), ``clamp64`` / ``clamp128`` (128 requests in one
batch with 64 / 128 distinct configs).

Declared activation sites (``--activation-hooks``) cost one op per step each, read or not.
Our main engine declares one (block 15's resid_post, which ``acts1`` reads), so every row of
it carries one idle activation-read op. ``sites0`` and ``sites30`` measure that cost
explicitly: plain traffic (no edits, no reads) on two more engines of ours, identical to the
main one (same 4 SAEs) except that ``sites0`` declares no activation site and ``sites30``
every layer's ``blocks.*.hook_resid_post``; all alive in the same block, interleaved with
the rest. Where an SAE edits a declared site (blocks 5, 10, 15, 25 here) the server adds a
before-edits twin op there (``docs/api.md``), so ``sites30`` runs 34 idle ops a step and the
main engine 2 (block 15's site and its twin). The JSON's ``act_sites_cost`` gives (sites0 - sites30) / plain (30 declared,
unused sites; target < 0.02) and (sites0 - idle) / plain (the one site every other row
carries).

``clt_clamp16`` runs in its own block on the embedded default model (``server/embedded``:
256 x 4 layers, real weights from the repository) with its cross-layer transcoder
``topics_clt`` served through ``--sae``: 16 distinct configs, each clamping one CLT feature
(flat index ``layer * 512 + index``, every source layer), against ``clt_plain`` (plain vLLM
on the same model, alive beside it, rounds interleaved). The SmolLM-shape model has no CLT.

With ``--tp2`` (default when there are >= 2 CPUs) a TP=2 block runs plain TP=2 vs our TP=2
engine on clamp16 and reads16 (on a model of the same depth with 8 heads instead of 9, which
two ranks can split).

Per block, plain vLLM and our engine(s) are started and stay alive side by side (those not
being timed idle), and every mix of them, plain included, is interleaved round by round
(the order rotates each round, with a pause before each timed round so one round's read
traffic has drained before the next starts). So the machine's drift lands on plain and
steered rounds alike, round by round; ``plain_drift`` reports how far plain's second half
of rounds moved from its first.

Sized for the machine: the dummy model runs bfloat16 where the CPU has native bf16 matmuls
and float32 where it would emulate them (``sae_runtime.hw``; ``--model-dtype``), and the
number of rounds is chosen from a timed calibration round so the run fits ``--budget-min``
(between 2 and ``--max-rounds`` rounds; where even 2 rounds would not fit, the generations
are shortened, halving ``--gen`` down to 16 tokens). The CPU model and capability go into the JSON.

    python -m loadtests.bench_e2e --out docs/benchmarks.json   (make bench runs this)

The SmolLM-shape model has random ("dummy") weights; the CLT block loads the embedded model
from the repository. No download, no tokenizer.
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

import torch

# SmolLM-135M's shape (Llama architecture, head_dim 64).
MODEL_CFG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 576,
    "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
    "num_key_value_heads": 3, "vocab_size": 49152, "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": True,
    "torch_dtype": "bfloat16", "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu",
}

# The TP=2 block needs head counts divisible by 2 (SmolLM-135M has 9 heads, 3 KV heads): the
# same depth and MLP width with 8 heads (4 KV) of 64, so hidden 512.
MODEL_CFG_TP2 = {**MODEL_CFG, "hidden_size": 512, "num_attention_heads": 8, "num_key_value_heads": 4}

MIXES = ["idle", "clamp1", "clamp16", "cond16", "reads16", "acts1", "sae4x16", "clamp64",
         "clamp128", "sites0", "sites30", "clt_clamp16"]
TP2_MIXES = ["clamp16", "reads16"]
SITES_MIXES = {"sites0": (), "sites30": None}  # engine of ours -> its act sites (None: all)
CLT_MIXES = ["clt_clamp16"]  # on the embedded default model with its CLT
BIG = {"clamp64", "clamp128", "plain128"}  # 128 requests in one batch
SAE_LAYERS = (15, 5, 10, 25)  # SAE i hooks blocks.{SAE_LAYERS[i]}.hook_resid_post
ACT_SITE = "blocks.15.hook_resid_post"  # the activation site our main engine declares (acts1)
ACT_READERS = 16  # acts1: requests 0, 2, 4, ... read, up to this many
READING = ("reads16", "acts1")  # mixes whose requests the router must know
EMBEDDED = Path(__file__).resolve().parents[1] / "server" / "embedded"
CLT = "topics_clt"  # the embedded default's cross-layer transcoder
SETTLE_S = 1.0  # idle pause before each timed round
BIG_REQUESTS = 128


def make_artifacts(root: Path, d_sae: int, dtype: str,
                   cfg: dict = MODEL_CFG) -> tuple[Path, list[Path]]:
    from safetensors.torch import save_file

    root.mkdir(parents=True, exist_ok=True)
    model = root / "smol-shape"
    model.mkdir(parents=True, exist_ok=True)
    (model / "config.json").write_text(json.dumps({**cfg, "torch_dtype": dtype}))
    d = cfg["hidden_size"]
    saes = []
    for i, layer in enumerate(SAE_LAYERS):
        sae = root / f"sae{i}"
        sae.mkdir(exist_ok=True)
        g = torch.Generator().manual_seed(i)
        W_dec = torch.randn(d_sae, d, generator=g)
        W_dec /= W_dec.norm(dim=1, keepdim=True)
        save_file({"W_enc": W_dec.t().contiguous(), "W_dec": W_dec,
                   "b_enc": torch.full((d_sae,), -0.05), "b_dec": torch.zeros(d)},
                  str(sae / "sae_weights.safetensors"))
        (sae / "cfg.json").write_text(json.dumps({
            "architecture": "standard", "d_in": d, "d_sae": d_sae, "apply_b_dec_to_input": True,
            "normalize_activations": "none",
            "metadata": {"hook_name": f"blocks.{layer}.hook_resid_post"}}))
        saes.append(sae)
    return model, saes


def set_parallel_env(tp: int) -> None:
    """vLLM's CPU settings for ``tp`` ranks, as steerd would choose them, except the KV cache:
    ``KV_GIB`` per rank unless ``VLLM_CPU_KVCACHE_SPACE`` is set (up to four engines are alive
    at once; the largest mix needs ~0.6 GiB of KV cache)."""
    from sae_runtime.hw import BIND_ENV, KV_ENV, cpu_env_defaults

    os.environ.setdefault(KV_ENV, str(KV_GIB))
    os.environ.pop(BIND_ENV, None)
    for var, (value, _) in cpu_env_defaults(dict(os.environ), tp).items():
        os.environ[var] = value


def all_sites(n_layers: int = MODEL_CFG["num_hidden_layers"]) -> tuple[str, ...]:
    """Every layer's resid_post: what ``--activation-hooks 'blocks.*.hook_resid_post'`` declares."""
    return tuple(f"blocks.{L}.hook_resid_post" for L in range(n_layers))


class Engine:
    """One engine of a block: plain vLLM (``saes`` None) or ours with ``saes`` ({id: folder})
    and ``act_sites`` declared, and the mixes timed on it."""

    def __init__(self, mixes: list[str], saes: dict[str, Path] | None = None,
                 act_sites: tuple[str, ...] = ()):
        self.mixes, self.saes, self.act_sites = mixes, saes, act_sites


def bench_saes(paths: list[Path]) -> dict[str, Path]:
    return {f"bench{i}": p for i, p in enumerate(paths)}


def build(model: Path, eng: Engine, args, tp: int = 1, load_format: str = "dummy"):
    from vllm import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    from sae_runtime.step.config import AdditionalConfig, SAEEntry, WorkerConfig
    from sae_runtime.vllm.engine import WORKER_EXTENSION

    kw = {}
    if eng.saes is not None:
        kw = dict(worker_extension_cls=WORKER_EXTENSION, additional_config=AdditionalConfig(
            WorkerConfig(
                saes=tuple(SAEEntry(name, str(p)) for name, p in eng.saes.items()),
                max_interventions=8, max_watch=0, reads_addr=args.reads_addr,
                act_sites=eng.act_sites)))
    set_parallel_env(tp)
    return AsyncLLM.from_engine_args(AsyncEngineArgs(
        model=str(model), load_format=load_format, skip_tokenizer_init=True, dtype=args.model_dtype,
        max_model_len=512, max_num_seqs=max(args.concurrency, BIG_REQUESTS),
        enable_prefix_caching=False, seed=0, disable_log_stats=True, tensor_parallel_size=tp, **kw))


def request_params(mix: str, i: int, eng: Engine, args, vocab: int = MODEL_CFG["vocab_size"]):
    """Request ``i`` of ``mix`` on ``eng``: (SamplingParams, prompt). Prompt token ids stay
    below ``vocab``."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.sampling_params import RequestOutputKind

    from sae_runtime.ops import Mode
    from sae_runtime.spec.interventions import Intervention, SteeringSpec
    from sae_runtime.spec.payloads import ActPayload
    from sae_runtime.spec.reads import Read, ReadSpec
    from sae_runtime.vllm.engine import make_prompt, make_sampling_params

    prompt = [(i * 131 + j * 7) % (vocab - 20) + 10 for j in range(args.prompt)]
    if mix.startswith("plain") or mix == "clt_plain":
        return SamplingParams(max_tokens=args.gen, ignore_eos=True, temperature=0.0, detokenize=False,
                              output_kind=RequestOutputKind.DELTA), TokensPrompt(prompt_token_ids=prompt)
    spec, reads, acts = SteeringSpec(), None, ()
    if mix == "clamp1":
        spec = SteeringSpec((Intervention("bench0", 123, Mode.CLAMP, 4.0),))
    elif mix in ("clamp16", "clamp64", "clamp128"):
        n_cfg = int(mix.removeprefix("clamp"))
        spec = SteeringSpec((Intervention("bench0", 1000 + (i % n_cfg), Mode.CLAMP, 4.0),))
    elif mix == "cond16":
        from sae_runtime.spec.interventions import Condition
        from sae_runtime.spec.selectors import Frame, Range, Selector
        from sae_runtime.step.edits import Cond

        window = Selector((Range(Frame.GENERATION, 0, args.gen // 2 + (i % 16)),))
        spec = SteeringSpec((Intervention(
            "bench0", 1000 + (i % 16), Mode.CLAMP, 4.0, positions=window,
            when=Condition("bench0", 3000 + (i % 16), Cond.GT, 0.0)),))
    elif mix == "sae4x16":
        spec = SteeringSpec(tuple(Intervention(f"bench{s}", 1000 + 16 * s + (i % 16), Mode.CLAMP, 4.0)
                                  for s in range(len(SAE_LAYERS))))
    elif mix == "reads16":
        reads = ReadSpec((Read("bench0", 16),))
    elif mix == "acts1" and i % 2 == 0 and i // 2 < ACT_READERS:
        acts = (ActPayload(eng.act_sites.index(ACT_SITE)),)  # every position
    elif mix == "clt_clamp16":
        spec = SteeringSpec((Intervention(CLT, clt_feature(i % 16), Mode.CLAMP, 4.0),))
    sp = make_sampling_params(max_tokens=args.gen, temperature=0.0, top_p=1.0, top_k=0, seed=None,
                              stop=[], stop_token_ids=[], ignore_eos=True, spec=spec,
                              sae_index={name: k for k, name in enumerate(eng.saes or ())},
                              reads=reads, request_id=f"{mix}-{i}", acts=acts)
    sp.detokenize = False
    return sp, make_prompt(prompt, spec)


async def mix_runner(engine, eng: Engine, mix: str, args, vocab: int = MODEL_CFG["vocab_size"]):
    """Warm ``engine`` (``eng``'s) up on ``mix``; returns a coroutine function that runs one
    round (``request_params`` for each request)."""
    n_requests = BIG_REQUESTS if mix in BIG else args.requests

    async def one(i: int):
        sp, p = request_params(mix, i, eng, args, vocab)
        times = []
        async for out in engine.generate(p, sp, f"{mix}-{i}-{time.monotonic_ns()}"):
            times += [time.perf_counter()] * len(out.outputs[0].token_ids)
        return times

    await asyncio.gather(*(one(i) for i in range(min(8, n_requests))))  # warm-up

    async def one_round() -> tuple[float, list[float]]:
        t0 = time.perf_counter()
        per_req = await asyncio.gather(*(one(i) for i in range(n_requests)))
        rate = sum(len(t) for t in per_req) / (time.perf_counter() - t0)
        return rate, [(t[-1] - t[0]) / (len(t) - 1) * 1000 for t in per_req if len(t) > 1]

    return one_round


def summarise(rounds: list[tuple[float, list[float]]]) -> dict:
    rates = [r for r, _ in rounds]
    tpot = sorted(x for _, ts in rounds for x in ts)
    return {"tok_s": statistics.median(rates), "tok_s_rounds": rates,
            "tpot_ms_p50": statistics.median(tpot), "tpot_ms_p99": tpot[min(len(tpot) - 1, int(0.99 * len(tpot)))]}


def tp1_engines(mixes: list[str], saes: list[Path]) -> list[Engine]:
    """The first block's engines, all alive at once: plain vLLM, our main engine (the 4 SAEs,
    block 15's resid_post declared) for the mixes of it, and one more engine of ours for each
    of ``sites0`` / ``sites30`` (the same SAEs, no / every activation site declared)."""
    main = [m for m in mixes if m not in CLT_MIXES and m not in SITES_MIXES]
    engs = [Engine(["plain", "plain128"] if BIG & set(mixes) else ["plain"])]
    if main:
        engs.append(Engine(main, bench_saes(saes), (ACT_SITE,)))
    engs += [Engine([m], bench_saes(saes), all_sites() if sites is None else sites)
             for m, sites in SITES_MIXES.items() if m in mixes]
    return engs


def clt_feature(cfg: int) -> int:
    """The CLT feature clamp config ``cfg`` (0..15) clamps: flat ``layer * 512 + index``, the
    four source layers in turn (so every later layer's output hook adds a share)."""
    return (cfg % 4) * 512 + 100 + cfg


async def run_block(model, engs: list[Engine], args, router, tp: int, rounds: dict[str, list],
                    calibrate: bool = False, load_format: str = "dummy", vocab: int = MODEL_CFG["vocab_size"]) -> None:
    """Plain vLLM and our engine(s) (``engs``, plain first), all started and alive side by
    side (those not timed idle: ~2% of a core each), every mix of all of them interleaved
    round by round in rotating order, so the machine's drift lands on plain and steered rounds
    alike: rounds into ``rounds``. With ``calibrate``, a timed round of the plain engine's
    mixes sizes ``args.rounds`` first."""
    engines = []
    try:
        runners = {}
        for eng in engs:
            engines.append(build(model, eng, args, tp, load_format))
            for mix in eng.mixes:
                if mix in READING:
                    for i in range(args.requests + 8):
                        router.register(f"{mix}-{i}")
                runners[mix] = await mix_runner(engines[-1], eng, mix, args, vocab)
        plain = engs[0].mixes
        if calibrate:
            t0 = time.perf_counter()
            for mix in plain:
                await runners[mix]()
            size_rounds(args, time.perf_counter() - t0, plain, len(engs))
        order = [m for eng in engs for m in eng.mixes]
        for r in range(args.rounds):
            # Rotate the order each round, and let the previous round's reads drain from
            # the router (this process) before the next one starts its clock.
            for mix in order[r % len(order):] + order[: r % len(order)]:
                await asyncio.sleep(SETTLE_S)
                rounds.setdefault(key(mix, tp), []).append(await runners[mix]())
        for mix in order:
            r = summarise(rounds[key(mix, tp)])
            print(f"{key(mix, tp):12s} {r['tok_s']:8.1f} tok/s  TPOT p50 {r['tpot_ms_p50']:.1f} ms"
                  f"  p99 {r['tpot_ms_p99']:.1f} ms", flush=True)
    finally:
        for engine in engines:
            engine.shutdown()
        engines.clear()
        gc.collect()


def key(mix: str, tp: int) -> str:
    return mix if tp == 1 else f"tp{tp}_{mix}"


def size_rounds(args, t_plain_round: float, plain: list[str], started: int) -> None:
    """Pick ``args.rounds`` so the whole run fits ``args.budget_min`` (2..--max-rounds).

    ``t_plain_round`` is one timed round of the ``plain`` mixes, after ``started`` engines
    have started; every other mix is costed by its token count at the same rate (TP=2 mixes
    at ``--tp2-cost`` times it, the embedded model's CLT block at ``--clt-cost``), each engine
    still to start at what each one took so far (at least ``ENGINE_START_S``). Halves
    ``args.gen`` (not below ``MIN_GEN``) while even two rounds would overrun the budget.
    """
    def tok(mixes):
        return sum(BIG_REQUESTS if m in BIG else args.requests for m in mixes) * args.gen

    main = [m for m in args.mixes if m not in CLT_MIXES]
    per_token = t_plain_round / tok(plain)
    per_round = tok(plain) + tok(main)
    starts = started
    n_timed = len(plain) + len(main)
    if args.tp2:
        per_round += (tok(["plain"]) + tok(args.tp2_mixes)) * args.tp2_cost
        starts += 2
        n_timed += 1 + len(args.tp2_mixes)
    if args.clt_mixes:
        per_round += tok(["clt_plain"] + args.clt_mixes) * args.clt_cost
        starts += 2
        n_timed += 1 + len(args.clt_mixes)
    settle = SETTLE_S * n_timed
    per_round = per_round * per_token + settle
    # Each engine still to start costs what each one started so far did up to here (start,
    # compile, warm-up), at least ENGINE_START_S.
    spent = time.perf_counter() - T0
    left = (args.budget_min * 60 - spent
            - (starts - started) * max(ENGINE_START_S, (spent - t_plain_round) / started))
    gen0 = args.gen
    # A slow machine (emulated bf16, few cores) shortens the generations before it drops
    # below two rounds: the per-token rate is what the ratios compare, and 2 rounds is the
    # least that shows drift.
    while args.gen > MIN_GEN and 2 * ((per_round - settle) * args.gen / gen0 + settle) > left:
        args.gen //= 2
    per_round = (per_round - settle) * args.gen / gen0 + settle
    args.rounds = max(2, min(args.max_rounds, int(left // per_round)))
    print(f"calibration: {t_plain_round:.1f}s per plain round at gen {gen0}, ~{per_round:.0f}s "
          f"per round of every mix at gen {args.gen} -> {args.rounds} rounds "
          f"(budget {args.budget_min} min)", flush=True)


def act_sites_cost(e2e: dict[str, float]) -> dict[str, float]:
    """The declared-but-unused activation sites' cost, in fractions of plain's tokens/s:
    ``all`` = (sites0 - sites30) (every layer's resid_post declared vs none), ``one`` =
    (sites0 - idle) (the one site the main engine declares), each where both were run."""
    out = {}
    if "sites0" in e2e and "sites30" in e2e:
        out["all"] = round(e2e["sites0"] - e2e["sites30"], 3)
    if "sites0" in e2e and "idle" in e2e:
        out["one"] = round(e2e["sites0"] - e2e["idle"], 3)
    return out


KV_GIB = 1
ENGINE_START_S = 75.0
MIN_GEN = 16  # the sizing never shortens generations below this
T0 = time.perf_counter()


async def main_async(args) -> dict:
    from sae_runtime.hw import cpu_info
    from server.core.reads import ReadRouter

    cpu = cpu_info()
    if args.model_dtype == "auto":
        args.model_dtype = "bfloat16" if cpu.native_bf16 else "float32"
    root = Path(tempfile.mkdtemp(prefix="steer-bench-"))
    model, saes = make_artifacts(root, args.d_sae, args.model_dtype)
    router = ReadRouter()  # drains the reads16 side channel like the server does
    router.start()
    args.reads_addr = router.addr
    rounds: dict[str, list] = {}
    load0 = os.getloadavg()
    await run_block(model, tp1_engines(args.mixes, saes), args, router, 1, rounds,
                    calibrate=not args.fixed_rounds)
    if args.tp2:
        model2, saes2 = make_artifacts(root / "tp2", args.d_sae, args.model_dtype, MODEL_CFG_TP2)
        await run_block(model2, [Engine(["plain"]), Engine(args.tp2_mixes, bench_saes(saes2), (ACT_SITE,))],
                        args, router, 2, rounds)
    if args.clt_mixes:
        vocab = json.loads((EMBEDDED / "model" / "config.json").read_text())["vocab_size"]
        await run_block(EMBEDDED / "model",
                        [Engine(["clt_plain"]), Engine(args.clt_mixes, {CLT: EMBEDDED / "saes" / CLT})],
                        args, router, 1, rounds, load_format="auto", vocab=vocab)
    router.close()
    load1 = os.getloadavg()
    results = {k: summarise(rs) for k, rs in rounds.items()}
    n = args.rounds

    def drift(k: str) -> float:
        """How far the plain rounds' second half moved from their first (1.000 = none)."""
        rates = results[k]["tok_s_rounds"]
        h = max(1, len(rates) // 2)
        return round(statistics.median(rates[-h:]) / statistics.median(rates[:h]), 3)

    def base(mix: str, tp: int) -> str:
        return key("plain128" if mix in BIG else "clt_plain" if mix in CLT_MIXES else "plain", tp)

    def ratio(mix: str, tp: int = 1) -> float:
        return round(results[key(mix, tp)]["tok_s"] / results[base(mix, tp)]["tok_s"], 3)

    def tpot_ratio(mix: str, tp: int = 1) -> float:
        return round(results[key(mix, tp)]["tpot_ms_p99"] / results[base(mix, tp)]["tpot_ms_p99"], 3)

    e2e = {m: ratio(m) for m in args.mixes}
    tpot = {m: tpot_ratio(m) for m in args.mixes}
    if args.tp2:
        e2e.update({key(m, 2): ratio(m, 2) for m in args.tp2_mixes})
        tpot.update({key(m, 2): tpot_ratio(m, 2) for m in args.tp2_mixes})
    return {
        "device": f"cpu: {cpu.describe()}",
        "cpu": cpu.as_dict(),
        "command": "python -m loadtests.bench_e2e " + " ".join(sys.argv[1:]),
        "wall_s": round(time.perf_counter() - T0, 1),
        "model": f"Llama, SmolLM-135M shape (576 x 30 layers; the TP=2 block: 512 x 30 layers, "
                 f"8 heads, since 9 do not split over 2 ranks), dummy {args.model_dtype} weights "
                 f"(chosen for this CPU), compiled mode",
        "load_avg": {"start": list(load0), "end": list(load1)},
        "sae": f"4 standard SAEs, d_sae {args.d_sae}, hooked after blocks "
               f"{', '.join(map(str, SAE_LAYERS))}; single-SAE mixes use the block-15 one; "
               f"our main engine declares one activation site ({ACT_SITE}), sites0 none, "
               f"sites30 all 30 blocks' resid_post"
               + (f"; clt_*: the embedded default model (256 x 4 layers, its own weights) with "
                  f"its CLT {CLT} (4 layers x 512 features)" if args.clt_mixes else ""),
        "act_sites_cost": act_sites_cost(e2e),
        "workload": f"{args.requests} concurrent requests (128 for plain128/clamp64/clamp128) x "
                    f"{n} rounds per mix; plain vLLM and our engine alive side by side, every "
                    f"mix of both (plain too) interleaved round by round in rotating order "
                    f"(median tokens/s; TPOT per request over all rounds), prompt "
                    f"{args.prompt}, generate {args.gen}, "
                    f"max_num_seqs {max(args.concurrency, BIG_REQUESTS)}, greedy",
        "e2e": e2e,
        "tpot_p99_ratio": tpot,
        "side_by_side": True,  # plain and ours alive at once, rounds interleaved
        "plain_drift": drift("plain"),
        "plain_drift_all": {k: drift(k) for k in results if "plain" in k},
        "raw": results,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=None,
                    help="rounds per mix (default: sized from a calibration round to fit --budget-min)")
    ap.add_argument("--max-rounds", type=int, default=5, help="most rounds the sizing picks")
    ap.add_argument("--budget-min", type=float, default=16.0,
                    help="wall-time budget the round count is sized for (minutes)")
    ap.add_argument("--model-dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                    help="model dtype; auto = bfloat16 where the CPU has native bf16, else float32")
    ap.add_argument("--tp2", action=argparse.BooleanOptionalAction, default=None,
                    help="also run the TP=2 block (default: when there are >= 2 CPUs)")
    ap.add_argument("--tp2-cost", type=float, default=1.3,
                    help="TP=2 round time relative to TP=1, for the sizing")
    ap.add_argument("--mixes", default=",".join(MIXES),
                    help=f"comma-separated subset of {','.join(MIXES)} (the TP=2 block runs "
                         f"those of {','.join(TP2_MIXES)} among them)")
    ap.add_argument("--clt-cost", type=float, default=0.1,
                    help="CLT block (embedded model) round time relative to TP=1, for the sizing "
                         "(measured 0.05 on a 2-core EPYC)")
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--gen", type=int, default=64)
    ap.add_argument("--d-sae", type=int, default=16384)
    ap.add_argument("--out", type=Path, default=None, help="write the JSON result here")
    ap.add_argument("--add-to", type=Path, default=None,
                    help="add the result to this existing JSON as a further run (its "
                         "'extra_runs'), keeping that file's own rows: rows measured by a "
                         "subset run beside an earlier full one; loadtests.report marks each "
                         "row's run")
    args = ap.parse_args()
    args.mixes = [m for m in args.mixes.split(",") if m]
    unknown = sorted(set(args.mixes) - set(MIXES))
    if unknown or not args.mixes:
        ap.error(f"--mixes: unknown {unknown or 'empty list'}; choose from {','.join(MIXES)}")
    args.tp2_mixes = [m for m in TP2_MIXES if m in args.mixes]
    if args.tp2 is None:
        args.tp2 = len(os.sched_getaffinity(0)) >= 2
    args.tp2 = args.tp2 and bool(args.tp2_mixes)
    args.clt_mixes = [m for m in CLT_MIXES if m in args.mixes]
    args.fixed_rounds = args.rounds is not None  # fixed: no sizing
    if not args.fixed_rounds:
        args.rounds = args.max_rounds
    res = asyncio.run(main_async(args))
    print(json.dumps(res["e2e"]))
    if args.out:
        args.out.write_text(json.dumps(res, indent=1) + "\n")
    if args.add_to:
        add_run(args.add_to, res)


def add_run(path: Path, res: dict) -> None:
    """Append ``res`` to ``path``'s ``extra_runs`` (the file's own run stays as it was)."""
    doc = json.loads(path.read_text())
    doc.setdefault("extra_runs", []).append(res)
    path.write_text(json.dumps(doc, indent=1) + "\n")


if __name__ == "__main__":
    main()
