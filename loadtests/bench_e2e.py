"""End-to-end throughput: our engine vs plain vLLM, measured side by side in one run.

Both engines use the same vLLM settings (compiled mode, same batch limits). "plain" is
vLLM without the worker extension and without SAEs; the other rows are our engine with
one SAE hooked, under different request mixes. Each row's ratio is its tokens/s divided
by plain's tokens/s from the same run.

Order: plain vLLM, then our engine with the four mixes interleaved round by round (the
order rotates each round, with a one-second pause before each timed round so one round's
read traffic has drained before the next starts), then plain vLLM again. Slow drift of the
machine lands on both sides of every ratio; ``plain_drift`` reports how far the second
plain half moved from the first.

    python -m loadtests.bench_e2e --out docs/benchmarks.json   (make bench runs this)

The model is a realistic shape with random ("dummy") weights: no download, no tokenizer.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import platform
import statistics
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


MIXES = ["idle", "clamp1", "clamp16", "reads16"]
SETTLE_S = 1.0  # idle pause before each timed round


def make_artifacts(root: Path, d_sae: int, layer: int) -> tuple[Path, Path]:
    from safetensors.torch import save_file

    model = root / "smol-shape"
    model.mkdir(parents=True, exist_ok=True)
    (model / "config.json").write_text(json.dumps(MODEL_CFG))
    sae = root / "sae"
    sae.mkdir(exist_ok=True)
    d = MODEL_CFG["hidden_size"]
    g = torch.Generator().manual_seed(0)
    W_dec = torch.randn(d_sae, d, generator=g)
    W_dec /= W_dec.norm(dim=1, keepdim=True)
    save_file({"W_enc": W_dec.t().contiguous(), "W_dec": W_dec, "b_enc": torch.full((d_sae,), -0.05),
               "b_dec": torch.zeros(d)}, str(sae / "sae_weights.safetensors"))
    (sae / "cfg.json").write_text(json.dumps({
        "architecture": "standard", "d_in": d, "d_sae": d_sae, "apply_b_dec_to_input": True,
        "normalize_activations": "none", "metadata": {"hook_name": f"blocks.{layer}.hook_resid_post"}}))
    return model, sae


def build(model: Path, sae: Path | None, args):
    from vllm import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    from sae_runtime.vllm.engine import WORKER_EXTENSION

    kw = {}
    if sae is not None:
        kw = dict(worker_extension_cls=WORKER_EXTENSION, additional_config={"sae_steering": {
            "saes": [{"id": "bench", "path": str(sae), "hook_name": None}],
            "max_interventions": 8, "max_watch": 0, "reads_addr": args.reads_addr}})
    return AsyncLLM.from_engine_args(AsyncEngineArgs(
        model=str(model), load_format="dummy", skip_tokenizer_init=True, dtype="bfloat16",
        max_model_len=512, max_num_seqs=args.concurrency, enable_prefix_caching=False,
        seed=0, disable_log_stats=True, **kw))


async def mix_runner(engine, mix: str, args):
    """Warm ``engine`` up on ``mix``; returns a coroutine function that runs one round."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.sampling_params import RequestOutputKind

    from sae_runtime.interventions import Intervention, SteeringSpec
    from sae_runtime.ops import Mode
    from sae_runtime.reads import Read, ReadSpec
    from sae_runtime.vllm.engine import make_prompt, make_sampling_params

    def params(i: int):
        if mix == "plain":
            return SamplingParams(max_tokens=args.gen, ignore_eos=True, temperature=0.0, detokenize=False,
                                  output_kind=RequestOutputKind.DELTA), TokensPrompt(prompt_token_ids=prompt(i))
        spec, reads = SteeringSpec(), None
        if mix == "clamp1":
            spec = SteeringSpec((Intervention("bench", 123, Mode.CLAMP, 4.0),))
        elif mix == "clamp16":
            spec = SteeringSpec((Intervention("bench", 1000 + (i % 16), Mode.CLAMP, 4.0),))
        elif mix == "reads16":
            reads = ReadSpec((Read("bench", 16),))
        sp = make_sampling_params(max_tokens=args.gen, temperature=0.0, top_p=1.0, top_k=0, seed=None,
                                  stop=[], stop_token_ids=[], ignore_eos=True, spec=spec,
                                  sae_index={"bench": 0}, reads=reads, request_id=f"{mix}-{i}")
        sp.detokenize = False
        return sp, make_prompt(prompt(i), spec)

    def prompt(i: int) -> list[int]:
        return [(i * 131 + j * 7) % 40000 + 10 for j in range(args.prompt)]

    async def one(i: int):
        sp, p = params(i)
        times = []
        async for out in engine.generate(p, sp, f"{mix}-{i}-{time.monotonic_ns()}"):
            times += [time.perf_counter()] * len(out.outputs[0].token_ids)
        return times

    await asyncio.gather(*(one(i) for i in range(min(8, args.requests))))  # warm-up

    async def one_round() -> tuple[float, list[float]]:
        t0 = time.perf_counter()
        per_req = await asyncio.gather(*(one(i) for i in range(args.requests)))
        rate = sum(len(t) for t in per_req) / (time.perf_counter() - t0)
        return rate, [(t[-1] - t[0]) / (len(t) - 1) * 1000 for t in per_req if len(t) > 1]

    return one_round


