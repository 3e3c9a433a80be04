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
"""

from __future__ import annotations

from enum import IntEnum

import torch

from sae_runtime import registry
from sae_runtime.saes.base import SAE


class Mode(IntEnum):
    """Intervention modes; the numbers match ``steering.v1.InterventionMode``."""

    NONE = 0  # padding entry: contributes nothing
    CLAMP = 1
    ABLATE = 2
    SCALE = 3
    ADD = 4


def sae_input(sae: SAE, x: torch.Tensor) -> torch.Tensor:
    """What the encoder sees: ``x - b_dec`` when ``apply_b_dec_to_input``, else ``x``."""
    return x - sae.b_dec if sae.cfg.apply_b_dec_to_input else x


def pre_activations(sae: SAE, x: torch.Tensor) -> torch.Tensor:
    """Dense pre-activations ``[..., d_sae]`` of ``x [..., d_in]``."""
    return sae_input(sae, x) @ sae.W_enc + sae.b_enc


def encode(sae: SAE, x: torch.Tensor) -> torch.Tensor:
    """Dense feature activations ``[..., d_sae]`` (reference; materialises every feature)."""
    return registry.get(sae.cfg.architecture).activate(sae, pre_activations(sae, x))


def decode(sae: SAE, acts: torch.Tensor) -> torch.Tensor:
    """Reconstruction ``acts @ W_dec + b_dec``."""
    return acts @ sae.W_dec + sae.b_dec


def feature_activations(sae: SAE, x: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """Activations of features ``cols [R, n]`` at rows ``x [R, d_in]`` -> ``[R, n]``.

    Touches only the gathered encoder columns unless the architecture needs the full
    pre-activation (TopK), in which case it is computed for these rows only.
    """
    arch = registry.get(sae.cfg.architecture)
    xin = sae_input(sae, x)  # [R, d_in]
    if arch.needs_full_preactivation:
        # Gather from the one full computation: a separately rounded column could fall on
        # the other side of the k-th value and flip membership.
        pre_full = xin @ sae.W_enc + sae.b_enc  # [R, d_sae]
        return arch.activate_columns(sae, pre_full.gather(1, cols), cols, pre_full)
    w = sae.W_enc.t()[cols]  # [R, n, d_in]
    pre_cols = torch.einsum("rd,rnd->rn", xin, w) + sae.b_enc[cols]
    return arch.activate_columns(sae, pre_cols, cols, None)


def edited_values(mode: torch.Tensor, value: torch.Tensor, act: torch.Tensor) -> torch.Tensor:
    """The feature value after each edit; ``mode``, ``value`` and ``act`` share a shape.

    Padding entries (Mode.NONE) keep ``act``, so they add nothing.
    """
    out = act
    out = torch.where(mode == Mode.CLAMP, value, out)
    out = torch.where(mode == Mode.ABLATE, torch.zeros_like(act), out)
    out = torch.where(mode == Mode.SCALE, act * value, out)
    out = torch.where(mode == Mode.ADD, act + value, out)
    return out


def intervention_delta(
    sae: SAE, x: torch.Tensor, feat: torch.Tensor, mode: torch.Tensor, value: torch.Tensor
) -> torch.Tensor:
    """Additive edit ``[R, d_in]`` for rows ``x [R, d_in]``.

    ``feat``, ``mode``, ``value`` are ``[R, K]``: feature index, Mode and value per edit.
    """
    act = feature_activations(sae, x, feat)  # [R, K]
    coef = edited_values(mode, value.to(act.dtype), act) - act  # [R, K]
    return torch.einsum("rk,rkd->rd", coef, sae.W_dec[feat])


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
    real = mode != Mode.NONE
    rows = torch.arange(acts.shape[0], device=acts.device)[:, None].expand_as(feat)
    acts[rows[real], feat[real]] = new[real]
    return acts
