"""The SAE container and the architecture interface.

Shapes follow SAELens: ``W_enc [d_in, d_sae]``, ``W_dec [d_sae, d_in]``, ``b_enc [d_sae]``,
``b_dec [d_in]``, ``threshold [d_sae]`` (JumpReLU only). Loaders of other formats convert
to this layout (transposing, expanding scalar thresholds, folding what can be folded
exactly), so the math in ``sae_runtime.ops`` is the same for every format.

How the SAE sees its input (``sae_runtime.ops``): the activation ``x`` is first normalised
per ``SAEConfig.normalization`` (``x_n``), then ``b_dec`` is subtracted when
``apply_b_dec_to_input``; that is the encoder input ``xin`` and
``pre = xin @ W_enc + b_enc``. The reconstruction ``acts @ W_dec + b_dec`` lives in the
normalised space and is mapped back with the inverse normalisation, so an edit's decoder
delta is rescaled by the same per-token factor (see ``ops.encoder_input``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, fields
from enum import IntEnum
from typing import Literal, Protocol

import torch

HookSite = Literal["resid_post", "resid_pre", "mlp_out", "attn_out", "z"]
"""Where in block ``layer`` the SAE reads and writes.

- ``resid_post``: residual stream after the block (SAELens ``blocks.L.hook_resid_post``);
- ``resid_pre``: residual stream before the block (``blocks.L.hook_resid_pre``, L >= 1);
- ``mlp_out`` / ``attn_out``: the MLP / attention output added to the stream
  (``blocks.L.hook_mlp_out`` / ``blocks.L.hook_attn_out``);
- ``z``: per-head attention outputs, concatenated, before the output projection
  (``blocks.L.attn.hook_z``); ``d_in = n_heads * d_head``.
