"""Optional bearer-token authentication (``authorization: Bearer <token>`` metadata or header).

Health checks and reflection stay open so load balancers and tools can probe the server.
Tokens are compared in constant time. The message never says which part was wrong.
"""

from __future__ import annotations

import hmac
import os
from collections.abc import Iterable
from pathlib import Path

import grpc

OPEN_SERVICES = ("/grpc.health.v1.Health/", "/grpc.reflection.")


def load_tokens(path: Path | None) -> list[bytes]:
    """Tokens from ``path`` (one per line, # comments) and STEERD_AUTH_TOKENS (comma-separated)."""
    tokens: list[str] = []
    if path is not None:
        tokens += [ln.strip() for ln in Path(path).read_text().splitlines()
                   if ln.strip() and not ln.lstrip().startswith("#")]
    tokens += [t.strip() for t in os.environ.get("STEERD_AUTH_TOKENS", "").split(",") if t.strip()]
    return [t.encode() for t in tokens]


def bearer_ok(authorization: str, tokens: list[bytes]) -> bool:
    """Whether an ``authorization`` value (gRPC metadata or HTTP header) is ``Bearer <token>``
    with an accepted token. Both front ends call this one check."""
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token:
        return False
    given = token.strip().encode()
    # compare against every token so timing does not reveal which one nearly matched
    return any([hmac.compare_digest(given, t) for t in tokens])


class BearerAuth(grpc.aio.ServerInterceptor):
    def __init__(self, tokens: Iterable[bytes]) -> None:
        self.tokens = list(tokens)

    def _ok(self, metadata) -> bool:
        value = next((v for k, v in metadata or () if k == "authorization"), "")
        return bearer_ok(value, self.tokens)

    async def intercept_service(self, continuation, details):
        if details.method.startswith(OPEN_SERVICES) or self._ok(details.invocation_metadata):
            return await continuation(details)
        handler = await continuation(details)
        return _deny(handler)


def _deny(handler):
    msg = "missing or invalid bearer token (send metadata 'authorization: Bearer <token>')"

    async def unary(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, msg)

    async def stream(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, msg)
        yield  # pragma: no cover - makes this an async generator

    if handler is None:
        return None
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(
            stream, request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer)
    return grpc.unary_unary_rpc_method_handler(
        unary, request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer)
