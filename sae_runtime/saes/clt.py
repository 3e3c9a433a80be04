"""Cross-layer transcoders (CLTs) and multi-layer crosscoders: the math, tensors in and out.

This module is the specification (plain torch, CPU) that a serving kernel for CLTs will be
tested against, as ``kernels/reference.py`` is for SAEs. Nothing here is stored between
calls; every function reads the ``CLT``'s tensors and returns new ones.

A CLT has ``L`` *slots*; slot ``s`` sits at model block ``cfg.layers[s]`` (a CLT: block
``s``; a Gemma Scope 2 crosscoder: four blocks such as 7, 13, 17, 22). Slot ``s``'s
``d_sae`` features read only that block's input activation ``x_s`` (``cfg.input_site``) and
write the output activation (``cfg.output_site``) of slot ``s`` and of every later slot:

    f_s   = act(x_s @ W_enc[s] + b_enc[s])                               [..., d_sae]
    y_l   = b_dec[l] + sum_{s <= l} f_s @ W_dec[s][:, l - s] (+ x_l @ W_skip[l])   [..., d_in]

exactly as circuit-tracer's ``CrossLayerTranscoder`` computes ``encode``/``decode``
(``compute_reconstruction``) and Gemma Scope 2's ``JumpReLUMultiLayerSAE`` does with causal
decoder weights:

- no input normalisation and no ``b_dec`` subtraction on the input;
- ``b_dec[l]`` is the bias of *output* slot ``l``, added once per output (not per source);
- the skip (Gemma Scope 2's ``affine_skip_connection``) is same-slot only, ``x_l @ W_skip[l]``
  with ``W_skip[l]`` stored ``[d_in, d_out]``;
- ``act`` is one of ``ACTIVATIONS`` (see ``Activation``).

An edit of feature ``(s, j)`` from its activation ``f`` to ``f'`` changes every output slot
``l >= s`` by ``(f' - f) * W_dec[s][j, l - s]`` (circuit-tracer's feature intervention:
the model's own MLP outputs are kept, only the deltas are added, the skip is untouched);
``edit_delta`` computes those deltas, ``ops.clt_intervention_delta`` the coefficients from
the request's modes (one definition of CLAMP/ABLATE/SCALE/ADD for SAEs and CLTs).

A feature is addressed by one flat index ``slot * d_sae + j`` (``flat_index``,
``split_index``), the way a served CLT numbers its features.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch

from sae_runtime.saes.base import SAE, SAEConfig

Activation = Literal["relu", "jumprelu", "jumprelu_signed"]
"""How pre-activations become feature activations.

- ``relu``: ``relu(pre)`` (circuit-tracer CLTs without thresholds).
- ``jumprelu``: ``relu(pre) * (pre > threshold)`` (Gemma Scope 2's ``JumpReLUMultiLayerSAE``,
  SAELens, this runtime's ``jumprelu`` SAEs).
- ``jumprelu_signed``: ``pre * (pre > threshold)`` (circuit-tracer's ``JumpReLU``, which has
  no ReLU: a negative pre-activation above a negative threshold passes, negative). It equals
  ``jumprelu`` wherever ``threshold >= 0``; the circuit-tracer loader uses it only for files
  with a negative threshold.
"""

ACTIVATIONS: tuple[str, ...] = ("relu", "jumprelu", "jumprelu_signed")

CLTSite = Literal["resid_mid", "ln2_normalized", "mlp_in", "mlp_out", "mlp_module_out",
                  "resid_post"]
"""Where a slot reads (``input_site``) or writes (``output_site``) in its block, by the
TransformerLens definitions circuit-tracer uses:

- ``resid_mid`` (``hook_resid_mid``): the residual stream after attention, *before* the
  pre-MLP norm (mntss CLTs);
- ``ln2_normalized`` (``ln2.hook_normalized``): that stream divided by its RMS (LayerNorm:
  centred and divided by its standard deviation), *without* the norm's weight;
- ``mlp_in`` (circuit-tracer's ``mlp.hook_in``; Gemma Scope 2's
  ``pre_feedforward_layernorm.output``): the MLP's input, the pre-MLP norm's output with its
  weight;
- ``mlp_out`` (``hook_mlp_out``): what the MLP adds to the stream (Gemma: after
  ``post_feedforward_layernorm``);
- ``mlp_module_out`` (``mlp.hook_out``): the MLP module's own output (Gemma: *before*
  ``post_feedforward_layernorm``; every other family: the same as ``mlp_out``);
