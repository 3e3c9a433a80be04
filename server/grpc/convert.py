"""``steering.v1`` messages to the core's types and back: pure functions, no engine.

Only what protobuf itself leaves open is checked here (an enum number outside the enum, an
unset frame or guardrail condition); every other rule is the core's
(``server.core.validate``, ``sae_runtime.spec``), shared with the HTTP door. Field paths in
errors are the proto's.
"""

from __future__ import annotations

from enum import IntEnum
from typing import TypeVar

import numpy as np

from sae_runtime.errors import InvalidRequestError
from sae_runtime.labels import store as feats
from sae_runtime.ops import Cond, Mode
from sae_runtime.spec.activations import ActDtype, ActivationRead, ActPool, pack
from sae_runtime.spec.guardrails import Guardrail
from sae_runtime.spec.interventions import Condition, Intervention, Scope
from sae_runtime.spec.reads import Read, ReadScope
from sae_runtime.spec.selectors import GENERATION, Frame, Range, Selector
from server.core import types as t
from steering.v1 import steering_pb2 as pb

E = TypeVar("E", bound=IntEnum)


def enum_of(enum: type[E], number: int, field: str, what: str) -> E:
    """The member numbered ``number`` (the proto's numbers are the enum's); an unknown
    number names ``field``. ``0`` (UNSPECIFIED) maps to the member numbered 0 where the enum
    has one (the core refuses it as unset)."""
    try:
        return enum(number)
    except ValueError:
        raise InvalidRequestError(field, f"unknown {what} {number}") from None


def optional_enum(enum: type[E], number: int, field: str, what: str) -> E | None:
    """``enum_of``, with 0 (UNSPECIFIED) as None (unset)."""
    return None if number == 0 else enum_of(enum, number, field, what)


# ---------------------------------------------------------------------------- requests


def prompt(p: pb.Prompt | None) -> t.Prompt | None:
    kind = p.WhichOneof("kind") if p is not None else None
    if kind is None:
        return None
    if kind == "text":
        return t.Prompt(text=p.text)
    if kind == "messages":
        return t.Prompt(messages=tuple((m.role, m.content) for m in p.messages.messages))
    return t.Prompt(ids=tuple(p.token_ids.ids))


def selector(sel: pb.PositionSelector, field: str) -> Selector:
    ranges = []
    for j, r in enumerate(sel.ranges):
        if r.frame == pb.POSITION_FRAME_UNSPECIFIED:
            raise InvalidRequestError(f"{field}.ranges[{j}].frame",
                                      "must be set (ABSOLUTE, PROMPT or GENERATION)")
        ranges.append(Range(enum_of(Frame, r.frame, f"{field}.ranges[{j}].frame", "frame"),
                            r.start if r.HasField("start") else None,
                            r.end if r.HasField("end") else None))
    return Selector(tuple(ranges), sel.exclude_ranges, tuple(sel.token_ids), sel.exclude_token_ids)


def _positions(m, field: str) -> Selector | None:
    return selector(m.positions, f"{field}.positions") if m.HasField("positions") else None


def condition(c: pb.FeatureCondition, field: str) -> Condition:
    return Condition(c.sae, int(c.feature), enum_of(Cond, c.op, f"{field}.op", "comparison"),
                     float(c.threshold))


def interventions(items) -> tuple[Intervention, ...]:
    out = []
    for j, iv in enumerate(items):
        field = f"interventions[{j}]"
        out.append(Intervention(
            iv.sae, iv.feature, enum_of(Mode, iv.mode, f"{field}.mode", "mode"), float(iv.value),
            optional_enum(Scope, iv.scope, f"{field}.scope", "scope"), _positions(iv, field),
            condition(iv.when, f"{field}.when") if iv.HasField("when") else None,
            bool(iv.latch)))
    return tuple(out)


def reads(items, field: str = "reads") -> tuple[Read, ...]:
    return tuple(
        Read(r.sae, r.top_k, tuple(r.watch),
             optional_enum(ReadScope, r.scope, f"{field}[{j}].scope", "scope"),
             _positions(r, f"{field}[{j}]"))
        for j, r in enumerate(items))


def activation_reads(items, field: str = "activation_reads") -> tuple[ActivationRead, ...]:
    out = []
    for j, a in enumerate(items):
        f = f"{field}[{j}]"
        pool = optional_enum(ActPool, a.pool, f"{f}.pool", "pool") or ActPool.NONE
        dtype = optional_enum(ActDtype, a.dtype, f"{f}.dtype", "dtype") or ActDtype.FLOAT32
        out.append(ActivationRead(a.hook, _positions(a, f), pool, dtype, a.before_edits))
    return tuple(out)