def summarise(rounds: list[tuple[float, list[float]]]) -> dict:
    rates = [r for r, _ in rounds]
    tpot = sorted(x for _, ts in rounds for x in ts)
    return {"tok_s": statistics.median(rates), "tok_s_rounds": rates,
            "tpot_ms_p50": statistics.median(tpot), "tpot_ms_p99": tpot[min(len(tpot) - 1, int(0.99 * len(tpot)))]}


async def main_async(args) -> dict:
    from server.reads import ReadRouter

    root = Path(tempfile.mkdtemp(prefix="steer-bench-"))
    model, sae = make_artifacts(root, args.d_sae, args.layer)
    router = ReadRouter()  # drains the reads16 side channel like the server does
    router.start()
    args.reads_addr = router.addr
    # Order: plain, ours (the four mixes interleaved round by round, in rotating order),
    # plain again. Drift of the machine over the run shows up as the two plain halves
    # differing (plain_drift), and lands on both sides of every ratio instead of on whichever
    # row ran last.
    rounds: dict[str, list] = {}
    for phase, with_sae, mixes in ((0, False, ["plain"]), (1, True, MIXES), (2, False, ["plain"])):
        engine = build(model, sae if with_sae else None, args)
        try:
            runners = {}
            for mix in mixes:
                if mix == "reads16":
                    for i in range(args.requests + 8):
                        router.register(f"reads16-{i}")
                runners[mix] = await mix_runner(engine, mix, args)
            for r in range(args.rounds):
                # Rotate the order each round, and let the previous round's reads drain from
                # the router (this process) before the next one starts its clock.
                for mix in mixes[r % len(mixes):] + mixes[: r % len(mixes)]:
                    await asyncio.sleep(SETTLE_S)
                    rounds.setdefault(mix, []).append(await runners[mix]())
            for mix in mixes:
                r = summarise(rounds[mix][-args.rounds:])
                print(f"{mix:8s} {r['tok_s']:8.1f} tok/s  TPOT p50 {r['tpot_ms_p50']:.1f} ms"
                      f"  p99 {r['tpot_ms_p99']:.1f} ms  (phase {phase})", flush=True)
        finally:
            engine.shutdown()
            del engine
            gc.collect()
    results = {mix: summarise(rs) for mix, rs in rounds.items()}
    plain_rates = results["plain"]["tok_s_rounds"]
    drift = statistics.median(plain_rates[args.rounds:]) / statistics.median(plain_rates[: args.rounds])
    router.close()
    base = results["plain"]["tok_s"]
    return {
        "device": f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)",
        "model": "Llama, SmolLM-135M shape (576 x 30 layers), dummy bf16 weights, compiled mode",
        "sae": f"standard, d_sae {args.d_sae}, hooked after block {args.layer}",
        "workload": f"{args.requests} concurrent requests x {args.rounds} rounds per mix, mixes "
                    f"interleaved round by round in rotating order, plain run before and after ({2 * args.rounds} "
                    f"rounds; median tokens/s; TPOT per request over all rounds), prompt "
                    f"{args.prompt}, generate {args.gen}, max_num_seqs {args.concurrency}, greedy",
        "e2e": {k: round(results[k]["tok_s"] / base, 3) for k in MIXES},
        "plain_drift": round(drift, 3),
        "raw": results,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--gen", type=int, default=64)
    ap.add_argument("--d-sae", type=int, default=16384)
    ap.add_argument("--layer", type=int, default=15)
    ap.add_argument("--out", type=Path, default=None, help="write the JSON result here")
    args = ap.parse_args()
    res = asyncio.run(main_async(args))
    print(json.dumps(res["e2e"]))
    if args.out:
        args.out.write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
