"""OpenAI-style JSON bodies to the core's request types, and the core's field paths back to
body fields (``body_field``: one explicit table).

The body models check only what JSON leaves open (types, enum names from
``server.http.names``, integers that protobuf would hold as uint32); every other rule is the
core's, shared with the gRPC door. Unknown top-level fields are ignored, as
OpenAI-compatible servers do; known ones this server cannot honour are refused.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from sae_runtime.errors import InvalidRequestError
from sae_runtime.spec.activations import ActivationRead
from sae_runtime.spec.guardrails import Guardrail
from sae_runtime.spec.interventions import Condition, Intervention
from sae_runtime.spec.reads import Read
from sae_runtime.spec.selectors import GENERATION, Range, Selector
from server.core import types as t
from server.http.names import (
    ACT_DTYPES,
    ACT_POOLS,
    FRAMES,
    MODES,
    OPS,
    READ_SCOPES,
    SCOPES,
    TRAIN_POSITIONS,
    VECTOR_METHODS,
    literal,
)

U32 = 2**32
I64 = {"ge": -(2**63), "lt": 2**63}
TokenId = Field(ge=0, lt=U32)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PositionRangeBody(_Strict):
    """The proto's PositionRange: ``{"frame": "prompt", "start": -1}``."""

    frame: literal(FRAMES)
    start: int | None = Field(default=None, **I64)
    end: int | None = Field(default=None, **I64)


class PositionsBody(_Strict):
    """The proto's PositionSelector."""

    ranges: list[PositionRangeBody] = Field(default_factory=list)
    exclude_ranges: bool = False
    token_ids: list[int] = Field(default_factory=list)
    exclude_token_ids: bool = False


class ConditionBody(_Strict):
    """The proto's FeatureCondition: ``{"sae": "s", "feature": 3, "op": ">", "threshold": 2}``."""

    sae: str
    feature: int = Field(ge=0, lt=U32)
    op: literal(OPS)
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
    mode: literal(MODES)
    value: float = 0.0
    scope: literal(SCOPES) | None = None  # None: "all", unless positions
    positions: PositionsBody | None = None
    when: ConditionBody | None = None
    latch: bool = False


class ReadBody(_Strict):
    """One of ``reads``: the proto's FeatureRead with lower-case names."""

    sae: str
    top_k: int = Field(default=0, ge=0, lt=U32)
    watch: list[int] = Field(default_factory=list)
    scope: literal(READ_SCOPES) | None = None  # None: "all", unless positions
    positions: PositionsBody | None = None


class ActivationReadBody(_Strict):
    """One of ``activation_reads``: the proto's ActivationRead with lower-case names."""

    hook: str
    positions: PositionsBody | None = None
    pool: literal(ACT_POOLS) | None = None  # None: "none" (one row per position)
    dtype: literal(ACT_DTYPES) | None = None  # None: "float32"
    before_edits: bool = False  # before this request's edits at the site


class MessageBody(BaseModel):
    model_config = ConfigDict(extra="allow")  # name, tool_call_id, ... are ignored
    role: str
    content: str | list[dict[str, Any]] | None = None


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")
    include_usage: bool = False


class CommonBody(BaseModel):
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
    seed: int | None = Field(default=None, **I64)
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
    activation_reads: list[ActivationReadBody] = Field(default_factory=list)


class TrainVectorBody(_Strict):
    """``POST /v1/vectors/train``: the proto's TrainVectorRequest; a prompt is text or a list
    of token ids."""

    name: str = ""
    positive: list[str | list[int]]
    negative: list[str | list[int]]
    layers: list[int]
    method: literal(VECTOR_METHODS) = "mean_diff"
    position: literal(TRAIN_POSITIONS) = "last"
    positions: PositionsBody | None = None
    normalize: bool = False
    register_: bool = Field(default=False, alias="register")  # BaseModel has a ``register``
    metadata: dict[str, str] = Field(default_factory=dict)


