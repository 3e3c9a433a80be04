"""The HTTP door (``--http-port``): OpenAI-compatible routes, the feature routes and the
browser playground, over the core.

- ``POST /v1/completions``, ``POST /v1/chat/completions`` (SSE streaming or not, ``n`` = 1),
  ``GET /v1/models``, ``GET /health``;
- ``GET /v1/saes`` (``ListSAEs``, each with ``labelled``), ``GET /v1/features/search?q=&sae=
  &limit=`` (``SearchFeatures``), ``GET /v1/features/{sae}/{index}`` (``GetFeature``),
  ``POST /v1/token_pieces`` with ``{"token_ids": [...]}`` (each id decoded on its own, so a
  page can label per-position reads);
- ``GET /v1/vectors`` (``ListVectors``); admin, with an ``--admin-tokens-file`` token only:
  ``POST /v1/admin/vectors`` with ``{"name", "layers": [{"layer", "values"}], "file" (base64),
  "file_format", "metadata"}`` (``LoadVector``), ``DELETE /v1/admin/vectors/{name}``
  (``UnloadVector``); ``POST /v1/vectors/train`` with the proto's TrainVectorRequest fields
  (``TrainVector``; prompts as text or token id lists, ``"method": "mean_diff"|"pca"``,
  ``"position": "last"|"mean"``): any caller, but with ``"register": true`` an admin token;
- ``GET /`` and ``GET /playground/...``: the playground's static files, served without auth
  (they hold no data; the page sends its bearer token to the JSON routes).

Each route converts its body or parameters to the core's types (``server.http.bodies``),
calls the core, and shapes the answer (``server.http.shape``); a domain error becomes an
OpenAI-shaped error (``server.http.errors``) whose ``param`` is the body field. The door's
own guards: bodies are read with a cap (413 past ``--max-message-bytes``, chunked bodies
included) and a deadline (408), JSON nested deeper than ``MAX_JSON_DEPTH`` is refused (400),
JSON routes take only ``Content-Type: application/json`` (415), and a request whose
``Host`` is not allowed or whose ``Origin`` is another site is refused (403), so a web page
cannot drive a server on a developer's machine (DNS rebinding, a text/plain form POST).
Anything unexpected is a JSON 500 without detail.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import numpy as np
from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from sae_runtime.errors import InvalidRequestError, SteeringError
from server.auth import Auth
from server.core.errors import Code
from server.core.metrics import Call, Metrics
from server.core.types import Chunk, LoadVectorRequest
from server.http import bodies, shape
from server.http.errors import HttpError, http_error

if TYPE_CHECKING:  # the core imports vLLM
    from server.core.service import Core

log = logging.getLogger("steerd")
DOOR = "http"
PLAYGROUND_DIR = Path(__file__).resolve().parents[1] / "playground"
SEARCH_PARAMS = ("q", "sae", "limit")
MAX_JSON_DEPTH = 32
"""Deepest nesting of arrays and objects a JSON body may have (the API's own is 5)."""
OFFLOAD_JSON_BYTES = 256 * 1024
"""Bodies larger than this are parsed in a worker thread, off the event loop."""


@dataclass(frozen=True)
class HttpLimits:
    """The door's own limits (``steerd serve --http-*``)."""

    max_body_bytes: int = 4 * 1024 * 1024
    body_timeout_s: float = 30.0  # a body must arrive within this
    allowed_hosts: tuple[str, ...] | None = None  # Host names accepted; None: any
    allowed_origins: tuple[str, ...] = ()  # cross-site origins accepted besides our own


def _too_deep(data: Any, limit: int) -> bool:
    stack = [(data, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > limit:
            return True
        items = node.values() if isinstance(node, dict) else node
        stack.extend((x, depth + 1) for x in items if isinstance(x, (list, dict)))
    return False


def parse_json(raw: bytes) -> Any:
    """The body's JSON; 400 for invalid or too deeply nested JSON."""
    too_deep = HttpError(Code.INVALID_ARGUMENT, f"the body's JSON is nested more than "
                         f"{MAX_JSON_DEPTH} levels deep")
    try:
        data = json.loads(raw)
    except RecursionError:
        raise too_deep from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise HttpError(Code.INVALID_ARGUMENT, f"the body is not valid JSON: {e}") from None
    if isinstance(data, (list, dict)) and _too_deep(data, MAX_JSON_DEPTH):
        raise too_deep
    return data


async def read_json(request: Request, limits: HttpLimits) -> Any:
    """The request's JSON body, read with the door's cap and deadline."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype != "application/json":
        raise HttpError(Code.INVALID_ARGUMENT, "send the body as JSON with 'Content-Type: "
                        f"application/json' (got {ctype or 'none'!r})", status=415,
                        name="unsupported_media_type")
    too_large = HttpError(Code.INVALID_ARGUMENT, f"request body is over the server's limit of "
                          f"{limits.max_body_bytes} bytes", status=413)
    size = request.headers.get("content-length")
    if size is not None and size.isascii() and size.isdigit() and int(size) > limits.max_body_bytes:
        raise too_large
    parts, n = [], 0
    try:
        async with asyncio.timeout(limits.body_timeout_s):
            async for part in request.stream():
                n += len(part)
                if n > limits.max_body_bytes:
                    raise too_large
                parts.append(part)
    except TimeoutError:
        raise HttpError(Code.INVALID_ARGUMENT, f"the request body did not arrive within "
                        f"{limits.body_timeout_s:g}s", status=408, name="timeout") from None
    raw = b"".join(parts)
    if n > OFFLOAD_JSON_BYTES:
        return await asyncio.to_thread(parse_json, raw)
    return parse_json(raw)


def _host_name(host: str) -> str:
    """``Host`` header -> name: ``localhost:8000`` -> ``localhost``, ``[::1]:80`` -> ``::1``."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def cross_site(request: Request, limits: HttpLimits) -> str | None:
    """Why a request looks driven by another site (None: it does not).

    ``Host`` must name this server (``allowed_hosts``; DNS rebinding points a foreign name
    at it). A browser's ``Origin`` must be this server's own (scheme://Host) or one of
    ``allowed_origins``; requests without one (curl, SDKs, same-origin GETs) pass.
    """
    host = request.headers.get("host", "")
    if limits.allowed_hosts is not None and _host_name(host) not in limits.allowed_hosts:
        return f"Host {host!r} is not one this server answers to (steerd serve --http-allowed-hosts)"
    origin = request.headers.get("origin")
    if origin is None or origin in limits.allowed_origins:
        return None
    o = urlsplit(origin)
    if o.netloc.lower() == host.lower() and o.scheme in ("http", "https"):
        return None
    return (f"Origin {origin!r} is another site; this server answers only its own pages "
            "(steerd serve --http-allowed-origins)")


async def _cancel_on_disconnect(request: Request, work: asyncio.Future) -> Any:
    """Await ``work``, cancelling it (and so the engine request) if the client goes away."""

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watch = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
    if not work.done():
        work.cancel()
        return None
    return work.result()


def _sse(obj: Any) -> bytes:
    return b"data: " + (obj if isinstance(obj, bytes) else json.dumps(obj).encode()) + b"\n\n"


def _int_param(name: str, raw: str, lo: int, hi: int) -> int:
    if not (raw.isascii() and raw.isdigit()) or not lo <= int(raw) < hi:
        raise InvalidRequestError(name, f"must be an integer in [{lo}, {hi}), got {raw!r}")
    return int(raw)


def build_app(core: Core, *, model: str, auth: Auth | None = None,
              limits: HttpLimits | None = None) -> Starlette:
    """The Starlette app; ``model`` is the id ``/v1/models`` lists and requests must name."""
    auth = auth or Auth()
    limits = limits or HttpLimits()
    metrics = core.metrics
    started = time.time()

    def fail(e: HttpError, call: Call | None) -> JSONResponse:
        if call is not None:
            call.end(code=e.code)
        headers = {"Retry-After": "1"} if e.status in (429, 503) else None
        if e.status == 401:
            headers = {"WWW-Authenticate": "Bearer"}
        return JSONResponse(e.body, status_code=e.status, headers=headers)

    def unauthorized() -> HttpError:
        return HttpError(Code.UNAUTHENTICATED, "missing or invalid bearer token (send "
                         "'Authorization: Bearer <token>')")

    async def parse(request: Request, cls: type[bodies.CommonBody]) -> bodies.CommonBody:
        data = await read_json(request, limits)
        try:
            body = cls.model_validate(data)
        except ValidationError as e:
            err = e.errors()[0]
            param = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in err["loc"]).lstrip(".")
            raise HttpError(Code.INVALID_ARGUMENT, f"{param}: {err['msg']}", param or None) from None
        if body.model != model:
            raise HttpError(Code.NOT_FOUND, f"model {body.model!r} is not served here; this "
                            f"server serves {model!r} (GET /v1/models)", "model", status=404,
                            name="model_not_found")
        return body

    async def generate(request: Request, cls: type[bodies.CommonBody]) -> Response:
        call = metrics.call("Generate", DOOR)
        authorization = request.headers.get("authorization", "")
        if not auth.ok(authorization):
            return fail(unauthorized(), call)
        body = None
        try:
            body = await parse(request, cls)
            stream = await core.generate(bodies.generate_request(body), auth.caller(authorization))
        except HttpError as e:
            return fail(e, call)
        except Exception as e:  # noqa: BLE001 - a domain error, or a JSON 500 (logged)
            if not isinstance(e, SteeringError):
                log.error("HTTP %s failed", request.url.path, exc_info=e)
            return fail(http_error(e, bodies.field_table(body)), call)
        shaper = shape.Shaper(body, model)
        if body.stream:
            return StreamingResponse(_events(stream, shaper, body, call),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        work = asyncio.ensure_future(core.collect(stream))
        try:
            msgs = await _cancel_on_disconnect(request, work)
        except SteeringError as e:
            return fail(http_error(e, bodies.field_table(body)), call)
        if msgs is None:  # the client went away; the engine request was aborted
            call.end(code=Code.CANCELLED)
            return Response(status_code=499)
        call.end()
        return JSONResponse(shaper.whole(msgs))

    async def _events(stream: AsyncIterator[Chunk], shaper: shape.Shaper,
                      body: bodies.CommonBody, call: Call) -> AsyncIterator[bytes]:
        try:
            first, usage = True, None
            async for msg in stream:
                out = shaper.chunk(msg, first)
                first = False
                if msg.finish_reason is not None:
                    usage = msg.usage
                if out is not None:
                    yield _sse(out)
            if body.stream_options is not None and body.stream_options.include_usage and usage:
                yield _sse(shaper.usage_chunk(usage))
        except SteeringError as e:  # headers are sent: the error travels as an event
            err = http_error(e, bodies.field_table(body))
            call.end(code=err.code)
            yield _sse(err.body)
        except BaseException as e:
            call.end(e)
            raise
        finally:
            await stream.aclose()  # gives the stream slot back and aborts the engine request
            call.end()
        yield _sse(b"[DONE]")

    async def completions(request: Request) -> Response:
        return await generate(request, bodies.CompletionBody)

    async def chat_completions(request: Request) -> Response:
        return await generate(request, bodies.ChatBody)

    def json_route(path: str, method: str, fn: Callable[[Request], Awaitable[Any]],
                   verbs: tuple[str, ...] = ("GET",), admin: bool = False,
                   own_auth: bool = False) -> Route:
        """A JSON route over core method ``method`` (the metric's label); ``admin``: it takes
        admin tokens only (``Auth.check_admin``), not the ordinary ones; ``own_auth``: ``fn``
        checks the token itself (``server.auth.MIXED_METHODS``)."""

        async def endpoint(request: Request) -> Response:
            call = metrics.call(method, DOOR)
            if not admin and not own_auth and not auth.ok(request.headers.get("authorization", "")):
                return fail(unauthorized(), call)
            try:
                if admin:
                    auth.check_admin(request.headers.get("authorization", ""))
                out = await fn(request)
            except HttpError as e:
                return fail(e, call)
            except Exception as e:  # noqa: BLE001 - a domain error, or a JSON 500 (logged)
                if not isinstance(e, SteeringError):
                    log.error("HTTP %s %s failed", request.method, path, exc_info=e)
                return fail(http_error(e), call)
            call.end()
            return JSONResponse(out)

        return Route(path, endpoint, methods=list(verbs))

    async def models(request: Request) -> dict:
        return {"object": "list", "data": [{
            "id": model, "object": "model", "created": int(started), "owned_by": "steerd",
            "max_model_len": core.max_model_len}]}

    async def list_saes(request: Request) -> dict:
        return {"object": "list", "data": [shape.sae_info(s) for s in core.list_saes()]}

    async def search(request: Request) -> dict:
        params = request.query_params
        for name in params:
            if name not in SEARCH_PARAMS:
                raise InvalidRequestError(name, f"unknown parameter (known: {', '.join(SEARCH_PARAMS)})")
        limit = params.get("limit", "")
        try:
            found = core.search_features(params.get("q", ""), params.get("sae", ""),
                                         _int_param("limit", limit, 1, 2**32) if limit else 0)
        except InvalidRequestError as e:
            if e.field == "query":  # the core's field is ``query``; this route's parameter is q
                raise InvalidRequestError("q", e.description) from None
            raise
        return {"object": "list", "data": [shape.feature(f) for f in found]}

    async def feature(request: Request) -> dict:
        index = _int_param("index", request.path_params["index"], 0, 2**32)
        return shape.feature(await core.get_feature(request.path_params["sae"], index))

    async def token_pieces(request: Request) -> dict:
        data = await read_json(request, limits)
        ids = data.get("token_ids") if isinstance(data, dict) else None
        if not isinstance(ids, list):
            raise InvalidRequestError("token_ids", "give a list of token ids")
        for j, x in enumerate(ids):
            if not isinstance(x, int) or isinstance(x, bool):
                raise InvalidRequestError(f"token_ids[{j}]", "must be a token id (an integer)")
        return {"pieces": core.token_pieces(ids)}

    async def list_vectors(request: Request) -> dict:
        return {"object": "list", "data": [shape.vector_info(v) for v in core.list_vectors()]}

    async def load_vector(request: Request) -> dict:
        return shape.vector_info(await core.load_vector(load_vector_body(
            await read_json(request, limits))))

    async def train_vector(request: Request) -> dict:
        data = await read_json(request, limits)
        try:
            body = bodies.TrainVectorBody.model_validate(data)
        except ValidationError as e:
            err = e.errors()[0]
            param = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in err["loc"]).lstrip(".")
            raise InvalidRequestError(param or "body", err["msg"]) from None
        auth.check_call(request.headers.get("authorization", ""), admin=body.register_)
        caller = auth.caller(request.headers.get("authorization", ""))
        return shape.trained_vector(await core.train_vector(bodies.train_vector_request(body),
                                                            caller))

    async def unload_vector(request: Request) -> dict:
        return shape.vector_info(core.unload_vector(request.path_params["name"]))

    async def health(request: Request) -> Response:
        return Response(status_code=503 if core.engine_dead else 200)

    async def index_page(request: Request) -> Response:
        return FileResponse(PLAYGROUND_DIR / "index.html")

    async def http_exception(request: Request, exc: HTTPException) -> Response:
        return JSONResponse(HttpError(Code.NOT_FOUND if exc.status_code == 404 else
                                      Code.INVALID_ARGUMENT, str(exc.detail),
                                      status=exc.status_code,
                                      name="not_found" if exc.status_code == 404 else None).body,
                            status_code=exc.status_code, headers=exc.headers)

    async def server_error(request: Request, exc: Exception) -> Response:
        log.error("HTTP %s %s failed", request.method, request.url.path, exc_info=exc)
        return JSONResponse(HttpError(Code.INTERNAL, "internal error").body, status_code=500)

    app = Starlette(routes=[
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        json_route("/v1/models", "ListModels", models),
        Route("/health", health, methods=["GET"]),
        json_route("/v1/saes", "ListSAEs", list_saes),
        json_route("/v1/features/search", "SearchFeatures", search),
        json_route("/v1/features/{sae}/{index}", "GetFeature", feature),
        json_route("/v1/token_pieces", "TokenPieces", token_pieces, verbs=("POST",)),
        json_route("/v1/vectors", "ListVectors", list_vectors),
        json_route("/v1/admin/vectors", "LoadVector", load_vector, verbs=("POST",), admin=True),
        json_route("/v1/admin/vectors/{name}", "UnloadVector", unload_vector,
                   verbs=("DELETE",), admin=True),
        json_route("/v1/vectors/train", "TrainVector", train_vector, verbs=("POST",),
                   own_auth=True),
        Route("/", index_page, methods=["GET"]),
        Mount("/playground", app=StaticFiles(directory=PLAYGROUND_DIR), name="playground"),
    ], exception_handlers={HTTPException: http_exception, Exception: server_error})
    return SameSite(app, limits)


LOAD_VECTOR_FIELDS = ("name", "layers", "file", "file_format", "metadata")


def load_vector_body(data: Any) -> LoadVectorRequest:
    """``POST /v1/admin/vectors``'s body as the core's ``LoadVectorRequest``; the fields are
    ``LoadVectorRequest``'s (``file`` base64), so the core's field paths name them."""
    if not isinstance(data, dict):
        raise InvalidRequestError("body", "give a JSON object")
    for k in data:
        if k not in LOAD_VECTOR_FIELDS:
            raise InvalidRequestError(k, f"unknown field (known: {', '.join(LOAD_VECTOR_FIELDS)})")
    name = data.get("name", "")
    if not isinstance(name, str):
        raise InvalidRequestError("name", "give a string")
    layers = data.get("layers", [])
    if not isinstance(layers, list):
        raise InvalidRequestError("layers", 'give a list of {"layer", "values"}')
    values = []
    for j, lv in enumerate(layers):
        if not isinstance(lv, dict) or set(lv) - {"layer", "values"}:
            raise InvalidRequestError(f"layers[{j}]", 'give {"layer": int, "values": [floats]}')
        layer, vals = lv.get("layer"), lv.get("values")
        if not isinstance(layer, int) or isinstance(layer, bool) or layer < 0:
            raise InvalidRequestError(f"layers[{j}].layer", "give a block number (>= 0)")
        if not isinstance(vals, list) or not all(
                isinstance(x, (int, float)) and not isinstance(x, bool) for x in vals):
            raise InvalidRequestError(f"layers[{j}].values", "give a list of numbers")
        values.append((layer, np.asarray(vals, dtype=np.float32)))
    file = data.get("file", "")
    try:
        raw = base64.b64decode(file, validate=True) if file else b""
    except (binascii.Error, TypeError, ValueError):
        raise InvalidRequestError("file", "give the file's bytes in base64") from None
    fmt = data.get("file_format", "")
    meta = data.get("metadata", {})
    if not isinstance(fmt, str):
        raise InvalidRequestError("file_format", "give a string")
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                             for k, v in meta.items()):
        raise InvalidRequestError("metadata", "give an object of strings")
    return LoadVectorRequest(name, tuple(values), raw, fmt, tuple(sorted(meta.items())))


class SameSite:
    """ASGI middleware: refuse requests another site drives (``cross_site``) with a JSON 403
    before any route runs."""

    def __init__(self, app, limits: HttpLimits) -> None:
        self.app = app
        self.limits = limits

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            why = cross_site(Request(scope), self.limits)
            if why is not None:
                res = JSONResponse(HttpError(Code.PERMISSION_DENIED, why, status=403,
                                             name="cross_site").body, status_code=403)
                await res(scope, receive, send)
                return
        await self.app(scope, receive, send)


def metrics_app(metrics: Metrics, auth: Auth) -> Starlette:
    """The metrics port's app: Prometheus text at ``/metrics``, behind ``auth`` (the server's
    when the port is exposed beyond loopback, none on loopback)."""
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    async def endpoint(request: Request) -> Response:
        if not auth.ok(request.headers.get("authorization", "")):
            return JSONResponse(HttpError(Code.UNAUTHENTICATED, "missing or invalid bearer "
                                          "token").body, status_code=401,
                                headers={"WWW-Authenticate": "Bearer"})
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return Starlette(routes=[Route("/metrics", endpoint, methods=["GET"])])
