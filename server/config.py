"""Server configuration: one frozen, documented model; the CLI is generated from it."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from sae_runtime.spec.budget import (
    DEFAULT_MAX_ACTIVATION_BYTES,
    DEFAULT_MAX_ACTIVATION_POSITIONS,
    DEFAULT_MAX_ACTIVATION_READS,
)
from sae_runtime.step.config import DEFAULT_READS_MAX_MESSAGE_BYTES


class SAESource(BaseModel):
    """One ``--sae [NAME=]PATH[@HOOK]`` entry."""

    model_config = ConfigDict(frozen=True)

    id: str = Field(description="Id used in requests; defaults to the directory name.")
    path: Path = Field(description="SAE directory (SAELens layout).")
    hook_name: str | None = Field(
        default=None, description="Override the hook, e.g. blocks.3.hook_resid_post."
    )

    @classmethod
    def parse(cls, text: str) -> SAESource:
        """Parse ``[NAME=]PATH[@HOOK]``."""
        name, sep, rest = text.partition("=")
        if not sep:
            name, rest = "", text
        path, at, hook = rest.partition("@")
        if not path:
            raise ValueError(f"--sae {text!r}: missing PATH (format: [NAME=]PATH[@HOOK])")
        p = Path(path)
        return cls(id=name or p.resolve().name, path=p, hook_name=hook if at else None)


class VectorSource(BaseModel):
    """One ``--vector NAME=PATH`` entry (``sae_runtime.loading.vectors``)."""

    model_config = ConfigDict(frozen=True)

    name: str
    path: Path

    @classmethod
    def parse(cls, text: str) -> VectorSource:
        name, sep, path = text.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--vector {text!r}: expected NAME=PATH")
        return cls(name=name, path=Path(path))


class ServerConfig(BaseModel):
    """Everything ``steerd serve`` can be told. Field descriptions are the CLI help."""

    model_config = ConfigDict(frozen=True)

    model: str = Field(description="Hugging Face model directory served by vLLM.")
    saes: tuple[SAESource, ...] = Field(
        default=(), description="SAEs to hook: [NAME=]PATH[@HOOK]; repeat for several."
    )
    vectors: tuple[VectorSource, ...] = Field(
        default=(), description="Steering vectors: NAME=PATH (llama.cpp/repeng GGUF control "
        "vector, or safetensors/.npz/.pt/.npy of {layer: vector}); repeat for several.")
    inline_vectors: str = Field(
        default="", description="Layers that take per-request inline steering vectors "
        "(GenerateRequest.inline_vectors): 'all', or a comma list of 0-based blocks such as "
        "'10,12'. Each costs one hook op per step and 2 * max_num_seqs * d_model floats.")
    activation_hooks: str = Field(
        default="", description="Hook sites whose raw activations requests may read "
        "(activation_reads), as comma-separated globs over SAELens names, e.g. "
        "'blocks.*.hook_resid_post,blocks.3.hook_mlp_out' (sites: hook_resid_pre from block 1, "
        "attn.hook_z, hook_attn_out, ln2.hook_normalized, hook_mlp_out, hook_resid_post). "
        "Each declared site costs one op per step and max_num_batched_tokens * width floats. Values are taken after the "
        "request's own edits at that site and at earlier ones.")
    max_activation_reads: int = Field(
        default=DEFAULT_MAX_ACTIVATION_READS, ge=1, le=1024,
        description="Most activation reads one request may carry (one per hook).")
    max_activation_positions: int = Field(
        default=DEFAULT_MAX_ACTIVATION_POSITIONS, ge=1,
        description="Most positions one request's activation reads may copy, summed over its reads.")
    max_activation_bytes: int = Field(
        default=DEFAULT_MAX_ACTIVATION_BYTES, ge=1024,
        description="Most bytes of float32 rows one request's activation reads may copy, summed "
                    "over its reads, before pooling.")
    runtime_vectors: str = Field(
        default="", description="Layers that take steering vectors loaded at run time (the "
        "LoadVector admin call; needs --admin-tokens-file): 'all', or a comma list of 0-based "
        "blocks. Each keeps --max-runtime-vectors zero rows from engine start, so a load "
        "recompiles nothing; a layer without a --vector or --inline-vectors bank costs one "
        "hook op per step.")
    max_runtime_vectors: int = Field(
        default=8, ge=1, le=1024, description="Rows kept per --runtime-vectors layer: the most "
        "vectors loaded at run time that hold a row at one layer at once (d_model floats each).")
    host: str = Field(default="127.0.0.1", description="Address to bind.")
    port: int = Field(default=50051, ge=0, le=65535, description="Port (0 picks a free one).")
    max_interventions: int = Field(
        default=32, ge=1, le=4096, description="Most interventions one request may carry."
    )
    max_read_top_k: int = Field(default=64, ge=1, le=4096, description="Largest top_k one read may ask for.")
    max_watch: int = Field(default=256, ge=0, le=65536, description="Longest watch list of one read.")
    max_encode_inputs: int = Field(default=32, ge=1, le=1024, description="Most inputs in one Encode call.")
    max_logprobs: int = Field(
        default=20, ge=0, le=1024,
        description="Largest logprobs / prompt_logprobs (top alternatives per token) a request may ask for.",
    )
    chat_template: Path | None = Field(
        default=None,
        description="Jinja chat template file for chat messages, overriding the tokenizer's own "
                    "(needed for a model without one).",
    )
    max_model_len: int | None = Field(
        default=None, ge=16, description="Longest prompt+generation in tokens (model default)."
    )
    max_num_seqs: int = Field(default=64, ge=1, description="Most sequences in one batch.")
    max_num_batched_tokens: int | None = Field(
        default=None, ge=16, description="Token budget of one engine step (vLLM default)."
    )
    dtype: str = Field(default="auto", description="Model dtype: auto, float32, bfloat16, ...")
    sae_dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        default="auto", description="Dtype SAEs compute in; auto = the model's dtype."
    )
    tensor_parallel_size: int = Field(
        default=1, ge=1, description="Tensor-parallel ranks (vLLM's --tensor-parallel-size)."
    )
    pipeline_parallel_size: int = Field(
        default=1, ge=1, description="Pipeline stages (vLLM's --pipeline-parallel-size)."
    )
    data_parallel_size: int = Field(
        default=1, ge=1, description="Data-parallel engine replicas (vLLM's --data-parallel-size)."
    )
    distributed_executor_backend: Literal["auto", "mp", "ray"] = Field(
        default="auto",
        description="vLLM executor for several ranks: mp (processes on this node), ray "
                    "(a Ray cluster, multi-node), auto = vLLM's choice.",
    )
    # ---- engines across nodes (vLLM's mp executor; names and meanings are vLLM's)
    nnodes: int = Field(
        default=1, ge=1,
        description="Nodes the engine's ranks span (vLLM's --nnodes): tensor/pipeline parallel "
                    "across machines. Node 0 runs steerd serve, the others steerd node with the "
                    "same flags and their --node-rank.")
    node_rank: int = Field(default=0, ge=0, description="This node's index (vLLM's --node-rank).")
    master_addr: str = Field(
        default="127.0.0.1",
        description="Node 0's address for torch.distributed across nodes (vLLM's --master-addr).")
    master_port: int = Field(
        default=29501, ge=1, le=65535,
        description="Node 0's torch.distributed port (vLLM's --master-port).")
    data_parallel_size_local: int | None = Field(
        default=None, ge=0,
        description="Data-parallel engines on this node (vLLM's --data-parallel-size-local); "
                    "fewer than --data-parallel-size puts the rest on other nodes.")
    data_parallel_address: str | None = Field(
        default=None,
        description="Node 0's address engines on other nodes reach for data parallel "
                    "(vLLM's --data-parallel-address; default: --master-addr).")
    data_parallel_rpc_port: int = Field(
        default=29550, ge=1, le=65535,
        description="Node 0's data-parallel handshake port (vLLM's --data-parallel-rpc-port).")
    data_parallel_start_rank: int | None = Field(
        default=None, ge=0,
        description="steerd node: the first data-parallel rank this node runs (vLLM's "
                    "--data-parallel-start-rank).")
    node_timeout_s: float = Field(
        default=60.0, gt=0,
        description="Engines across nodes: how long an engine may stay silent before the API "
                    "node counts it gone (in-flight streams end UNAVAILABLE, steerd exits 1), "
                    "and how long an engine node outlives an unreachable API node (it exits 1).")
    reads_address: str | None = Field(
        default=None,
        description="ZMQ address workers push feature reads to (default: an ipc:// socket in a "
                    "private 0700 directory, one node). When engines run on other nodes give "
                    "tcp://HOST:PORT with an address of this host they can reach: steerd "
                    "binds it with ZMQ CURVE (fresh keys every start; peers without them "
                    "cannot deliver).",
    )
    reads_max_message_bytes: int = Field(
        default=DEFAULT_READS_MAX_MESSAGE_BYTES, ge=1024 * 1024,
        description="Largest feature-reads message from a worker; workers split a step's "
                    "reads to fit, and the server drops (and counts) a larger one.",
    )
    enforce_eager: bool = Field(
        default=False, description="Run the model eagerly instead of compiled (debugging)."
    )
    enable_prefix_caching: bool = Field(default=True, description="vLLM prefix caching.")
    grace_period_s: float = Field(
        default=10.0, ge=0, description="Seconds in-flight streams get to finish on shutdown."
    )
    seed: int = Field(default=0, description="Engine seed.")
    # ---- limits: a request over a cap gets RESOURCE_EXHAUSTED (the server never queues it)
    max_concurrent_streams: int = Field(
        default=256, ge=1, description="Most Generate/Encode calls in flight; more get RESOURCE_EXHAUSTED."
    )
    max_distinct_configs: int = Field(
        default=64, ge=1,
        description="Most distinct intervention sets in flight; a request bringing one more gets "
                    "RESOURCE_EXHAUSTED.",
    )
    max_prompt_tokens: int | None = Field(
        default=None, ge=1, description="Longest prompt in tokens (default: model length - 1)."
    )
    max_new_tokens: int | None = Field(
        default=None, ge=1, description="Largest max_tokens (default: what the model length allows)."
    )
    max_message_bytes: int = Field(
        default=4 * 1024 * 1024, ge=1024, description="Largest request message in bytes."
    )
    max_stream_buffer_bytes: int = Field(
        default=8 * 1024 * 1024, ge=1024,
        description="Most bytes of responses (tokens and feature reads) one Generate stream may "
                    "hold that the client has not taken yet; beyond it the stream ends with "
                    "RESOURCE_EXHAUSTED ('client is not reading') and its engine request is "
                    "aborted. Counted after what the connection's flow-control window already "
                    "carries to the client.",
    )
    guardrail_missing_read: Literal["pass", "trip"] = Field(
        default="pass",
        description="What a guardrail (abort_when) does at a position whose guard read never "
                    "arrived from the worker (logged as 'feature reads incomplete'): pass (the "
                    "position is not checked) or trip (fail closed: the stream ends with "
                    "finish_reason FEATURE and value NaN).",
    )
    # ---- security
    auth_tokens_file: Path | None = Field(
        default=None,
        description="File with accepted bearer tokens, one per line; or set STEERD_AUTH_TOKENS "
                    "(comma-separated). Clients send 'authorization: Bearer <token>'. A file "
                    "with no token is a startup error.",
    )
    admin_tokens_file: Path | None = Field(
        default=None,
        description="File with admin bearer tokens, one per line: only these may call the "
                    "admin RPCs and routes (LoadVector, UnloadVector); with none, admin calls "
                    "are refused. Admin tokens give no other access (ordinary calls take "
                    "--auth-tokens-file's tokens when auth is on).",
    )
    cache_salt_per_token: bool = Field(
        default=True,
        description="With auth on, salt every request's prefix cache by the caller's token, so "
                    "one tenant cannot learn another's prompts from cached_tokens (tenants "
                    "then share no cached prefixes).",
    )
    tls_cert: Path | None = Field(default=None, description="PEM server certificate (enables TLS).")
    tls_key: Path | None = Field(default=None, description="PEM private key of --tls-cert.")
    tls_client_ca: Path | None = Field(
        default=None, description="PEM CA bundle; when set, clients must present a certificate (mTLS)."
    )
    # ---- observability
    metrics_port: int | None = Field(
        default=None, ge=0, le=65535, description="Serve Prometheus metrics on this port (off by default)."
    )
    metrics_host: str = Field(
        default="127.0.0.1",
        description="Address the metrics port binds. Anything but loopback exposes it: it then "
                    "uses --tls-* and requires a bearer token when auth is on.",
    )
    log_format: Literal["text", "json"] = Field(default="text", description="Log line format.")
    # ---- OpenAI-compatible HTTP (same engine, validation, caps, auth and metrics)
    http_port: int | None = Field(
        default=None, ge=0, le=65535,
        description="Also serve the OpenAI-compatible HTTP API (/v1/completions, "
                    "/v1/chat/completions, /v1/models) on this port (off by default; 0 picks one).",
    )
    http_max_connections: int = Field(
        default=256, ge=1,
        description="Most open HTTP connections; more are closed as they arrive.")
    http_header_timeout_s: float = Field(
        default=10.0, gt=0,
        description="Seconds an HTTP connection has to send a request's headers (slowloris).")
    http_body_timeout_s: float = Field(
        default=30.0, gt=0, description="Seconds an HTTP request has to send its whole body.")
    http_idle_timeout_s: float = Field(
        default=5.0, gt=0, description="Seconds an idle keep-alive HTTP connection stays open.")
    http_allowed_hosts: str = Field(
        default="",
        description="Host names the HTTP port answers to, comma-separated, or '*' for any. "
                    "Default: localhost, 127.0.0.1 and ::1 when --host is a loopback address "
                    "(a web page cannot reach the server through DNS rebinding), else any.")
    http_allowed_origins: str = Field(
        default="",
        description="Browser origins (scheme://host[:port]) besides the server's own that may "
                    "call the HTTP API, comma-separated. Requests from other sites get 403.")

    @model_validator(mode="after")
    def _tls_pair(self) -> ServerConfig:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("--tls-cert and --tls-key go together")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ValueError("--tls-client-ca (mTLS) needs --tls-cert and --tls-key")
        return self

    @field_validator("reads_address")
    @classmethod
    def _zmq_address(cls, v: str | None) -> str | None:
        if v is not None and not (v.startswith("tcp://") or v.startswith("ipc://")):
            raise ValueError(f"--reads-address {v!r}: give tcp://HOST:PORT or ipc://PATH")
        return v

    def activation_globs(self) -> tuple[str, ...]:
        """``activation_hooks`` as globs."""
        return tuple(g.strip() for g in self.activation_hooks.split(",") if g.strip())

    @field_validator("inline_vectors", "runtime_vectors")
    @classmethod
    def _vector_layers(cls, v: str, info) -> str:
        flag = "--" + info.field_name.replace("_", "-")
        v = v.strip()
        if v in ("", "all"):
            return v
        try:
            layers = [int(x) for x in v.split(",")]
        except ValueError:
            raise ValueError(f"{flag} {v!r}: give 'all' or 0-based block numbers "
                             "separated by commas, e.g. 10,12") from None
        if any(x < 0 for x in layers):
            raise ValueError(f"{flag} {v!r}: block numbers start at 0")
        return ",".join(str(x) for x in sorted(set(layers)))

    def allowed_hosts(self) -> tuple[str, ...] | None:
        """``http_allowed_hosts`` as names (None: any host)."""
        v = self.http_allowed_hosts.strip()
        if v == "*":
            return None
        if v:
            return tuple(h.strip().lower().strip("[]") for h in v.split(",") if h.strip())
        if self.host in ("127.0.0.1", "localhost", "::1") or self.host.startswith("127."):
            return ("localhost", "127.0.0.1", "::1", self.host)
        return None

    def inline_vector_layers(self, n_layers: int) -> tuple[int, ...]:
        """The blocks that take inline vectors (``inline_vectors``) in a model of
        ``n_layers`` blocks; a block beyond the model is the loader's error to name."""
        return _layers(self.inline_vectors, n_layers)

    def runtime_vector_layers(self, n_layers: int) -> tuple[int, ...]:
        """The blocks that keep rows for runtime-loaded vectors (``runtime_vectors``)."""
        return _layers(self.runtime_vectors, n_layers)

    @field_validator("saes")
    @classmethod
    def _unique_ids(cls, v: tuple[SAESource, ...]) -> tuple[SAESource, ...]:
        ids = [s.id for s in v]
        dup = {i for i in ids if ids.count(i) > 1}
        if dup:
            raise ValueError(f"duplicate SAE ids {sorted(dup)}; name them with NAME=PATH")
        return v


def _layers(text: str, n_layers: int) -> tuple[int, ...]:
    if not text:
        return ()
    if text == "all":
        return tuple(range(n_layers))
    return tuple(int(x) for x in text.split(","))