class CompletionBody(CommonBody):
    prompt: str | list[int] | list[str] | list[list[int]]
    logprobs: int | None = Field(default=None, ge=0, lt=U32)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None


class ChatBody(CommonBody):
    messages: list[MessageBody]
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, lt=U32)
    max_completion_tokens: int | None = Field(default=None, ge=0, lt=U32)
    tools: list[Any] | None = None
    response_format: dict[str, Any] | None = None


# ---------------------------------------------------------------------------- body -> core


def _unsupported(body: CommonBody) -> None:
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


def _completion_prompt(prompt) -> t.Prompt:
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        if len(prompt) != 1:
            raise InvalidRequestError("prompt", f"one prompt per request (n=1); got {len(prompt)}")
        prompt = prompt[0]
    if isinstance(prompt, str):
        return t.Prompt(text=prompt)
    for j, tok in enumerate(prompt):
        if not 0 <= tok < U32:
            raise InvalidRequestError(f"prompt[{j}]", "token ids must be non-negative")
    return t.Prompt(ids=tuple(prompt))


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


def _ids(ids: list[int], field: str, what: str = "token ids must be non-negative") -> tuple[int, ...]:
    for k, v in enumerate(ids):
        if not 0 <= v < U32:
            raise InvalidRequestError(f"{field}[{k}]", what)
    return tuple(ids)


def selector(body: PositionsBody, field: str) -> Selector:
    return Selector(tuple(Range(FRAMES[r.frame], r.start, r.end) for r in body.ranges),
                    body.exclude_ranges, _ids(body.token_ids, f"{field}.token_ids",
                                              "must be a token id >= 0"),
                    body.exclude_token_ids)


def _positions(body, field: str) -> Selector | None:
    return selector(body.positions, f"{field}.positions") if body.positions is not None else None


def train_vector_request(body: TrainVectorBody) -> t.TrainVectorRequest:
    """The body as the core's ``TrainVectorRequest`` (its field paths are the body's)."""

    def prompts(items: list, field: str) -> tuple[t.Prompt, ...]:
        return tuple(t.Prompt(text=p) if isinstance(p, str) else
                     t.Prompt(ids=_ids(p, f"{field}[{j}]")) for j, p in enumerate(items))

    return t.TrainVectorRequest(
        name=body.name, positive=prompts(body.positive, "positive"),
        negative=prompts(body.negative, "negative"),
        layers=_ids(body.layers, "layers", "must be a layer >= 0"),
        method=int(VECTOR_METHODS[body.method]), position=TRAIN_POSITIONS[body.position],
        positions=selector(body.positions, "positions") if body.positions is not None else None,
        normalize=body.normalize, register=body.register_,
        metadata=tuple(sorted(body.metadata.items())))


def _condition(c: ConditionBody) -> Condition:
    return Condition(c.sae, c.feature, OPS[c.op], c.threshold)


