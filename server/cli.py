"""``steerd``: the server command line. Options are generated from ``ServerConfig``."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from typing import Literal, get_args, get_origin

from pydantic import ValidationError

from sae_runtime.errors import SteeringError
from server import logs
from server.config import SAESource, ServerConfig, VectorSource


def _add_config_options(p: argparse.ArgumentParser) -> None:
    for name, field in ServerConfig.model_fields.items():
        flag = "--" + name.replace("_", "-")
        default = field.default
        if name == "saes":
            p.add_argument("--sae", dest="saes", action="append", default=[],
                           metavar="[NAME=]PATH[@HOOK]", help=field.description)
        elif name == "vectors":
            p.add_argument("--vector", dest="vectors", action="append", default=[],
                           metavar="NAME=PATH", help=field.description)
        elif field.annotation is bool:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=default,
                           help=f"{field.description} (default: {default})")
        else:
            types = [t for t in get_args(field.annotation) or (field.annotation,) if t is not type(None)]
            kind = types[0] if types and types[0] in (int, float) else str
            choices = list(get_args(field.annotation)) if get_origin(field.annotation) is Literal else None
            required = field.is_required()
            p.add_argument(flag, type=str if choices else kind, choices=choices, required=required,
                           default=None if required else default,
                           help=field.description + ("" if required else f" (default: {default})"))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="steerd", description="SAE steering server: vLLM with per-request SAE interventions over gRPC."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="serve a model with SAEs hooked",
                           description="Start the engine and serve steering.v1.SteeringService.")
    _add_config_options(serve)
    serve.add_argument("--log-level", default="INFO", help="logging level (default: INFO)")
    node = sub.add_parser(
        "node", help="run another node's share of an engine led by steerd serve on node 0",
        description="A headless engine node (vLLM's --headless): tensor/pipeline-parallel "
                    "workers (--nnodes N --node-rank R) or data-parallel engines "
                    "(--data-parallel-size-local, --data-parallel-start-rank) for the steerd "
                    "serve on node 0. Give it the same flags as node 0 (model, --sae, --vector, "
                    "engine and parallel options, --reads-address): it builds the same workers; "
                    "node 0 refuses a node whose SAEs or engine settings differ. The API options "
                    "(--host, --port, auth, TLS, HTTP) are accepted and ignored.")
    _add_config_options(node)
    node.add_argument("--log-level", default="INFO", help="logging level (default: INFO)")
    from server import labels_cli

    labels_cli.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "labels":
        from server import labels_cli

        return labels_cli.main(args)
    logging.basicConfig(level=args.log_level.upper(), handlers=[logs.handler(args.log_format)])
    values = {k: v for k, v in vars(args).items() if k in ServerConfig.model_fields}
    try:
        values["saes"] = tuple(SAESource.parse(s) for s in values.get("saes", []))
        values["vectors"] = tuple(VectorSource.parse(s) for s in values.get("vectors", []))
        cfg = ServerConfig(**values)
        if args.command == "node":
            from server.app import run_node

            return run_node(cfg)
        code = asyncio.run(_serve(cfg))
    except (ValidationError, ValueError, SteeringError) as e:
        print(f"steerd: error: {e}", file=sys.stderr)
        return 2
    return code


async def _serve(cfg: ServerConfig) -> int:
    from server.app import serve

    return await serve(cfg)


if __name__ == "__main__":
    sys.exit(main())
