"""Pure SAE math: tensors in, tensors out. No state, no vLLM.

Intervention semantics (DESIGN §2). For feature i with activation ``f_i(x)`` and decoder
row ``W_dec[i]``, every mode adds a multiple of ``W_dec[i]`` to ``x`` and leaves the SAE's
reconstruction error untouched:

    CLAMP  x + (v - f_i) W_dec[i]
    ABLATE x - f_i W_dec[i]
    SCALE  x + (s - 1) f_i W_dec[i]
    ADD    x + a W_dec[i]

Several edits in one request sum their deltas; activations are all read from the same
incoming ``x`` (edits do not see each other).

Normalised SAEs (``SAEConfig.normalization``) encode ``x_n = N(x)`` and reconstruct in the
normalised space; their output is mapped back with the inverse map of the same token,
``x_hat = N_x^{-1}(acts @ W_dec + b_dec)``. Every inverse map used here is affine with a
per-token scale ``c(x)`` (the second value of ``normalize``), so the edit that keeps the reconstruction error
``x - x_hat`` unchanged in the *original* space is the decoder-space delta times ``c(x)``:

    x + delta = x - x_hat(f) + x_hat(f'),   delta = c(x) * sum_i (f'_i - f_i) W_dec[i]
"""

from __future__ import annotations

import dataclasses
import math
from enum import IntEnum

import torch

from sae_runtime import registry
from sae_runtime.errors import SAEFormatError
from sae_runtime.saes import clt as clt_math
from sae_runtime.saes.base import SAE
from sae_runtime.saes.clt import CLT


class Mode(IntEnum):
    """Intervention modes; the numbers match ``steering.v1.InterventionMode``."""

    NONE = 0  # padding entry: contributes nothing
    CLAMP = 1
    ABLATE = 2
    SCALE = 3
    ADD = 4


class Cond(IntEnum):
    """Comparison of a conditional edit or a guardrail; the numbers match
    ``steering.v1.Comparison``. ``NONE``: unconditional (the edit record's empty value)."""

    NONE = 0
    GT = 1
    LT = 2


