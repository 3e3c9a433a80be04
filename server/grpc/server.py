"""The gRPC server: bound before the engine starts (a busy port or bad TLS files refuse to
start at once), serving the door's servicer, health and reflection once the core is up."""

from __future__ import annotations

from typing import TYPE_CHECKING

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from server.auth import ADMIN_METHODS, MIXED_METHODS, Auth
from server.core.errors import Code
from server.core.metrics import Metrics
from server.grpc.servicer import DOOR, SteeringServicer
from server.startup import StartupError
from steering.v1 import steering_pb2 as pb

if TYPE_CHECKING:  # the core imports vLLM: the port is bound before the engine starts
    from server.core.service import Core

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["SteeringService"].full_name
OPEN_SERVICES = ("/grpc.health.v1.Health/", "/grpc.reflection.")
"""Health checks and reflection stay open so load balancers and tools can probe the server."""
ADMIN_PATHS = frozenset(f"/{SERVICE_NAME}/{m}" for m in (*ADMIN_METHODS, *MIXED_METHODS))
"""Calls the interceptor lets through: the servicer checks their tokens (``server.auth``)."""


class GrpcDoor:
    """``grpc.aio.Server`` with auth, health and reflection; ``bind`` before the engine,
    ``start`` with the core."""

    def __init__(self, *, host: str, port: int, auth: Auth, metrics: Metrics,
                 max_message_bytes: int, tls: tuple[bytes, bytes, bytes | None] | None) -> None:
        self.auth = auth
        self.server = grpc.aio.server(
            interceptors=[BearerAuth(auth, metrics)] if auth.on else [],
            options=[("grpc.max_receive_message_length", max_message_bytes),
                     ("grpc.max_send_message_length", max(max_message_bytes, 64 * 1024 * 1024))],
        )
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), self.server)
        addr = f"{host}:{port}"
        try:
            if tls is not None:
                key, cert, ca = tls
                creds = grpc.ssl_server_credentials([(key, cert)], root_certificates=ca,
                                                    require_client_auth=ca is not None)
                self.port = self.server.add_secure_port(addr, creds)
            else:
                self.port = self.server.add_insecure_port(addr)
        except RuntimeError as e:
            raise StartupError(f"--port: cannot bind {addr}: {e}") from None
        if self.port == 0:
            raise StartupError(f"--port: cannot bind {addr} (in use, or not an address of this host)")
        self.servicer: SteeringServicer | None = None

    async def start(self, core: Core) -> None:
        self.servicer = SteeringServicer(core, self.auth)
        add_servicer(self.servicer, self.server)
        await self.server.start()
        for name in ("", SERVICE_NAME):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)

    async def not_serving(self) -> None:
        for name in ("", SERVICE_NAME):
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)


def add_servicer(servicer: SteeringServicer, server: grpc.aio.Server) -> None:
    """Register the service like the generated ``add_..._to_server``, but without a request
    deserializer: each method parses its raw request itself (``SteeringServicer._parse``),
    so a message gRPC could not parse is INVALID_ARGUMENT, not INTERNAL, with no wrapper
    between gRPC and the method's own generator."""
    handlers = {}
    for m in pb.DESCRIPTOR.services_by_name["SteeringService"].methods:
        resp_cls = getattr(pb, m.output_type.name)
        make = (grpc.unary_stream_rpc_method_handler if m.server_streaming
                else grpc.unary_unary_rpc_method_handler)
        handlers[m.name] = make(getattr(servicer, m.name),
                                response_serializer=resp_cls.SerializeToString)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)


class BearerAuth(grpc.aio.ServerInterceptor):
    """Refuse calls without an accepted bearer token (``server.auth``), but health and
    reflection; the refusal is counted as UNAUTHENTICATED. Admin calls pass on to the
    servicer, which takes admin tokens only (``Auth.check_admin``), as do the calls whose
    token depends on the request (``MIXED_METHODS``: ``Auth.check_call``)."""

    def __init__(self, auth: Auth, metrics: Metrics) -> None:
        self.auth = auth
        self.metrics = metrics

    async def intercept_service(self, continuation, details):
        if details.method.startswith(OPEN_SERVICES) or details.method in ADMIN_PATHS:
            return await continuation(details)
        value = next((v for k, v in details.invocation_metadata or () if k == "authorization"), "")
        if self.auth.ok(value):
            return await continuation(details)
        handler = await continuation(details)
        return _deny(handler, self.metrics, details.method.rsplit("/", 1)[-1])


def _deny(handler, metrics: Metrics, method: str):
    msg = "missing or invalid bearer token (send metadata 'authorization: Bearer <token>')"

    async def unary(request, context):
        metrics.call(method, DOOR).end(code=Code.UNAUTHENTICATED)
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, msg)

    async def stream(request, context):
        metrics.call(method, DOOR).end(code=Code.UNAUTHENTICATED)
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