def generate_request(body: CommonBody) -> t.GenerateRequest:
    """The body as the core's request (checked later, by the core, as gRPC's are)."""
    _unsupported(body)
    chat = isinstance(body, ChatBody)
    if chat:
        if not body.messages:
            raise InvalidRequestError("messages", "give at least one message")
        prompt = t.Prompt(messages=tuple((m.role, _content(j, m))
                                         for j, m in enumerate(body.messages)))
        max_tokens = (body.max_completion_tokens if body.max_completion_tokens is not None
                      else body.max_tokens)
        if body.top_logprobs is not None and not body.logprobs:
            raise InvalidRequestError("top_logprobs", "needs logprobs: true")
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
    else:
        prompt = _completion_prompt(body.prompt)
        max_tokens, logprobs = body.max_tokens, body.logprobs
    for j, v in enumerate(body.vectors):
        _ids(v.layers, f"vectors[{j}].layers", "must be a layer >= 0")
    for j, r in enumerate(body.reads):
        _ids(r.watch, f"reads[{j}].watch", "must be a feature index >= 0")
    return t.GenerateRequest(
        prompt=prompt, max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p,
        top_k=body.top_k, seed=body.seed,
        stop=(body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ()),
        stop_token_ids=_ids(body.stop_token_ids, "stop_token_ids"),
        ignore_eos=body.ignore_eos, logprobs=logprobs, prompt_logprobs=body.prompt_logprobs,
        interventions=tuple(
            Intervention(iv.sae, iv.feature, MODES[iv.mode], iv.value,
                         SCOPES[iv.scope] if iv.scope is not None else None,
                         _positions(iv, f"interventions[{j}]"),
                         _condition(iv.when) if iv.when is not None else None, iv.latch)
            for j, iv in enumerate(body.interventions)),
        reads=tuple(Read(r.sae, r.top_k, tuple(r.watch),
                         READ_SCOPES[r.scope] if r.scope is not None else None,
                         _positions(r, f"reads[{j}]"))
                    for j, r in enumerate(body.reads)),
        abort_when=tuple(Guardrail(_condition(g), _positions(g, f"abort_when[{j}]") or GENERATION)
                         for j, g in enumerate(body.abort_when)),
        vectors=tuple(t.NamedVector(v.name, v.strength, tuple(v.layers),
                                    _positions(v, f"vectors[{j}]"))
                      for j, v in enumerate(body.vectors)),
        inline_vectors=tuple(t.InlineVector(np.asarray(v.values, dtype=np.float32), v.layer,
                                            v.strength, _positions(v, f"inline_vectors[{j}]"))
                             for j, v in enumerate(body.inline_vectors)),
        request_id=body.request_id,
        activation_reads=tuple(
            ActivationRead(a.hook, _positions(a, f"activation_reads[{j}]"),
                           ACT_POOLS[a.pool or "none"], ACT_DTYPES[a.dtype or "float32"],
                           a.before_edits)
            for j, a in enumerate(body.activation_reads)),
        fit_max_tokens=chat,
    )


# ---------------------------------------------------------------------------- core field -> body


def field_table(body: CommonBody | None) -> dict[tuple[str, ...], tuple[str, ...]]:
    """Core field paths (the proto's, with ``[]`` for any index) -> this body's fields: the
    one table. A path's longest listed head is replaced; the rest, and the indices, stay."""
    chat = isinstance(body, ChatBody)
    table: dict[tuple[str, ...], tuple[str, ...]] = {
        ("sampling",): (),  # sampling.temperature -> temperature, ...
        ("sampling", "logprobs"): ("top_logprobs",) if chat else ("logprobs",),
        ("abort_when", "[]", "condition"): ("abort_when", "[]"),  # a flat body
        ("prompt",): ("messages",) if chat else ("prompt",),
        ("prompt", "text"): ("prompt",),
        ("prompt", "token_ids", "ids"): ("prompt",),
        ("prompt", "messages"): ("messages",),
        ("prompt", "messages", "messages"): ("messages",),
    }
    if chat and body.max_completion_tokens is not None:
        table[("sampling", "max_tokens")] = ("max_completion_tokens",)
    if body is not None and isinstance(body.stop, str):
        table[("sampling", "stop", "[]")] = ("stop",)
    return table


_SEGMENT = re.compile(r"\[\d+\]|[^.\[\]]+")


def body_field(path: str, table: dict[tuple[str, ...], tuple[str, ...]]) -> str:
    """``path`` with its longest head listed in ``table`` replaced (``field_table``)."""
    segs = _SEGMENT.findall(path)
    norm = tuple("[]" if s.startswith("[") else s for s in segs)
    for n in range(len(segs), 0, -1):
        new = table.get(norm[:n])
        if new is None:
            continue
        idx = iter([s for s in segs[:n] if s.startswith("[")])
        return _join([next(idx) if s == "[]" else s for s in new] + segs[n:])
    return path


def _join(segs: list[str]) -> str:
    return "".join(s if s.startswith("[") else f".{s}" for s in segs).lstrip(".")
