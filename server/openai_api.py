"""OpenAI-compatible HTTP front end (``--http-port``), served by the same process and engine.

``POST /v1/completions``, ``POST /v1/chat/completions`` (SSE streaming or not, ``n`` = 1) and
``GET /v1/models``. A body is turned into a ``steering.v1.GenerateRequest`` here and then goes
through the servicer's own ``prepare_generate`` / ``generate_stream``: validation, caps,
tokenization, chat rendering, reads, logprobs and metrics are the gRPC path's, not copies.
Our extras ride in the body (what the OpenAI SDK sends through ``extra_body``):
``interventions`` (with ``when``/``latch``), ``reads``, ``abort_when``, ``vectors``, ``inline_vectors``, ``top_k``, ``ignore_eos``, ``stop_token_ids``,
``prompt_logprobs``, ``return_token_ids`` and ``request_id``. Reads come back per chunk (or
per choice when not streaming) as ``choices[0].features``.

Errors are OpenAI-shaped, ``{"error": {"message", "type", "param", "code"}}``: ``param``
names the body field (``max_tokens``, ``interventions[0].feature``), ``code`` is the gRPC
status name in lower case, and the HTTP status follows ``HTTP_STATUS``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any, Literal

import grpc
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from sae_runtime.errors import InvalidRequestError, SteeringError
from server.auth import bearer_ok
from server.errors import status_code_of
from server.service import SteeringServicer
from steering.v1 import steering_pb2 as pb

log = logging.getLogger("steerd")

# gRPC status of a domain error -> (HTTP status, OpenAI error type)
HTTP_STATUS: dict[grpc.StatusCode, tuple[int, str]] = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error"),
    grpc.StatusCode.NOT_FOUND: (400, "invalid_request_error"),  # an unknown SAE in the body
    grpc.StatusCode.FAILED_PRECONDITION: (400, "invalid_request_error"),
    grpc.StatusCode.UNAUTHENTICATED: (401, "authentication_error"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "rate_limit_error"),
    grpc.StatusCode.INTERNAL: (500, "server_error"),
    grpc.StatusCode.UNAVAILABLE: (503, "service_unavailable_error"),
}
_MODES = {"clamp": pb.INTERVENTION_MODE_CLAMP, "ablate": pb.INTERVENTION_MODE_ABLATE,
          "scale": pb.INTERVENTION_MODE_SCALE, "add": pb.INTERVENTION_MODE_ADD}
_SCOPES = {"all": pb.SCOPE_ALL, "generation_only": pb.SCOPE_GENERATION_ONLY}
_READ_SCOPES = {"all": pb.READ_SCOPE_ALL, "prompt": pb.READ_SCOPE_PROMPT,
                "generation": pb.READ_SCOPE_GENERATION}
_FRAMES = {"absolute": pb.POSITION_FRAME_ABSOLUTE, "prompt": pb.POSITION_FRAME_PROMPT,
           "generation": pb.POSITION_FRAME_GENERATION}
_FINISH = {pb.FINISH_REASON_LENGTH: "length", pb.FINISH_REASON_STOP: "stop",
           pb.FINISH_REASON_ABORT: "abort",
           # OpenAI's name for "content was cut by a filter"; ``guardrail`` says which
           pb.FINISH_REASON_FEATURE: "content_filter"}
_OPS = {">": pb.COMPARISON_GT, "gt": pb.COMPARISON_GT, "<": pb.COMPARISON_LT,
        "lt": pb.COMPARISON_LT}
U32 = 2**32


# ---------------------------------------------------------------------------- request bodies


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PositionRangeBody(_Strict):
    """The proto's PositionRange: ``{"frame": "prompt", "start": -1}``."""

    frame: Literal["absolute", "prompt", "generation"]
    start: int | None = Field(default=None, ge=-(2**63), lt=2**63)
    end: int | None = Field(default=None, ge=-(2**63), lt=2**63)


class PositionsBody(_Strict):
    """The proto's PositionSelector (validated by the gRPC path's converter)."""

    ranges: list[PositionRangeBody] = Field(default_factory=list)
    exclude_ranges: bool = False
    token_ids: list[int] = Field(default_factory=list)
    exclude_token_ids: bool = False


