"""A thin, typed client over the generated stubs. It never imports the server."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal, NamedTuple, Union

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from steering.v1 import steering_pb2 as pb
from steering.v1 import steering_pb2_grpc as pb_grpc

ScopeName = Literal["all", "generation_only"]
# A prompt: text, token ids, or chat messages ({"role", "content"} dicts or (role, content) pairs)
Message = Union[Mapping[str, str], tuple[str, str]]
PromptLike = Union[str, Sequence[int], Sequence[Message]]
ReadScopeName = Literal["all", "prompt", "generation"]
_READ_SCOPES = {"all": pb.READ_SCOPE_ALL, "prompt": pb.READ_SCOPE_PROMPT,
                "generation": pb.READ_SCOPE_GENERATION}
_SCOPES = {"all": pb.SCOPE_ALL, "generation_only": pb.SCOPE_GENERATION_ONLY}
FrameName = Literal["absolute", "prompt", "generation"]
FRAMES = {"absolute": pb.POSITION_FRAME_ABSOLUTE, "prompt": pb.POSITION_FRAME_PROMPT,
          "generation": pb.POSITION_FRAME_GENERATION}
FINISH_NAMES = {
    pb.FINISH_REASON_UNSPECIFIED: None,
    pb.FINISH_REASON_LENGTH: "length",
    pb.FINISH_REASON_STOP: "stop",
    pb.FINISH_REASON_ABORT: "abort",
    pb.FINISH_REASON_FEATURE: "feature",
}


def position_range(frame: FrameName, start: int | None = None,
                   end: int | None = None) -> pb.PositionRange:
    """``[start, end)`` counted in ``frame`` (None: the frame's default).

    ``absolute``: positions; ``prompt``: prompt positions, negative = from the prompt's end
    (``-1`` = the last prompt token); ``generation``: generation steps (0 = the first
    generated token, fed back at position prompt_len)."""
    r = pb.PositionRange(frame=FRAMES[frame])
    if start is not None:
        r.start = start
    if end is not None:
        r.end = end
    return r


def prompt_range(start: int | None = None, end: int | None = None) -> pb.PositionRange:
    """Prompt positions ``[start, end)``; negative values count from the prompt's end."""
    return position_range("prompt", start, end)


def generation_range(start: int | None = None, end: int | None = None) -> pb.PositionRange:
    """Generation steps ``[start, end)``: ``generation_range(0, 20)`` = the first 20
    generated tokens, ``generation_range(4)`` = from the 5th on."""
    return position_range("generation", start, end)


def absolute_range(start: int | None = None, end: int | None = None) -> pb.PositionRange:
    """Absolute positions ``[start, end)``."""
    return position_range("absolute", start, end)


def parse_range(text: str) -> pb.PositionRange:
    """``FRAME:START:END`` (either bound may be empty), e.g. ``prompt:-1:``, ``gen::20``,
    ``abs:3:7``; FRAME is ``abs``/``absolute``, ``prompt`` or ``gen``/``generation``.
    Raises ValueError on bad syntax (values are the server's to judge)."""
    parts = text.split(":")
    names = {"abs": "absolute", "absolute": "absolute", "prompt": "prompt",
             "gen": "generation", "generation": "generation"}
    if len(parts) != 3 or parts[0] not in names:
        raise ValueError(f"{text!r}: expected FRAME:START:END with FRAME abs, prompt or gen "
                         "(bounds may be empty), e.g. prompt:-1: or gen:0:20")
    try:
        start, end = (int(v) if v.strip() else None for v in parts[1:])
    except ValueError:
        raise ValueError(f"{text!r}: START and END must be integers or empty") from None
    return position_range(names[parts[0]], start, end)  # type: ignore[arg-type]


def positions(*ranges: pb.PositionRange, exclude_ranges: bool = False,
              token_ids: Sequence[int] = (), exclude_token_ids: bool = False) -> pb.PositionSelector:
    """A position selector: the positions in any of ``ranges`` (none given: every position;
    ``exclude_ranges``: in none of them) whose token is in ``token_ids`` (none given: any
    token; ``exclude_token_ids``: not in them)."""
    return pb.PositionSelector(ranges=list(ranges), exclude_ranges=exclude_ranges,
                               token_ids=list(token_ids), exclude_token_ids=exclude_token_ids)


def _iv(sae: str, feature: int, mode: int, value: float, scope: ScopeName | None,
        at: pb.PositionSelector | None) -> pb.Intervention:
    iv = pb.Intervention(sae=sae, feature=feature, mode=mode, value=value)
    if at is not None:
        iv.positions.CopyFrom(at)  # scope stays unset: a selector replaces it
    if scope is not None or at is None:
        iv.scope = _SCOPES[scope or "all"]
    return iv


def clamp(sae: str, feature: int, value: float, scope: ScopeName | None = None, *,
          at: pb.PositionSelector | None = None) -> pb.Intervention:
    """Set feature ``feature`` of ``sae`` to ``value`` (at the positions of ``scope`` or of
    the selector ``at``, see ``positions``; default every position)."""
    return _iv(sae, feature, pb.INTERVENTION_MODE_CLAMP, value, scope, at)


def ablate(sae: str, feature: int, scope: ScopeName | None = None, *,
           at: pb.PositionSelector | None = None) -> pb.Intervention:
    """Set the feature to 0."""
    return _iv(sae, feature, pb.INTERVENTION_MODE_ABLATE, 0.0, scope, at)


def scale(sae: str, feature: int, factor: float, scope: ScopeName | None = None, *,
          at: pb.PositionSelector | None = None) -> pb.Intervention:
    """Multiply the feature by ``factor``."""
    return _iv(sae, feature, pb.INTERVENTION_MODE_SCALE, factor, scope, at)


def add(sae: str, feature: int, strength: float, scope: ScopeName | None = None, *,
        at: pb.PositionSelector | None = None) -> pb.Intervention:
    """Add ``strength`` times the feature's decoder direction."""
    return _iv(sae, feature, pb.INTERVENTION_MODE_ADD, strength, scope, at)


_OPS = {">": pb.COMPARISON_GT, "<": pb.COMPARISON_LT}


def when(sae: str, feature: int, op: str, threshold: float) -> pb.FeatureCondition:
    """The condition ``feature of sae`` ``op`` (``">"`` or ``"<"``) ``threshold``."""
    if op not in _OPS:
        raise ValueError(f"op must be '>' or '<', got {op!r}")
    return pb.FeatureCondition(sae=sae, feature=feature, op=_OPS[op], threshold=threshold)


class LayerFeature(NamedTuple):
    """Feature ``index`` of model layer ``layer`` of a cross-layer transcoder, as an
    attribution graph names it (written ``L/J``). The server takes one flat index per
    feature, ``slot * features_per_layer + index`` (``slot``: the layer's position in the
    CLT's ``SAEInfo.layers``); ``flat_feature`` converts."""

    layer: int
    index: int

    def __str__(self) -> str:
        return f"{self.layer}/{self.index}"


FeatureRef = Union[int, LayerFeature]
"""A feature as a user names it: a flat index, or a CLT's ``LayerFeature``."""


def parse_feature(text: str) -> FeatureRef:
    """``J`` (a flat feature index) or ``L/J`` (feature ``J`` of layer ``L`` of a
    cross-layer transcoder); raises ``ValueError`` on anything else or a negative number."""
    layer, slash, index = text.strip().rpartition("/")
    try:
        j = int(index)
        lay = int(layer) if slash else 0
    except ValueError:
        raise ValueError(f"feature {text!r}: expected an index J or LAYER/J (a cross-layer "
                         "transcoder's feature J of layer LAYER)") from None
    if j < 0 or lay < 0:
        raise ValueError(f"feature {text!r}: numbers must be >= 0")
    return LayerFeature(lay, j) if slash else j


def flat_feature(info: pb.SAEInfo, feature: FeatureRef) -> int:
    """The flat index the server takes for ``feature`` of the SAE ``info`` describes
    (``ListSAEs`` / ``GetModelInfo``): an ``int`` as it is; a ``LayerFeature`` ``L/J`` of a
    cross-layer transcoder is ``slot * features_per_layer + J`` with ``slot`` the position
    of block ``L`` in ``info.layers``. Raises ``ValueError`` naming the SAE when ``info`` is
    not a CLT, ``L`` is none of its layers, or ``J`` is not below ``features_per_layer``."""
    if not isinstance(feature, LayerFeature):
        return int(feature)
    layers, F = list(info.layers), info.features_per_layer
    if not layers or not F:
        raise ValueError(f"feature {feature} of SAE {info.id!r}: LAYER/J addresses a cross-layer "
                         f"transcoder's feature, and {info.id!r} is not one (give its index)")
    if feature.layer not in layers:
        raise ValueError(f"feature {feature} of SAE {info.id!r}: layer {feature.layer} is not "
                         f"one of its layers {layers}")
    if feature.index >= F:
        raise ValueError(f"feature {feature} of SAE {info.id!r}: index {feature.index} is out of "
                         f"range (it has {F} features per layer: 0..{F - 1})")
    return layers.index(feature.layer) * F + feature.index


def parse_condition(text: str, resolve: Callable[[str, FeatureRef], int] | None = None
                    ) -> pb.FeatureCondition:
    """``SAE:FEATURE>THRESHOLD`` (or ``<``) -> a FeatureCondition (the CLI's form).

    ``FEATURE`` is a flat index or, for a cross-layer transcoder, ``L/J``
    (``parse_feature``), which needs ``resolve`` (``SteeringClient.flat_feature``)."""
    import re

    m = re.fullmatch(r"\s*([^:<>\s]+):(\d+(?:/\d+)?)\s*([<>])\s*([-+0-9.eE]+|nan|inf)\s*",
                     text)
    if m is None:
        raise ValueError(f"expected SAE:FEATURE>THRESHOLD or SAE:FEATURE<THRESHOLD, got {text!r}")
    feature = parse_feature(m.group(2))
    if isinstance(feature, LayerFeature):
        if resolve is None:
            raise ValueError(f"{text!r}: a LAYER/J feature needs the SAE's layers (pass resolve, "
                             "e.g. SteeringClient.flat_feature)")
        feature = resolve(m.group(1), feature)
    return when(m.group(1), feature, m.group(3), float(m.group(4)))


def conditional(iv: pb.Intervention, condition: pb.FeatureCondition, *,
                latch: bool = False) -> pb.Intervention:
    """``iv`` applied only where ``condition`` holds (same SAE); ``latch``: once it has held,
    stay on for the rest of the request."""
    out = pb.Intervention()
    out.CopyFrom(iv)
    out.when.CopyFrom(condition)
    out.latch = latch
    return out


def guardrail(condition: pb.FeatureCondition,
              at: pb.PositionSelector | None = None) -> pb.Guardrail:
    """Stop the request when ``condition`` holds at a generated position (or at the
    positions of ``at``, prompt ones included); see ``GenerateRequest.abort_when``."""
    g = pb.Guardrail(condition=condition)
    if at is not None:
        g.positions.CopyFrom(at)
    return g


def vector(name: str, strength: float, layers: Sequence[int] = (), *,
           at: pb.PositionSelector | None = None) -> pb.VectorSteer:
    """Add ``strength`` times the server's steering vector ``name`` (steerd serve --vector)
    at its layers (or the subset ``layers``), at every position or those of ``at``."""
    v = pb.VectorSteer(name=name, strength=strength, layers=list(layers))
    if at is not None:
        v.positions.CopyFrom(at)
    return v


def inline_vector(values: Sequence[float], layer: int, strength: float = 1.0, *,
                  at: pb.PositionSelector | None = None) -> pb.InlineVector:
    """Add ``strength * values`` (d_model floats: a list, a numpy array or a tensor) to the
    output of block ``layer`` (one the server takes inline vectors at: GetModelInfo's
    ``inline_vector_layers``), at every position or those of ``at``."""
    v = pb.InlineVector(values=[float(x) for x in values], layer=layer, strength=strength)
    if at is not None:
        v.positions.CopyFrom(at)
    return v


def read(sae: str, top_k: int = 0, watch: Sequence[int] = (),
         scope: ReadScopeName | None = None, *, at: pb.PositionSelector | None = None) -> pb.FeatureRead:
    """Ask for ``sae``'s top_k features and/or a watch list at the positions of ``scope``
    (or of the selector ``at``; default every position)."""
    r = pb.FeatureRead(sae=sae, top_k=top_k, watch=list(watch))
    if at is not None:
        r.positions.CopyFrom(at)
    if scope is not None or at is None:
        r.scope = _READ_SCOPES[scope or "all"]
    return r


ACT_POOLS = {"none": pb.ACTIVATION_POOL_NONE, "mean": pb.ACTIVATION_POOL_MEAN,
             "max": pb.ACTIVATION_POOL_MAX, "last": pb.ACTIVATION_POOL_LAST}
ACT_DTYPES = {"f32": pb.ACTIVATION_DTYPE_FLOAT32, "f16": pb.ACTIVATION_DTYPE_FLOAT16,
              "bf16": pb.ACTIVATION_DTYPE_BFLOAT16}


def activation_read(hook: str, *, pool: str = "none", dtype: str = "f32",
                    at: pb.PositionSelector | None = None,
                    before_edits: bool = False) -> pb.ActivationRead:
    """Ask for the raw activation at ``hook`` (a declared SAELens hook name, e.g.
    ``blocks.1.hook_resid_post``), per position or pooled (``mean``, ``max``, ``last``),
    as ``f32``, ``f16`` or ``bf16``, at the positions of ``at`` (default every position);
    after this request's edits at that site, or before them with ``before_edits`` (the
    results keep those apart: ``activations_before[hook]``)."""
    r = pb.ActivationRead(hook=hook, pool=ACT_POOLS[pool], dtype=ACT_DTYPES[dtype],
                          before_edits=before_edits)
    if at is not None:
        r.positions.CopyFrom(at)
    return r


def unpack(a: pb.Activations) -> np.ndarray:
    """An ``Activations`` message's rows as float32 ``[rows, d]`` (bfloat16 is the top half
    of a float32, so it widens exactly)."""
    rows, d = (list(a.shape) + [0, 0])[:2]
    if a.dtype == pb.ACTIVATION_DTYPE_FLOAT16:
        v = np.frombuffer(a.data, dtype="<f2").astype(np.float32)
    elif a.dtype == pb.ACTIVATION_DTYPE_BFLOAT16:
        v = (np.frombuffer(a.data, dtype="<u2").astype(np.uint32) << 16).view(np.float32)
    else:
        v = np.frombuffer(a.data, dtype="<f4").astype(np.float32)
    return v.reshape(rows, d)


def activations_of(msgs, before_edits: bool = False) -> tuple[dict[str, np.ndarray],
                                                             dict[str, list[int]]]:
    """``Activations`` messages (a stream's, in order) as ``{hook: [rows, d]}`` and
    ``{hook: positions}``; rows of one hook over several messages are concatenated. Only
    the reads after edits, or only those before (``before_edits``)."""
    parts: dict[str, list[np.ndarray]] = {}
    positions: dict[str, list[int]] = {}
    for a in msgs:
        if a.before_edits != before_edits:
            continue
        parts.setdefault(a.hook, []).append(unpack(a))
        positions.setdefault(a.hook, []).extend(a.positions)
    return ({h: np.concatenate(p) if len(p) > 1 else p[0] for h, p in parts.items()}, positions)


@dataclass
class EncodedActivations:
    """One Encode input's raw activations (``SteeringClient.encode_activations``)."""

    token_ids: list[int]
    activations: dict[str, np.ndarray]  # hook -> float32 [rows, d]
    positions: dict[str, list[int]]  # hook -> the rows' positions (pooled: the pooled ones)
    # the before_edits reads, the same way
    activations_before: dict[str, np.ndarray] = field(default_factory=dict)
    positions_before: dict[str, list[int]] = field(default_factory=dict)


@dataclass
class GenerationResult:
    """A whole Generate stream, collected."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)  # generated ids only
    prompt_token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    request_id: str = ""
    usage: pb.Usage | None = None
    features: list[pb.FeatureActivations] = field(default_factory=list)
    logprobs: list[pb.PositionLogprobs] = field(default_factory=list)  # one per generated token
    prompt_logprobs: list[pb.PositionLogprobs] = field(default_factory=list)  # positions 1..n-1
    guardrail: pb.GuardrailTrip | None = None  # finish_reason "feature": what tripped, where
    activations: dict[str, np.ndarray] = field(default_factory=dict)  # hook -> float32 [rows, d]
    activation_positions: dict[str, list[int]] = field(default_factory=dict)  # hook -> positions
    # the before_edits reads, the same way (a hook may be read both ways)
    activations_before: dict[str, np.ndarray] = field(default_factory=dict)
    activation_positions_before: dict[str, list[int]] = field(default_factory=dict)


class SteeringClient:
    """Blocking client. ``with SteeringClient("localhost:50051") as c: c.generate_text("hi")``.

    ``token`` is sent as ``authorization: Bearer <token>``; ``admin_token`` instead of it
    on admin calls (``load_vector``, ``unload_vector``, ``train_vector(register=True)``: the server takes only its
    ``--admin-tokens-file`` tokens there). ``tls_ca`` (PEM bytes or a path) switches to TLS;
    add ``tls_cert``/``tls_key`` for mutual TLS.
    """

    def __init__(self, target: str, *, timeout: float | None = None,
                 channel: grpc.Channel | None = None, token: str | None = None,
                 tls_ca: bytes | str | None = None, tls_cert: bytes | str | None = None,
                 tls_key: bytes | str | None = None, admin_token: str | None = None) -> None:
        if channel is None:
            if tls_ca is not None:
                creds = grpc.ssl_channel_credentials(
                    root_certificates=_pem(tls_ca), private_key=_pem(tls_key),
                    certificate_chain=_pem(tls_cert))
                channel = grpc.secure_channel(target, creds)
            else:
                channel = grpc.insecure_channel(target)
        self.channel = channel
        self.stub = pb_grpc.SteeringServiceStub(self.channel)
        self._sae_infos: dict[str, pb.SAEInfo] | None = None  # ListSAEs, for flat_feature
        self.timeout = timeout
        self.metadata = (("authorization", f"Bearer {token}"),) if token else None
        self.admin_metadata = ((("authorization", f"Bearer {admin_token}"),) if admin_token
                               else self.metadata)

    def __enter__(self) -> SteeringClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.channel.close()

    @staticmethod
    def build_request(
        prompt: PromptLike, *, max_tokens: int | None = None,
        temperature: float | None = None, top_p: float | None = None, top_k: int | None = None,
        seed: int | None = None, stop: Sequence[str] = (), stop_token_ids: Sequence[int] = (),
        ignore_eos: bool = False, interventions: Sequence[pb.Intervention] = (),
        reads: Sequence[pb.FeatureRead] = (), request_id: str = "",
        logprobs: int | None = None, prompt_logprobs: int | None = None,
        abort_when: Sequence[pb.Guardrail | pb.FeatureCondition] = (),
        vectors: Sequence[pb.VectorSteer] = (),
        inline_vectors: Sequence[pb.InlineVector] = (),
        activation_reads: Sequence[pb.ActivationRead] = (),
    ) -> pb.GenerateRequest:
        """``logprobs=n``: each generated token's logprob and the n most likely alternatives;
        ``prompt_logprobs=n``: the same for prompt positions 1..n-1. ``abort_when``:
        guardrails (a bare condition watches the generated positions)."""
        p = _prompt(prompt)
        s = pb.SamplingParams(stop=list(stop), stop_token_ids=list(stop_token_ids),
                              ignore_eos=ignore_eos)
        for name, v in (("max_tokens", max_tokens), ("temperature", temperature),
                        ("top_p", top_p), ("top_k", top_k), ("seed", seed),
                        ("logprobs", logprobs), ("prompt_logprobs", prompt_logprobs)):
            if v is not None:
                setattr(s, name, v)
        guards = [g if isinstance(g, pb.Guardrail) else guardrail(g) for g in abort_when]
        return pb.GenerateRequest(prompt=p, sampling=s, interventions=list(interventions),
                                  reads=list(reads), request_id=request_id, abort_when=guards,
                                  vectors=list(vectors), inline_vectors=list(inline_vectors),
                                  activation_reads=list(activation_reads))

    def generate(self, prompt: PromptLike, **kw) -> Iterator[pb.GenerateResponse]:
        """Stream responses; cancel by calling ``.cancel()`` on the returned iterator.

        ``prompt`` is text, token ids, or chat messages (rendered by the server's chat template).
        """
        return self.stub.Generate(self.build_request(prompt, **kw), timeout=self.timeout,
                                  metadata=self.metadata)

    def generate_text(self, prompt: PromptLike, **kw) -> GenerationResult:
        """Run a whole generation and collect it."""
        return collect(self.generate(prompt, **kw))

    def encode(self, inputs: Sequence[PromptLike], reads: Sequence[pb.FeatureRead] = (),
               activation_reads: Sequence[pb.ActivationRead] = ()) -> list[pb.EncodeResult]:
        """Per-token and pooled activations of each input (no generation)."""
        req = pb.EncodeRequest(inputs=[_prompt(x) for x in inputs], reads=list(reads),
                               activation_reads=list(activation_reads))
        return list(self.stub.Encode(req, timeout=self.timeout, metadata=self.metadata).results)

    def encode_activations(self, inputs: Sequence[PromptLike],
                           activation_reads: Sequence[pb.ActivationRead]) -> list[EncodedActivations]:
        """Each input's raw activations as numpy arrays (``r.activations[hook]``; the
        ``before_edits`` reads in ``r.activations_before[hook]``)."""
        out = []
        for r in self.encode(inputs, activation_reads=activation_reads):
            acts, pos = activations_of(r.activations)
            before, pos_before = activations_of(r.activations, before_edits=True)
            out.append(EncodedActivations(list(r.token_ids), acts, pos, before, pos_before))
        return out

    def get_feature(self, sae: str, index: int) -> pb.Feature:
        """A labelled feature's label and statistics."""
        return self.stub.GetFeature(pb.GetFeatureRequest(sae=sae, index=index),
                                    timeout=self.timeout, metadata=self.metadata)

    def search_features(self, query: str, *, sae: str = "", limit: int = 0) -> list[pb.Feature]:
        """Features whose label, topic or top tokens contain every word of ``query``, best first."""
        req = pb.SearchFeaturesRequest(query=query, sae=sae, limit=limit)
        return list(self.stub.SearchFeatures(req, timeout=self.timeout, metadata=self.metadata).features)

    def list_saes(self) -> list[pb.SAEInfo]:
        return list(self.stub.ListSAEs(pb.ListSAEsRequest(), timeout=self.timeout,
                                       metadata=self.metadata).saes)

    def flat_feature(self, sae: str, feature: FeatureRef) -> int:
        """The flat index of ``feature`` of ``sae`` (``flat_feature``): an ``int`` as it is;
        a ``LayerFeature`` (``L/J``, a cross-layer transcoder's feature J of layer L, as an
        attribution graph names it) converted with the SAE's ``ListSAEs`` entry (fetched
        once per client). Raises ``ValueError`` for an SAE the server does not serve, a
        non-CLT SAE, or a layer or index out of range."""
        if not isinstance(feature, LayerFeature):
            return int(feature)
        if self._sae_infos is None:
            self._sae_infos = {s.id: s for s in self.list_saes()}
        if sae not in self._sae_infos:
            raise ValueError(f"feature {feature} of SAE {sae!r}: the server serves no SAE "
                             f"{sae!r} (it serves {sorted(self._sae_infos)})")
        return flat_feature(self._sae_infos[sae], feature)

    def model_info(self) -> pb.GetModelInfoResponse:
        return self.stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=self.timeout,
                                      metadata=self.metadata)

    def list_vectors(self) -> list[pb.VectorInfo]:
        """The steering vectors requests may name: startup (--vector) and runtime-loaded."""
        return list(self.stub.ListVectors(pb.ListVectorsRequest(), timeout=self.timeout,
                                          metadata=self.metadata).vectors)

    def load_vector(self, name: str, values: Mapping[int, Sequence[float]] | None = None, *,
                    file: bytes | str | None = None, file_format: str | None = None,
                    metadata: Mapping[str, str] | None = None) -> pb.VectorInfo:
        """Load a steering vector at run time (admin): ``values`` ``{block: d_model floats}``
        (lists, numpy arrays or tensors), or ``file`` (a GGUF / safetensors path or its
        bytes; ``file_format`` "gguf" / "safetensors", from the path's suffix by default).
        Returns once every worker holds it; requests may then name it."""
        req = pb.LoadVectorRequest(name=name, metadata=dict(metadata or {}))
        for layer, v in (values or {}).items():
            req.layers.append(pb.LayerValues(layer=int(layer), values=[float(x) for x in v]))
        if file is not None:
            if isinstance(file, str):
                file_format = file_format or file.rsplit(".", 1)[-1].lower()
                with open(file, "rb") as fh:
                    file = fh.read()
            req.file = file
            req.file_format = file_format or ""
        return self.stub.LoadVector(req, timeout=self.timeout,
                                    metadata=self.admin_metadata).vector

    def export_vector(self, name: str) -> bytes:
        """A vector the server holds as a self-describing llama.cpp control-vector GGUF
        (its model id, hidden size, hook names, layer convention, method and date)."""
        return self.stub.ExportVector(pb.ExportVectorRequest(name=name), timeout=self.timeout,
                                      metadata=self.metadata).gguf

    def train_vector(self, name: str, positive: Sequence[PromptLike],
                     negative: Sequence[PromptLike], layers: Sequence[int], *,
                     method: str = "mean_diff", position: str = "last",
                     positions: pb.PositionSelector | None = None, normalize: bool = False,
                     register: bool = False,
                     metadata: Mapping[str, str] | None = None) -> pb.TrainVectorResponse:
        """Fit a steering vector from contrastive prompts on the server's own activations
        at ``blocks.L.hook_resid_post`` of each of ``layers``: ``method`` "mean_diff" (CAA)
        or "pca" (repeng's, pairs), each prompt's ``position`` "last" or "mean" over
        ``positions``. With ``register`` (admin: sent with ``admin_token``) the server
        loads it as a runtime vector named ``name``. ``trained_json`` turns the answer
        into ``{"name", "vectors", "stats"}``."""
        req = pb.TrainVectorRequest(
            name=name, positive=[_prompt(p) for p in positive],
            negative=[_prompt(p) for p in negative], layers=[int(x) for x in layers],
            method=pb.VectorMethod.Value(f"VECTOR_METHOD_{method.upper()}"),
            position=pb.TrainPosition.Value(f"TRAIN_POSITION_{position.upper()}"),
            normalize=normalize, register=register, metadata=dict(metadata or {}))
        if positions is not None:
            req.positions.CopyFrom(positions)
        return self.stub.TrainVector(req, timeout=self.timeout,
                                     metadata=self.admin_metadata if register else self.metadata)

    def unload_vector(self, name: str) -> pb.VectorInfo:
        """Unload a runtime-loaded vector (admin): new requests may no longer name it;
        running ones keep it to their end."""
        return self.stub.UnloadVector(pb.UnloadVectorRequest(name=name), timeout=self.timeout,
                                      metadata=self.admin_metadata).vector

    def health(self, service: str = "") -> str:
        """``SERVING``, ``NOT_SERVING``, ... for ``service`` ("" = the whole server)."""
        stub = health_pb2_grpc.HealthStub(self.channel)
        resp = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=self.timeout)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)