def guardrails(items) -> tuple[Guardrail, ...]:
    out = []
    for j, g in enumerate(items):
        field = f"abort_when[{j}]"
        if not g.HasField("condition"):
            raise InvalidRequestError(f"{field}.condition", "must be set")
        out.append(Guardrail(condition(g.condition, f"{field}.condition"),
                             _positions(g, field) or GENERATION))
    return tuple(out)


def generate_request(req: pb.GenerateRequest) -> t.GenerateRequest:
    s = req.sampling

    def opt(name: str):
        return getattr(s, name) if s.HasField(name) else None

    return t.GenerateRequest(
        prompt=prompt(req.prompt if req.HasField("prompt") else None),
        max_tokens=opt("max_tokens"), temperature=opt("temperature"), top_p=opt("top_p"),
        top_k=opt("top_k"), seed=opt("seed"), stop=tuple(s.stop),
        stop_token_ids=tuple(s.stop_token_ids), ignore_eos=s.ignore_eos,
        logprobs=opt("logprobs"), prompt_logprobs=opt("prompt_logprobs"),
        interventions=interventions(req.interventions), reads=reads(req.reads),
        abort_when=guardrails(req.abort_when),
        vectors=tuple(t.NamedVector(v.name, v.strength, tuple(v.layers),
                                    _positions(v, f"vectors[{j}]"))
                      for j, v in enumerate(req.vectors)),
        inline_vectors=tuple(t.InlineVector(np.asarray(v.values, dtype=np.float32), v.layer,
                                            v.strength, _positions(v, f"inline_vectors[{j}]"))
                             for j, v in enumerate(req.inline_vectors)),
        request_id=req.request_id,
        activation_reads=activation_reads(req.activation_reads),
    )


def encode_request(req: pb.EncodeRequest) -> t.EncodeRequest:
    """Encode reads take no scope or positions (they read the whole prompt); activation
    reads select among the prompt's positions."""
    return t.EncodeRequest(tuple(prompt(p) for p in req.inputs),
                           tuple(Read(r.sae, r.top_k, tuple(r.watch)) for r in req.reads),
                           activation_reads(req.activation_reads))


# ---------------------------------------------------------------------------- responses


def _logprob(lp: t.Logprob) -> pb.Logprob:
    return pb.Logprob(token_id=lp.token_id, logprob=lp.logprob, rank=lp.rank, token=lp.token)


def _position_logprobs(items: list[t.PositionLogprobs]) -> list[pb.PositionLogprobs]:
    return [pb.PositionLogprobs(chosen=_logprob(e.chosen), top=[_logprob(x) for x in e.top])
            for e in items]


def feature_activations(f: t.FeatureActivations) -> pb.FeatureActivations:
    return pb.FeatureActivations(position=f.position, token_id=f.token_id, sae=f.sae,
                                 indices=f.indices.tolist(), values=f.values.tolist(),
                                 watch_values=f.watch_values.tolist())


def activations(a: t.ActivationRows) -> pb.Activations:
    """Rows packed as little-endian ``dtype`` (``sae_runtime.spec.activations.pack``)."""
    rows, d = (a.values.shape if a.values.ndim == 2 else (0, 0))
    return pb.Activations(hook=a.hook, positions=a.positions, shape=[rows, d], dtype=int(a.dtype),
                          data=pack(a.values, a.dtype), pool=int(a.pool),
                          before_edits=a.before_edits)


def chunk(c: t.Chunk) -> pb.GenerateResponse:
    """A chunk as a GenerateResponse (once per token per stream: kept lean; a repeated field
    given to the constructor costs more than an append)."""
    msg = pb.GenerateResponse(request_id=c.request_id, text=c.text,
                              first_position=c.first_position)
    ids = c.token_ids
    if len(ids) == 1:
        msg.token_ids.append(ids[0])
    elif ids:
        msg.token_ids.extend(ids)
    if c.prompt_token_ids:
        msg.prompt_token_ids.extend(c.prompt_token_ids)
    if c.features:
        msg.features.extend(feature_activations(f) for f in c.features)
    if c.activations:
        msg.activations.extend(activations(a) for a in c.activations)
    if c.logprobs:
        msg.logprobs.extend(_position_logprobs(c.logprobs))
    if c.prompt_logprobs:
        msg.prompt_logprobs.extend(_position_logprobs(c.prompt_logprobs))
    if c.finish_reason is not None:
        msg.finish_reason = int(c.finish_reason)
    if c.guardrail is not None:
        g = c.guardrail
        msg.guardrail.CopyFrom(pb.GuardrailTrip(guardrail=g.guardrail, sae=g.sae,
                                                feature=g.feature, position=g.position,
                                                value=g.value))
    if c.usage is not None:
        u = c.usage
        msg.usage.CopyFrom(pb.Usage(prompt_tokens=u.prompt_tokens,
                                    completion_tokens=u.completion_tokens,
                                    cached_prompt_tokens=u.cached_prompt_tokens))
    return msg