class ConditionBody(_Strict):
    """The proto's FeatureCondition: ``{"sae": "s", "feature": 3, "op": ">", "threshold": 2}``."""

    sae: str
    feature: int = Field(ge=0, lt=U32)
    op: Literal[">", "<", "gt", "lt"]
    threshold: float


class GuardrailBody(ConditionBody):
    """One of ``abort_when``: a condition and, optionally, the positions it watches."""

    positions: PositionsBody | None = None


class VectorBody(_Strict):
    """One of ``vectors``: the proto's VectorSteer."""

    name: str
    strength: float
    layers: list[int] = Field(default_factory=list)
    positions: PositionsBody | None = None


class InlineVectorBody(_Strict):
    """One of ``inline_vectors``: the proto's InlineVector."""

    values: list[float]
    layer: int = Field(ge=0, lt=U32)
    strength: float = 1.0
    positions: PositionsBody | None = None


class InterventionBody(_Strict):
    """One of ``interventions``: the proto's Intervention with lower-case names."""

    sae: str
    feature: int = Field(ge=0, lt=U32)
    mode: Literal["clamp", "ablate", "scale", "add"]
    value: float = 0.0
    scope: Literal["all", "generation_only"] | None = None  # None: "all", unless positions
    positions: PositionsBody | None = None
    when: ConditionBody | None = None
    latch: bool = False


class ReadBody(_Strict):
    """One of ``reads``: the proto's FeatureRead with lower-case names."""

    sae: str
    top_k: int = Field(default=0, ge=0, lt=U32)
    watch: list[int] = Field(default_factory=list)
    scope: Literal["all", "prompt", "generation"] | None = None  # None: "all", unless positions
    positions: PositionsBody | None = None


class MessageBody(BaseModel):
    model_config = ConfigDict(extra="allow")  # name, tool_call_id, ... are ignored
    role: str
    content: str | list[dict[str, Any]] | None = None


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")
    include_usage: bool = False


class _Common(BaseModel):
    """Fields both endpoints take. Unknown fields are ignored, as OpenAI-compatible servers do;
    known ones we cannot honour are refused by ``_unsupported`` rather than ignored."""

    model_config = ConfigDict(extra="allow")
    model: str
    max_tokens: int | None = Field(default=None, ge=0, lt=U32)
    temperature: float | None = None
    top_p: float | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=-(2**63), lt=2**63)
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # vLLM-style and steering extras (``extra_body`` in the OpenAI SDK)
    top_k: int | None = Field(default=None, ge=0, lt=U32)
    ignore_eos: bool = False
    stop_token_ids: list[int] = Field(default_factory=list)
    prompt_logprobs: int | None = Field(default=None, ge=0, lt=U32)
    return_token_ids: bool = False
    request_id: str = ""
    interventions: list[InterventionBody] = Field(default_factory=list)
    reads: list[ReadBody] = Field(default_factory=list)
    abort_when: list[GuardrailBody] = Field(default_factory=list)
    vectors: list[VectorBody] = Field(default_factory=list)
    inline_vectors: list[InlineVectorBody] = Field(default_factory=list)


class CompletionBody(_Common):
    prompt: str | list[int] | list[str] | list[list[int]]
    logprobs: int | None = Field(default=None, ge=0, lt=U32)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None


class ChatBody(_Common):
    messages: list[MessageBody]
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, lt=U32)
    max_completion_tokens: int | None = Field(default=None, ge=0, lt=U32)
    tools: list[Any] | None = None
    response_format: dict[str, Any] | None = None


# ---------------------------------------------------------------------------- body -> proto


def _unsupported(body: _Common) -> None:
    """Refuse what this server cannot do instead of silently ignoring it."""
    if body.n != 1:
        raise InvalidRequestError("n", f"only n=1 is supported, got {body.n}")
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(body, name):
            raise InvalidRequestError(name, "not supported by this server (leave it 0 or unset)")
    if body.logit_bias:
        raise InvalidRequestError("logit_bias", "not supported by this server")
    if isinstance(body, CompletionBody):
        if body.echo:
            raise InvalidRequestError("echo", "not supported; use prompt_logprobs for prompt scores")
        if body.suffix:
            raise InvalidRequestError("suffix", "not supported by this server")
        if body.best_of not in (None, 1):
            raise InvalidRequestError("best_of", f"only best_of=1 is supported, got {body.best_of}")
    if isinstance(body, ChatBody):
        if body.tools:
            raise InvalidRequestError("tools", "tool calls are not supported by this server")
        if body.response_format and body.response_format.get("type", "text") != "text":
            raise InvalidRequestError("response_format", "only the 'text' format is supported")


