"""Requests checked against the server: its SAEs, vectors, vocabulary and caps.

Pure functions, no engine: a door's typed request (``server.core.types``) in, a
``Generation`` (or an error naming the field by its ``steering.v1`` path) out. The rules on
interventions, reads, guardrails and selectors are ``sae_runtime.spec``'s; what is checked
here is what only the server knows (caps, vocabulary, vectors) and the sampling fields.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, replace

import numpy as np

from sae_runtime.errors import InvalidRequestError, ResourceLimitError
from sae_runtime.ops import Mode
from sae_runtime.saes.base import SAEConfig
from sae_runtime.spec import budget
from sae_runtime.spec.activations import NO_SITES, ActivationRead, DeclaredSites, validate_reads
from sae_runtime.spec.guardrails import MAX_GUARDRAILS, GuardSpec
from sae_runtime.spec.interventions import Intervention, SteeringSpec
from sae_runtime.spec.reads import Read, ReadScope, ReadSpec
from sae_runtime.spec.vectors import VectorIndex
from server.core.types import GenerateRequest, InlineVector, NamedVector, Prompt
from server.logs import check_printable

DEFAULT_MAX_TOKENS = 16
DEFAULT_SEARCH_LIMIT = 10
MAX_SEARCH_LIMIT = 100
MAX_QUERY_LEN = 200
MAX_REQUEST_ID_LEN = 128
DEFAULT_MAX_LOGPROBS = 20  # vLLM's own default cap
MAX_STOP = 16
"""Most stop strings one request may give (vLLM checks every one at every step)."""
MAX_STOP_LEN = 256
"""Longest stop string, in characters."""
MAX_VECTORS = 8
"""Most steering vectors one request may name."""
MAX_INLINE_VECTORS = 4
"""Most inline vectors one request may carry (one per layer)."""


@dataclass(frozen=True)
class Limits:
    """Server caps a request is checked against."""

    max_interventions: int
    vocab_size: int
    max_read_top_k: int = 64
    max_watch: int = 256
    max_encode_inputs: int = 32
    max_prompt_tokens: int | None = None  # None: the model length - 1
    max_new_tokens: int | None = None  # None: whatever the model length allows
    max_logprobs: int = DEFAULT_MAX_LOGPROBS
    max_guardrails: int = MAX_GUARDRAILS
    max_activation_reads: int = budget.DEFAULT_MAX_ACTIVATION_READS
    max_activation_positions: int = budget.DEFAULT_MAX_ACTIVATION_POSITIONS
    max_activation_bytes: int = budget.DEFAULT_MAX_ACTIVATION_BYTES


@dataclass(frozen=True)
class Generation:
    """A checked generation request: defaults filled in, vectors turned into edits."""

    prompt: Prompt
    max_tokens: int | None  # None: what fits the context (``GenerateRequest.fit_max_tokens``)
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
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    guards: GuardSpec = GuardSpec()
    acts: tuple[ActivationRead, ...] = ()  # raw activation reads (checked against the sites)

    def with_max_tokens(self, n: int) -> Generation:
        return replace(self, max_tokens=n)


def finite(field: str, v: float) -> float:
    if not math.isfinite(v):
        raise InvalidRequestError(field, f"must be finite, got {v}")
    return v


def generation(req: GenerateRequest, *, saes: Mapping[str, SAEConfig], limits: Limits,
               vectors: VectorIndex, sites: DeclaredSites = NO_SITES) -> Generation:
    """Check ``req``; errors name the offending field. The activation reads' sizes depend
    on the prompt's length: ``activation_budget`` checks them once it is known."""
    vocab_size = limits.vocab_size
    if len(req.request_id) > MAX_REQUEST_ID_LEN:
        raise InvalidRequestError(
            "request_id", f"at most {MAX_REQUEST_ID_LEN} characters, got {len(req.request_id)}")
    check_printable("request_id", req.request_id)
    prompt = checked_prompt(req.prompt, "prompt", vocab_size)

    max_tokens = req.max_tokens
    if max_tokens is None and not req.fit_max_tokens:
        max_tokens = DEFAULT_MAX_TOKENS
    if max_tokens is not None and max_tokens <= 0:
        raise InvalidRequestError("sampling.max_tokens", f"must be >= 1, got {max_tokens}")
    temperature = 1.0 if req.temperature is None else finite("sampling.temperature", req.temperature)
    if temperature < 0:
        raise InvalidRequestError("sampling.temperature", f"must be >= 0, got {temperature}")
    top_p = 1.0 if req.top_p is None else finite("sampling.top_p", req.top_p)
    if not 0 < top_p <= 1:
        raise InvalidRequestError("sampling.top_p", f"must be in (0, 1], got {top_p}")
    top_k = req.top_k or 0
    if top_k > vocab_size:
        raise InvalidRequestError("sampling.top_k", f"must be <= vocab_size={vocab_size}")
    if len(req.stop) > MAX_STOP:
        raise InvalidRequestError("sampling.stop", f"{len(req.stop)} stop strings given; the "
                                  f"server allows at most {MAX_STOP}")
    for j, st in enumerate(req.stop):
        if not st:
            raise InvalidRequestError(f"sampling.stop[{j}]", "stop strings must not be empty")
        if len(st) > MAX_STOP_LEN:
            raise InvalidRequestError(f"sampling.stop[{j}]", f"{len(st)} characters; at most "
                                      f"{MAX_STOP_LEN}")
    if len(req.stop_token_ids) > MAX_STOP:
        raise InvalidRequestError("sampling.stop_token_ids", f"{len(req.stop_token_ids)} ids "
                                  f"given; the server allows at most {MAX_STOP}")
    for j, t in enumerate(req.stop_token_ids):
        if not 0 <= t < vocab_size:
            raise InvalidRequestError(f"sampling.stop_token_ids[{j}]",
                                      f"token id {t} is out of range (vocab_size={vocab_size})")
    for name in ("logprobs", "prompt_logprobs"):
        n = getattr(req, name)
        if n is not None and n > limits.max_logprobs:
            raise InvalidRequestError(
                f"sampling.{name}", f"{n} is more than the server's cap of "
                f"{limits.max_logprobs} (steerd serve --max-logprobs)")

    spec = SteeringSpec(req.interventions)
    spec.validate(saes, limits.max_interventions, vocab_size)
    reads = ReadSpec(req.reads)
    reads.validate(saes, max_top_k=limits.max_read_top_k, max_watch=limits.max_watch,
                   vocab_size=vocab_size)
    guards = GuardSpec(req.abort_when)
    guards.validate(saes, max_guardrails=limits.max_guardrails, vocab_size=vocab_size)
    edits = spec.interventions
    if req.vectors:
        edits += vector_edits(req.vectors, vectors, limits, vocab_size)
    if req.inline_vectors:
        edits += inline_vector_edits(req.inline_vectors, vectors, vocab_size)
    if edits != spec.interventions:
        spec = SteeringSpec(edits)
    budget.check_request(spec, reads, guards, saes, limits)
    validate_reads(req.activation_reads, sites, max_reads=limits.max_activation_reads,
                   vocab_size=vocab_size)
    return Generation(
        prompt=prompt, max_tokens=max_tokens, temperature=temperature, top_p=top_p,
        top_k=top_k, seed=req.seed, stop=req.stop, stop_token_ids=req.stop_token_ids,
        ignore_eos=req.ignore_eos, spec=spec, request_id=req.request_id, reads=reads, logprobs=req.logprobs,
        prompt_logprobs=req.prompt_logprobs, guards=guards, acts=req.activation_reads)


