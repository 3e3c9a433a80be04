"""Pure conversions between protobuf messages and runtime types, with validation.

No network, no engine: every function here is testable on its own.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from sae_runtime.errors import (
    InvalidRequestError,
    NoChatTemplateError,
    NotLabelledError,
    UnknownSAEError,
)
from sae_runtime.labels import store as feats
from sae_runtime.ops import Mode
from sae_runtime.saes.base import SAEConfig
from sae_runtime.spec.guardrails import MAX_GUARDRAILS, Guardrail, GuardSpec
from sae_runtime.spec.interventions import Condition, Intervention, Scope, SteeringSpec
from sae_runtime.spec.reads import Read, ReadScope, ReadSpec
from sae_runtime.spec.selectors import GENERATION, Frame, Range, Selector
from sae_runtime.spec.vectors import VectorIndex, is_bank
from sae_runtime.step.edits import Cond
from steering.v1 import steering_pb2 as pb

DEFAULT_MAX_TOKENS = 16
DEFAULT_SEARCH_LIMIT = 10
MAX_SEARCH_LIMIT = 100
MAX_QUERY_LEN = 200
MAX_REQUEST_ID_LEN = 128
DEFAULT_MAX_LOGPROBS = 20  # vLLM's own default cap

_FINISH = {
    "length": pb.FINISH_REASON_LENGTH,
    "stop": pb.FINISH_REASON_STOP,
    "abort": pb.FINISH_REASON_ABORT,
}
_SITE = {"resid_post": pb.HOOK_SITE_RESID_POST, "resid_pre": pb.HOOK_SITE_RESID_PRE,
         "attn_out": pb.HOOK_SITE_ATTN_OUT, "mlp_out": pb.HOOK_SITE_MLP_OUT, "z": pb.HOOK_SITE_Z,
         "mlp_in": pb.HOOK_SITE_MLP_IN, "ln2_normalized": pb.HOOK_SITE_MLP_IN}


@dataclass(frozen=True)
class GenerateInputs:
    """A validated GenerateRequest."""

    prompt_text: str | None  # exactly one of prompt_text / prompt_ids / prompt_messages is set
    prompt_ids: tuple[int, ...] | None
    max_tokens: int
    temperature: float
    top_p: float
    top_k: int
    seed: int | None
    stop: tuple[str, ...]
    stop_token_ids: tuple[int, ...]
    ignore_eos: bool
    spec: SteeringSpec
    request_id: str
    reads: ReadSpec = ReadSpec()
    prompt_messages: tuple[tuple[str, str], ...] | None = None  # (role, content) pairs
    logprobs: int | None = None  # top-n alternatives per generated token; None = no logprobs
    prompt_logprobs: int | None = None  # top-n per prompt position; None = none
    guards: GuardSpec = GuardSpec()


@dataclass(frozen=True)
class PromptInput:
    """A validated Prompt: exactly one of the three kinds is set."""

    text: str | None = None
    ids: tuple[int, ...] | None = None
    messages: tuple[tuple[str, str], ...] | None = None  # (role, content), oldest first


@dataclass(frozen=True)
class Limits:
    """Server caps a request is validated against."""

    max_interventions: int
    vocab_size: int
    max_read_top_k: int = 64
    max_watch: int = 256
    max_encode_inputs: int = 32
    max_prompt_tokens: int | None = None  # None: the model length - 1
    max_new_tokens: int | None = None  # None: whatever the model length allows
    max_logprobs: int = DEFAULT_MAX_LOGPROBS
    max_guardrails: int = MAX_GUARDRAILS


def _finite(field: str, v: float) -> float:
    if not math.isfinite(v):
        raise InvalidRequestError(field, f"must be finite, got {v}")
    return v


def generate_inputs_from_pb(
    req: pb.GenerateRequest, *, saes: Mapping[str, SAEConfig], limits: Limits,
    vectors: VectorIndex | None = None,
) -> GenerateInputs:
    """Validate a GenerateRequest; errors name the offending field."""
    vocab_size = limits.vocab_size
    if len(req.request_id) > MAX_REQUEST_ID_LEN:
        raise InvalidRequestError(
            "request_id", f"at most {MAX_REQUEST_ID_LEN} characters, got {len(req.request_id)}"
        )
    prompt = prompt_from_pb(req.prompt if req.HasField("prompt") else None, "prompt", vocab_size)

    s = req.sampling
    max_tokens = s.max_tokens if s.HasField("max_tokens") else DEFAULT_MAX_TOKENS
    if max_tokens <= 0:
        raise InvalidRequestError("sampling.max_tokens", f"must be >= 1, got {max_tokens}")
    temperature = _finite("sampling.temperature", s.temperature) if s.HasField("temperature") else 1.0
    if temperature < 0:
        raise InvalidRequestError("sampling.temperature", f"must be >= 0, got {temperature}")
    top_p = _finite("sampling.top_p", s.top_p) if s.HasField("top_p") else 1.0
    if not 0 < top_p <= 1:
        raise InvalidRequestError("sampling.top_p", f"must be in (0, 1], got {top_p}")
    top_k = s.top_k if s.HasField("top_k") else 0
    if top_k > vocab_size:
        raise InvalidRequestError("sampling.top_k", f"must be <= vocab_size={vocab_size}")
    for j, st in enumerate(s.stop):
        if not st:
            raise InvalidRequestError(f"sampling.stop[{j}]", "stop strings must not be empty")
    for j, t in enumerate(s.stop_token_ids):
        if t >= vocab_size:
            raise InvalidRequestError(
                f"sampling.stop_token_ids[{j}]", f"token id {t} is out of range (vocab_size={vocab_size})"
            )

    logprobs = prompt_logprobs = None
    for name in ("logprobs", "prompt_logprobs"):
        if s.HasField(name):
            n = getattr(s, name)
            if n > limits.max_logprobs:
                raise InvalidRequestError(
                    f"sampling.{name}", f"{n} is more than the server's cap of "
                    f"{limits.max_logprobs} (steerd serve --max-logprobs)")
            logprobs, prompt_logprobs = (n, prompt_logprobs) if name == "logprobs" else (logprobs, n)

    spec = spec_from_pb(req.interventions)
    spec.validate(saes, limits.max_interventions, vocab_size)
    reads = reads_from_pb(req.reads, saes=saes, limits=limits)
    guards = guards_from_pb(req.abort_when)
    guards.validate(saes, max_guardrails=limits.max_guardrails, vocab_size=vocab_size)
    named = [(f"interventions[{j}].sae", iv.sae) for j, iv in enumerate(spec.interventions)]
    named += [(f"reads[{j}].sae", r.sae) for j, r in enumerate(reads.reads)]
    named += [(f"abort_when[{j}].condition.sae", g.condition.sae)
              for j, g in enumerate(guards.guards)]
    for field, sid in named:
        if is_bank(sid):
            raise InvalidRequestError(field, f"{sid!r} holds steering vectors: steer them "
                                      "with `vectors` (by name)")
    if req.vectors:
        spec = SteeringSpec(spec.interventions + vectors_from_pb(
            req.vectors, vectors or VectorIndex({}), saes, limits, vocab_size))
    if req.inline_vectors:
        spec = SteeringSpec(spec.interventions + inline_vectors_from_pb(
            req.inline_vectors, vectors or VectorIndex({}), saes, limits, vocab_size))
    return GenerateInputs(
        prompt_text=prompt.text, prompt_ids=prompt.ids, prompt_messages=prompt.messages,
        max_tokens=max_tokens, temperature=temperature,
        top_p=top_p, top_k=top_k, seed=s.seed if s.HasField("seed") else None,
        stop=tuple(s.stop), stop_token_ids=tuple(s.stop_token_ids), ignore_eos=s.ignore_eos,
        spec=spec, request_id=req.request_id, reads=reads, logprobs=logprobs,
        prompt_logprobs=prompt_logprobs, guards=guards,
    )


def prompt_from_pb(prompt: pb.Prompt | None, field: str, vocab_size: int) -> PromptInput:
    """The text, token ids or chat messages of a Prompt; errors name ``field``."""
    kind = prompt.WhichOneof("kind") if prompt is not None else None
    if kind is None:
        raise InvalidRequestError(
            field, f"required: set {field}.text, {field}.token_ids or {field}.messages")
    if kind == "text":
        if not prompt.text:
            raise InvalidRequestError(f"{field}.text", "must not be empty")
        return PromptInput(text=prompt.text)
    if kind == "messages":
        msgs = prompt.messages.messages
        if not msgs:
            raise InvalidRequestError(f"{field}.messages.messages", "give at least one message")
        for j, m in enumerate(msgs):
            if not m.role:
                raise InvalidRequestError(f"{field}.messages.messages[{j}].role", "must not be empty")
        return PromptInput(messages=tuple((m.role, m.content) for m in msgs))
    ids = tuple(prompt.token_ids.ids)
    if not ids:
        raise InvalidRequestError(f"{field}.token_ids.ids", "must hold at least one token id")
    for j, t in enumerate(ids):
        if t >= vocab_size:
            raise InvalidRequestError(
                f"{field}.token_ids.ids[{j}]", f"token id {t} is out of range (vocab_size={vocab_size})"
            )
    return PromptInput(ids=ids)


def render_chat(tokenizer, messages: tuple[tuple[str, str], ...], template: str | None,
                model: str, field: str = "prompt") -> list[int]:
    """Token ids of ``messages`` under the chat template, generation prompt added.

    ``template`` (the server's --chat-template) overrides the tokenizer's own. Without
    either, NoChatTemplateError (FAILED_PRECONDITION) names the model. The template decides
    the special tokens (BOS included), as in Hugging Face's ``apply_chat_template``.
    """
    if template is None and not getattr(tokenizer, "chat_template", None):
        raise NoChatTemplateError(
            f"{field}.messages", f"model {model} has no chat template; send text or token "
            "ids, or start steerd with --chat-template FILE")
    from jinja2 import TemplateError

    try:
        out = tokenizer.apply_chat_template(
            [{"role": r, "content": c} for r, c in messages], chat_template=template,
            add_generation_prompt=True, tokenize=True)
    except TemplateError as e:  # the template's raise_exception, or a render error
        raise InvalidRequestError(f"{field}.messages",
                                  f"the chat template rejected the messages: {e}") from None
    ids = out["input_ids"] if isinstance(out, Mapping) else out  # transformers 5: BatchEncoding
    return [int(t) for t in ids]


def logprobs_to_pb(entries, n: int) -> list[pb.PositionLogprobs]:
    """vLLM's per-position logprob dicts as protobuf.

    Each dict maps token id -> Logprob(logprob, rank, decoded_token); vLLM inserts the
    chosen token first, then the top ``n`` (the chosen one is not repeated when it is
    among them, so a dict has ``n`` or ``n + 1`` entries).
    """
    out = []
    for d in entries:
        items = list(d.items())
        (cid, c), rest = items[0], items[1:]
        top = rest if len(items) == n + 1 else sorted(items, key=lambda kv: kv[1].rank)
        out.append(pb.PositionLogprobs(
            chosen=_logprob_pb(cid, c), top=[_logprob_pb(t, lp) for t, lp in top[:n]]))
    return out


def _logprob_pb(token_id: int, lp) -> pb.Logprob:
    # -inf (a masked token) is not representable by every client; clamp as OpenAI does
    return pb.Logprob(token_id=token_id, logprob=max(lp.logprob, -9999.0), rank=lp.rank or 0,
                      token=lp.decoded_token or "")


def selector_from_pb(sel: pb.PositionSelector, field: str) -> Selector:
    """A PositionSelector as ``selectors.Selector``; frames are checked here, every other
    rule in ``Selector.validate`` (called by the spec's validation)."""
    ranges = []
    for j, r in enumerate(sel.ranges):
        if r.frame == pb.POSITION_FRAME_UNSPECIFIED:
            raise InvalidRequestError(f"{field}.ranges[{j}].frame",
                                      "must be set (ABSOLUTE, PROMPT or GENERATION)")
        if r.frame not in (f.value for f in Frame):
            raise InvalidRequestError(f"{field}.ranges[{j}].frame", f"unknown frame {r.frame}")
        ranges.append(Range(Frame(r.frame), r.start if r.HasField("start") else None,
                            r.end if r.HasField("end") else None))
    return Selector(tuple(ranges), sel.exclude_ranges, tuple(sel.token_ids), sel.exclude_token_ids)


def reads_from_pb(items, *, saes: Mapping[str, SAEConfig], limits: Limits, field: str = "reads",
                  pooled: bool = False, force_scope: ReadScope | None = None) -> ReadSpec:
    """Reads from protobuf, validated. ``force_scope`` (Encode) overrides scope and positions."""
    out = []
    for j, r in enumerate(items):
        scope = ReadScope.ALL if r.scope == pb.READ_SCOPE_UNSPECIFIED else r.scope
        if scope not in (s.value for s in ReadScope):
            raise InvalidRequestError(f"{field}[{j}].scope", f"unknown scope {r.scope}")
        positions = None
        if r.HasField("positions") and force_scope is None:
            if r.scope != pb.READ_SCOPE_UNSPECIFIED:
                raise InvalidRequestError(f"{field}[{j}].positions",
                                          "set scope or positions, not both")
            positions = selector_from_pb(r.positions, f"{field}[{j}].positions")
        out.append(Read(r.sae, r.top_k, tuple(r.watch), force_scope or ReadScope(scope), positions))
    spec = ReadSpec(tuple(out), pooled=pooled)
    spec.validate(saes, max_top_k=limits.max_read_top_k, max_watch=limits.max_watch, prefix=field,
                  vocab_size=limits.vocab_size)
    return spec


def feature_activations_pb(position: int, token_id: int, sae: str, read) -> pb.FeatureActivations:
    """One position's read (server.reads.PositionRead) as protobuf."""
    return pb.FeatureActivations(
        position=position, token_id=token_id, sae=sae, indices=read.indices.tolist(),
        values=read.values.tolist(), watch_values=read.watch.tolist(),
    )


def spec_from_pb(items) -> SteeringSpec:
    """Interventions from protobuf; range checks happen in SteeringSpec.validate."""
    out = []
    for j, iv in enumerate(items):
        if iv.mode == pb.INTERVENTION_MODE_UNSPECIFIED:
            raise InvalidRequestError(
                f"interventions[{j}].mode", "must be set (CLAMP, ABLATE, SCALE or ADD)"
            )
        if iv.mode not in (m.value for m in Mode):
            raise InvalidRequestError(f"interventions[{j}].mode", f"unknown mode {iv.mode}")
        scope = Scope.ALL if iv.scope == pb.SCOPE_UNSPECIFIED else iv.scope
        if scope not in (s.value for s in Scope):
            raise InvalidRequestError(f"interventions[{j}].scope", f"unknown scope {iv.scope}")
        positions = None
        if iv.HasField("positions"):
            if iv.scope != pb.SCOPE_UNSPECIFIED:
                raise InvalidRequestError(f"interventions[{j}].positions",
                                          "set scope or positions, not both")
            positions = selector_from_pb(iv.positions, f"interventions[{j}].positions")
        when = condition_from_pb(iv.when, f"interventions[{j}].when") if iv.HasField("when") else None
        out.append(Intervention(iv.sae, iv.feature, Mode(iv.mode), float(iv.value), Scope(scope),
                                positions, when, bool(iv.latch)))
    return SteeringSpec(tuple(out))


MAX_VECTORS = 8
"""Most steering vectors one request may name."""


def vectors_from_pb(items, index: VectorIndex, saes: Mapping[str, SAEConfig], limits: Limits,
                    vocab_size: int) -> tuple[Intervention, ...]:
    """GenerateRequest.vectors as ADD edits on the vector banks (``sae_runtime.loading.vectors``)."""
    if len(items) > MAX_VECTORS:
        raise InvalidRequestError("vectors", f"{len(items)} vectors given; the server allows "
                                  f"at most {MAX_VECTORS} per request")
    out: list[Intervention] = []
    seen: dict[str, int] = {}
    rows: dict[str, int] = {}
    for j, v in enumerate(items):
        field = f"vectors[{j}]"
        if v.name not in index.rows:
            known = ", ".join(sorted(index.rows)) or "none (steerd serve --vector NAME=PATH)"
            raise InvalidRequestError(f"{field}.name", f"unknown steering vector {v.name!r}; "
                                      f"loaded: {known}")
        if v.name in seen:
            raise InvalidRequestError(f"{field}.name", f"vector {v.name!r} is already given by "
                                      f"vectors[{seen[v.name]}]")
        seen[v.name] = j
        strength = _finite(f"{field}.strength", v.strength)
        layers = index.rows[v.name]
        want = list(v.layers) or sorted(layers)
        for k, layer in enumerate(want):
            if layer not in layers:
                raise InvalidRequestError(f"{field}.layers[{k}]", f"vector {v.name!r} has no "
                                          f"layer {layer}; it has {sorted(layers)}")
        pos = selector_from_pb(v.positions, f"{field}.positions") if v.HasField("positions") else None
        if pos is not None:
            pos.validate(f"{field}.positions", vocab_size)
        for layer in dict.fromkeys(want):
            bank, row = layers[layer]
            rows[bank] = rows.get(bank, 0) + (pos.max_windows if pos is not None else 1)
            out.append(Intervention(bank, row, Mode.ADD, strength, Scope.ALL, pos))
    for bank, n in rows.items():
        if n > limits.max_interventions:
            raise InvalidRequestError("vectors", f"the vectors at {bank} need {n} edit rows; the "
                                      f"server allows at most {limits.max_interventions}")
    return tuple(out)


MAX_INLINE_VECTORS = 4
"""Most inline vectors one request may carry (one per layer)."""


def inline_vectors_from_pb(items, index: VectorIndex, saes: Mapping[str, SAEConfig],
                           limits: Limits, vocab_size: int) -> tuple[Intervention, ...]:
    """GenerateRequest.inline_vectors as ADD edits on the inline row of their layer's bank
    (``sae_runtime.loading.vectors``), each carrying its float32 values."""
    if len(items) > MAX_INLINE_VECTORS:
        raise InvalidRequestError("inline_vectors", f"{len(items)} inline vectors given; the "
                                  f"server allows at most {MAX_INLINE_VECTORS} per request")
    out: list[Intervention] = []
    seen: dict[int, int] = {}
    for j, v in enumerate(items):
        field = f"inline_vectors[{j}]"
        if v.layer not in index.inline:
            takes = ", ".join(map(str, sorted(index.inline))) or "none"
            raise InvalidRequestError(f"{field}.layer", f"layer {v.layer} takes no inline vectors "
                                      f"(layers that do: {takes}; steerd serve --inline-vectors)")
        if v.layer in seen:
            raise InvalidRequestError(f"{field}.layer", f"layer {v.layer} already has "
                                      f"inline_vectors[{seen[v.layer]}]; give one per layer")
        seen[v.layer] = j
        bank, row = index.inline[v.layer]
        d = saes[bank].d_in
        values = np.asarray(v.values, dtype=np.float32)
        if values.shape != (d,):
            raise InvalidRequestError(f"{field}.values", f"{values.size} values given; the model's "
                                      f"hidden size is {d}")
        if not np.isfinite(values).all():
            bad = int(np.flatnonzero(~np.isfinite(values))[0])
            raise InvalidRequestError(f"{field}.values", f"values[{bad}] is {values[bad]}; every "
                                      "value must be finite")
        strength = _finite(f"{field}.strength", v.strength)
        pos = selector_from_pb(v.positions, f"{field}.positions") if v.HasField("positions") else None
        if pos is not None:
            pos.validate(f"{field}.positions", vocab_size)
        out.append(Intervention(bank, row, Mode.ADD, strength, Scope.ALL, pos,
                                vector=values.astype("<f4").tobytes()))
    return tuple(out)


def condition_from_pb(c: pb.FeatureCondition, field: str) -> Condition:
    """A FeatureCondition; range checks happen in ``Condition.validate``."""
    if c.op == pb.COMPARISON_UNSPECIFIED:
        raise InvalidRequestError(f"{field}.op", "must be set (GT or LT)")
    if c.op not in (x.value for x in Cond if x != Cond.NONE):
        raise InvalidRequestError(f"{field}.op", f"unknown comparison {c.op}")
    return Condition(c.sae, int(c.feature), Cond(c.op), float(c.threshold))


def guards_from_pb(items) -> GuardSpec:
    """GenerateRequest.abort_when; validated by ``GuardSpec.validate``."""
    out = []
    for j, g in enumerate(items):
        field = f"abort_when[{j}]"
        if not g.HasField("condition"):
            raise InvalidRequestError(f"{field}.condition", "must be set")
        cond = condition_from_pb(g.condition, f"{field}.condition")
        pos = (selector_from_pb(g.positions, f"{field}.positions") if g.HasField("positions")
               else GENERATION)
        out.append(Guardrail(cond, pos))
    return GuardSpec(tuple(out))


def check_lengths(prompt_len: int, max_tokens: int, max_model_len: int,
                  limits: Limits | None = None, field: str = "prompt") -> None:
    """Prompt and requested generation must fit the model's context and the server's caps."""
    if limits is not None and limits.max_prompt_tokens and prompt_len > limits.max_prompt_tokens:
        raise InvalidRequestError(
            field, f"prompt is {prompt_len} tokens; the server accepts at most "
            f"{limits.max_prompt_tokens}")
    if limits is not None and limits.max_new_tokens and max_tokens > limits.max_new_tokens:
        raise InvalidRequestError(
            "sampling.max_tokens", f"{max_tokens} exceeds the server's cap of {limits.max_new_tokens}")
    if prompt_len >= max_model_len:
        raise InvalidRequestError(
            field, f"prompt is {prompt_len} tokens; the model allows at most "
            f"{max_model_len - 1} so that one token can be generated"
        )
    if prompt_len + max_tokens > max_model_len:
        raise InvalidRequestError(
            "sampling.max_tokens",
            f"prompt ({prompt_len} tokens) + max_tokens ({max_tokens}) exceeds the model "
            f"length {max_model_len}; ask for at most {max_model_len - prompt_len}",
        )


def finish_reason_to_pb(reason: str | None) -> int:
    return _FINISH.get(reason or "", pb.FINISH_REASON_UNSPECIFIED)


def sae_info_to_pb(sae_id: str, cfg: SAEConfig, dtype: str = "float32") -> pb.SAEInfo:
    return pb.SAEInfo(
        id=sae_id, format=cfg.format, architecture=cfg.architecture, hook_name=cfg.hook_name,
        site=_SITE.get(cfg.site, pb.HOOK_SITE_UNSPECIFIED), layer=cfg.layer, d_sae=cfg.d_sae, d_in=cfg.d_in,
        dtype=dtype, model_name=cfg.model_name, k=cfg.k or 0,
        input_site=_SITE.get(cfg.input_site, pb.HOOK_SITE_UNSPECIFIED),
        hook_name_out=cfg.hook_name_out,
    )


def feature_to_pb(f: feats.Feature) -> pb.Feature:
    return pb.Feature(
        sae=f.sae, index=f.index, label=f.label, density=f.density,
        max_activation=f.max_activation, mean_activation=f.mean_activation, topic=f.topic,
        topic_selectivity=f.topic_selectivity, topic_coverage=f.topic_coverage, score=f.score,
        top_tokens=list(f.top_tokens), dead=f.dead, topic_means=dict(f.topic_means),
        site_norm=f.site_norm, steer_value=f.steer_value, steer_success=f.steer_success,
        examples=[pb.FeatureExample(context=e.context, token=e.token, activation=e.activation)
                  for e in f.examples],
        promoted=[pb.TokenLogit(token=t.token, token_id=t.token_id, logit=t.logit) for t in f.promoted],
        suppressed=[pb.TokenLogit(token=t.token, token_id=t.token_id, logit=t.logit) for t in f.suppressed],
        logit_effects_unavailable=f.logit_effects_unavailable,
    )


def _labels_of(sae: str, field: str, saes: Mapping[str, SAEConfig],
               labels: Mapping[str, feats.FeatureLabels]) -> feats.FeatureLabels:
    if sae not in saes:
        raise UnknownSAEError(field, sae, list(saes))
    if sae not in labels:
        raise NotLabelledError(
            f"{field}: SAE {sae!r} has no feature labels; put a {feats.LABELS_FILE} beside its "
            f"weights (labelled SAEs: {', '.join(labels) or 'none'})")
    return labels[sae]


def get_feature(req: pb.GetFeatureRequest, saes: Mapping[str, SAEConfig],
                labels: Mapping[str, feats.FeatureLabels], effects=None) -> feats.Feature:
    """The feature's record: its labels when its SAE has a labels file (else an empty label),
    with logit effects from the file or, where the file has none, from ``effects(sae, index)
    -> sae_runtime.labels.logit_effects.Effects`` (None: none asked). Blocking when ``effects`` loads
    weights: call it off the event loop."""
    from dataclasses import replace

    if req.sae not in saes:
        raise UnknownSAEError("sae", req.sae, list(saes))
    d_sae = saes[req.sae].d_sae
    if req.index >= d_sae:
        raise InvalidRequestError("index", f"{req.index} is out of range: SAE {req.sae!r} has "
                                  f"{d_sae} features (0..{d_sae - 1})")
    lab = labels.get(req.sae)
    f = lab.get(req.index) if lab is not None else feats.Feature(req.sae, req.index, "")
    if effects is not None and not (f.promoted or f.suppressed):
        e = effects(req.sae, req.index)
        f = replace(f, promoted=e.promoted, suppressed=e.suppressed,
                    logit_effects_unavailable=e.unavailable)
    return f


def search_features(req: pb.SearchFeaturesRequest, saes: Mapping[str, SAEConfig],
                    labels: Mapping[str, feats.FeatureLabels]) -> list[feats.Feature]:
    if not feats.query_words(req.query):
        raise InvalidRequestError("query", "give at least one word to search for")
    if len(req.query) > MAX_QUERY_LEN:
        raise InvalidRequestError("query", f"{len(req.query)} characters; at most {MAX_QUERY_LEN}")
    if req.limit > MAX_SEARCH_LIMIT:
        raise InvalidRequestError("limit", f"{req.limit} is more than the maximum {MAX_SEARCH_LIMIT}")
    if req.sae:
        scope = {req.sae: _labels_of(req.sae, "sae", saes, labels)}
    elif not labels:
        raise NotLabelledError(
            f"no loaded SAE has feature labels (looked for {feats.LABELS_FILE} beside each SAE)")
    else:
        scope = dict(labels)
    return feats.search(scope, req.query, req.limit or DEFAULT_SEARCH_LIMIT)
