"""``steer``: command-line client.

    steer --target localhost:50051 generate --prompt "the ocean" --max-tokens 20 \
        --clamp resid_l1:12=8.0 --json

Values are passed through as typed; the server validates them, so every client gets the
same rules. On an RPC error the exit status is 1 and stderr shows the status code name
and the server's message.
"""

from __future__ import annotations

import argparse
import json
import sys

import grpc

from clients.client import SteeringClient, ablate, add, clamp, collect, scale, FINISH_NAMES


def _edit(kind: str, with_value: bool):
    """argparse type for ``SAE:FEATURE=VALUE`` (or ``SAE:FEATURE`` without a value)."""

    def parse(text: str):
        head, eq, value = text.partition("=")
        if with_value and not eq:
            raise argparse.ArgumentTypeError(f"--{kind} {text!r}: expected SAE:FEATURE=VALUE")
        if not with_value and eq:
            raise argparse.ArgumentTypeError(f"--{kind} {text!r}: expected SAE:FEATURE")
        sae, colon, feature = head.rpartition(":")
        if not colon or not sae:
            raise argparse.ArgumentTypeError(f"--{kind} {text!r}: expected SAE:FEATURE")
        try:
            feat = int(feature)
            val = float(value) if with_value else 0.0
        except ValueError:
            raise argparse.ArgumentTypeError(f"--{kind} {text!r}: FEATURE must be an integer "
                                             "and VALUE a number") from None
        if feat < 0:
            raise argparse.ArgumentTypeError(f"--{kind} {text!r}: FEATURE must be >= 0")
        return (kind, sae, feat, val)

    return parse


def _ids(text: str) -> list[int]:
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--prompt-ids {text!r}: expected comma-separated integers") from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="steer", description="Client for the SAE steering server.")
    p.add_argument("--target", default="localhost:50051", help="server HOST:PORT (default: %(default)s)")
    p.add_argument("--timeout", type=float, default=None, help="RPC deadline in seconds")
    sub = p.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate text, optionally steered")
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="prompt text")
    src.add_argument("--prompt-ids", type=_ids, help="prompt token ids, e.g. 1,2,3")
    g.add_argument("--max-tokens", type=int, default=None, help="tokens to generate (server default 16)")
    g.add_argument("--temperature", type=float, default=None, help="0 = greedy (server default 1.0)")
    g.add_argument("--top-p", type=float, default=None)
    g.add_argument("--top-k", type=int, default=None)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    g.add_argument("--request-id", default="", help="id echoed back and logged by the server")
    g.add_argument("--generation-only", action="store_true",
                   help="apply the edits only at generated positions (default: every position)")
    for kind, with_value, meta, helptext in (
        ("clamp", True, "SAE:FEATURE=VALUE", "set a feature to VALUE"),
        ("ablate", False, "SAE:FEATURE", "set a feature to 0"),
        ("scale", True, "SAE:FEATURE=FACTOR", "multiply a feature by FACTOR"),
        ("add", True, "SAE:FEATURE=STRENGTH", "add STRENGTH x the feature's decoder direction"),
    ):
        g.add_argument(f"--{kind}", dest="edits", action="append", default=None,
                       type=_edit(kind, with_value), metavar=meta, help=f"{helptext} (repeatable)")
    g.add_argument("--json", action="store_true", help="print one JSON object when done")

    sub.add_parser("saes", help="list the server's SAEs (JSON)")
    sub.add_parser("info", help="describe the served model (JSON)")
    return p


def _interventions(edits, scope: str):
    makers = {
        "clamp": lambda s, f, v: clamp(s, f, v, scope),
        "ablate": lambda s, f, v: ablate(s, f, scope),
        "scale": lambda s, f, v: scale(s, f, v, scope),
        "add": lambda s, f, v: add(s, f, v, scope),
    }
    return [makers[kind](sae, feat, val) for kind, sae, feat, val in edits or ()]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        with SteeringClient(args.target, timeout=args.timeout) as client:
            if args.command == "generate":
                return _generate(client, args)
            if args.command == "saes":
                from google.protobuf.json_format import MessageToDict

                print(json.dumps([MessageToDict(s, preserving_proto_field_name=True)
                                  for s in client.list_saes()], indent=1))
            elif args.command == "info":
                from google.protobuf.json_format import MessageToDict

                print(json.dumps(MessageToDict(client.model_info(), preserving_proto_field_name=True), indent=1))
    except grpc.RpcError as e:
        print(f"steer: {e.code().name}: {e.details()}", file=sys.stderr)
        return 1
    return 0


def _generate(client: SteeringClient, args) -> int:
    stream = client.generate(
        args.prompt if args.prompt is not None else args.prompt_ids,
        max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
        top_k=args.top_k, seed=args.seed, stop=args.stop, request_id=args.request_id,
        interventions=_interventions(args.edits, "generation_only" if args.generation_only else "all"),
    )
    if args.json:
        r = collect(stream)
        print(json.dumps({
            "request_id": r.request_id, "text": r.text, "token_ids": r.token_ids,
            "prompt_token_ids": r.prompt_token_ids, "finish_reason": r.finish_reason,
        }))
        return 0
    finish = None
    for msg in stream:
        sys.stdout.write(msg.text)
        sys.stdout.flush()
        finish = FINISH_NAMES.get(msg.finish_reason) or finish
    sys.stdout.write("\n")
    print(f"[finish: {finish}]", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
