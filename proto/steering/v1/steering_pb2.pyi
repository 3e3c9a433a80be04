from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class InterventionMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    INTERVENTION_MODE_UNSPECIFIED: _ClassVar[InterventionMode]
    INTERVENTION_MODE_CLAMP: _ClassVar[InterventionMode]
    INTERVENTION_MODE_ABLATE: _ClassVar[InterventionMode]
    INTERVENTION_MODE_SCALE: _ClassVar[InterventionMode]
    INTERVENTION_MODE_ADD: _ClassVar[InterventionMode]

class PositionFrame(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    POSITION_FRAME_UNSPECIFIED: _ClassVar[PositionFrame]
    POSITION_FRAME_ABSOLUTE: _ClassVar[PositionFrame]
    POSITION_FRAME_PROMPT: _ClassVar[PositionFrame]
    POSITION_FRAME_GENERATION: _ClassVar[PositionFrame]

class Scope(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SCOPE_UNSPECIFIED: _ClassVar[Scope]
    SCOPE_ALL: _ClassVar[Scope]
    SCOPE_GENERATION_ONLY: _ClassVar[Scope]

class Comparison(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    COMPARISON_UNSPECIFIED: _ClassVar[Comparison]
    COMPARISON_GT: _ClassVar[Comparison]
    COMPARISON_LT: _ClassVar[Comparison]

class ReadScope(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    READ_SCOPE_UNSPECIFIED: _ClassVar[ReadScope]
    READ_SCOPE_ALL: _ClassVar[ReadScope]
    READ_SCOPE_PROMPT: _ClassVar[ReadScope]
    READ_SCOPE_GENERATION: _ClassVar[ReadScope]

class FinishReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FINISH_REASON_UNSPECIFIED: _ClassVar[FinishReason]
    FINISH_REASON_LENGTH: _ClassVar[FinishReason]
    FINISH_REASON_STOP: _ClassVar[FinishReason]
    FINISH_REASON_ABORT: _ClassVar[FinishReason]
    FINISH_REASON_FEATURE: _ClassVar[FinishReason]

class HookSite(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    HOOK_SITE_UNSPECIFIED: _ClassVar[HookSite]
    HOOK_SITE_RESID_POST: _ClassVar[HookSite]
    HOOK_SITE_RESID_PRE: _ClassVar[HookSite]
    HOOK_SITE_ATTN_OUT: _ClassVar[HookSite]
    HOOK_SITE_MLP_OUT: _ClassVar[HookSite]
    HOOK_SITE_Z: _ClassVar[HookSite]
    HOOK_SITE_MLP_IN: _ClassVar[HookSite]

class ActivationPool(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ACTIVATION_POOL_UNSPECIFIED: _ClassVar[ActivationPool]
    ACTIVATION_POOL_NONE: _ClassVar[ActivationPool]
    ACTIVATION_POOL_MEAN: _ClassVar[ActivationPool]
    ACTIVATION_POOL_MAX: _ClassVar[ActivationPool]
    ACTIVATION_POOL_LAST: _ClassVar[ActivationPool]

class ActivationDtype(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ACTIVATION_DTYPE_UNSPECIFIED: _ClassVar[ActivationDtype]
    ACTIVATION_DTYPE_FLOAT32: _ClassVar[ActivationDtype]
    ACTIVATION_DTYPE_FLOAT16: _ClassVar[ActivationDtype]
    ACTIVATION_DTYPE_BFLOAT16: _ClassVar[ActivationDtype]

class VectorMethod(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    VECTOR_METHOD_UNSPECIFIED: _ClassVar[VectorMethod]
    VECTOR_METHOD_MEAN_DIFF: _ClassVar[VectorMethod]
    VECTOR_METHOD_PCA: _ClassVar[VectorMethod]

class TrainPosition(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TRAIN_POSITION_UNSPECIFIED: _ClassVar[TrainPosition]
    TRAIN_POSITION_LAST: _ClassVar[TrainPosition]
    TRAIN_POSITION_MEAN: _ClassVar[TrainPosition]
INTERVENTION_MODE_UNSPECIFIED: InterventionMode
INTERVENTION_MODE_CLAMP: InterventionMode
INTERVENTION_MODE_ABLATE: InterventionMode
INTERVENTION_MODE_SCALE: InterventionMode
INTERVENTION_MODE_ADD: InterventionMode
POSITION_FRAME_UNSPECIFIED: PositionFrame
POSITION_FRAME_ABSOLUTE: PositionFrame
POSITION_FRAME_PROMPT: PositionFrame
POSITION_FRAME_GENERATION: PositionFrame
SCOPE_UNSPECIFIED: Scope
SCOPE_ALL: Scope
SCOPE_GENERATION_ONLY: Scope
COMPARISON_UNSPECIFIED: Comparison
COMPARISON_GT: Comparison
COMPARISON_LT: Comparison
READ_SCOPE_UNSPECIFIED: ReadScope
READ_SCOPE_ALL: ReadScope
READ_SCOPE_PROMPT: ReadScope
READ_SCOPE_GENERATION: ReadScope
FINISH_REASON_UNSPECIFIED: FinishReason
FINISH_REASON_LENGTH: FinishReason
FINISH_REASON_STOP: FinishReason
FINISH_REASON_ABORT: FinishReason
FINISH_REASON_FEATURE: FinishReason
HOOK_SITE_UNSPECIFIED: HookSite
HOOK_SITE_RESID_POST: HookSite
HOOK_SITE_RESID_PRE: HookSite
HOOK_SITE_ATTN_OUT: HookSite
HOOK_SITE_MLP_OUT: HookSite
HOOK_SITE_Z: HookSite
HOOK_SITE_MLP_IN: HookSite
ACTIVATION_POOL_UNSPECIFIED: ActivationPool
ACTIVATION_POOL_NONE: ActivationPool
ACTIVATION_POOL_MEAN: ActivationPool
ACTIVATION_POOL_MAX: ActivationPool
ACTIVATION_POOL_LAST: ActivationPool
ACTIVATION_DTYPE_UNSPECIFIED: ActivationDtype
ACTIVATION_DTYPE_FLOAT32: ActivationDtype
ACTIVATION_DTYPE_FLOAT16: ActivationDtype
ACTIVATION_DTYPE_BFLOAT16: ActivationDtype
VECTOR_METHOD_UNSPECIFIED: VectorMethod
VECTOR_METHOD_MEAN_DIFF: VectorMethod
VECTOR_METHOD_PCA: VectorMethod
TRAIN_POSITION_UNSPECIFIED: TrainPosition
TRAIN_POSITION_LAST: TrainPosition
TRAIN_POSITION_MEAN: TrainPosition

class Prompt(_message.Message):
    __slots__ = ("text", "token_ids", "messages")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    text: str
    token_ids: TokenIds
    messages: ChatMessages
    def __init__(self, text: _Optional[str] = ..., token_ids: _Optional[_Union[TokenIds, _Mapping]] = ..., messages: _Optional[_Union[ChatMessages, _Mapping]] = ...) -> None: ...

class ChatMessages(_message.Message):
    __slots__ = ("messages",)
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    messages: _containers.RepeatedCompositeFieldContainer[ChatMessage]
    def __init__(self, messages: _Optional[_Iterable[_Union[ChatMessage, _Mapping]]] = ...) -> None: ...

class ChatMessage(_message.Message):
    __slots__ = ("role", "content")
    ROLE_FIELD_NUMBER: _ClassVar[int]
    CONTENT_FIELD_NUMBER: _ClassVar[int]
    role: str
    content: str
    def __init__(self, role: _Optional[str] = ..., content: _Optional[str] = ...) -> None: ...

class TokenIds(_message.Message):
    __slots__ = ("ids",)
    IDS_FIELD_NUMBER: _ClassVar[int]
    ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, ids: _Optional[_Iterable[int]] = ...) -> None: ...

class SamplingParams(_message.Message):
    __slots__ = ("max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "stop_token_ids", "ignore_eos", "logprobs", "prompt_logprobs")
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    STOP_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    IGNORE_EOS_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    max_tokens: int
    temperature: float
    top_p: float
    top_k: int
    seed: int
    stop: _containers.RepeatedScalarFieldContainer[str]
    stop_token_ids: _containers.RepeatedScalarFieldContainer[int]
    ignore_eos: bool
    logprobs: int
    prompt_logprobs: int
    def __init__(self, max_tokens: _Optional[int] = ..., temperature: _Optional[float] = ..., top_p: _Optional[float] = ..., top_k: _Optional[int] = ..., seed: _Optional[int] = ..., stop: _Optional[_Iterable[str]] = ..., stop_token_ids: _Optional[_Iterable[int]] = ..., ignore_eos: _Optional[bool] = ..., logprobs: _Optional[int] = ..., prompt_logprobs: _Optional[int] = ...) -> None: ...

class PositionRange(_message.Message):
    __slots__ = ("frame", "start", "end")
    FRAME_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    frame: PositionFrame
    start: int
    end: int
    def __init__(self, frame: _Optional[_Union[PositionFrame, str]] = ..., start: _Optional[int] = ..., end: _Optional[int] = ...) -> None: ...

class PositionSelector(_message.Message):
    __slots__ = ("ranges", "exclude_ranges", "token_ids", "exclude_token_ids")
    RANGES_FIELD_NUMBER: _ClassVar[int]
    EXCLUDE_RANGES_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    EXCLUDE_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    ranges: _containers.RepeatedCompositeFieldContainer[PositionRange]
    exclude_ranges: bool
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    exclude_token_ids: bool
    def __init__(self, ranges: _Optional[_Iterable[_Union[PositionRange, _Mapping]]] = ..., exclude_ranges: _Optional[bool] = ..., token_ids: _Optional[_Iterable[int]] = ..., exclude_token_ids: _Optional[bool] = ...) -> None: ...

class Intervention(_message.Message):
    __slots__ = ("sae", "feature", "mode", "value", "scope", "positions", "when", "latch")
    SAE_FIELD_NUMBER: _ClassVar[int]
    FEATURE_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    SCOPE_FIELD_NUMBER: _ClassVar[int]
    POSITIONS_FIELD_NUMBER: _ClassVar[int]
    WHEN_FIELD_NUMBER: _ClassVar[int]
    LATCH_FIELD_NUMBER: _ClassVar[int]
    sae: str
    feature: int
    mode: InterventionMode
    value: float
    scope: Scope
    positions: PositionSelector
    when: FeatureCondition
    latch: bool
    def __init__(self, sae: _Optional[str] = ..., feature: _Optional[int] = ..., mode: _Optional[_Union[InterventionMode, str]] = ..., value: _Optional[float] = ..., scope: _Optional[_Union[Scope, str]] = ..., positions: _Optional[_Union[PositionSelector, _Mapping]] = ..., when: _Optional[_Union[FeatureCondition, _Mapping]] = ..., latch: _Optional[bool] = ...) -> None: ...

class FeatureCondition(_message.Message):
    __slots__ = ("sae", "feature", "op", "threshold")
    SAE_FIELD_NUMBER: _ClassVar[int]
    FEATURE_FIELD_NUMBER: _ClassVar[int]
    OP_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    sae: str
    feature: int
    op: Comparison
    threshold: float
    def __init__(self, sae: _Optional[str] = ..., feature: _Optional[int] = ..., op: _Optional[_Union[Comparison, str]] = ..., threshold: _Optional[float] = ...) -> None: ...

class Guardrail(_message.Message):
    __slots__ = ("condition", "positions")
    CONDITION_FIELD_NUMBER: _ClassVar[int]
    POSITIONS_FIELD_NUMBER: _ClassVar[int]
    condition: FeatureCondition
    positions: PositionSelector
    def __init__(self, condition: _Optional[_Union[FeatureCondition, _Mapping]] = ..., positions: _Optional[_Union[PositionSelector, _Mapping]] = ...) -> None: ...

class VectorSteer(_message.Message):
    __slots__ = ("name", "strength", "layers", "positions")
    NAME_FIELD_NUMBER: _ClassVar[int]
    STRENGTH_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    POSITIONS_FIELD_NUMBER: _ClassVar[int]
    name: str
    strength: float
    layers: _containers.RepeatedScalarFieldContainer[int]
    positions: PositionSelector
    def __init__(self, name: _Optional[str] = ..., strength: _Optional[float] = ..., layers: _Optional[_Iterable[int]] = ..., positions: _Optional[_Union[PositionSelector, _Mapping]] = ...) -> None: ...

class InlineVector(_message.Message):
    __slots__ = ("values", "layer", "strength", "positions")
    VALUES_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    STRENGTH_FIELD_NUMBER: _ClassVar[int]
    POSITIONS_FIELD_NUMBER: _ClassVar[int]
    values: _containers.RepeatedScalarFieldContainer[float]
    layer: int
    strength: float
    positions: PositionSelector
    def __init__(self, values: _Optional[_Iterable[float]] = ..., layer: _Optional[int] = ..., strength: _Optional[float] = ..., positions: _Optional[_Union[PositionSelector, _Mapping]] = ...) -> None: ...

class VectorInfo(_message.Message):
    __slots__ = ("name", "layers", "runtime", "metadata")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    RUNTIME_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    name: str
    layers: _containers.RepeatedScalarFieldContainer[int]
    runtime: bool
    metadata: _containers.ScalarMap[str, str]
    def __init__(self, name: _Optional[str] = ..., layers: _Optional[_Iterable[int]] = ..., runtime: _Optional[bool] = ..., metadata: _Optional[_Mapping[str, str]] = ...) -> None: ...

class GuardrailTrip(_message.Message):
    __slots__ = ("guardrail", "sae", "feature", "position", "value")
    GUARDRAIL_FIELD_NUMBER: _ClassVar[int]
    SAE_FIELD_NUMBER: _ClassVar[int]
    FEATURE_FIELD_NUMBER: _ClassVar[int]
    POSITION_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    guardrail: int
    sae: str
    feature: int
    position: int
    value: float
    def __init__(self, guardrail: _Optional[int] = ..., sae: _Optional[str] = ..., feature: _Optional[int] = ..., position: _Optional[int] = ..., value: _Optional[float] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("prompt", "sampling", "interventions", "request_id", "reads", "abort_when", "vectors", "inline_vectors", "activation_reads")
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    INTERVENTIONS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    READS_FIELD_NUMBER: _ClassVar[int]
    ABORT_WHEN_FIELD_NUMBER: _ClassVar[int]
    VECTORS_FIELD_NUMBER: _ClassVar[int]
    INLINE_VECTORS_FIELD_NUMBER: _ClassVar[int]
    ACTIVATION_READS_FIELD_NUMBER: _ClassVar[int]
    prompt: Prompt
    sampling: SamplingParams
    interventions: _containers.RepeatedCompositeFieldContainer[Intervention]
    request_id: str
    reads: _containers.RepeatedCompositeFieldContainer[FeatureRead]
    abort_when: _containers.RepeatedCompositeFieldContainer[Guardrail]
    vectors: _containers.RepeatedCompositeFieldContainer[VectorSteer]
    inline_vectors: _containers.RepeatedCompositeFieldContainer[InlineVector]
    activation_reads: _containers.RepeatedCompositeFieldContainer[ActivationRead]
    def __init__(self, prompt: _Optional[_Union[Prompt, _Mapping]] = ..., sampling: _Optional[_Union[SamplingParams, _Mapping]] = ..., interventions: _Optional[_Iterable[_Union[Intervention, _Mapping]]] = ..., request_id: _Optional[str] = ..., reads: _Optional[_Iterable[_Union[FeatureRead, _Mapping]]] = ..., abort_when: _Optional[_Iterable[_Union[Guardrail, _Mapping]]] = ..., vectors: _Optional[_Iterable[_Union[VectorSteer, _Mapping]]] = ..., inline_vectors: _Optional[_Iterable[_Union[InlineVector, _Mapping]]] = ..., activation_reads: _Optional[_Iterable[_Union[ActivationRead, _Mapping]]] = ...) -> None: ...

class FeatureRead(_message.Message):
    __slots__ = ("sae", "top_k", "watch", "scope", "positions")
    SAE_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    WATCH_FIELD_NUMBER: _ClassVar[int]
    SCOPE_FIELD_NUMBER: _ClassVar[int]
    POSITIONS_FIELD_NUMBER: _ClassVar[int]
    sae: str
    top_k: int
    watch: _containers.RepeatedScalarFieldContainer[int]
    scope: ReadScope
    positions: PositionSelector
    def __init__(self, sae: _Optional[str] = ..., top_k: _Optional[int] = ..., watch: _Optional[_Iterable[int]] = ..., scope: _Optional[_Union[ReadScope, str]] = ..., positions: _Optional[_Union[PositionSelector, _Mapping]] = ...) -> None: ...

class FeatureActivations(_message.Message):
    __slots__ = ("position", "token_id", "sae", "indices", "values", "watch_values")
    POSITION_FIELD_NUMBER: _ClassVar[int]
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    SAE_FIELD_NUMBER: _ClassVar[int]
    INDICES_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    WATCH_VALUES_FIELD_NUMBER: _ClassVar[int]
    position: int
    token_id: int
    sae: str
    indices: _containers.RepeatedScalarFieldContainer[int]
    values: _containers.RepeatedScalarFieldContainer[float]
    watch_values: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, position: _Optional[int] = ..., token_id: _Optional[int] = ..., sae: _Optional[str] = ..., indices: _Optional[_Iterable[int]] = ..., values: _Optional[_Iterable[float]] = ..., watch_values: _Optional[_Iterable[float]] = ...) -> None: ...

class Usage(_message.Message):
    __slots__ = ("prompt_tokens", "completion_tokens", "cached_prompt_tokens")
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CACHED_PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    prompt_tokens: int
    completion_tokens: int
    cached_prompt_tokens: int
    def __init__(self, prompt_tokens: _Optional[int] = ..., completion_tokens: _Optional[int] = ..., cached_prompt_tokens: _Optional[int] = ...) -> None: ...

class Logprob(_message.Message):
    __slots__ = ("token_id", "logprob", "rank", "token")
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    LOGPROB_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    token_id: int
    logprob: float
    rank: int
    token: str
    def __init__(self, token_id: _Optional[int] = ..., logprob: _Optional[float] = ..., rank: _Optional[int] = ..., token: _Optional[str] = ...) -> None: ...

class PositionLogprobs(_message.Message):
    __slots__ = ("chosen", "top")
    CHOSEN_FIELD_NUMBER: _ClassVar[int]
    TOP_FIELD_NUMBER: _ClassVar[int]
    chosen: Logprob
    top: _containers.RepeatedCompositeFieldContainer[Logprob]
    def __init__(self, chosen: _Optional[_Union[Logprob, _Mapping]] = ..., top: _Optional[_Iterable[_Union[Logprob, _Mapping]]] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("request_id", "token_ids", "text", "first_position", "finish_reason", "usage", "prompt_token_ids", "features", "logprobs", "prompt_logprobs", "guardrail", "activations")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    FIRST_POSITION_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    GUARDRAIL_FIELD_NUMBER: _ClassVar[int]
    ACTIVATIONS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    text: str
    first_position: int
    finish_reason: FinishReason
    usage: Usage
    prompt_token_ids: _containers.RepeatedScalarFieldContainer[int]
    features: _containers.RepeatedCompositeFieldContainer[FeatureActivations]
    logprobs: _containers.RepeatedCompositeFieldContainer[PositionLogprobs]
    prompt_logprobs: _containers.RepeatedCompositeFieldContainer[PositionLogprobs]
    guardrail: GuardrailTrip
    activations: _containers.RepeatedCompositeFieldContainer[Activations]
    def __init__(self, request_id: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., text: _Optional[str] = ..., first_position: _Optional[int] = ..., finish_reason: _Optional[_Union[FinishReason, str]] = ..., usage: _Optional[_Union[Usage, _Mapping]] = ..., prompt_token_ids: _Optional[_Iterable[int]] = ..., features: _Optional[_Iterable[_Union[FeatureActivations, _Mapping]]] = ..., logprobs: _Optional[_Iterable[_Union[PositionLogprobs, _Mapping]]] = ..., prompt_logprobs: _Optional[_Iterable[_Union[PositionLogprobs, _Mapping]]] = ..., guardrail: _Optional[_Union[GuardrailTrip, _Mapping]] = ..., activations: _Optional[_Iterable[_Union[Activations, _Mapping]]] = ...) -> None: ...

class EncodeRequest(_message.Message):
    __slots__ = ("inputs", "reads", "activation_reads")
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    READS_FIELD_NUMBER: _ClassVar[int]
    ACTIVATION_READS_FIELD_NUMBER: _ClassVar[int]
    inputs: _containers.RepeatedCompositeFieldContainer[Prompt]
    reads: _containers.RepeatedCompositeFieldContainer[FeatureRead]
    activation_reads: _containers.RepeatedCompositeFieldContainer[ActivationRead]
    def __init__(self, inputs: _Optional[_Iterable[_Union[Prompt, _Mapping]]] = ..., reads: _Optional[_Iterable[_Union[FeatureRead, _Mapping]]] = ..., activation_reads: _Optional[_Iterable[_Union[ActivationRead, _Mapping]]] = ...) -> None: ...

class PooledFeature(_message.Message):
    __slots__ = ("index", "max", "mean")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    MAX_FIELD_NUMBER: _ClassVar[int]
    MEAN_FIELD_NUMBER: _ClassVar[int]
    index: int
    max: float
    mean: float
    def __init__(self, index: _Optional[int] = ..., max: _Optional[float] = ..., mean: _Optional[float] = ...) -> None: ...

class PooledActivations(_message.Message):
    __slots__ = ("sae", "features")
    SAE_FIELD_NUMBER: _ClassVar[int]
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    sae: str
    features: _containers.RepeatedCompositeFieldContainer[PooledFeature]
    def __init__(self, sae: _Optional[str] = ..., features: _Optional[_Iterable[_Union[PooledFeature, _Mapping]]] = ...) -> None: ...

class EncodeResult(_message.Message):
    __slots__ = ("token_ids", "features", "pooled", "activations")
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    POOLED_FIELD_NUMBER: _ClassVar[int]
    ACTIVATIONS_FIELD_NUMBER: _ClassVar[int]
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    features: _containers.RepeatedCompositeFieldContainer[FeatureActivations]
    pooled: _containers.RepeatedCompositeFieldContainer[PooledActivations]
    activations: _containers.RepeatedCompositeFieldContainer[Activations]
    def __init__(self, token_ids: _Optional[_Iterable[int]] = ..., features: _Optional[_Iterable[_Union[FeatureActivations, _Mapping]]] = ..., pooled: _Optional[_Iterable[_Union[PooledActivations, _Mapping]]] = ..., activations: _Optional[_Iterable[_Union[Activations, _Mapping]]] = ...) -> None: ...

class EncodeResponse(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[EncodeResult]
    def __init__(self, results: _Optional[_Iterable[_Union[EncodeResult, _Mapping]]] = ...) -> None: ...

class ListSAEsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class SAEInfo(_message.Message):
    __slots__ = ("id", "format", "architecture", "hook_name", "site", "layer", "d_sae", "d_in", "dtype", "model_name", "k", "input_site", "hook_name_out", "layers", "features_per_layer")
    ID_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    ARCHITECTURE_FIELD_NUMBER: _ClassVar[int]
    HOOK_NAME_FIELD_NUMBER: _ClassVar[int]
    SITE_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    D_SAE_FIELD_NUMBER: _ClassVar[int]
    D_IN_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    INPUT_SITE_FIELD_NUMBER: _ClassVar[int]
    HOOK_NAME_OUT_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    FEATURES_PER_LAYER_FIELD_NUMBER: _ClassVar[int]
    id: str
    format: str
    architecture: str
    hook_name: str
    site: HookSite
    layer: int
    d_sae: int
    d_in: int
    dtype: str
    model_name: str
    k: int
    input_site: HookSite
    hook_name_out: str
    layers: _containers.RepeatedScalarFieldContainer[int]
    features_per_layer: int
    def __init__(self, id: _Optional[str] = ..., format: _Optional[str] = ..., architecture: _Optional[str] = ..., hook_name: _Optional[str] = ..., site: _Optional[_Union[HookSite, str]] = ..., layer: _Optional[int] = ..., d_sae: _Optional[int] = ..., d_in: _Optional[int] = ..., dtype: _Optional[str] = ..., model_name: _Optional[str] = ..., k: _Optional[int] = ..., input_site: _Optional[_Union[HookSite, str]] = ..., hook_name_out: _Optional[str] = ..., layers: _Optional[_Iterable[int]] = ..., features_per_layer: _Optional[int] = ...) -> None: ...

class ListSAEsResponse(_message.Message):
    __slots__ = ("saes",)
    SAES_FIELD_NUMBER: _ClassVar[int]
    saes: _containers.RepeatedCompositeFieldContainer[SAEInfo]
    def __init__(self, saes: _Optional[_Iterable[_Union[SAEInfo, _Mapping]]] = ...) -> None: ...

class GetModelInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetModelInfoResponse(_message.Message):
    __slots__ = ("model", "architecture", "num_layers", "hidden_size", "vocab_size", "max_model_len", "max_interventions", "dtype", "compiled", "max_read_top_k", "max_watch", "max_encode_inputs", "max_logprobs", "chat_template", "tensor_parallel_size", "pipeline_parallel_size", "data_parallel_size", "distributed_executor_backend", "max_guardrails", "vectors", "inline_vector_layers", "max_inline_vectors", "device", "model_runner", "cudagraph_mode", "activation_hooks", "max_activation_reads", "max_activation_positions", "max_activation_bytes", "activation_hooks_with_edits", "runtime_vector_layers", "max_runtime_vectors")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    ARCHITECTURE_FIELD_NUMBER: _ClassVar[int]
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_SIZE_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_MODEL_LEN_FIELD_NUMBER: _ClassVar[int]
    MAX_INTERVENTIONS_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    COMPILED_FIELD_NUMBER: _ClassVar[int]
    MAX_READ_TOP_K_FIELD_NUMBER: _ClassVar[int]
    MAX_WATCH_FIELD_NUMBER: _ClassVar[int]
    MAX_ENCODE_INPUTS_FIELD_NUMBER: _ClassVar[int]
    MAX_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    CHAT_TEMPLATE_FIELD_NUMBER: _ClassVar[int]
    TENSOR_PARALLEL_SIZE_FIELD_NUMBER: _ClassVar[int]
    PIPELINE_PARALLEL_SIZE_FIELD_NUMBER: _ClassVar[int]
    DATA_PARALLEL_SIZE_FIELD_NUMBER: _ClassVar[int]
    DISTRIBUTED_EXECUTOR_BACKEND_FIELD_NUMBER: _ClassVar[int]
    MAX_GUARDRAILS_FIELD_NUMBER: _ClassVar[int]
    VECTORS_FIELD_NUMBER: _ClassVar[int]
    INLINE_VECTOR_LAYERS_FIELD_NUMBER: _ClassVar[int]
    MAX_INLINE_VECTORS_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    MODEL_RUNNER_FIELD_NUMBER: _ClassVar[int]
    CUDAGRAPH_MODE_FIELD_NUMBER: _ClassVar[int]
    ACTIVATION_HOOKS_FIELD_NUMBER: _ClassVar[int]
    MAX_ACTIVATION_READS_FIELD_NUMBER: _ClassVar[int]
    MAX_ACTIVATION_POSITIONS_FIELD_NUMBER: _ClassVar[int]
    MAX_ACTIVATION_BYTES_FIELD_NUMBER: _ClassVar[int]
    ACTIVATION_HOOKS_WITH_EDITS_FIELD_NUMBER: _ClassVar[int]
    RUNTIME_VECTOR_LAYERS_FIELD_NUMBER: _ClassVar[int]
    MAX_RUNTIME_VECTORS_FIELD_NUMBER: _ClassVar[int]
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
    vectors: _containers.RepeatedCompositeFieldContainer[VectorInfo]
    inline_vector_layers: _containers.RepeatedScalarFieldContainer[int]
    max_inline_vectors: int
    device: str
    model_runner: str
    cudagraph_mode: str
    activation_hooks: _containers.RepeatedScalarFieldContainer[str]
    max_activation_reads: int
    max_activation_positions: int
    max_activation_bytes: int
    activation_hooks_with_edits: _containers.RepeatedScalarFieldContainer[str]
    runtime_vector_layers: _containers.RepeatedScalarFieldContainer[int]
    max_runtime_vectors: int
    def __init__(self, model: _Optional[str] = ..., architecture: _Optional[str] = ..., num_layers: _Optional[int] = ..., hidden_size: _Optional[int] = ..., vocab_size: _Optional[int] = ..., max_model_len: _Optional[int] = ..., max_interventions: _Optional[int] = ..., dtype: _Optional[str] = ..., compiled: _Optional[bool] = ..., max_read_top_k: _Optional[int] = ..., max_watch: _Optional[int] = ..., max_encode_inputs: _Optional[int] = ..., max_logprobs: _Optional[int] = ..., chat_template: _Optional[bool] = ..., tensor_parallel_size: _Optional[int] = ..., pipeline_parallel_size: _Optional[int] = ..., data_parallel_size: _Optional[int] = ..., distributed_executor_backend: _Optional[str] = ..., max_guardrails: _Optional[int] = ..., vectors: _Optional[_Iterable[_Union[VectorInfo, _Mapping]]] = ..., inline_vector_layers: _Optional[_Iterable[int]] = ..., max_inline_vectors: _Optional[int] = ..., device: _Optional[str] = ..., model_runner: _Optional[str] = ..., cudagraph_mode: _Optional[str] = ..., activation_hooks: _Optional[_Iterable[str]] = ..., max_activation_reads: _Optional[int] = ..., max_activation_positions: _Optional[int] = ..., max_activation_bytes: _Optional[int] = ..., activation_hooks_with_edits: _Optional[_Iterable[str]] = ..., runtime_vector_layers: _Optional[_Iterable[int]] = ..., max_runtime_vectors: _Optional[int] = ...) -> None: ...

class GetFeatureRequest(_message.Message):
    __slots__ = ("sae", "index")
    SAE_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    sae: str
    index: int
    def __init__(self, sae: _Optional[str] = ..., index: _Optional[int] = ...) -> None: ...

class FeatureExample(_message.Message):
    __slots__ = ("context", "token", "activation")
    CONTEXT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    ACTIVATION_FIELD_NUMBER: _ClassVar[int]
    context: str
    token: str
    activation: float
    def __init__(self, context: _Optional[str] = ..., token: _Optional[str] = ..., activation: _Optional[float] = ...) -> None: ...

class Feature(_message.Message):
    __slots__ = ("sae", "index", "label", "density", "max_activation", "mean_activation", "topic", "topic_selectivity", "topic_coverage", "score", "top_tokens", "examples", "dead", "topic_means", "site_norm", "steer_value", "steer_success", "promoted", "suppressed", "logit_effects_unavailable")
    class TopicMeansEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    SAE_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    DENSITY_FIELD_NUMBER: _ClassVar[int]
    MAX_ACTIVATION_FIELD_NUMBER: _ClassVar[int]
    MEAN_ACTIVATION_FIELD_NUMBER: _ClassVar[int]
    TOPIC_FIELD_NUMBER: _ClassVar[int]
    TOPIC_SELECTIVITY_FIELD_NUMBER: _ClassVar[int]
    TOPIC_COVERAGE_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    TOP_TOKENS_FIELD_NUMBER: _ClassVar[int]
    EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    DEAD_FIELD_NUMBER: _ClassVar[int]
    TOPIC_MEANS_FIELD_NUMBER: _ClassVar[int]
    SITE_NORM_FIELD_NUMBER: _ClassVar[int]
    STEER_VALUE_FIELD_NUMBER: _ClassVar[int]
    STEER_SUCCESS_FIELD_NUMBER: _ClassVar[int]
    PROMOTED_FIELD_NUMBER: _ClassVar[int]
    SUPPRESSED_FIELD_NUMBER: _ClassVar[int]
    LOGIT_EFFECTS_UNAVAILABLE_FIELD_NUMBER: _ClassVar[int]
    sae: str
    index: int
    label: str
    density: float
    max_activation: float
    mean_activation: float
    topic: str
    topic_selectivity: float
    topic_coverage: float
    score: float
    top_tokens: _containers.RepeatedScalarFieldContainer[str]
    examples: _containers.RepeatedCompositeFieldContainer[FeatureExample]
    dead: bool
    topic_means: _containers.ScalarMap[str, float]
    site_norm: float
    steer_value: float
    steer_success: float
    promoted: _containers.RepeatedCompositeFieldContainer[TokenLogit]
    suppressed: _containers.RepeatedCompositeFieldContainer[TokenLogit]
    logit_effects_unavailable: str
    def __init__(self, sae: _Optional[str] = ..., index: _Optional[int] = ..., label: _Optional[str] = ..., density: _Optional[float] = ..., max_activation: _Optional[float] = ..., mean_activation: _Optional[float] = ..., topic: _Optional[str] = ..., topic_selectivity: _Optional[float] = ..., topic_coverage: _Optional[float] = ..., score: _Optional[float] = ..., top_tokens: _Optional[_Iterable[str]] = ..., examples: _Optional[_Iterable[_Union[FeatureExample, _Mapping]]] = ..., dead: _Optional[bool] = ..., topic_means: _Optional[_Mapping[str, float]] = ..., site_norm: _Optional[float] = ..., steer_value: _Optional[float] = ..., steer_success: _Optional[float] = ..., promoted: _Optional[_Iterable[_Union[TokenLogit, _Mapping]]] = ..., suppressed: _Optional[_Iterable[_Union[TokenLogit, _Mapping]]] = ..., logit_effects_unavailable: _Optional[str] = ...) -> None: ...

class TokenLogit(_message.Message):
    __slots__ = ("token", "token_id", "logit")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    LOGIT_FIELD_NUMBER: _ClassVar[int]
    token: str
    token_id: int
    logit: float
    def __init__(self, token: _Optional[str] = ..., token_id: _Optional[int] = ..., logit: _Optional[float] = ...) -> None: ...

class SearchFeaturesRequest(_message.Message):
    __slots__ = ("query", "sae", "limit")
    QUERY_FIELD_NUMBER: _ClassVar[int]
    SAE_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    query: str
    sae: str
    limit: int
    def __init__(self, query: _Optional[str] = ..., sae: _Optional[str] = ..., limit: _Optional[int] = ...) -> None: ...

class SearchFeaturesResponse(_message.Message):
    __slots__ = ("features",)
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    features: _containers.RepeatedCompositeFieldContainer[Feature]
    def __init__(self, features: _Optional[_Iterable[_Union[Feature, _Mapping]]] = ...) -> None: ...

class ActivationRead(_message.Message):
    __slots__ = ("hook", "positions", "pool", "dtype", "before_edits")
    HOOK_FIELD_NUMBER: _ClassVar[int]
    POSITIONS_FIELD_NUMBER: _ClassVar[int]
    POOL_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    BEFORE_EDITS_FIELD_NUMBER: _ClassVar[int]
    hook: str
    positions: PositionSelector
    pool: ActivationPool
    dtype: ActivationDtype
    before_edits: bool
    def __init__(self, hook: _Optional[str] = ..., positions: _Optional[_Union[PositionSelector, _Mapping]] = ..., pool: _Optional[_Union[ActivationPool, str]] = ..., dtype: _Optional[_Union[ActivationDtype, str]] = ..., before_edits: _Optional[bool] = ...) -> None: ...

class Activations(_message.Message):
    __slots__ = ("hook", "positions", "shape", "dtype", "data", "pool", "before_edits")
    HOOK_FIELD_NUMBER: _ClassVar[int]
    POSITIONS_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    POOL_FIELD_NUMBER: _ClassVar[int]
    BEFORE_EDITS_FIELD_NUMBER: _ClassVar[int]
    hook: str
    positions: _containers.RepeatedScalarFieldContainer[int]
    shape: _containers.RepeatedScalarFieldContainer[int]
    dtype: ActivationDtype
    data: bytes
    pool: ActivationPool
    before_edits: bool
    def __init__(self, hook: _Optional[str] = ..., positions: _Optional[_Iterable[int]] = ..., shape: _Optional[_Iterable[int]] = ..., dtype: _Optional[_Union[ActivationDtype, str]] = ..., data: _Optional[bytes] = ..., pool: _Optional[_Union[ActivationPool, str]] = ..., before_edits: _Optional[bool] = ...) -> None: ...

class LayerValues(_message.Message):
    __slots__ = ("layer", "values")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    layer: int
    values: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, layer: _Optional[int] = ..., values: _Optional[_Iterable[float]] = ...) -> None: ...

class LoadVectorRequest(_message.Message):
    __slots__ = ("name", "layers", "file", "file_format", "metadata")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    FILE_FIELD_NUMBER: _ClassVar[int]
    FILE_FORMAT_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    name: str
    layers: _containers.RepeatedCompositeFieldContainer[LayerValues]
    file: bytes
    file_format: str
    metadata: _containers.ScalarMap[str, str]
    def __init__(self, name: _Optional[str] = ..., layers: _Optional[_Iterable[_Union[LayerValues, _Mapping]]] = ..., file: _Optional[bytes] = ..., file_format: _Optional[str] = ..., metadata: _Optional[_Mapping[str, str]] = ...) -> None: ...

class LoadVectorResponse(_message.Message):
    __slots__ = ("vector",)
    VECTOR_FIELD_NUMBER: _ClassVar[int]
    vector: VectorInfo
    def __init__(self, vector: _Optional[_Union[VectorInfo, _Mapping]] = ...) -> None: ...

class UnloadVectorRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class UnloadVectorResponse(_message.Message):
    __slots__ = ("vector",)
    VECTOR_FIELD_NUMBER: _ClassVar[int]
    vector: VectorInfo
    def __init__(self, vector: _Optional[_Union[VectorInfo, _Mapping]] = ...) -> None: ...

class ListVectorsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListVectorsResponse(_message.Message):
    __slots__ = ("vectors",)
    VECTORS_FIELD_NUMBER: _ClassVar[int]
    vectors: _containers.RepeatedCompositeFieldContainer[VectorInfo]
    def __init__(self, vectors: _Optional[_Iterable[_Union[VectorInfo, _Mapping]]] = ...) -> None: ...

class ExportVectorRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class ExportVectorResponse(_message.Message):
    __slots__ = ("gguf", "vector")
    GGUF_FIELD_NUMBER: _ClassVar[int]
    VECTOR_FIELD_NUMBER: _ClassVar[int]
    gguf: bytes
    vector: VectorInfo
    def __init__(self, gguf: _Optional[bytes] = ..., vector: _Optional[_Union[VectorInfo, _Mapping]] = ...) -> None: ...

class TrainVectorRequest(_message.Message):
    __slots__ = ("name", "positive", "negative", "layers", "method", "position", "positions", "normalize", "register", "metadata")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    POSITIVE_FIELD_NUMBER: _ClassVar[int]
    NEGATIVE_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    POSITION_FIELD_NUMBER: _ClassVar[int]
    POSITIONS_FIELD_NUMBER: _ClassVar[int]
    NORMALIZE_FIELD_NUMBER: _ClassVar[int]
    REGISTER_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    name: str
    positive: _containers.RepeatedCompositeFieldContainer[Prompt]
    negative: _containers.RepeatedCompositeFieldContainer[Prompt]
    layers: _containers.RepeatedScalarFieldContainer[int]
    method: VectorMethod
    position: TrainPosition
    positions: PositionSelector
    normalize: bool
    register: bool
    metadata: _containers.ScalarMap[str, str]
    def __init__(self, name: _Optional[str] = ..., positive: _Optional[_Iterable[_Union[Prompt, _Mapping]]] = ..., negative: _Optional[_Iterable[_Union[Prompt, _Mapping]]] = ..., layers: _Optional[_Iterable[int]] = ..., method: _Optional[_Union[VectorMethod, str]] = ..., position: _Optional[_Union[TrainPosition, str]] = ..., positions: _Optional[_Union[PositionSelector, _Mapping]] = ..., normalize: _Optional[bool] = ..., register: _Optional[bool] = ..., metadata: _Optional[_Mapping[str, str]] = ...) -> None: ...

class TrainedLayerStats(_message.Message):
    __slots__ = ("layer", "mean_positive", "mean_negative", "accuracy", "held_out_accuracy", "held_out")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    MEAN_POSITIVE_FIELD_NUMBER: _ClassVar[int]
    MEAN_NEGATIVE_FIELD_NUMBER: _ClassVar[int]
    ACCURACY_FIELD_NUMBER: _ClassVar[int]
    HELD_OUT_ACCURACY_FIELD_NUMBER: _ClassVar[int]
    HELD_OUT_FIELD_NUMBER: _ClassVar[int]
    layer: int
    mean_positive: float
    mean_negative: float
    accuracy: float
    held_out_accuracy: float
    held_out: int
    def __init__(self, layer: _Optional[int] = ..., mean_positive: _Optional[float] = ..., mean_negative: _Optional[float] = ..., accuracy: _Optional[float] = ..., held_out_accuracy: _Optional[float] = ..., held_out: _Optional[int] = ...) -> None: ...

class TrainVectorResponse(_message.Message):
    __slots__ = ("name", "layers", "stats", "vector")
    NAME_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    STATS_FIELD_NUMBER: _ClassVar[int]
    VECTOR_FIELD_NUMBER: _ClassVar[int]
    name: str
    layers: _containers.RepeatedCompositeFieldContainer[LayerValues]
    stats: _containers.RepeatedCompositeFieldContainer[TrainedLayerStats]
    vector: VectorInfo
    def __init__(self, name: _Optional[str] = ..., layers: _Optional[_Iterable[_Union[LayerValues, _Mapping]]] = ..., stats: _Optional[_Iterable[_Union[TrainedLayerStats, _Mapping]]] = ..., vector: _Optional[_Union[VectorInfo, _Mapping]] = ...) -> None: ...