def encode_result(r: t.EncodeResult) -> pb.EncodeResult:
    return pb.EncodeResult(
        token_ids=r.token_ids, features=[feature_activations(f) for f in r.features],
        pooled=[pb.PooledActivations(sae=p.sae, features=[
            pb.PooledFeature(index=f.index, max=f.max, mean=f.mean) for f in p.features])
            for p in r.pooled],
        activations=[activations(a) for a in r.activations])


def sae_info(s: t.SAEInfo) -> pb.SAEInfo:
    return pb.SAEInfo(id=s.id, format=s.format, architecture=s.architecture,
                      hook_name=s.hook_name, site=s.site, layer=s.layer, d_sae=s.d_sae,
                      d_in=s.d_in, dtype=s.dtype, model_name=s.model_name, k=s.k,
                      input_site=s.input_site or 0, hook_name_out=s.hook_name_out,
                      layers=s.layers, features_per_layer=s.features_per_layer)


def model_info(m: t.ModelInfo) -> pb.GetModelInfoResponse:
    fields = {f.name: getattr(m, f.name) for f in pb.GetModelInfoResponse.DESCRIPTOR.fields
              if f.name not in ("vectors",)}
    return pb.GetModelInfoResponse(**fields, vectors=[vector_info(v) for v in m.vectors])


def vector_info(v: t.VectorInfo) -> pb.VectorInfo:
    return pb.VectorInfo(name=v.name, layers=v.layers, runtime=v.runtime,
                         metadata=dict(v.metadata))


def load_vector_request(req: pb.LoadVectorRequest) -> t.LoadVectorRequest:
    return t.LoadVectorRequest(
        name=req.name,
        values=tuple((int(lv.layer), np.asarray(lv.values, dtype=np.float32))
                     for lv in req.layers),
        file=bytes(req.file), file_format=req.file_format,
        metadata=tuple(sorted(req.metadata.items())))


def train_vector_request(req: pb.TrainVectorRequest) -> t.TrainVectorRequest:
    """UNSPECIFIED method and position are MEAN_DIFF and LAST."""
    return t.TrainVectorRequest(
        name=req.name, positive=tuple(prompt(p) for p in req.positive),
        negative=tuple(prompt(p) for p in req.negative), layers=tuple(int(x) for x in req.layers),
        method=req.method or pb.VECTOR_METHOD_MEAN_DIFF,
        position=enum_of(t.TrainPosition, req.position or pb.TRAIN_POSITION_LAST, "position",
                         "position"),
        positions=selector(req.positions, "positions") if req.HasField("positions") else None,
        normalize=req.normalize, register=req.register,
        metadata=tuple(sorted(req.metadata.items())))


def train_vector_response(r: t.TrainVectorResult) -> pb.TrainVectorResponse:
    out = pb.TrainVectorResponse(
        name=r.name,
        layers=[pb.LayerValues(layer=x.layer, values=x.values.tolist()) for x in r.layers],
        stats=[pb.TrainedLayerStats(layer=x.layer, mean_positive=x.mean_positive,
                                    mean_negative=x.mean_negative, accuracy=x.accuracy,
                                    held_out_accuracy=x.held_out_accuracy, held_out=x.held_out)
               for x in r.layers])
    if r.vector is not None:
        out.vector.CopyFrom(vector_info(r.vector))
    return out


def feature(f: feats.Feature) -> pb.Feature:
    return pb.Feature(
        sae=f.sae, index=f.index, label=f.label, density=f.density,
        max_activation=f.max_activation, mean_activation=f.mean_activation, topic=f.topic,
        topic_selectivity=f.topic_selectivity, topic_coverage=f.topic_coverage, score=f.score,
        top_tokens=list(f.top_tokens), dead=f.dead, topic_means=dict(f.topic_means),
        site_norm=f.site_norm, steer_value=f.steer_value, steer_success=f.steer_success,
        examples=[pb.FeatureExample(context=e.context, token=e.token, activation=e.activation)
                  for e in f.examples],
        promoted=[pb.TokenLogit(token=x.token, token_id=x.token_id, logit=x.logit)
                  for x in f.promoted],
        suppressed=[pb.TokenLogit(token=x.token, token_id=x.token_id, logit=x.logit)
                    for x in f.suppressed],
        logit_effects_unavailable=f.logit_effects_unavailable,
    )
