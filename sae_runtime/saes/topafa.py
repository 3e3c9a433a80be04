"""Top-AFA SAE (Lee et al. 2025, "Evaluating and Designing Sparse Autoencoders by
Approximating Quasi-Orthogonality"; reference code: github.com/SewoongLee/top-afa-sae,
``training/sae.py`` ``TopAFASAE.forward``).

Instead of a fixed k, each token keeps as many features as it takes for the norm of their
decoder contributions to match the norm of the encoder input ("approximate feature
activation"). The exact rule implemented, per token:

1. ``a = relu(pre)`` and ``s_i = (a_i * ||W_dec[i]||)**2`` (``SAE.rank_scale`` replaces the
   decoder norms when set);
2. sort ``s`` descending and take the cumulative sums ``c_1 <= c_2 <= ... <= c_d``; the last
   one is replaced by ``1e8`` (as the reference does, so keeping every latent is never
   chosen);
3. ``k = argmin_j | sqrt(c_j) - ||xin|| |`` (1-based, first index on ties), where ``xin`` is
   the encoder input ``x - b_dec`` (after any input normalisation);
4. keep the latents whose ``s_i`` is at least the k-th largest ``s`` (the reference keeps
   exactly the first k of an arbitrary sort on exact ties; that is the only difference),
   with value ``a_i``.

The reference trains without an encoder bias; an SAE stored with ``b_enc = 0`` computes
exactly its ``relu(x_cent @ W_enc)``.
"""

from __future__ import annotations

import torch

from sae_runtime.saes.base import SAE, register

_LAST_CUMSUM = 1e8  # the reference's sentinel for "all latents"


class TopAFAArchitecture:
    name = "top_afa"
    needs_full_preactivation = True
    needs_k = False
    extra_tensors: tuple[str, ...] = ()

    def activate(self, sae: SAE, pre: torch.Tensor, xin: torch.Tensor | None = None):
        acts = torch.relu(pre)
        score, kth = _score_and_kth(sae, acts, xin)
        return acts * (score >= kth)

    def activate_columns(self, sae, pre_cols, cols, pre_full, xin=None):
        assert pre_full is not None, "top-AFA needs the full pre-activation"
        _, kth = _score_and_kth(sae, torch.relu(pre_full), xin)
        acts = torch.relu(pre_cols)
        return acts * ((acts * _scale(sae)[cols]).square() >= kth)


def _scale(sae: SAE) -> torch.Tensor:
    return sae.rank_scale if sae.rank_scale is not None else sae.W_dec.norm(dim=-1)


def _score_and_kth(
    sae: SAE, acts: torch.Tensor, xin: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-latent scores ``s [..., d_sae]`` and the k-th largest score ``[..., 1]``."""
    assert xin is not None, "top-AFA needs the encoder input"
    score = (acts * _scale(sae)).square()
    ordered = score.sort(dim=-1, descending=True).values
    cum = ordered.cumsum(dim=-1)
    cum[..., -1] = _LAST_CUMSUM
    target = xin.norm(dim=-1, keepdim=True)  # [..., 1]
    k = (cum.sqrt() - target).abs().argmin(dim=-1, keepdim=True)  # 0-based index of the k-th
    return score, ordered.gather(-1, k)


register(TopAFAArchitecture())
