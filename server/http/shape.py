"""The core's answers as JSON: OpenAI completion chunks and responses, and the proto's
messages for the feature routes (the proto's field names, every field present, as gRPC
JSON would print them)."""

from __future__ import annotations

import base64
import dataclasses
import math
import time
import uuid
from typing import Any

import numpy as np

from sae_runtime.labels import store as feats
from sae_runtime.spec.activations import ActPool, pack
from server.core import types as t
from server.http.bodies import ChatBody, CommonBody, CompletionBody
from server.http.names import FINISH, SITES


def feature_activations(f: t.FeatureActivations) -> dict:
    return {"position": f.position, "token_id": f.token_id, "sae": f.sae,
            "indices": f.indices.tolist(), "values": f.values.tolist(),
            "watch_values": f.watch_values.tolist()}


def activations(a: t.ActivationRows) -> dict:
    """The proto's Activations as JSON: ``data`` is the packed little-endian values in
    base64 (``sae_runtime.spec.activations.pack``), ``dtype`` and ``pool`` by name."""
    rows, d = a.values.shape if a.values.ndim == 2 else (0, 0)
    return {"hook": a.hook, "positions": list(a.positions), "shape": [rows, d],
            "dtype": a.dtype.name.lower(), "pool": a.pool.name.lower(),
            "before_edits": a.before_edits,
            "data": base64.b64encode(pack(a.values, a.dtype)).decode()}


def merged_activations(items: list[t.ActivationRows]) -> list[t.ActivationRows]:
    """Per-position rows of one read (hook and before_edits) over several chunks as one
    entry (pooled ones as they are), in first-seen order."""
    out: dict[tuple[str, bool, bool], t.ActivationRows] = {}
    for a in items:
        key = (a.hook, a.before_edits, a.pool is ActPool.NONE)
        prev = out.get(key)
        if prev is None or not key[2]:
            out[key] = a
        else:
            out[key] = t.ActivationRows(a.hook, [*prev.positions, *a.positions],
                                        np.concatenate([prev.values, a.values]), a.pool, a.dtype,
                                        a.before_edits)
    return list(out.values())


def _trip(g: t.GuardrailTrip) -> dict:
    return {"guardrail": g.guardrail, "sae": g.sae, "feature": g.feature,
            "position": g.position, "value": g.value}


def _completion_logprobs(entries: list[t.PositionLogprobs], offset: int) -> tuple[dict, int]:
    """Legacy completions logprobs: tokens, token_logprobs, top_logprobs, text_offset."""
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for e in entries:
        out["tokens"].append(e.chosen.token)
        out["token_logprobs"].append(e.chosen.logprob)
        top = {e.chosen.token: e.chosen.logprob}
        top.update({x.token: x.logprob for x in e.top})
        out["top_logprobs"].append(top)
        out["text_offset"].append(offset)
        offset += len(e.chosen.token)
    return out, offset


def _chat_logprobs(entries: list[t.PositionLogprobs]) -> list[dict]:
    def one(lp: t.Logprob) -> dict:
        return {"token": lp.token, "logprob": lp.logprob, "bytes": list(lp.token.encode())}

    return [{**one(e.chosen), "top_logprobs": [one(x) for x in e.top]} for e in entries]