def checked_prompt(prompt: Prompt | None, field: str, vocab_size: int) -> Prompt:
    """The prompt, checked: set, not empty, token ids in the vocabulary; errors name
    ``field`` (``prompt``, ``inputs[3]``)."""
    if prompt is None:
        raise InvalidRequestError(
            field, f"required: set {field}.text, {field}.token_ids or {field}.messages")
    if prompt.text is not None:
        if not prompt.text:
            raise InvalidRequestError(f"{field}.text", "must not be empty")
    elif prompt.messages is not None:
        if not prompt.messages:
            raise InvalidRequestError(f"{field}.messages.messages", "give at least one message")
        for j, (role, _) in enumerate(prompt.messages):
            if not role:
                raise InvalidRequestError(f"{field}.messages.messages[{j}].role",
                                          "must not be empty")
    else:
        ids = prompt.ids or ()
        if not ids:
            raise InvalidRequestError(f"{field}.token_ids.ids", "must hold at least one token id")
        for j, t in enumerate(ids):
            if not 0 <= t < vocab_size:
                raise InvalidRequestError(f"{field}.token_ids.ids[{j}]", f"token id {t} is out "
                                          f"of range (vocab_size={vocab_size})")
    return prompt


def activation_budget(acts: tuple[ActivationRead, ...], prompt_len: int, total: int,
                      sites: DeclaredSites, limits: Limits) -> None:
    """Refuse activation reads over the per-request caps (``budget.check_activations``)
    for a prompt of ``prompt_len`` tokens and positions ``[0, total)``."""
    if acts:
        budget.check_activations([a.selector for a in acts], [sites.width(a.hook) for a in acts],
                                 prompt_len, total, limits)


