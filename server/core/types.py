"""The core's request and response types: what a front door hands in and gets back.

Each door maps its wire format to these and back (``server.grpc.convert``,
``server.http.bodies`` / ``server.http.shape``); nothing here knows protobuf or JSON.
Requests are typed but not yet checked against the server (SAE ids, caps, vocabulary): the
core does that (``server.core.validate``), naming fields by the API's paths
(``steering.v1``: ``sampling.max_tokens``, ``interventions[2].feature``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import IntEnum

import numpy as np

from sae_runtime.saes.base import Site
from sae_runtime.spec.activations import ActDtype, ActivationRead, ActPool
from sae_runtime.spec.guardrails import Guardrail
from sae_runtime.spec.interventions import Intervention
from sae_runtime.spec.reads import Read
from sae_runtime.spec.selectors import Selector

# ---------------------------------------------------------------------------- requests


@dataclass(frozen=True)
class Prompt:
    """Exactly one of ``text``, ``ids`` or ``messages`` is set."""

    text: str | None = None
    ids: tuple[int, ...] | None = None
    messages: tuple[tuple[str, str], ...] | None = None  # (role, content), oldest first

    @property
    def kind(self) -> str:
        return "messages" if self.messages is not None else "ids" if self.ids is not None else "text"


@dataclass(frozen=True)
class NamedVector:
    """A loaded steering vector by name (``GenerateRequest.vectors``)."""

    name: str
    strength: float
    layers: tuple[int, ...] = ()  # () = every layer it has
    positions: Selector | None = None


@dataclass(frozen=True)
class InlineVector:
    """A request's own vector at one layer (``GenerateRequest.inline_vectors``)."""

    values: np.ndarray  # [d_model] float32
    layer: int
    strength: float = 1.0
    positions: Selector | None = None


@dataclass(frozen=True)
class GenerateRequest:
    """One generation as a door received it. ``None`` means unset: the core's default."""

    prompt: Prompt | None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    interventions: tuple[Intervention, ...] = ()
    reads: tuple[Read, ...] = ()
    abort_when: tuple[Guardrail, ...] = ()
    vectors: tuple[NamedVector, ...] = ()
    inline_vectors: tuple[InlineVector, ...] = ()
    request_id: str = ""
    activation_reads: tuple[ActivationRead, ...] = ()
    fit_max_tokens: bool = False
    """Unset ``max_tokens`` means whatever the context (and --max-new-tokens) allows, as in
    OpenAI's chat API; else ``DEFAULT_MAX_TOKENS``."""


@dataclass(frozen=True)
class EncodeRequest:
    inputs: tuple[Prompt | None, ...]
    reads: tuple[Read, ...]
    activation_reads: tuple[ActivationRead, ...] = ()


@dataclass(frozen=True)
class Caller:
    """Who sends a request, as the door's auth established it. ``tenant`` is a digest of
    the caller's bearer token (None without auth): the prefix cache is salted by it."""

    tenant: str | None = None


ANONYMOUS = Caller()

# ---------------------------------------------------------------------------- responses


class FinishReason(IntEnum):
    """Why a generation ended; the numbers match ``steering.v1.FinishReason``."""

    LENGTH = 1
    STOP = 2
    ABORT = 3
    FEATURE = 4  # a guardrail tripped (``Chunk.guardrail`` says which)


@dataclass(slots=True)
class Logprob:
    token_id: int
    logprob: float
    rank: int
    token: str


@dataclass(slots=True)
class PositionLogprobs:
    chosen: Logprob
    top: list[Logprob]


@dataclass(slots=True)
class FeatureActivations:
    """One position's read of one SAE: top-k ``indices``/``values`` (value-descending) and
    the watch list's ``watch_values``."""

    position: int
    token_id: int
    sae: str
    indices: np.ndarray  # [k] int32
    values: np.ndarray  # [k] float32
    watch_values: np.ndarray  # [w] float32

    def nbytes(self) -> int:
        """About its encoded size (``Chunk.nbytes``)."""
        return 24 + len(self.sae) + 9 * len(self.indices) + 4 * len(self.watch_values)