- ``resid_post`` (``hook_resid_post``): the block's output stream (crosscoders).
"""

CLT_SITES: tuple[str, ...] = ("resid_mid", "ln2_normalized", "mlp_in", "mlp_out",
                              "mlp_module_out", "resid_post")
_INPUTS = ("resid_mid", "ln2_normalized", "mlp_in", "resid_post")
_OUTPUTS = ("mlp_out", "mlp_module_out", "resid_post")


@dataclass(frozen=True)
class CLTConfig:
    """Everything about a CLT or crosscoder except its tensors."""

    kind: Literal["clt", "crosscoder"]
    """``clt``: each slot reads a block's MLP input side and writes MLP outputs;
    ``crosscoder``: each slot reads and writes the residual stream of its block."""
    n_layers: int
    """``L``: number of slots (a CLT: the blocks it spans, 0..L-1)."""
    d_in: int
    """Width of every slot's input and output (the model's hidden size)."""
    d_sae: int
    """Features per slot; the CLT has ``n_layers * d_sae`` features in all."""
    activation: str
    """One of ``ACTIVATIONS`` (see ``Activation``)."""
    layers: tuple[int, ...]
    """Model block of each slot, strictly increasing."""
    input_site: str
    """Where each slot reads, one of ``CLT_SITES`` (see ``CLTSite``)."""
    output_site: str
    """Where each slot writes, one of ``CLT_SITES``."""
    input_hook: str = ""
    """The input hook as the files name it, relative to a block (``hook_resid_mid``)."""
    output_hook: str = ""
    """The output hook as the files name it, relative to a block (``hook_mlp_out``)."""
    skip: bool = False
    """True when the files carry a same-slot affine skip (``W_skip``)."""
    format: str = "circuit_tracer"
    """On-disk format: ``circuit_tracer`` or ``gemma_scope_2``."""
    model_name: str = ""
    """Model the CLT was trained on, as its files record it (may be empty)."""
    dtype: str = "float32"
    """Dtype the weights are stored in on disk."""
    dropped_acausal_max: float = 0.0
    """Largest ``|w_dec[s][:, l]|`` with ``l < s`` in files that store the full decoder
    (Gemma Scope 2); those entries are dropped, as circuit-tracer drops them (0: none)."""

    def __post_init__(self) -> None:
        if self.n_layers <= 0 or self.d_in <= 0 or self.d_sae <= 0:
            raise ValueError(f"n_layers, d_in and d_sae must be positive, got {self.n_layers}, "
                             f"{self.d_in}, {self.d_sae}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        if len(self.layers) != self.n_layers or any(
                b <= a for a, b in zip(self.layers, self.layers[1:], strict=False)) or (
                self.layers and self.layers[0] < 0):
            raise ValueError(f"layers must be {self.n_layers} increasing block indices, got "
                             f"{self.layers}")
        if self.input_site not in _INPUTS:
            raise ValueError(f"input_site must be one of {_INPUTS}, got {self.input_site!r}")
        if self.output_site not in _OUTPUTS:
            raise ValueError(f"output_site must be one of {_OUTPUTS}, got {self.output_site!r}")

    @property
    def n_features(self) -> int:
        """Features in all slots together (the range of a flat index)."""
        return self.n_layers * self.d_sae

    @property
    def decoder_rows(self) -> int:
        """Decoder vectors stored: ``d_sae`` per (source, output >= source) pair."""
        return self.n_layers * (self.n_layers + 1) // 2 * self.d_sae


@dataclass(frozen=True, eq=False)
class CLT:
    """A CLT's config and tensors (causal decoders only). Immutable."""

    cfg: CLTConfig
    W_enc: torch.Tensor  # [L, d_in, d_sae]
    b_enc: torch.Tensor  # [L, d_sae]
    W_dec: tuple[torch.Tensor, ...]  # W_dec[s]: [d_sae, L - s, d_in]; [:, k] writes slot s + k
    b_dec: torch.Tensor  # [L, d_in], bias of each output slot
    threshold: torch.Tensor | None = field(default=None)  # [L, d_sae] (JumpReLU)
    W_skip: torch.Tensor | None = field(default=None)  # [L, d_in, d_in], y_l += x_l @ W_skip[l]

    def __post_init__(self) -> None:
        c = self.cfg
        L, d, F = c.n_layers, c.d_in, c.d_sae
        want = {"W_enc": (L, d, F), "b_enc": (L, F), "b_dec": (L, d)}
        if c.activation != "relu":
            want["threshold"] = (L, F)
        if c.skip:
            want["W_skip"] = (L, d, d)
        for name, shape in want.items():
            t = getattr(self, name)
            if t is None or tuple(t.shape) != shape:
                raise ValueError(f"CLT tensor {name} must have shape {shape}, got "
                                 f"{None if t is None else tuple(t.shape)}")
        if len(self.W_dec) != L or any(tuple(w.shape) != (F, L - s, d)
                                        for s, w in enumerate(self.W_dec)):
            raise ValueError(f"CLT W_dec must be {L} tensors [d_sae, L - s, d_in], got "
                             f"{[tuple(w.shape) for w in self.W_dec]}")

    @property
    def dtype(self) -> torch.dtype:
        return self.W_enc.dtype

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> CLT:
        """A copy with every tensor moved (and optionally cast)."""

        def mv(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device=device, dtype=dtype or t.dtype).contiguous()

        return CLT(self.cfg, mv(self.W_enc), mv(self.b_enc), tuple(mv(w) for w in self.W_dec),
                   mv(self.b_dec), mv(self.threshold), mv(self.W_skip))