def trained_json(r: pb.TrainVectorResponse) -> dict:
    """A ``TrainVector`` answer as ``POST /v1/vectors/train`` shapes it: ``{"name",
    "vectors": {"<layer>": [floats]}, "stats": {"<layer>": {...}}, "vector"}`` (a NaN
    held-out accuracy, when nothing was held out, is None)."""
    import math

    return {
        "name": r.name,
        "vectors": {str(lv.layer): list(lv.values) for lv in r.layers},
        "stats": {str(s.layer): {"mean_positive": s.mean_positive,
                                 "mean_negative": s.mean_negative, "accuracy": s.accuracy,
                                 "held_out_accuracy": (s.held_out_accuracy
                                                       if math.isfinite(s.held_out_accuracy)
                                                       else None),
                                 "held_out": s.held_out} for s in r.stats},
        "vector": ({"name": r.vector.name, "layers": list(r.vector.layers),
                    "runtime": r.vector.runtime, "metadata": dict(r.vector.metadata)}
                   if r.HasField("vector") else None),
    }


def _pem(x: bytes | str | None) -> bytes | None:
    if x is None or isinstance(x, bytes):
        return x
    with open(x, "rb") as fh:
        return fh.read()


def _prompt(prompt: PromptLike) -> pb.Prompt:
    if isinstance(prompt, str):
        return pb.Prompt(text=prompt)
    items = list(prompt)
    if items and not isinstance(items[0], int):
        msgs = [pb.ChatMessage(role=m["role"], content=m["content"]) if isinstance(m, Mapping)
                else pb.ChatMessage(role=m[0], content=m[1]) for m in items]
        return pb.Prompt(messages=pb.ChatMessages(messages=msgs))
    return pb.Prompt(token_ids=pb.TokenIds(ids=items))


def collect(stream: Iterator[pb.GenerateResponse]) -> GenerationResult:
    out = GenerationResult()
    acts: list[pb.Activations] = []
    for msg in stream:
        acts.extend(msg.activations)
        out.request_id = msg.request_id
        out.text += msg.text
        out.token_ids.extend(msg.token_ids)
        out.features.extend(msg.features)
        out.logprobs.extend(msg.logprobs)
        out.prompt_logprobs.extend(msg.prompt_logprobs)
        if msg.prompt_token_ids:
            out.prompt_token_ids = list(msg.prompt_token_ids)
        if msg.finish_reason:
            out.finish_reason = FINISH_NAMES[msg.finish_reason]
            out.usage = msg.usage
        if msg.HasField("guardrail"):
            out.guardrail = msg.guardrail
    out.activations, out.activation_positions = activations_of(acts)
    out.activations_before, out.activation_positions_before = activations_of(acts, True)
    return out