def usage(u: t.Usage) -> dict:
    return {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
            "total_tokens": u.prompt_tokens + u.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": u.cached_prompt_tokens}}


class Shaper:
    """Turns the core's chunks into OpenAI chunks or one response."""

    def __init__(self, body: CommonBody, model: str) -> None:
        self.body, self.model, self.chat = body, model, isinstance(body, ChatBody)
        self.id = ("chatcmpl-" if self.chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self.object = "chat.completion" if self.chat else "text_completion"
        self.offset = 0
        self.logprobs = isinstance(body, ChatBody) and body.logprobs or \
            isinstance(body, CompletionBody) and body.logprobs is not None

    def _choice(self, msg: t.Chunk, first: bool) -> dict:
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
        c["finish_reason"] = FINISH.get(msg.finish_reason)
        if msg.guardrail is not None:
            c["guardrail"] = _trip(msg.guardrail)
        if self.body.return_token_ids:
            c["token_ids"] = list(msg.token_ids)
            if first and not self.chat:
                c["prompt_token_ids"] = list(msg.prompt_token_ids)
        if self.body.reads:
            c["features"] = [feature_activations(f) for f in msg.features]
        if self.body.activation_reads:
            c["activations"] = [activations(a) for a in msg.activations]
        if self.body.prompt_logprobs is not None and msg.prompt_logprobs:
            c["prompt_logprobs"] = _chat_logprobs(msg.prompt_logprobs)
        return c

    def chunk(self, msg: t.Chunk, first: bool) -> dict | None:
        if not (first or msg.token_ids or msg.text or msg.features or msg.activations
                or msg.finish_reason):
            return None
        out = {"id": self.id, "object": self.object + (".chunk" if self.chat else ""),
               "created": self.created, "model": self.model, "choices": [self._choice(msg, first)]}
        if self.chat and first and self.body.return_token_ids:
            out["prompt_token_ids"] = list(msg.prompt_token_ids)
        return out

    def usage_chunk(self, u: t.Usage) -> dict:
        return {"id": self.id, "object": self.object + (".chunk" if self.chat else ""),
                "created": self.created, "model": self.model, "choices": [], "usage": usage(u)}

    def whole(self, msgs: list[t.Chunk]) -> dict:
        """The non-streaming response: every chunk folded into one choice."""
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
        choice["finish_reason"] = FINISH.get(last.finish_reason)
        if last.guardrail is not None:
            choice["guardrail"] = _trip(last.guardrail)
        if self.body.return_token_ids:
            choice["token_ids"] = [x for m in msgs for x in m.token_ids]
            if not self.chat:
                choice["prompt_token_ids"] = list(msgs[0].prompt_token_ids)
        if self.body.reads:
            choice["features"] = [feature_activations(f) for m in msgs for f in m.features]
        if self.body.activation_reads:
            choice["activations"] = [activations(a) for a in
                                     merged_activations([a for m in msgs for a in m.activations])]
        if self.body.prompt_logprobs is not None:
            choice["prompt_logprobs"] = _chat_logprobs([e for m in msgs for e in m.prompt_logprobs])
        out = {"id": self.id, "object": self.object, "created": self.created, "model": self.model,
               "choices": [choice], "usage": usage(last.usage or t.Usage(0, 0))}
        if self.chat and self.body.return_token_ids:
            out["prompt_token_ids"] = list(msgs[0].prompt_token_ids)
        return out


# ---------------------------------------------------------------------------- feature routes


_SITE_NAME = {v: k for k, v in SITES.items()}


def sae_info(s: t.SAEInfo) -> dict:
    """``ListSAEs``'s SAEInfo as JSON (sites by name, ``""`` for none), plus ``labelled``."""
    return {**dataclasses.asdict(s), "site": _SITE_NAME[s.site],
            "input_site": _SITE_NAME.get(s.input_site, "")}


def feature(f: feats.Feature) -> dict:
    """The proto's Feature as JSON (its fields, every one present)."""
    return {
        "sae": f.sae, "index": f.index, "label": f.label, "density": f.density,
        "max_activation": f.max_activation, "mean_activation": f.mean_activation,
        "topic": f.topic, "topic_selectivity": f.topic_selectivity,
        "topic_coverage": f.topic_coverage, "score": f.score, "top_tokens": list(f.top_tokens),
        "examples": [{"context": e.context, "token": e.token, "activation": e.activation}
                     for e in f.examples],
        "dead": f.dead, "topic_means": dict(f.topic_means), "site_norm": f.site_norm,
        "steer_value": f.steer_value, "steer_success": f.steer_success,
        "promoted": [dataclasses.asdict(x) for x in f.promoted],
        "suppressed": [dataclasses.asdict(x) for x in f.suppressed],
        "logit_effects_unavailable": f.logit_effects_unavailable,
    }


def model_info(m: t.ModelInfo) -> dict:
    """``GetModelInfo`` as JSON."""
    return dataclasses.asdict(m)


def vector_info(v) -> dict:
    """A ``VectorInfo`` as JSON (``GET /v1/vectors``, the admin vector routes)."""
    return {"name": v.name, "layers": list(v.layers), "runtime": v.runtime,
            "metadata": dict(v.metadata)}


def _finite(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


def trained_vector(r) -> dict:
    """A ``TrainVectorResult`` as JSON (``POST /v1/vectors/train``; ``steer vectors train
    --json`` prints the same): ``{"name", "vectors": {"<layer>": [floats]}, "stats":
    {"<layer>": {...}}, "vector": VectorInfo or null}``; a NaN statistic is null."""
    return {
        "name": r.name,
        "vectors": {str(x.layer): x.values.tolist() for x in r.layers},
        "stats": {str(x.layer): {"mean_positive": x.mean_positive,
                                 "mean_negative": x.mean_negative, "accuracy": x.accuracy,
                                 "held_out_accuracy": _finite(x.held_out_accuracy),
                                 "held_out": x.held_out} for x in r.layers},
        "vector": vector_info(r.vector) if r.vector is not None else None,
    }