def encode_reads(reads: tuple[Read, ...], *, n_inputs: int, saes: Mapping[str, SAEConfig],
                 limits: Limits, acts: tuple[ActivationRead, ...] = (),
                 sites: DeclaredSites = NO_SITES) -> ReadSpec:
    """An Encode call's reads: pooled, over the whole prompt (scope and positions do not
    apply), checked like Generate's; and its activation reads, checked against ``sites``."""
    if not n_inputs:
        raise InvalidRequestError("inputs", "give at least one input")
    if n_inputs > limits.max_encode_inputs:
        raise InvalidRequestError(
            "inputs", f"{n_inputs} inputs given; the server allows at most "
            f"{limits.max_encode_inputs} per call")
    if not reads and not acts:
        raise InvalidRequestError("reads", "give at least one read (reads or activation_reads)")
    validate_reads(acts, sites, max_reads=limits.max_activation_reads,
                   vocab_size=limits.vocab_size)
    spec = ReadSpec(tuple(replace(r, scope=ReadScope.PROMPT, positions=None) for r in reads),
                    pooled=True)
    spec.validate(saes, max_top_k=limits.max_read_top_k, max_watch=limits.max_watch,
                  vocab_size=limits.vocab_size)
    budget.check_request(SteeringSpec(), spec, GuardSpec(), saes, limits)
    return spec


def vector_edits(items: tuple[NamedVector, ...], index: VectorIndex, limits: Limits,
                 vocab_size: int) -> tuple[Intervention, ...]:
    """Named steering vectors as ADD edits on their layers' banks (``sae_runtime.loading.vectors``)."""
    if len(items) > MAX_VECTORS:
        raise InvalidRequestError("vectors", f"{len(items)} vectors given; the server allows "
                                  f"at most {MAX_VECTORS} per request")
    out: list[Intervention] = []
    seen: dict[str, int] = {}
    for j, v in enumerate(items):
        field = f"vectors[{j}]"
        if v.name not in index.rows:
            known = ", ".join(sorted(index.rows)) or "none (steerd serve --vector NAME=PATH, LoadVector)"
            raise InvalidRequestError(f"{field}.name", f"unknown steering vector {v.name!r}; "
                                      f"loaded: {known}")
        if v.name in seen:
            raise InvalidRequestError(f"{field}.name", f"vector {v.name!r} is already given by "
                                      f"vectors[{seen[v.name]}]")
        seen[v.name] = j
        strength = finite(f"{field}.strength", v.strength)
        layers = index.rows[v.name]
        want = list(v.layers) or sorted(layers)
        for k, layer in enumerate(want):
            if layer not in layers:
                raise InvalidRequestError(f"{field}.layers[{k}]", f"vector {v.name!r} has no "
                                          f"layer {layer}; it has {sorted(layers)}")
        if v.positions is not None:
            v.positions.validate(f"{field}.positions", vocab_size)
        for layer in dict.fromkeys(want):
            bank, row = layers[layer]
            out.append(Intervention(bank, row, Mode.ADD, strength, None, v.positions,
                                    tag=index.tags.get(v.name)))
    return tuple(out)


def inline_vector_edits(items: tuple[InlineVector, ...], index: VectorIndex,
                        vocab_size: int) -> tuple[Intervention, ...]:
    """Inline vectors as ADD edits on the inline row of their layer's bank, each carrying
    its float32 values (``sae_runtime.loading.vectors``)."""
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
        values = np.asarray(v.values, dtype=np.float32).reshape(-1)
        if values.shape != (index.d_model,):
            raise InvalidRequestError(f"{field}.values", f"{values.size} values given; the model's "
                                      f"hidden size is {index.d_model}")
        if not np.isfinite(values).all():
            bad = int(np.flatnonzero(~np.isfinite(values))[0])
            raise InvalidRequestError(f"{field}.values", f"values[{bad}] is {values[bad]}; every "
                                      "value must be finite")
        strength = finite(f"{field}.strength", v.strength)
        if v.positions is not None:
            v.positions.validate(f"{field}.positions", vocab_size)
        out.append(Intervention(bank, row, Mode.ADD, strength, None, v.positions,
                                vector=values.astype("<f4").tobytes()))
    return tuple(out)


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
            f"{max_model_len - 1} so that one token can be generated")
    if prompt_len + max_tokens > max_model_len:
        raise InvalidRequestError(
            "sampling.max_tokens",
            f"prompt ({prompt_len} tokens) + max_tokens ({max_tokens}) exceeds the model "
            f"length {max_model_len}; ask for at most {max_model_len - prompt_len}")


def search_args(query: str, limit: int) -> int:
    """Check a feature search; returns the limit to use."""
    from sae_runtime.labels.store import query_words

    if not query_words(query):
        raise InvalidRequestError("query", "give at least one word to search for")
    if len(query) > MAX_QUERY_LEN:
        raise InvalidRequestError("query", f"{len(query)} characters; at most {MAX_QUERY_LEN}")
    if limit > MAX_SEARCH_LIMIT:
        raise InvalidRequestError("limit", f"{limit} is more than the maximum {MAX_SEARCH_LIMIT}")
    return limit or DEFAULT_SEARCH_LIMIT


def reply_cap(cap: int, what: str) -> ResourceLimitError:
    """The error of an answer (a non-streamed completion, an Encode result) over ``cap``."""
    return ResourceLimitError(
        f"the {what} is over the server's cap of {cap} bytes (steerd serve "
        "--max-stream-buffer-bytes); stream it, or ask for fewer positions or features")