def _completion_prompt(prompt) -> pb.Prompt:
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        if len(prompt) != 1:
            raise InvalidRequestError("prompt", f"one prompt per request (n=1); got {len(prompt)}")
        prompt = prompt[0]
    if isinstance(prompt, str):
        return pb.Prompt(text=prompt)
    if any(not 0 <= t < U32 for t in prompt):
        raise InvalidRequestError("prompt", "token ids must be non-negative")
    return pb.Prompt(token_ids=pb.TokenIds(ids=prompt))


def _content(j: int, m: MessageBody) -> str:
    if m.content is None or isinstance(m.content, str):
        return m.content or ""
    parts = []
    for k, part in enumerate(m.content):
        if part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise InvalidRequestError(f"messages[{j}].content[{k}]",
                                      "only text parts ({'type': 'text', 'text': ...}) are supported")
        parts.append(part["text"])
    return "".join(parts)


def _condition_pb(c: ConditionBody) -> pb.FeatureCondition:
    return pb.FeatureCondition(sae=c.sae, feature=c.feature, op=_OPS[c.op], threshold=c.threshold)


def _trip_json(t: pb.GuardrailTrip) -> dict:
    return {"guardrail": t.guardrail, "sae": t.sae, "feature": t.feature,
            "position": t.position, "value": t.value}


def request_from_body(body: _Common) -> pb.GenerateRequest:
    """A GenerateRequest carrying everything the body asks for (validated later, in one place)."""
    _unsupported(body)
    req = pb.GenerateRequest(request_id=body.request_id)
    if isinstance(body, ChatBody):
        req.prompt.messages.messages.extend(
            pb.ChatMessage(role=m.role, content=_content(j, m)) for j, m in enumerate(body.messages))
        if not body.messages:
            raise InvalidRequestError("messages", "give at least one message")
    else:
        req.prompt.CopyFrom(_completion_prompt(body.prompt))
    s = req.sampling
    max_tokens = body.max_completion_tokens if isinstance(body, ChatBody) and \
        body.max_completion_tokens is not None else body.max_tokens
    for name, v in (("max_tokens", max_tokens), ("temperature", body.temperature),
                    ("top_p", body.top_p), ("top_k", body.top_k), ("seed", body.seed),
                    ("prompt_logprobs", body.prompt_logprobs)):
        if v is not None:
            setattr(s, name, v)
    if isinstance(body, ChatBody):
        if body.top_logprobs is not None and not body.logprobs:
            raise InvalidRequestError("top_logprobs", "needs logprobs: true")
        if body.logprobs:
            s.logprobs = body.top_logprobs or 0
    elif body.logprobs is not None:
        s.logprobs = body.logprobs
    stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    s.stop.extend(stops)
    for j, t in enumerate(body.stop_token_ids):
        if not 0 <= t < U32:
            raise InvalidRequestError(f"stop_token_ids[{j}]", "token ids must be non-negative")
    s.stop_token_ids.extend(body.stop_token_ids)
    s.ignore_eos = body.ignore_eos
    for j, iv in enumerate(body.interventions):
        m = req.interventions.add(sae=iv.sae, feature=iv.feature, mode=_MODES[iv.mode],
                                  value=iv.value)
        if iv.scope is not None:
            m.scope = _SCOPES[iv.scope]
        if iv.positions is not None:
            m.positions.CopyFrom(_positions_pb(iv.positions, f"interventions[{j}].positions"))
        if iv.when is not None:
            m.when.CopyFrom(_condition_pb(iv.when))
        m.latch = iv.latch
    for j, v in enumerate(body.vectors):
        for k, layer in enumerate(v.layers):
            if not 0 <= layer < U32:
                raise InvalidRequestError(f"vectors[{j}].layers[{k}]", "must be a layer >= 0")
        steer = req.vectors.add(name=v.name, strength=v.strength, layers=v.layers)
        if v.positions is not None:
            steer.positions.CopyFrom(_positions_pb(v.positions, f"vectors[{j}].positions"))
    for j, v in enumerate(body.inline_vectors):
        iv = req.inline_vectors.add(values=v.values, layer=v.layer, strength=v.strength)
        if v.positions is not None:
            iv.positions.CopyFrom(_positions_pb(v.positions, f"inline_vectors[{j}].positions"))
    for j, g in enumerate(body.abort_when):
        guard = req.abort_when.add(condition=_condition_pb(g))
        if g.positions is not None:
            guard.positions.CopyFrom(_positions_pb(g.positions, f"abort_when[{j}].positions"))
    for j, r in enumerate(body.reads):
        for k, w in enumerate(r.watch):
            if not 0 <= w < U32:
                raise InvalidRequestError(f"reads[{j}].watch[{k}]", "must be a feature index >= 0")
        m = req.reads.add(sae=r.sae, top_k=r.top_k, watch=r.watch)
        if r.scope is not None:
            m.scope = _READ_SCOPES[r.scope]
        if r.positions is not None:
            m.positions.CopyFrom(_positions_pb(r.positions, f"reads[{j}].positions"))
    return req


