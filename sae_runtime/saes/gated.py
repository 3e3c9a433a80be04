"""Gated SAE (SAELens ``gated``, Rajamanoharan et al. 2024).

Two paths share ``W_enc``: the gate ``pre = xin @ W_enc + b_gate`` (stored as ``b_enc``)
decides which features fire, the magnitude ``xin @ (W_enc * exp(r_mag)) + b_mag`` how
strongly: ``f = [pre > 0] * relu(mag)``. The magnitude path is computed from the gate
pre-activation, ``mag = (pre - b_gate) * exp(r_mag) + b_mag``, so only one matmul runs.
"""

from __future__ import annotations

import torch

from sae_runtime.saes.base import SAE, register


class GatedArchitecture:
    name = "gated"
    needs_full_preactivation = False
    needs_k = False
    extra_tensors: tuple[str, ...] = ("b_mag", "r_mag")

    def activate(self, sae: SAE, pre: torch.Tensor, xin: torch.Tensor | None = None):
        assert sae.b_mag is not None and sae.r_mag is not None, "gated SAE without b_mag/r_mag"
        mag = (pre - sae.b_enc) * sae.r_mag.exp() + sae.b_mag
        return torch.relu(mag) * (pre > 0)

    def activate_columns(self, sae, pre_cols, cols, pre_full, xin=None):
        assert sae.b_mag is not None and sae.r_mag is not None, "gated SAE without b_mag/r_mag"
        mag = (pre_cols - sae.b_enc[cols]) * sae.r_mag[cols].exp() + sae.b_mag[cols]
        return torch.relu(mag) * (pre_cols > 0)


register(GatedArchitecture())
