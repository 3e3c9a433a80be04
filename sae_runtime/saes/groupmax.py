"""GroupMax SAE (EleutherAI sparsify ``activation: groupmax``).

The ``d_sae`` latents form ``k`` contiguous groups of ``d_sae / k``; in each group only the
largest ReLU'd pre-activation survives: ``f_i = relu(pre_i) * [relu(pre_i) = max_group(i)]``.
A latent tied with its group's maximum counts as a member.
"""

from __future__ import annotations

import torch

from sae_runtime.saes.base import SAE, register


class GroupMaxArchitecture:
    name = "groupmax"
    needs_full_preactivation = True
    needs_k = True
    extra_tensors: tuple[str, ...] = ()

    def activate(self, sae: SAE, pre: torch.Tensor, xin: torch.Tensor | None = None):
        acts = torch.relu(pre)
        gmax = _group_max(sae, acts)  # [..., k]
        per_latent = gmax.repeat_interleave(_group_size(sae), dim=-1)  # [..., d_sae]
        return acts * (acts >= per_latent)

    def activate_columns(self, sae, pre_cols, cols, pre_full, xin=None):
        assert pre_full is not None, "GroupMax needs the full pre-activation"
        gmax = _group_max(sae, torch.relu(pre_full))  # [..., k]
        acts = torch.relu(pre_cols)
        return acts * (acts >= gmax.gather(-1, cols // _group_size(sae)))


def _group_size(sae: SAE) -> int:
    assert sae.cfg.k is not None, "groupmax SAE without k"
    if sae.cfg.d_sae % sae.cfg.k:
        raise ValueError(f"groupmax: d_sae={sae.cfg.d_sae} is not a multiple of k={sae.cfg.k}")
    return sae.cfg.d_sae // sae.cfg.k


def _group_max(sae: SAE, acts: torch.Tensor) -> torch.Tensor:
    return acts.unflatten(-1, (sae.cfg.k, _group_size(sae))).amax(dim=-1)


register(GroupMaxArchitecture())
