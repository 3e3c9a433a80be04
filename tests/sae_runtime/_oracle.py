"""Compare our SAE math with a reference implementation of the same SAE.

The reference is given as two functions on dense tensors, ``encode(x) -> f [N, d_sae]`` and
``decode(f, x) -> x_hat [N, d_in]`` (``x`` is the activation that was encoded, needed by
references whose output map depends on it). Every check is an equality with the reference
up to ``ATOL`` in float32:

- ``ops.encode`` and ``ops.feature_activations`` against ``encode``;
- ``ops.decode`` against ``decode``;
- ``x + ops.intervention_delta(...)`` against ``x - decode(f) + decode(f')`` for CLAMP,
  ABLATE, SCALE and ADD (and a mixed row set with padding entries), where ``f'`` is ``f``
  with the edits applied: the reconstruction error is preserved in the original space;
- ``ops.read_latents`` against ``f'``.

Edited features per row: the strongest, the second strongest and the weakest (usually
inactive) feature of the reference encoding, so the edits cannot all be no-ops.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from sae_runtime import ops
from sae_runtime.saes.base import SAE

ATOL = 1e-5
Mode = ops.Mode
VALUES = {  # per edited column: strongest, second, weakest
    Mode.CLAMP: (2.5, -1.5, 0.75),
    Mode.ABLATE: (0.0, 0.0, 0.0),
    Mode.SCALE: (2.0, -0.5, 3.0),
    Mode.ADD: (1.5, -1.0, 0.5),
}


def close(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    err = (got - want).abs().max().item() if got.numel() else 0.0
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    assert err <= ATOL, f"{what}: max abs error {err:.3g} > {ATOL}"


def apply_edits(f: torch.Tensor, feat: torch.Tensor, mode: torch.Tensor,
                value: torch.Tensor) -> torch.Tensor:
    """``f`` with the edits written in, computed independently of ``ops.edited_values``."""
    out = f.clone()
    for r in range(f.shape[0]):
        for j in range(feat.shape[1]):
            i, m, v = int(feat[r, j]), int(mode[r, j]), float(value[r, j])
            if m == Mode.CLAMP:
                out[r, i] = v
            elif m == Mode.ABLATE:
                out[r, i] = 0.0
            elif m == Mode.SCALE:
                out[r, i] = f[r, i] * v
            elif m == Mode.ADD:
                out[r, i] = f[r, i] + v
    return out


def check_against_reference(
    ours: SAE,
    x: torch.Tensor,
    encode: Callable[[torch.Tensor], torch.Tensor],
    decode: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
) -> None:
    with torch.no_grad():
        f = encode(x)
        assert (f != 0).any(), "the reference SAE never fires; the comparison would be vacuous"
        assert (f == 0).any(), "the reference SAE fires everywhere; sparsity is not exercised"
        close(ops.encode(ours, x), f, "encode")
        close(ops.decode(ours, f, x), decode(f, x), "decode")
        g = torch.Generator().manual_seed(0)
        cols = torch.randint(0, f.shape[1], (x.shape[0], 9), generator=g)
        close(ops.feature_activations(ours, x, cols), f.gather(1, cols), "feature_activations")

        order = f.abs().argsort(dim=1, descending=True)
        feat = torch.stack([order[:, 0], order[:, 1], order[:, -1]], dim=1)  # [N, 3]
        n = x.shape[0]
        base = x - decode(f, x)  # the reference's reconstruction error
        for m, vals in VALUES.items():
            mode = torch.full((n, 3), int(m))
            value = torch.tensor(vals).expand(n, 3)
            f_new = apply_edits(f, feat, mode, value)
            want = base + decode(f_new, x)
            delta = ops.intervention_delta(ours, x, feat, mode, value)
            close(x + delta, want, f"intervention_delta {m.name}")
            if m in (Mode.ABLATE, Mode.CLAMP):
                assert delta.abs().max() > 1e-3, f"{m.name} edited nothing"
            close(ops.read_latents(ours, x, feat, mode, value), f_new, f"read_latents {m.name}")

        # One call with every mode and padding (Mode.NONE) entries; half the rows unedited.
        mode = torch.tensor([[1, 3, 0], [2, 4, 1], [0, 0, 0], [4, 0, 3]]).repeat(n // 4 + 1, 1)[:n]
        value = torch.randn(n, 3, generator=g)
        f_new = apply_edits(f, feat, mode, value)
        close(x + ops.intervention_delta(ours, x, feat, mode, value), base + decode(f_new, x),
              "intervention_delta mixed")
        close(ops.read_latents(ours, x, feat, mode, value), f_new, "read_latents mixed")
