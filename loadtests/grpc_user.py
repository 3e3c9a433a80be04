"""gRPC plumbing for Locust: a client wrapper that reports every call to Locust's stats.

This follows Locust's documented gRPC recipe ("Testing other systems/protocols"): gRPC is
made gevent-cooperative with ``grpc.experimental.gevent.init_gevent()`` (after Locust has
monkey-patched the standard library, before any channel exists), and a thin client
wrapper fires ``environment.events.request`` once per call, so Locust's console stats,
charts, CSV and HTML reports all see the RPCs.

Server-streaming calls (``Generate``) are timed from the call to the end of the stream and
also yield per-stream metrics (time to first token, per-token latency, tokens/s); see
``LocustGrpcClient.stream``. Those are reported as their own entries with request type
``METRIC`` through ``LocustGrpcClient.metric``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
import grpc.experimental.gevent as grpc_gevent
from locust import User
from locust.env import Environment
from locust.exception import LocustError

# Importing locust has monkey-patched the standard library for gevent; gRPC's gevent mode
# must be switched on after that and before the first channel is created.
grpc_gevent.init_gevent()

REQUEST_TYPE = "grpc"
METRIC_TYPE = "METRIC"


class GrpcStatusError(Exception):
    """A call ended with a non-OK status; str() is ``CODE: details`` (groups well in Locust)."""

    def __init__(self, code: grpc.StatusCode | None, details: str | None) -> None:
        self.code = code
        self.details = details or ""
        super().__init__(f"{code.name if code else 'UNKNOWN'}: {self.details}")


class ResponseCheckError(Exception):
    """The call succeeded at the gRPC level but its responses were wrong."""


def status_error(e: grpc.RpcError) -> GrpcStatusError:
    code = e.code() if hasattr(e, "code") else None
    details = e.details() if hasattr(e, "details") else str(e)
    return GrpcStatusError(code, details)


@dataclass
class StreamResult:
    """What one server-streaming call produced, with client-side timings (perf_counter s)."""

    t_start: float
    t_end: float = 0.0
    t_first_token: float | None = None  # arrival of the first message carrying tokens
    t_last_token: float | None = None  # arrival of the last message carrying tokens
    messages: list[Any] = field(default_factory=list)
    tokens: int = 0
    bytes: int = 0
    cancelled: bool = False  # we cancelled it and the call ended CANCELLED
    finished_before_cancel: bool = False  # we meant to cancel, but it had already ended

    @property
    def ttft_ms(self) -> float | None:
        if self.t_first_token is None:
            return None
        return (self.t_first_token - self.t_start) * 1000.0

    @property
    def tpot_ms(self) -> float | None:
        """Mean latency per token after the first (ms/token); None with fewer than 2 tokens."""
        if self.tokens < 2 or self.t_first_token is None or self.t_last_token is None:
            return None
        return (self.t_last_token - self.t_first_token) * 1000.0 / (self.tokens - 1)

    @property
    def tokens_per_s(self) -> float | None:
        duration = self.t_end - self.t_start
        if self.tokens == 0 or duration <= 0:
            return None
        return self.tokens / duration


class LocustGrpcClient:
    """Wraps a generated stub; every call fires one Locust ``request`` event.

    ``unary`` and ``stream`` return ``None`` when the call failed (the failure is already
    reported to Locust), so tasks never need their own try/except around RPCs.
    """

    def __init__(self, stub: Any, environment: Environment, timeout: float | None = None) -> None:
        self.stub = stub
        self.env = environment
        self.timeout = timeout

    def _fire(self, name: str, start: float, length: int, exc: Exception | None,
              request_type: str = REQUEST_TYPE) -> None:
        self.env.events.request.fire(
            request_type=request_type, name=name,
            response_time=(time.perf_counter() - start) * 1000.0,
            response_length=length, response=None, context={}, exception=exc)

    def metric(self, name: str, value: float | None, length: int = 0) -> None:
        """Report ``value`` as a ``METRIC`` entry (Locust shows it in its time columns)."""
        if value is None:
            return
        self.env.events.request.fire(
            request_type=METRIC_TYPE, name=name, response_time=float(value),
            response_length=length, response=None, context={}, exception=None)

    def unary(self, method: str, request: Any, *, name: str | None = None,
              check: Callable[[Any], None] | None = None) -> Any | None:
        """Call a unary-unary method; ``check(response)`` may raise ResponseCheckError."""
        start = time.perf_counter()
        try:
            response = getattr(self.stub, method)(request, timeout=self.timeout)
            if check is not None:
                check(response)
        except grpc.RpcError as e:
            self._fire(name or method, start, 0, status_error(e))
            return None
        except ResponseCheckError as e:
            self._fire(name or method, start, 0, e)
            return None
        self._fire(name or method, start, response.ByteSize(), None)
        return response

    def stream(self, method: str, request: Any, *, name: str | None = None,
               cancel_after: int | None = None,
               check: Callable[[StreamResult], None] | None = None) -> StreamResult | None:
        """Run a unary-stream call to its end, or cancel it after ``cancel_after`` messages.

        A cancel counts as a success when the call then ends with CANCELLED (our cancel) or
        had already finished on its own. Any other status is a failure, and so is a
        CANCELLED we did not ask for. ``check(result)`` may raise ResponseCheckError.
        """
        result = StreamResult(t_start=time.perf_counter())
        call = getattr(self.stub, method)(request, timeout=self.timeout)
        we_cancelled = False
        exc: Exception | None = None
        try:
            try:
                for msg in call:
                    now = time.perf_counter()
                    result.messages.append(msg)
                    result.bytes += msg.ByteSize()
                    n = len(getattr(msg, "token_ids", ()))
                    if n:
                        result.tokens += n
                        result.t_last_token = now
                        if result.t_first_token is None:
                            result.t_first_token = now
                    if cancel_after is not None and len(result.messages) >= cancel_after:
                        we_cancelled = True
                        if not call.cancel():  # False: the call had already terminated
                            result.finished_before_cancel = True
                            break
                        # Drain: the next read must raise CANCELLED.
                        for _ in call:
                            pass
                        break
            except grpc.RpcError as e:
                if we_cancelled and e.code() == grpc.StatusCode.CANCELLED:
                    result.cancelled = True
                else:
                    exc = status_error(e)
            result.t_end = time.perf_counter()
            if exc is None and we_cancelled and not (result.cancelled
                                                     or result.finished_before_cancel):
                exc = ResponseCheckError("cancelled the call but it did not end CANCELLED")
            if exc is None and check is not None:
                try:
                    check(result)
                except ResponseCheckError as e:
                    exc = e
        finally:
            # Locust stopping a user (GreenletExit) or a bug above: never leave the stream
            # running on the server. cancel() is a no-op on a finished call.
            call.cancel()
        name = name or method
        self.env.events.request.fire(
            request_type=REQUEST_TYPE, name=name,
            response_time=(result.t_end - result.t_start) * 1000.0,
            response_length=result.bytes, response=None, context={}, exception=exc)
        return None if exc is not None else result


def parse_host(host: str) -> str:
    """``grpc://h:p``, ``http://h:p`` or ``h:p`` -> ``h:p`` (a gRPC target)."""
    for scheme in ("grpc://", "http://", "https://"):
        if host.startswith(scheme):
            host = host[len(scheme):]
    return host.rstrip("/")


class GrpcUser(User):
    """A Locust user with one plaintext channel to ``--host`` and a ``LocustGrpcClient``."""

    abstract = True
    stub_class: type | None = None
    rpc_timeout: float | None = 300.0

    def __init__(self, environment: Environment) -> None:
        super().__init__(environment)
        if not self.host:
            raise LocustError("set the server with --host HOST:PORT")
        if self.stub_class is None:
            raise LocustError("GrpcUser subclasses must set stub_class")
        self.channel = grpc.insecure_channel(parse_host(self.host))
        self.client = LocustGrpcClient(self.stub_class(self.channel), environment,
                                       timeout=self.rpc_timeout)

    def on_stop(self) -> None:
        self.channel.close()