# ---------------------------------------------------------------- sizes and addressing

def decoder_bytes(cfg: CLTConfig, dtype: torch.dtype) -> int:
    """Bytes of the causal decoder in ``dtype``: ``L (L + 1) / 2 * d_sae * d_in`` values."""
    return cfg.decoder_rows * cfg.d_in * _itemsize(dtype)


def weight_bytes(cfg: CLTConfig, dtype: torch.dtype) -> int:
    """Bytes of every tensor of the CLT in ``dtype`` (decoder, encoder, biases, thresholds,
    skip)."""
    L, d, F = cfg.n_layers, cfg.d_in, cfg.d_sae
    n = cfg.decoder_rows * d + L * d * F + L * F + L * d
    n += L * F if cfg.activation != "relu" else 0
    n += L * d * d if cfg.skip else 0
    return n * _itemsize(dtype)


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def flat_index(cfg: CLTConfig, slot: int, index: int) -> int:
    """The flat feature index of feature ``index`` of slot ``slot``: ``slot * d_sae + index``."""
    if not 0 <= slot < cfg.n_layers or not 0 <= index < cfg.d_sae:
        raise ValueError(f"feature ({slot}, {index}) is outside {cfg.n_layers} slots x "
                         f"{cfg.d_sae} features")
    return slot * cfg.d_sae + index


def split_index(cfg: CLTConfig, flat: int) -> tuple[int, int]:
    """``(slot, index)`` of a flat feature index (``flat_index``'s inverse)."""
    if not 0 <= flat < cfg.n_features:
        raise ValueError(f"feature {flat} is outside [0, {cfg.n_features})")
    return divmod(flat, cfg.d_sae)


# ---------------------------------------------------------------- encode and decode

def activate(clt: CLT, slot: int, pre: torch.Tensor) -> torch.Tensor:
    """Feature activations of slot ``slot`` from its pre-activations ``[..., d_sae]``."""
    kind = clt.cfg.activation
    if kind == "relu":
        return torch.relu(pre)
    assert clt.threshold is not None, "JumpReLU CLT without threshold"
    on = pre > clt.threshold[slot]
    return pre * on if kind == "jumprelu_signed" else torch.relu(pre) * on


def pre_activations(clt: CLT, x: torch.Tensor, slot: int) -> torch.Tensor:
    """``x @ W_enc[slot] + b_enc[slot]`` for slot ``slot``'s input ``x [..., d_in]``."""
    return x @ clt.W_enc[slot] + clt.b_enc[slot]


def encode_layer(clt: CLT, x: torch.Tensor, slot: int) -> torch.Tensor:
    """Features ``[..., d_sae]`` of slot ``slot`` from its input ``x [..., d_in]``
    (circuit-tracer ``encode_layer``)."""
    return activate(clt, slot, pre_activations(clt, x, slot))


def encode(clt: CLT, xs: torch.Tensor) -> torch.Tensor:
    """Features ``[L, ..., d_sae]`` of every slot from the inputs ``xs [L, ..., d_in]``
    (circuit-tracer ``encode``)."""
    _check_slots(clt, xs, "xs")
    return torch.stack([encode_layer(clt, xs[s], s) for s in range(clt.cfg.n_layers)])


def decode_layer(clt: CLT, fs: Sequence[torch.Tensor] | torch.Tensor, slot: int,
                 x: torch.Tensor | None = None) -> torch.Tensor:
    """Output ``[..., d_in]`` of slot ``slot``: ``b_dec[slot] + sum_{s <= slot} fs[s] @
    W_dec[s][:, slot - s]``, plus ``x @ W_skip[slot]`` when the CLT has a skip (then ``x``,
    slot ``slot``'s input, is required). ``fs[s]`` is ``[..., d_sae]``; only ``s <= slot`` are
    read, so a forward pass can decode slot ``l`` once slots ``0..l`` are encoded."""
    out = clt.b_dec[slot] + sum(fs[s] @ clt.W_dec[s][:, slot - s] for s in range(slot + 1))
    if clt.W_skip is not None:
        if x is None:
            raise ValueError("this CLT has a skip connection: decode needs the slot's input x")
        out = out + x @ clt.W_skip[slot]
    return out