"""


class Site(IntEnum):
    """Every hook site by number (``HookSite`` and ``InputSite``'s ``mlp_in``, upper case);
    the numbers match ``steering.v1.HookSite``."""

    RESID_POST = 1
    RESID_PRE = 2
    ATTN_OUT = 3
    MLP_OUT = 4
    Z = 5
    MLP_IN = 6


Normalization = Literal["none", "constant_scale", "token_norm", "layer_norm"]
"""Input normalisation applied before encoding and inverted after decoding.

- ``none``: ``x_n = x``.
- ``constant_scale``: ``x_n = x * norm_scale_in``; outputs map back with
  ``y * norm_scale_out`` (SAELens ``expected_average_only_in`` with a known scaling factor:
  ``in = s, out = 1/s``; Llama Scope ``dataset-wise``: ``in = sqrt(d)/avg_norm_in``,
  ``out = avg_norm_out/sqrt(d)``).
- ``token_norm``: ``x_n = x * sqrt(d_in) / ||x||`` per token, outputs ``y / (sqrt(d_in)/||x||)``
  (SAELens ``constant_norm_rescale``, Llama Scope ``token-wise``).
- ``layer_norm``: ``x_n = (x - mean(x)) / (std(x) + eps)`` per token (unbiased std),
  outputs ``y * std(x) + mean(x)`` (SAELens ``layer_norm``; no eps on the way out, as
  SAELens does).
"""

NORMALIZATIONS: tuple[str, ...] = ("none", "constant_scale", "token_norm", "layer_norm")

InputSite = Literal["", "mlp_in", "ln2_normalized"]
"""Where the SAE *reads* when that differs from where it writes (``SAEConfig.site``).

- ``""``: it encodes the activation it edits (every SAE).
- ``mlp_in``: the input of block ``layer``'s MLP, the pre-MLP norm's output *with* its
  weight (circuit-tracer ``blocks.L.mlp.hook_in``; SAELens' Gemma Scope 2 loader names it
  ``blocks.L.hook_mlp_in`` with ``hf_hook_name`` ``...pre_feedforward_layernorm.output``).
- ``ln2_normalized``: TransformerLens ``blocks.L.ln2.hook_normalized``, the pre-MLP norm's
  normalised input *without* its weight (RMSNorm: ``x / rms(x)``; LayerNorm: ``(x -
  mean) / std``); the MLP input is this times the weight (Gemma: ``1 + weight``), plus the
  bias of a LayerNorm. SAELens' Gemma Scope transcoders (``gemma_2_transcoder``) and
  circuit-tracer's ``ln2.hook_normalized`` sets read it. The worker serves it from the MLP
  input by folding the weight into the encoder (``ops.fold_norm_weight``).

A **transcoder** reads at one of these and writes ``mlp_out``: its latents come from the
MLP input side and an edit moves the MLP output, ``mlp_out += (v - f_i(x_in)) W_dec[i]``. An
affine skip (``W_skip x_in``) is part of the transcoder's reconstruction only; an edit
leaves it (and the MLP's true output) alone.
"""

INPUT_SITES: tuple[str, ...] = ("", "mlp_in", "ln2_normalized")


@dataclass(frozen=True)
class SAEConfig:
    """Everything about an SAE except its tensors."""

    architecture: str
    """Registered architecture name, e.g. ``standard``, ``jumprelu``, ``topk``."""
    d_in: int
    """Width of the hooked activation (the model's hidden size; n_heads * d_head at ``z``)."""
    d_sae: int
    """Number of features."""
    hook_name: str
    """Hook name as the SAE's files give it (or as overridden), e.g.
    ``blocks.3.hook_resid_post`` or a sparsify hookpoint such as ``layers.3``."""
    layer: int
    """0-based block index parsed from ``hook_name``."""
    site: HookSite
    """Where in the block the SAE reads and writes."""
    apply_b_dec_to_input: bool = False
    """Subtract ``b_dec`` from the (normalised) input before encoding (SAELens convention)."""
    k: int | None = None
    """Active features per token for TopK-family architectures (number of groups for
    ``groupmax``); None otherwise."""
    model_name: str = ""
    """Model the SAE was trained on, as its config records it (may be empty)."""
    dtype: str = "float32"
    """Dtype the weights are stored in."""
    format: str = "saelens"
    """On-disk format the SAE was loaded from: ``saelens``, ``gemma_scope``, ``llama_scope``
    or ``sparsify``."""
    normalization: str = "none"
    """Input normalisation, one of ``NORMALIZATIONS`` (see ``Normalization``)."""
    norm_scale_in: float = 1.0
    """``constant_scale`` only: factor applied to the input before encoding."""
    norm_scale_out: float = 1.0
    """``constant_scale`` only: factor applied to decoder outputs (and edit deltas)."""
    norm_eps: float = 1e-5
    """``layer_norm`` only: epsilon added to the standard deviation on the way in."""
    training_architecture: str = ""
    """Architecture the SAE was trained as when it differs from the inference one, e.g.
    ``batchtopk`` or ``matryoshka_batchtopk`` (served as ``jumprelu``), or the transcoder
    class its files name (``jumprelu_skip_transcoder``, served as ``jumprelu`` reading
    ``mlp_in``)."""
    input_site: str = ""
    """One of ``INPUT_SITES`` (see ``InputSite``): ``mlp_in`` or ``ln2_normalized`` for a
    transcoder."""
    hook_name_out: str = ""
    """A transcoder's output hook as its files name it (``blocks.L.hook_mlp_out``)."""
    clt_layers: tuple[int, ...] = ()
    """A served cross-layer transcoder (``sae_runtime.saes.clt``): the model block of each of
    its slots (empty for an SAE). Then this config describes the whole CLT as one hook: its
    ``d_sae`` features are the flat indices ``slot * features_per_layer + index``, ``layer``
    is the first slot's block, and the per-slot math is ``clt.slot_sae``'s."""

    def __post_init__(self) -> None:
        if self.d_in <= 0 or self.d_sae <= 0:
            raise ValueError(f"d_in and d_sae must be positive, got {self.d_in}, {self.d_sae}")
        if self.k is not None and not 0 < self.k <= self.d_sae:
            raise ValueError(f"k must be in [1, d_sae={self.d_sae}], got {self.k}")
        if self.normalization not in NORMALIZATIONS:
            raise ValueError(
                f"normalization must be one of {', '.join(NORMALIZATIONS)}, "
                f"got {self.normalization!r}"
            )
        if self.clt_layers and self.d_sae % len(self.clt_layers):
            raise ValueError(f"a CLT's d_sae {self.d_sae} must be a multiple of its "
                             f"{len(self.clt_layers)} layers")
        if self.input_site not in INPUT_SITES:
            raise ValueError(f"input_site must be one of {INPUT_SITES}, got {self.input_site!r}")
        if self.input_site:
            # The edit formula assumes the decoder writes the site's own space: no output
            # normalisation to invert, no b_dec on the (other) input.
            if self.site != "mlp_out":
                raise ValueError(f"a transcoder reading {self.input_site} must write mlp_out, "
                                 f"not {self.site}")
            if self.normalization != "none" or self.apply_b_dec_to_input:
                raise ValueError("a transcoder must have normalization 'none' and "
                                 "apply_b_dec_to_input false (SAELens refuses both too)")

    @property
    def features_per_layer(self) -> int:
        """A CLT's features per slot (``d_sae`` for an SAE)."""
        return self.d_sae // len(self.clt_layers) if self.clt_layers else self.d_sae

    @property
    def transcoder(self) -> bool:
        """True when the SAE reads at another site than it writes (``input_site``)."""
        return bool(self.input_site)

    @property
    def read_site(self) -> str:
        """Where the SAE encodes from: ``input_site`` for a transcoder, else ``site``."""
        return self.input_site or self.site


@dataclass(frozen=True, eq=False)
class SAE:
    """An SAE's config and tensors. Immutable; nothing is cached on it during a forward."""

    cfg: SAEConfig
    W_enc: torch.Tensor  # [d_in, d_sae]
    W_dec: torch.Tensor  # [d_sae, d_in]
    b_enc: torch.Tensor  # [d_sae]  (gated: the gate bias b_gate)
    b_dec: torch.Tensor  # [d_in]
    threshold: torch.Tensor | None = field(default=None)  # [d_sae], JumpReLU
    b_mag: torch.Tensor | None = field(default=None)  # [d_sae], gated: magnitude bias
    r_mag: torch.Tensor | None = field(default=None)  # [d_sae], gated: log magnitude scale
    rank_scale: torch.Tensor | None = field(default=None)
    """[d_sae] positive per-feature factor applied to pre-activations where an architecture
    *selects* features (JumpReLU threshold test, TopK ranking, top-AFA norm matching) but
    not to the activation values: Llama Scope's ``sparsity_include_decoder_norm`` (decoder
    column norms). None = 1 (top-AFA: the decoder row norms, computed on the fly)."""
    enc_gemm: Callable[[torch.Tensor], torch.Tensor] | None = field(default=None)
    """``xin [R, d_in] -> xin @ W_enc [R, d_sae]`` by a faster kernel than torch's matmul
    (the worker sets vLLM's prepacked oneDNN GEMM on CPU: ~4x faster at decode sizes).
    Must equal ``xin @ W_enc`` up to float rounding; None = torch's matmul. Not a tensor:
    ``to`` drops it (it is bound to these weights on this device)."""

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> SAE:
        """A copy with every tensor moved (and optionally cast)."""

        def mv(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device=device, dtype=dtype or t.dtype).contiguous()

        return SAE(self.cfg, **{f.name: mv(getattr(self, f.name)) for f in fields(self)
                                if f.name not in ("cfg", "enc_gemm")})


class Architecture(Protocol):
    """How an architecture turns pre-activations into feature activations.

    ``pre = xin @ W_enc + b_enc`` where ``xin`` is the encoder input (``ops.sae_input``).
    Implementations are pure: they read the SAE's tensors and write nothing to it.
    """

    name: str
    needs_full_preactivation: bool
    """True when a feature's activation depends on other features' pre-activations (TopK)."""
    needs_k: bool
    """True when ``SAEConfig.k`` is required."""
    extra_tensors: tuple[str, ...]
    """SAE tensor fields beyond the four basic ones this architecture requires."""

    def activate(
        self, sae: SAE, pre: torch.Tensor, xin: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Dense activations ``[..., d_sae]`` from dense pre-activations ``[..., d_sae]``.

        ``xin [..., d_in]`` is the encoder input; only architectures whose selection depends
        on the input itself (top-AFA) read it.
        """
        ...

    def activate_columns(
        self,
        sae: SAE,
        pre_cols: torch.Tensor,
        cols: torch.Tensor,
        pre_full: torch.Tensor | None,
        xin: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Activations of selected features.

        ``pre_cols [..., n]`` are the pre-activations of features ``cols [..., n]`` (same
        leading shape). ``pre_full [..., d_sae]`` is given only when
        ``needs_full_preactivation`` is true. Must agree with ``activate`` gathered at
        ``cols``.
        """
        ...


ARCHITECTURES: dict[str, Architecture] = {}
"""Every registered architecture by name (filled by ``register``; look up through
``sae_runtime.registry``, which imports every architecture module first)."""


def register(arch: Architecture) -> Architecture:
    """Register ``arch`` under ``arch.name``; a second registration of a name raises."""
    if arch.name in ARCHITECTURES:
        raise ValueError(f"SAE architecture {arch.name!r} is registered twice")
    ARCHITECTURES[arch.name] = arch
    return arch