def _positions_pb(body: PositionsBody, field: str) -> pb.PositionSelector:
    """The body's selector as protobuf; only what protobuf cannot hold is checked here (the
    rules are ``convert.selector_from_pb`` / ``Selector.validate``, as for gRPC)."""
    sel = pb.PositionSelector(exclude_ranges=body.exclude_ranges,
                              exclude_token_ids=body.exclude_token_ids)
    for r in body.ranges:
        m = sel.ranges.add(frame=_FRAMES[r.frame])
        if r.start is not None:
            m.start = r.start
        if r.end is not None:
            m.end = r.end
    for k, t in enumerate(body.token_ids):
        if not 0 <= t < U32:
            raise InvalidRequestError(f"{field}.token_ids[{k}]", "must be a token id >= 0")
    sel.token_ids.extend(body.token_ids)
    return sel


def http_param(field: str, chat: bool, body: _Common | None = None) -> str:
    """The body field a proto field path (from a validation error) came from."""
    renames = [("prompt.messages.messages", "messages"), ("prompt.messages", "messages"),
               ("prompt.token_ids.ids", "prompt"), ("prompt.text", "prompt"),
               ("prompt", "messages" if chat else "prompt")]
    max_tokens = ("max_completion_tokens" if chat and isinstance(body, ChatBody)
                  and body.max_completion_tokens is not None else "max_tokens")
    renames += [("sampling.max_tokens", max_tokens),
                ("sampling.logprobs", "top_logprobs" if chat else "logprobs")]
    if body is not None and isinstance(body.stop, str):
        renames.append(("sampling.stop[0]", "stop"))
    renames.append(("sampling", ""))
    for old, new in renames:
        if field == old or field.startswith((old + ".", old + "[")):
            rest = field[len(old):]
            return (new + rest).lstrip(".") if new else rest.lstrip(".")
    return field


# ---------------------------------------------------------------------------- responses


def error_json(status: int, kind: str, message: str, param: str | None, code: str) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


class HttpError(Exception):
    def __init__(self, status: int, kind: str, message: str, param: str | None, code: str) -> None:
        super().__init__(message)
        self.status, self.body, self.code = status, error_json(status, kind, message, param, code), code


def _from_steering(e: SteeringError, chat: bool, body: _Common | None) -> HttpError:
    code = status_code_of(e)
    status, kind = HTTP_STATUS.get(code, (500, "server_error"))
    field = getattr(e, "field", None)
    param = http_param(field, chat, body) if field else None
    message = str(e)
    if field and param != field and message.startswith(field + ":"):
        message = param + message[len(field):]  # name the body field, not the proto path
    return HttpError(status, kind, message, param, code.name.lower())


def _feature_json(f: pb.FeatureActivations) -> dict:
    return {"position": f.position, "token_id": f.token_id, "sae": f.sae,
            "indices": list(f.indices), "values": list(f.values),
            "watch_values": list(f.watch_values)}