@dataclass(slots=True)
class ActivationRows:
    """Rows of one activation read: ``values [len(positions), d]`` float32 per position, or
    ``[1, d]`` pooled over ``positions``; the doors pack them as ``dtype``."""

    hook: str
    positions: list[int]
    values: np.ndarray  # float32 [rows, d]
    pool: ActPool = ActPool.NONE
    dtype: ActDtype = ActDtype.FLOAT32
    before_edits: bool = False  # the read's ``before_edits``

    def nbytes(self) -> int:
        """About its encoded size (``Chunk.nbytes``)."""
        return 18 + len(self.hook) + 5 * len(self.positions) + self.values.size * self.dtype.itemsize


@dataclass(slots=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_prompt_tokens: int = 0


@dataclass(slots=True)
class GuardrailTrip:
    guardrail: int  # index in the request's abort_when
    sae: str
    feature: int
    position: int
    value: float


@dataclass(slots=True)
class Chunk:
    """One message of a generation stream: the tokens and text since the last one, reads
    of positions not reported before; the first carries the prompt's ids, the last the
    finish reason and usage."""

    request_id: str
    token_ids: list[int]
    text: str
    first_position: int
    # empty tuples when absent (most chunks): no list allocated per chunk
    prompt_token_ids: Sequence[int] = ()
    logprobs: Sequence[PositionLogprobs] = ()
    prompt_logprobs: Sequence[PositionLogprobs] = ()
    features: Sequence[FeatureActivations] = ()
    finish_reason: FinishReason | None = None
    guardrail: GuardrailTrip | None = None
    usage: Usage | None = None
    activations: Sequence[ActivationRows] = ()

    def nbytes(self) -> int:
        """About the bytes this message takes on the wire (protobuf's encoding; JSON is
        larger by a constant factor): what the stream buffer cap counts."""
        n = 16 + len(self.request_id) + 5 * (len(self.token_ids) + len(self.prompt_token_ids))
        n += len(self.text.encode()) if not self.text.isascii() else len(self.text)
        n += sum(f.nbytes() for f in self.features)
        n += sum(a.nbytes() for a in self.activations)
        for lps in (self.logprobs, self.prompt_logprobs):
            for e in lps:
                n += 28 + len(e.chosen.token) + sum(24 + len(t.token) for t in e.top)
        return n


def merge_chunks(chunks: list[Chunk]) -> Chunk:
    """Consecutive messages of one stream as one: lists and text concatenate,
    ``first_position`` and the prompt's ids are the first one's, the last one's finish
    reason, guardrail and usage win."""
    first = chunks[0]
    out = Chunk(first.request_id, [t for c in chunks for t in c.token_ids],
                "".join(c.text for c in chunks), first.first_position, first.prompt_token_ids,
                [e for c in chunks for e in c.logprobs],
                [e for c in chunks for e in c.prompt_logprobs],
                [f for c in chunks for f in c.features],
                activations=[a for c in chunks for a in c.activations])
    for c in chunks:
        if c.finish_reason is not None:
            out.finish_reason, out.guardrail, out.usage = c.finish_reason, c.guardrail, c.usage
    return out


@dataclass(slots=True)
class PooledFeature:
    index: int
    max: float
    mean: float


@dataclass(slots=True)
class PooledActivations:
    sae: str
    features: list[PooledFeature]


@dataclass(slots=True)
class EncodeResult:
    token_ids: list[int]
    features: list[FeatureActivations]
    pooled: list[PooledActivations]
    activations: list[ActivationRows] = field(default_factory=list)  # one per activation read


@dataclass(frozen=True)
class SAEInfo:
    """A loaded SAE as ``ListSAEs`` describes it (``input_site``: a transcoder's, else None)."""

    id: str
    format: str
    architecture: str
    hook_name: str
    site: Site
    layer: int
    d_sae: int
    d_in: int
    dtype: str
    model_name: str
    k: int
    input_site: Site | None
    hook_name_out: str
    labelled: bool
    # a cross-layer transcoder: the block of each layer (slot), and its features per layer;
    # its features are the flat ids ``slot * features_per_layer + index`` (d_sae in all)
    layers: tuple[int, ...] = ()
    features_per_layer: int = 0


@dataclass(frozen=True)
class VectorInfo:
    """A steering vector requests may name: a startup one (``--vector``) or one loaded at
    run time (``runtime``, with the metadata it was loaded with)."""

    name: str
    layers: tuple[int, ...]
    runtime: bool = False
    metadata: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class LoadVectorRequest:
    """``LoadVector``: a name and either per-layer values or a vector file's bytes.

    ``values``: ``(layer, float32 [d_model])`` pairs (field ``layers[j]``); ``file``: a
    GGUF or safetensors file (``file_format``: "gguf" / "safetensors"); ``metadata``: free
    text kept with the vector and shown by ``ListVectors`` (a described GGUF's own metadata
    is added under its keys)."""

    name: str
    values: tuple[tuple[int, np.ndarray], ...] = ()
    file: bytes = b""
    file_format: str = ""
    metadata: tuple[tuple[str, str], ...] = ()


class TrainPosition(IntEnum):
    """Which activation of a prompt a vector is trained on; numbers match
    ``steering.v1.TrainPosition``."""

    LAST = 1  # the last (selected) position's
    MEAN = 2  # the mean over the selected positions


@dataclass(frozen=True)
class TrainVectorRequest:
    """``TrainVector``: contrastive prompts, the layers and the method
    (``sae_runtime.training.vectors_fit``); ``positions`` selects the prompt positions
    the activation is taken over (None: all); ``register`` loads the result as a runtime
    vector named ``name`` (admin only)."""

    name: str
    positive: tuple[Prompt | None, ...]
    negative: tuple[Prompt | None, ...]
    layers: tuple[int, ...]
    method: int = 1  # ``vectors_fit.Method``
    position: TrainPosition = TrainPosition.LAST
    positions: Selector | None = None
    normalize: bool = False
    register: bool = False
    metadata: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class TrainedLayer:
    """One layer of a trained vector, with its separation statistics
    (``vectors_fit.Separation``)."""

    layer: int
    values: np.ndarray  # [d_model] float32
    mean_positive: float
    mean_negative: float
    accuracy: float
    held_out_accuracy: float
    held_out: int


@dataclass(frozen=True)
class TrainVectorResult:
    name: str
    layers: tuple[TrainedLayer, ...]
    vector: VectorInfo | None = None  # with ``register``: the loaded vector


@dataclass(frozen=True)
class ModelInfo:
    """What ``GetModelInfo`` reports: the model, the engine and every cap."""

    model: str
    architecture: str
    num_layers: int
    hidden_size: int
    vocab_size: int
    max_model_len: int
    max_interventions: int
    dtype: str
    compiled: bool
    max_read_top_k: int
    max_watch: int
    max_encode_inputs: int
    max_logprobs: int
    chat_template: bool
    tensor_parallel_size: int
    pipeline_parallel_size: int
    data_parallel_size: int
    distributed_executor_backend: str
    max_guardrails: int
    vectors: tuple[VectorInfo, ...]
    inline_vector_layers: tuple[int, ...]
    max_inline_vectors: int
    runtime_vector_layers: tuple[int, ...] = ()  # blocks that take LoadVector (--runtime-vectors)
    max_runtime_vectors: int = 0  # rows per such block
    device: str = ""  # as the workers reported it at startup (``vllm.engine.runtime_info``)
    model_runner: str = ""  # "v1" or "v2"
    cudagraph_mode: str = ""  # vLLM's CUDA graph mode; "" on CPU
    activation_hooks: tuple[str, ...] = ()  # the declared activation sites
    # of those, the ones where an edit hook sits: a before-edits read differs there
    activation_hooks_with_edits: tuple[str, ...] = ()
    max_activation_reads: int = 0
    max_activation_positions: int = 0
    max_activation_bytes: int = 0
