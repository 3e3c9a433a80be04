"""uvicorn for the HTTP door, in the server's event loop, with the door's connection limits.

The socket is bound before the engine starts (a busy port refuses to start at once); uvicorn
serves it once the core is up, without its own signal handling (``server.app.serve`` owns
SIGTERM and drains both doors). Stalled sockets cannot exhaust file descriptors: at most
``max_connections`` are open (more are closed as they arrive), a connection must send a
request's headers within ``header_timeout_s`` (the first request and each one after a
response; slowloris), and an idle keep-alive connection closes after ``idle_timeout_s``.
Bodies have their own deadline (``server.http.app.HttpLimits.body_timeout_s``).
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from server.startup import StartupError


@dataclass(frozen=True)
class ConnectionLimits:
    max_connections: int = 256
    header_timeout_s: float = 10.0
    idle_timeout_s: float = 5.0


def limited_protocol(base: type, limits: ConnectionLimits, refused: Callable[[], None]) -> type:
    """uvicorn's HTTP protocol ``base`` with the connection cap and the header deadline."""

    class Limited(base):
        _header_timer: asyncio.TimerHandle | None = None
        _waiting_for: object = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            if len(self.connections) > limits.max_connections:
                refused()
                transport.close()
                return
            self._await_request()

        def _await_request(self) -> None:
            """Start the header deadline: a request newer than the current one must have
            its headers in by then (uvicorn makes a request's cycle when they are in)."""
            self._waiting_for = self.cycle
            self._header_timer = self.loop.call_later(limits.header_timeout_s, self._no_headers)

        def _no_headers(self) -> None:
            self._header_timer = None
            cycle = self.cycle
            if cycle is self._waiting_for and (cycle is None or cycle.response_complete):
                self.transport.close()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if self._header_timer is not None:
                self._header_timer.cancel()
            if not self.transport.is_closing():
                self._await_request()

        def connection_lost(self, exc) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None
            super().connection_lost(exc)

    Limited.__name__ = f"Limited{base.__name__}"
    return Limited


class HttpServer:
    """One uvicorn server on a socket bound at construction."""

    def __init__(self, host: str, port: int, *, grace_s: float, ssl: dict[str, Any] | None = None,
                 limits: ConnectionLimits | None = None, option: str = "--http-port") -> None:
        self.host = host
        self.grace_s = grace_s
        self.ssl = ssl
        self.limits = limits or ConnectionLimits()
        self.scheme = "https" if ssl else "http"
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as e:
            sock.close()
            raise StartupError(f"{option}: cannot bind {host}:{port}: {e.strerror or e}") from None
        sock.set_inheritable(True)
        self._sock = sock
        self.port = sock.getsockname()[1]
        self.server = None
        self._task: asyncio.Task | None = None

    async def start(self, app, refused: Callable[[], None] = lambda: None) -> int:
        """Serve ``app`` on the bound socket; returns the port."""
        import uvicorn
        from uvicorn.protocols.http.auto import AutoHTTPProtocol

        config = uvicorn.Config(
            app, lifespan="off", access_log=False, log_level="warning",
            timeout_graceful_shutdown=max(self.grace_s, 0.1),
            timeout_keep_alive=self.limits.idle_timeout_s,
            http=limited_protocol(AutoHTTPProtocol, self.limits, refused), **(self.ssl or {}))
        self.server = uvicorn.Server(config)
        config.load()
        self.server.lifespan = config.lifespan_class(config)
        await self.server.startup(sockets=[self._sock])
        self._task = asyncio.create_task(self.server.main_loop())
        return self.port

    async def stop(self) -> None:
        """Stop accepting, let in-flight requests finish for the grace period, then close."""
        if self._task is None:
            self._sock.close()
            return
        self.server.should_exit = True
        await self._task
        await self.server.shutdown(sockets=[self._sock])


def ssl_options(cert, key, client_ca) -> dict[str, Any] | None:
    """uvicorn TLS settings from the gRPC ones (the same certificate serves both)."""
    if cert is None:
        return None
    import ssl

    out: dict[str, Any] = {"ssl_certfile": str(cert), "ssl_keyfile": str(key)}
    if client_ca is not None:
        out.update(ssl_ca_certs=str(client_ca), ssl_cert_reqs=ssl.CERT_REQUIRED)
    return out
