"""JumpReLU SAE (SAELens, Gemma Scope, Llama Scope): ``f = relu(pre) * (pre * r > threshold)``.

``r`` is ``SAE.rank_scale`` (1 when absent): Llama Scope's ``sparsity_include_decoder_norm``
tests ``pre * ||W_dec[i]|| > threshold`` but reports ``pre``. SAELens BatchTopK and
Matryoshka BatchTopK SAEs are JumpReLU SAEs at inference (their global threshold becomes a
constant per-feature threshold), so they load as this architecture.
"""

from __future__ import annotations

import torch

from sae_runtime.saes.base import SAE, register


class JumpReLUArchitecture:
    name = "jumprelu"
    needs_full_preactivation = False
    needs_k = False
    extra_tensors: tuple[str, ...] = ("threshold",)

    def activate(self, sae: SAE, pre: torch.Tensor, xin: torch.Tensor | None = None):
        assert sae.threshold is not None, "JumpReLU SAE without threshold"
        score = pre if sae.rank_scale is None else pre * sae.rank_scale
        return torch.relu(pre) * (score > sae.threshold)

    def activate_columns(self, sae, pre_cols, cols, pre_full, xin=None):
        assert sae.threshold is not None, "JumpReLU SAE without threshold"
        score = pre_cols if sae.rank_scale is None else pre_cols * sae.rank_scale[cols]
        return torch.relu(pre_cols) * (score > sae.threshold[cols])


register(JumpReLUArchitecture())
