"""The SAE container and the architecture interface.

Shapes follow SAELens: ``W_enc [d_in, d_sae]``, ``W_dec [d_sae, d_in]``, ``b_enc [d_sae]``,
``b_dec [d_in]``, ``threshold [d_sae]`` (JumpReLU only).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Protocol

import torch

HookSite = Literal["resid_post", "resid_pre"]


@dataclass(frozen=True)
class SAEConfig:
    """Everything about an SAE except its tensors."""

    architecture: str
    """Registered architecture name, e.g. ``standard``, ``jumprelu``, ``topk``."""
    d_in: int
    """Width of the hooked activation (the model's hidden size)."""
    d_sae: int
    """Number of features."""
    hook_name: str
    """SAELens hook name, e.g. ``blocks.3.hook_resid_post``."""
    layer: int
    """0-based block index parsed from ``hook_name``."""
    site: HookSite
    """Where in the block the SAE reads and writes."""
    apply_b_dec_to_input: bool = False
    """Subtract ``b_dec`` from the input before encoding (SAELens convention)."""
    k: int | None = None
    """Active features per token for TopK-family architectures; None otherwise."""
    model_name: str = ""
    """Model the SAE was trained on, as its config records it (may be empty)."""
    dtype: str = "float32"
    """Dtype the weights are stored in."""
    format: str = "saelens"
    """On-disk format the SAE was loaded from."""

    def __post_init__(self) -> None:
        if self.d_in <= 0 or self.d_sae <= 0:
            raise ValueError(f"d_in and d_sae must be positive, got {self.d_in}, {self.d_sae}")
        if self.k is not None and not 0 < self.k <= self.d_sae:
            raise ValueError(f"k must be in [1, d_sae={self.d_sae}], got {self.k}")


@dataclass(frozen=True, eq=False)
class SAE:
    """An SAE's config and tensors. Immutable; nothing is cached on it during a forward."""

    cfg: SAEConfig
    W_enc: torch.Tensor  # [d_in, d_sae]
    W_dec: torch.Tensor  # [d_sae, d_in]
    b_enc: torch.Tensor  # [d_sae]
    b_dec: torch.Tensor  # [d_in]
    threshold: torch.Tensor | None = field(default=None)  # [d_sae], JumpReLU

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> SAE:
        """A copy with every tensor moved (and optionally cast)."""

        def mv(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device=device, dtype=dtype or t.dtype).contiguous()

        return SAE(
            self.cfg, mv(self.W_enc), mv(self.W_dec), mv(self.b_enc), mv(self.b_dec),
            mv(self.threshold),
        )


class Architecture(Protocol):
    """How an architecture turns pre-activations into feature activations."""

    name: str
    needs_full_preactivation: bool
    """True when a feature's activation depends on other features' pre-activations (TopK)."""

    def activate(self, sae: SAE, pre: torch.Tensor) -> torch.Tensor:
        """Dense activations ``[..., d_sae]`` from dense pre-activations ``[..., d_sae]``."""
        ...

    def activate_columns(
        self, sae: SAE, pre_cols: torch.Tensor, cols: torch.Tensor, pre_full: torch.Tensor | None
    ) -> torch.Tensor:
        """Activations of selected features.

        ``pre_cols [..., n]`` are the pre-activations of features ``cols [..., n]`` (same
        leading shape). ``pre_full [..., d_sae]`` is given only when
        ``needs_full_preactivation`` is true.
        """
        ...