def decode(clt: CLT, fs: torch.Tensor, xs: torch.Tensor | None = None) -> torch.Tensor:
    """Outputs ``[L, ..., d_in]`` of every slot from features ``fs [L, ..., d_sae]`` (and, with
    a skip, inputs ``xs [L, ..., d_in]``): circuit-tracer ``decode(features, input_acts)`` for
    every position (circuit-tracer drops positions after the last active feature; this does
    not)."""
    _check_slots(clt, fs, "fs")
    return torch.stack([decode_layer(clt, fs, s, None if xs is None else xs[s])
                        for s in range(clt.cfg.n_layers)])


def decoder_vectors(clt: CLT, slot: int, feat: torch.Tensor) -> torch.Tensor:
    """Decoder rows of features ``feat [...]`` of slot ``slot`` to every later output slot:
    ``[..., L - slot, d_in]`` (circuit-tracer ``_get_decoder_vectors``)."""
    return clt.W_dec[slot][feat]


def edit_delta(clt: CLT, slot: int, feat: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
    """What edits of slot ``slot``'s features add to every output slot ``l >= slot``.

    ``feat``, ``coef`` ``[R, K]``: per row, the edited features and their change of activation
    (``f' - f``; a clamp to ``v``: ``v - f``). Returns ``[R, L - slot, d_in]``, entry
    ``[r, l - slot] = sum_k coef[r, k] * W_dec[slot][feat[r, k], l - slot]``.
    """
    return torch.einsum("rk,rkod->rod", coef.to(clt.W_dec[slot].dtype),
                        decoder_vectors(clt, slot, feat))


def _check_slots(clt: CLT, t: torch.Tensor, name: str) -> None:
    if t.shape[0] != clt.cfg.n_layers:
        raise ValueError(f"{name} must have one entry per slot ({clt.cfg.n_layers}), got "
                         f"{t.shape[0]}")


# ---------------------------------------------------------------- serving views

SLOT_ARCHITECTURES = {"relu": "standard", "jumprelu": "jumprelu"}
"""The SAE architecture a slot's features are computed by, per ``Activation``.
``jumprelu_signed`` has none (the SAE kernels gate with ``relu``)."""


def slot_sae(clt: CLT, slot: int) -> SAE:
    """Slot ``slot`` as an SAE: a transcoder of block ``layers[slot]`` whose encoder is the
    slot's and whose decoder is its *own-layer* share ``W_dec[slot][:, 0]``. Its features
    and an edit's coefficient ``f' - f`` are exactly the CLT's (``encode_layer``); the
    serving kernels compute them with the SAE machinery. Shares the CLT's tensors."""
    c = clt.cfg
    arch = SLOT_ARCHITECTURES.get(c.activation)
    if arch is None:
        raise ValueError(f"a CLT with activation {c.activation!r} has no SAE view")
    layer = c.layers[slot]
    cfg = SAEConfig(architecture=arch, d_in=c.d_in, d_sae=c.d_sae,
                    hook_name=f"blocks.{layer}.{c.input_hook or 'mlp.hook_in'}", layer=layer,
                    site="mlp_out", model_name=c.model_name, dtype=c.dtype, format=c.format,
                    training_architecture="cross_layer_transcoder", input_site="mlp_in",
                    hook_name_out=f"blocks.{layer}.{c.output_hook or 'hook_mlp_out'}")
    return SAE(cfg, W_enc=clt.W_enc[slot], W_dec=clt.W_dec[slot][:, 0], b_enc=clt.b_enc[slot],
               b_dec=clt.b_dec[slot],
               threshold=None if clt.threshold is None else clt.threshold[slot])


def output_decoder(clt: CLT, slot: int) -> torch.Tensor:
    """``[(slot + 1) * d_sae, d_in]``: what a unit change of each flat feature ``s * d_sae + j``
    with ``s <= slot`` adds to output slot ``slot`` (``W_dec[s][j, slot - s]``). Row ``i`` is
    flat feature ``i``, so the edits reaching one output slot are one gather of it (a copy:
    the decoders, stored source-major, laid out output-major)."""
    return torch.cat([clt.W_dec[s][:, slot - s] for s in range(slot + 1)]).contiguous()