def normalize(sae: SAE, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(x_n, c)``: the normalised input and the per-token output scale ``c [..., 1]``.

    ``c`` is None when the SAE does not normalise (scale 1). The inverse map of a
    normalised-space vector ``y`` is ``y * c + mean(x)`` (the mean only for ``layer_norm``).
    """
    kind = sae.cfg.normalization
    if kind == "none":
        return x, None
    if kind == "constant_scale":
        return x * sae.cfg.norm_scale_in, x.new_full((1,), sae.cfg.norm_scale_out)
    if kind == "token_norm":
        norm = x.norm(dim=-1, keepdim=True)
        # An all-zero row (padding) stays zero instead of becoming NaN.
        safe = torch.where(norm > 0, norm, torch.ones_like(norm))
        coeff = math.sqrt(sae.cfg.d_in) / safe
        return x * coeff, 1.0 / coeff
    if kind == "layer_norm":
        mu = x.mean(dim=-1, keepdim=True)
        centred = x - mu
        std = centred.std(dim=-1, keepdim=True)
        return centred / (std + sae.cfg.norm_eps), std
    raise ValueError(f"unknown normalization {kind!r}")


def encoder_input(sae: SAE, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(sae_input(sae, x), c)`` from one normalisation pass; ``c [..., 1]`` (None = 1) maps
    a decoder-space delta back to ``x``'s space."""
    xn, scale = normalize(sae, x)
    return (xn - sae.b_dec if sae.cfg.apply_b_dec_to_input else xn), scale


def sae_input(sae: SAE, x: torch.Tensor) -> torch.Tensor:
    """What the encoder sees: ``N(x) - b_dec`` when ``apply_b_dec_to_input``, else ``N(x)``."""
    return encoder_input(sae, x)[0]


def dense_pre(sae: SAE, xin: torch.Tensor) -> torch.Tensor:
    """``xin @ W_enc + b_enc`` ``[..., d_sae]`` for an encoder input ``xin [..., d_in]``,
    through ``sae.enc_gemm`` when one is set (2-D inputs)."""
    mm = sae.enc_gemm
    if mm is not None and xin.dim() == 2 and xin.shape[0] > 0:
        return mm(xin.contiguous()) + sae.b_enc
    return xin @ sae.W_enc + sae.b_enc


def pre_activations(sae: SAE, x: torch.Tensor) -> torch.Tensor:
    """Dense pre-activations ``[..., d_sae]`` of ``x [..., d_in]``."""
    return dense_pre(sae, sae_input(sae, x))


def encode(sae: SAE, x: torch.Tensor) -> torch.Tensor:
    """Dense feature activations ``[..., d_sae]`` (reference; materialises every feature)."""
    xin = sae_input(sae, x)
    return registry.get(sae.cfg.architecture).activate(sae, dense_pre(sae, xin), xin)


def decode(sae: SAE, acts: torch.Tensor, x: torch.Tensor | None = None) -> torch.Tensor:
    """Reconstruction ``N_x^{-1}(acts @ W_dec + b_dec)`` in the input's space.

    ``x`` (the activation that was encoded) is needed only by SAEs with a per-token
    normalisation (``token_norm``, ``layer_norm``), whose inverse depends on it.
    """
    return from_decoder_space(sae, acts @ sae.W_dec + sae.b_dec, x)


def feature_activations(sae: SAE, x: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """Activations of features ``cols [R, n]`` at rows ``x [R, d_in]`` -> ``[R, n]``.

    Touches only the gathered encoder columns unless the architecture needs the full
    pre-activation (TopK), in which case it is computed for these rows only.
    """
    return _column_activations(sae, sae_input(sae, x), cols)


def _column_activations(sae: SAE, xin: torch.Tensor, cols: torch.Tensor,
                        pre_full: torch.Tensor | None = None) -> torch.Tensor:
    """``pre_full``: ``dense_pre(sae, xin)`` when the caller has it (an architecture that
    needs the full pre-activation computes it here otherwise)."""
    arch = registry.get(sae.cfg.architecture)
    if arch.needs_full_preactivation:
        # Gather from the one full computation: a separately rounded column could fall on
        # the other side of the k-th value and flip membership.
        if pre_full is None:
            pre_full = dense_pre(sae, xin)  # [R, d_sae]
        return arch.activate_columns(sae, pre_full.gather(1, cols), cols, pre_full, xin)
    w = sae.W_enc.t()[cols]  # [R, n, d_in]
    pre_cols = torch.einsum("rd,rnd->rn", xin, w) + sae.b_enc[cols]
    return arch.activate_columns(sae, pre_cols, cols, None, xin)


def edited_values(mode: torch.Tensor, value: torch.Tensor, act: torch.Tensor) -> torch.Tensor:
    """The feature value after each edit; ``mode``, ``value`` and ``act`` share a shape.

    Padding entries (Mode.NONE) keep ``act``, so they add nothing.
    """
    out = act
    out = torch.where(mode == int(Mode.CLAMP), value, out)
    out = torch.where(mode == int(Mode.ABLATE), torch.zeros_like(act), out)
    out = torch.where(mode == int(Mode.SCALE), act * value, out)
    out = torch.where(mode == int(Mode.ADD), act + value, out)
    return out


def intervention_delta(
    sae: SAE, x: torch.Tensor, feat: torch.Tensor, mode: torch.Tensor, value: torch.Tensor
) -> torch.Tensor:
    """Additive edit ``[R, d_in]`` for rows ``x [R, d_in]``.

    ``feat``, ``mode``, ``value`` are ``[R, K]``: feature index, Mode and value per edit.
    For a normalised SAE the decoder-space delta is mapped back to ``x``'s space.
    """
    xin, scale = encoder_input(sae, x)
    act = _column_activations(sae, xin, feat)  # [R, K]
    coef = edited_values(mode, value.to(act.dtype), act) - act  # [R, K]
    delta = torch.einsum("rk,rkd->rd", coef, sae.W_dec[feat])
    return delta if scale is None else delta * scale


def fold_norm_weight(sae: SAE, gain: torch.Tensor, bias: torch.Tensor | None = None) -> SAE:
    """``sae`` (reading TransformerLens' ``ln2.hook_normalized``, ``x_hat``) rewritten to read
    the MLP input ``m = x_hat * gain + bias`` instead, with the same activations:

        x_hat @ W_enc + b_enc = m @ (W_enc / gain[:, None]) + (b_enc - (bias / gain) @ W_enc)

    Exact up to rounding (computed in float64). A zero ``gain`` entry erases that coordinate of
    ``x_hat`` from the MLP input: such a model cannot serve the SAE, and it is refused.
    Only encoder-side tensors change; the decoder (an edit's direction) is untouched.
    """
    cfg = sae.cfg
    assert cfg.normalization == "none" and not cfg.apply_b_dec_to_input, "a transcoder's input"
    g = gain.to(torch.float64)
    if g.shape != (cfg.d_in,) or bool((g == 0).any()):
        raise SAEFormatError(f"{cfg.hook_name}: the pre-MLP norm's weight ({tuple(g.shape)}, "
                             f"{int((g == 0).sum())} zero entries) cannot be divided out of the "
                             "MLP input to give ln2.hook_normalized")
    W = sae.W_enc.to(torch.float64)
    b_enc = sae.b_enc.to(torch.float64)
    if bias is not None:
        b_enc = b_enc - (bias.to(torch.float64) / g) @ W
    return dataclasses.replace(sae, W_enc=(W / g[:, None]).to(sae.W_enc.dtype).contiguous(),
                               b_enc=b_enc.to(sae.b_enc.dtype), enc_gemm=None)


def clt_intervention_delta(
    clt: CLT, slot: int, x: torch.Tensor, feat: torch.Tensor, mode: torch.Tensor,
    value: torch.Tensor,
) -> torch.Tensor:
    """What edits of CLT slot ``slot``'s features add to every output slot ``l >= slot``.

    ``x [R, d_in]`` is the slot's input (its features' activations are read from it, as for
    an SAE); ``feat``, ``mode``, ``value`` ``[R, K]`` are per-slot feature indices, Modes and
    values. Returns ``[R, L - slot, d_in]``: entry ``[r, l - slot]`` is added to output slot
    ``l``; a clamp of feature ``j`` to ``v`` contributes ``(v - f_j(x)) W_dec[slot][j, l - slot]``.
    """
    act = clt_math.encode_layer(clt, x, slot).gather(1, feat)  # [R, K]
    coef = edited_values(mode, value.to(act.dtype), act) - act
    return clt_math.edit_delta(clt, slot, feat, coef)


def read_latents(
    sae: SAE, x: torch.Tensor, feat: torch.Tensor, mode: torch.Tensor, value: torch.Tensor
) -> torch.Tensor:
    """Dense latents ``[R, d_sae]`` of rows ``x [R, d_in]`` as the edits leave them.

    ``feat/mode/value [R, K]`` are the row's edits at this SAE (Mode.NONE = no edit): an
    edited feature reads as its edited value, every other feature as encoded from ``x``.
    """
    acts = encode(sae, x)
    if feat.numel() == 0:
        return acts
    new = edited_values(mode, value.to(acts.dtype), acts.gather(1, feat))
    real = mode != int(Mode.NONE)
    rows = torch.arange(acts.shape[0], device=acts.device)[:, None].expand_as(feat)
    acts[rows[real], feat[real]] = new[real]
    return acts


def from_decoder_space(sae: SAE, y: torch.Tensor, x: torch.Tensor | None) -> torch.Tensor:
    """``N_x^{-1}(y)``: a decoder-space vector mapped back to the input's space."""
    kind = sae.cfg.normalization
    if kind == "none":
        return y
    if kind == "constant_scale":
        return y * sae.cfg.norm_scale_out
    if x is None:
        raise ValueError(f"decode of a {kind!r}-normalised SAE needs the encoded input x")
    _, scale = normalize(sae, x)
    assert scale is not None
    return y * scale + (x.mean(dim=-1, keepdim=True) if kind == "layer_norm" else 0.0)
