"""Plain vLLM (no worker extension, no SAEs) as a baseline: greedy tokens as JSON.

    python -m tests.e2e.plain_vllm MODEL --tp 2 --prompts '[[5, 6, 7]]' --max-tokens 10

Run as its own process (vLLM spawns its workers, and a second engine must not share the
test process). Engine settings match ``tests.e2e.conftest.start_server``.
"""

from __future__ import annotations

import argparse
import json
import os

from server.startup import apply_cpu_env_defaults


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--pp", type=int, default=1)
    ap.add_argument("--prompts", required=True, help="JSON list of token-id lists")
    ap.add_argument("--max-tokens", type=int, required=True)
    ap.add_argument("--max-model-len", type=int, default=256)
    ap.add_argument("--max-num-batched-tokens", type=int, default=64)
    args = ap.parse_args()
    apply_cpu_env_defaults(args.tp * args.pp, os.environ)
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(model=args.model, dtype="float32", tensor_parallel_size=args.tp,
              pipeline_parallel_size=args.pp, max_model_len=args.max_model_len,
              max_num_batched_tokens=args.max_num_batched_tokens, max_num_seqs=32, seed=0)
    sp = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True)
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in json.loads(args.prompts)], sp)
    print("TOKENS " + json.dumps([list(o.outputs[0].token_ids) for o in outs]), flush=True)


if __name__ == "__main__":
    main()