def _completion_logprobs(entries, offset: int) -> tuple[dict, int]:
    """Legacy completions logprobs: tokens, token_logprobs, top_logprobs, text_offset."""
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for e in entries:
        out["tokens"].append(e.chosen.token)
        out["token_logprobs"].append(e.chosen.logprob)
        top = {e.chosen.token: e.chosen.logprob}
        top.update({t.token: t.logprob for t in e.top})
        out["top_logprobs"].append(top)
        out["text_offset"].append(offset)
        offset += len(e.chosen.token)
    return out, offset


def _chat_logprobs(entries) -> list[dict]:
    def one(lp: pb.Logprob) -> dict:
        return {"token": lp.token, "logprob": lp.logprob, "bytes": list(lp.token.encode())}

    return [{**one(e.chosen), "top_logprobs": [one(t) for t in e.top]} for e in entries]


def _usage(u: pb.Usage) -> dict:
    return {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
            "total_tokens": u.prompt_tokens + u.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": u.cached_prompt_tokens}}


class _Shaper:
    """Turns the servicer's GenerateResponse messages into OpenAI chunks or one response."""

    def __init__(self, body: _Common, model: str, chat: bool) -> None:
        self.body, self.model, self.chat = body, model, chat
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self.object = "chat.completion" if chat else "text_completion"
        self.offset = 0
        self.logprobs = isinstance(body, ChatBody) and body.logprobs or \
            isinstance(body, CompletionBody) and body.logprobs is not None

    def _choice(self, msg: pb.GenerateResponse, first: bool) -> dict:
        c: dict[str, Any] = {"index": 0}
        if self.chat:
            c["delta"] = {"content": msg.text}
            if first:
                c["delta"] = {"role": "assistant", "content": msg.text}
        else:
            c["text"] = msg.text
        if self.logprobs:
            if self.chat:
                c["logprobs"] = {"content": _chat_logprobs(msg.logprobs)}
            else:
                c["logprobs"], self.offset = _completion_logprobs(msg.logprobs, self.offset)
        else:
            c["logprobs"] = None
        c["finish_reason"] = _FINISH.get(msg.finish_reason)
        if msg.HasField("guardrail"):
            c["guardrail"] = _trip_json(msg.guardrail)
        if self.body.return_token_ids:
            c["token_ids"] = list(msg.token_ids)
            if first and not self.chat:
                c["prompt_token_ids"] = list(msg.prompt_token_ids)
        if self.body.reads:
            c["features"] = [_feature_json(f) for f in msg.features]
        if self.body.prompt_logprobs is not None and msg.prompt_logprobs:
            c["prompt_logprobs"] = _chat_logprobs(msg.prompt_logprobs)
        return c

    def chunk(self, msg: pb.GenerateResponse, first: bool) -> dict | None:
        if not (first or msg.token_ids or msg.text or msg.features or msg.finish_reason):
            return None
        out = {"id": self.id, "object": self.object + (".chunk" if self.chat else ""),
               "created": self.created, "model": self.model, "choices": [self._choice(msg, first)]}
        if self.chat and first and self.body.return_token_ids:
            out["prompt_token_ids"] = list(msg.prompt_token_ids)
        return out

    def usage_chunk(self, usage: pb.Usage) -> dict:
        return {"id": self.id, "object": self.object + (".chunk" if self.chat else ""),
                "created": self.created, "model": self.model, "choices": [], "usage": _usage(usage)}

    def whole(self, msgs: list[pb.GenerateResponse]) -> dict:
        """The non-streaming response: every message folded into one choice."""
        text = "".join(m.text for m in msgs)
        last = msgs[-1]
        choice: dict[str, Any] = {"index": 0}
        if self.chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        entries = [e for m in msgs for e in m.logprobs]
        if not self.logprobs:
            choice["logprobs"] = None
        elif self.chat:
            choice["logprobs"] = {"content": _chat_logprobs(entries)}
        else:
            choice["logprobs"] = _completion_logprobs(entries, 0)[0]
        choice["finish_reason"] = _FINISH.get(last.finish_reason)
        if last.HasField("guardrail"):
            choice["guardrail"] = _trip_json(last.guardrail)
        if self.body.return_token_ids:
            choice["token_ids"] = [t for m in msgs for t in m.token_ids]
            if not self.chat:
                choice["prompt_token_ids"] = list(msgs[0].prompt_token_ids)
        if self.body.reads:
            choice["features"] = [_feature_json(f) for m in msgs for f in m.features]
        if self.body.prompt_logprobs is not None:
            choice["prompt_logprobs"] = _chat_logprobs([e for m in msgs for e in m.prompt_logprobs])
        out = {"id": self.id, "object": self.object, "created": self.created, "model": self.model,
               "choices": [choice], "usage": _usage(last.usage)}
        if self.chat and self.body.return_token_ids:
            out["prompt_token_ids"] = list(msgs[0].prompt_token_ids)
        return out


# ---------------------------------------------------------------------------- the app


def _sse(obj: Any) -> bytes:
    return b"data: " + (obj if isinstance(obj, bytes) else json.dumps(obj).encode()) + b"\n\n"


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


def build_app(servicer: SteeringServicer, *, model: str, tokens: list[bytes],
              max_body_bytes: int) -> Starlette:
    """The Starlette app; ``model`` is the id ``/v1/models`` lists and requests must name."""
    metrics = servicer.metrics

    def fail(e: HttpError, method: str) -> JSONResponse:
        metrics.requests.labels(method, e.code.upper()).inc()
        headers = {"Retry-After": "1"} if e.status in (429, 503) else None
        if e.status == 401:
            headers = {"WWW-Authenticate": "Bearer"}
        return JSONResponse(e.body, status_code=e.status, headers=headers)

    def authorized(request: Request) -> bool:
        return not tokens or bearer_ok(request.headers.get("authorization", ""), tokens)

    def unauthorized() -> HttpError:
        return HttpError(401, "authentication_error",
                         "missing or invalid bearer token (send 'Authorization: Bearer <token>')",
                         None, "unauthenticated")

    async def parse(request: Request, cls: type[_Common], chat: bool) -> _Common:
        size = request.headers.get("content-length")
        if size is not None and size.isdigit() and int(size) > max_body_bytes:
            raise HttpError(413, "invalid_request_error", f"request body is over the server's "
                            f"limit of {max_body_bytes} bytes", None, "invalid_argument")
        raw = await request.body()
        if len(raw) > max_body_bytes:
            raise HttpError(413, "invalid_request_error", f"request body is over the server's "
                            f"limit of {max_body_bytes} bytes", None, "invalid_argument")
        try:
            data = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise HttpError(400, "invalid_request_error", f"the body is not valid JSON: {e}",
                            None, "invalid_argument") from None
        try:
            body = cls.model_validate(data)
        except ValidationError as e:
            err = e.errors()[0]
            param = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in err["loc"]).lstrip(".")
            raise HttpError(400, "invalid_request_error", f"{param}: {err['msg']}", param or None,
                            "invalid_argument") from None
        if body.model != model:
            raise HttpError(404, "invalid_request_error", f"model {body.model!r} is not served "
                            f"here; this server serves {model!r} (GET /v1/models)", "model",
                            "model_not_found")
        return body

    async def generate(request: Request, cls: type[_Common], chat: bool) -> Response:
        method = request.url.path
        if not authorized(request):
            return fail(unauthorized(), method)
        body = None
        try:
            body = await parse(request, cls, chat)
            admitted = servicer.prepare_generate(request_from_body(body),
                                                 default_max_tokens_to_fit=chat)
        except HttpError as e:
            return fail(e, method)
        except SteeringError as e:
            return fail(_from_steering(e, chat, body), method)
        shaper = _Shaper(body, model, chat)
        stream = servicer.generate_stream(admitted)
        if body.stream:
            return StreamingResponse(_events(stream, shaper, body, chat, method),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        work = asyncio.ensure_future(_collect(stream))
        try:
            msgs = await _cancel_on_disconnect(request, work)
        except SteeringError as e:
            return fail(_from_steering(e, chat, body), method)
        if msgs is None:  # the client went away; the engine request was aborted
            metrics.requests.labels(method, "CANCELLED").inc()
            return Response(status_code=499)
        metrics.requests.labels(method, "OK").inc()
        return JSONResponse(shaper.whole(msgs))

    async def _events(stream: AsyncIterator[pb.GenerateResponse], shaper: _Shaper, body: _Common,
                      chat: bool, method: str) -> AsyncIterator[bytes]:
        code = "OK"
        try:
            first, usage = True, None
            async for msg in stream:
                out = shaper.chunk(msg, first)
                first = False
                if msg.finish_reason:
                    usage = msg.usage
                if out is not None:
                    yield _sse(out)
            if body.stream_options is not None and body.stream_options.include_usage and usage:
                yield _sse(shaper.usage_chunk(usage))
        except SteeringError as e:  # headers are sent: the error travels as an event
            err = _from_steering(e, chat, body)
            code = err.code.upper()
            yield _sse(err.body)
        except (asyncio.CancelledError, GeneratorExit):
            code = "CANCELLED"
            raise
        finally:
            await stream.aclose()  # gives the stream slot back and aborts the engine request
            metrics.requests.labels(method, code).inc()
        yield _sse(b"[DONE]")

    async def completions(request: Request) -> Response:
        return await generate(request, CompletionBody, chat=False)

    async def chat_completions(request: Request) -> Response:
        return await generate(request, ChatBody, chat=True)

    async def models(request: Request) -> Response:
        if not authorized(request):
            return fail(unauthorized(), request.url.path)
        return JSONResponse({"object": "list", "data": [{
            "id": model, "object": "model", "created": int(servicer_started), "owned_by": "steerd",
            "max_model_len": servicer.max_model_len}]})

    async def health(request: Request) -> Response:
        dead = getattr(servicer.engine, "errored", False)
        return Response(status_code=503 if dead else 200)

    servicer_started = time.time()
    from server.http_features import feature_routes  # here: it imports this module's helpers

    return Starlette(routes=[
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
        *feature_routes(servicer, authorized=authorized, fail=fail, unauthorized=unauthorized),
    ])


async def _collect(stream: AsyncIterator[pb.GenerateResponse]) -> list[pb.GenerateResponse]:
    try:
        return [m async for m in stream]
    finally:
        await stream.aclose()


class HttpServer:
    """uvicorn in the running event loop, without its signal handling (``serve`` owns signals)."""

    def __init__(self, app: Starlette, host: str, port: int, *, grace_s: float,
                 ssl: dict[str, Any] | None = None) -> None:
        import uvicorn

        self.config = uvicorn.Config(app, host=host, port=port, lifespan="off", access_log=False,
                                     log_level="warning", timeout_graceful_shutdown=max(grace_s, 0.1),
                                     **(ssl or {}))
        self.server = uvicorn.Server(self.config)
        self.host = host
        self.port = port
        self.scheme = "https" if ssl else "http"
        self._task: asyncio.Task | None = None
        self._sock: socket.socket | None = None

    async def start(self) -> int:
        """Bind (an OSError names a busy port), start serving, return the bound port."""
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self.host, self.port))
        except OSError as e:
            sock.close()
            raise OSError(f"--http-port: cannot bind {self.host}:{self.port}: {e}") from None
        sock.set_inheritable(True)
        self._sock = sock
        self.port = sock.getsockname()[1]
        self.config.load()
        self.server.lifespan = self.config.lifespan_class(self.config)
        await self.server.startup(sockets=[sock])
        self._task = asyncio.create_task(self.server.main_loop())
        return self.port

    async def stop(self) -> None:
        """Stop accepting, let in-flight requests finish for the grace period, then close."""
        if self._task is None:
            return
        self.server.should_exit = True
        await self._task
        await self.server.shutdown(sockets=[self._sock] if self._sock else None)


def ssl_options(cert, key, client_ca) -> dict[str, Any] | None:
    """uvicorn TLS settings from the gRPC ones (the same certificate serves both)."""
    if cert is None:
        return None
    import ssl

    out: dict[str, Any] = {"ssl_certfile": str(cert), "ssl_keyfile": str(key)}
    if client_ca is not None:
        out.update(ssl_ca_certs=str(client_ca), ssl_cert_reqs=ssl.CERT_REQUIRED)
    return out


