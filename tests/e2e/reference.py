"""Independent reference: Hugging Face transformers forward with hooks doing the SAE edit.

The SAE math comes from the sae-lens package (``SAE.load_from_disk`` + ``encode``); the
edit is the documented formula x <- x + sum_i (new_i - f_i(x)) W_dec[i], applied at the
positions the intervention's scope selects. Nothing here imports our runtime.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from sae_lens import SAE
from transformers import LlamaForCausalLM

CLAMP, ABLATE, SCALE, ADD = 1, 2, 3, 4
ALL, GENERATION_ONLY = 1, 2


@dataclass(frozen=True)
class Edit:
    sae: str
    feature: int
    mode: int
    value: float = 0.0
    scope: int = ALL


class HFReference:
    def __init__(self, model_dir, sae_dirs: dict, sae_order: tuple[str, ...]) -> None:
        self.model = LlamaForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
        self.saes = {sid: SAE.load_from_disk(str(sae_dirs[sid]), device="cpu") for sid in sae_order}
        self.order = sae_order
        self.hooks = {sid: json.loads((Path(sae_dirs[sid]) / "cfg.json").read_text())["metadata"]["hook_name"]
                      for sid in sae_order}

    def block_of(self, sid: str) -> int:
        hook = self.hooks[sid]  # blocks.L.hook_resid_{post,pre}
        layer = int(hook.split(".")[1])
        return layer if hook.endswith("resid_post") else layer - 1

    def residual(self, ids: list[int], block: int) -> torch.Tensor:
        """Residual stream after ``block`` (no edits): [T, d]."""
        with torch.no_grad():
            hs = self.model(torch.tensor([ids]), output_hidden_states=True).hidden_states
        return hs[block + 1][0]

    def logits(self, ids: list[int], edits: list[Edit], prompt_len: int) -> torch.Tensor:
        """Logits [T, vocab] of the full sequence with the edits hooked in."""
        handles = []
        T = len(ids)
        pos = torch.arange(T)
        for sid in self.order:
            mine = [e for e in edits if e.sae == sid]
            if not mine:
                continue
            sae = self.saes[sid]

            def hook(module, inputs, output, sae=sae, mine=mine):
                h = output[0] if isinstance(output, tuple) else output  # [1, T, d]
                f = sae.encode(h)
                delta = torch.zeros_like(h)
                for e in mine:
                    a = f[..., e.feature]
                    new = {CLAMP: torch.full_like(a, e.value), ABLATE: torch.zeros_like(a),
                           SCALE: a * e.value, ADD: a + e.value}[e.mode]
                    mask = (pos >= prompt_len) if e.scope == GENERATION_ONLY else torch.ones(T, dtype=torch.bool)
                    coef = (new - a) * mask.to(a.dtype)
                    delta = delta + coef[..., None] * sae.W_dec[e.feature]
                h = h + delta
                return (h, *output[1:]) if isinstance(output, tuple) else h

            handles.append(self.model.model.layers[self.block_of(sid)].register_forward_hook(hook))
        try:
            with torch.no_grad():
                return self.model(torch.tensor([ids])).logits[0]
        finally:
            for hd in handles:
                hd.remove()


def check_teacher_forced(logits: torch.Tensor, prompt_len: int, generated: list[int],
                         tol: float = 1e-3) -> int:
    """Every generated token must be the reference argmax up to ``tol`` logits.

    Returns how many tokens were the exact argmax. Raises AssertionError at the first
    position where the served token is more than ``tol`` below the reference maximum.
    """
    exact = 0
    for j, tok in enumerate(generated):
        row = logits[prompt_len - 1 + j]
        best = int(row.argmax())
        gap = float(row.max() - row[tok])
        assert gap <= tol, (f"position {prompt_len + j}: served token {tok} is {gap:.4g} logits "
                            f"below the reference argmax {best}")
        exact += tok == best
    return exact
