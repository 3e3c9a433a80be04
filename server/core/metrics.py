"""Prometheus metrics (served on --metrics-port by ``server.http.app.metrics_app``) and the core's own counters.

The same numbers back the tests' leak checks: after every stream ends, active streams,
read buffers, distinct configs in flight and engine requests must all return to zero.

Every call through either door is counted once, when it ends, in
``steerd_requests_total{method, door, code}``: ``method`` is the core operation (the gRPC
method's name: ``Generate`` for ``/v1/completions`` and ``/v1/chat/completions`` too),
``door`` is ``grpc`` or ``http``, ``code`` the core's status (``server.core.errors.Code``).
A door opens a ``Call`` when a request arrives and ends it with the exception that ended
the call, or none.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from server.core.errors import Code, code_of

_LAT = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("steerd_requests", "Calls by core method, door and final status",
                                ["method", "door", "code"], registry=r)
        self.active_streams = Gauge("steerd_active_streams", "Generate/Encode calls in flight",
                                    registry=r)
        self.distinct_configs = Gauge("steerd_distinct_configs_in_flight",
                                      "Distinct intervention sets among in-flight requests", registry=r)
        self.read_buffers = Gauge("steerd_read_buffers", "Requests with a feature-read buffer",
                                  registry=r)
        self.engine_requests = Gauge("steerd_engine_unfinished_requests",
                                     "Requests the engine has not finished (queued + running)",
                                     registry=r)
        self.ttft = Histogram("steerd_ttft_seconds", "Time to first token", buckets=_LAT, registry=r)
        self.tpot = Histogram("steerd_tpot_seconds", "Time per output token after the first",
                              buckets=_LAT, registry=r)
        self.tokens = Counter("steerd_generated_tokens", "Tokens generated", registry=r)
        self.interventions = Counter("steerd_interventions", "Interventions received", registry=r)
        self.read_positions = Counter("steerd_read_positions", "Positions reported by feature reads",
                                      registry=r)
        self.rejected = Counter("steerd_rejected", "Requests refused by a server cap", ["cap"],
                                registry=r)
        self.reads_dropped = Counter(
            "steerd_reads_dropped",
            "Reads side-channel records or messages dropped, by reason: unknown_request (a "
            "finished or cancelled request's late step, or a made-up id), malformed (sizes, "
            "SAE, positions or features out of range, or not a record list), oversized (a "
            "message over --reads-max-message-bytes), unauthenticated (a peer that failed the "
            "CURVE handshake)", ["reason"], registry=r)

    def call(self, method: str, door: str) -> Call:
        """Start counting one call (``Call.end`` counts it)."""
        return Call(self, method, door)


class Call:
    """One call being counted; ``end`` records its code once (later ends do nothing)."""

    __slots__ = ("metrics", "method", "door", "code")

    def __init__(self, metrics: Metrics, method: str, door: str) -> None:
        self.metrics, self.method, self.door = metrics, method, door
        self.code: Code | None = None

    def end(self, error: BaseException | None = None, code: Code | None = None) -> Code:
        """Count the call as ended by ``error`` (None: OK), or with ``code`` when given."""
        if self.code is None:
            self.code = code or code_of(error)
            self.metrics.requests.labels(self.method, self.door, self.code.value).inc()
        return self.code

    async def __aenter__(self) -> Call:
        return self

    async def __aexit__(self, typ, exc, tb) -> None:
        self.end(exc)
