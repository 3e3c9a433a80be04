"""Independent reference: Hugging Face transformers forward with hooks doing the SAE edit.

The SAE math comes from the sae-lens package (``SAE.load_from_disk`` + ``encode``); the
edit is the documented formula x <- x + sum_i (new_i - f_i(x)) W_dec[i], applied at the
positions the intervention's scope selects (or at an explicit set of positions, ``Edit.at``,
which a test computes by hand from a position selector's documented meaning), at the SAE's
hook site in the HF model (``sae_runtime.labels.hf_sites``: TransformerLens' site
definitions on HF modules).
Nothing here touches the server or its vLLM glue.
"""

from __future__ import annotations

import json
import re
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import torch
from sae_lens import SAE
from transformers import AutoModelForCausalLM

from sae_runtime.labels.hf_sites import edit_site, site_activations
from tests.transcoder_refs import (
    load_sae_lens_transcoder,
    transcoder_input_site,
    transcoder_layer,
)

CLAMP, ABLATE, SCALE, ADD = 1, 2, 3, 4
ALL, GENERATION_ONLY = 1, 2
_HOOK = re.compile(
    r"^blocks\.(\d+)\.(?:attn\.|ln2\.)?hook_(resid_post|resid_pre|attn_out|mlp_out|z|normalized)$")


@dataclass(frozen=True)
class Edit:
    sae: str
    feature: int
    mode: int
    value: float = 0.0
    scope: int = ALL
    at: frozenset[int] | None = None  # explicit absolute positions; overrides ``scope``
    # conditional edit: (feature, ">" or "<", threshold) of the same SAE at the same site,
    # from the incoming activation; ``latch``: on from the first position it held at
    when: tuple[int, str, float] | None = None
    latch: bool = False


def _is_transcoder(folder: Path) -> bool:
    cfg = folder / "cfg.json"
    return not cfg.is_file() or "transcoder" in json.loads(cfg.read_text()).get("architecture", "")


class HFReference:
    """Transcoders (sae-lens's ``Transcoder`` classes, or a Gemma Scope 2 folder as
    sae-lens's loader reads it) encode the MLP's input side (``ln2.hook_normalized`` as
    TransformerLens defines it, or the MLP's input) and edit the MLP's output."""

    def __init__(self, model_dir, sae_dirs: dict, sae_order: tuple[str, ...]) -> None:
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        self.order = sae_order
        self.saes, self.sites = {}, {}
        self.transcoders: dict[str, str] = {}  # transcoder id -> where it reads
        for sid in sae_order:
            folder = Path(sae_dirs[sid])
            if _is_transcoder(folder):
                self.saes[sid] = load_sae_lens_transcoder(folder)
                self.sites[sid] = (transcoder_layer(folder), "mlp_out")
                self.transcoders[sid] = transcoder_input_site(folder)
                continue
            self.saes[sid] = SAE.load_from_disk(str(folder), device="cpu")
            hook = json.loads((folder / "cfg.json").read_text())["metadata"]["hook_name"]
            m = _HOOK.match(hook)
            self.sites[sid] = (int(m.group(1)), m.group(2))

    def read_site(self, sid: str) -> tuple[int, str]:
        """Where the SAE encodes from: its site, or a transcoder's MLP input."""
        layer, site = self.sites[sid]
        return (layer, self.transcoders[sid]) if sid in self.transcoders else (layer, site)

    def activation(self, ids: list[int], sid: str) -> torch.Tensor:
        """Unedited activation the SAE encodes (a transcoder: the MLP input): [T, d]."""
        return site_activations(self.model, torch.tensor([ids]), *self.read_site(sid))[0]

    def latents(self, ids: list[int], sid: str) -> torch.Tensor:
        """sae-lens latents of the unedited activation at the SAE's site: [T, d_sae]."""
        with torch.no_grad():
            return self.saes[sid].encode(self.activation(ids, sid))

    def logits(self, ids: list[int], edits: list[Edit], prompt_len: int) -> torch.Tensor:
        """Logits [T, vocab] of the full sequence with the edits hooked in (server SAE order)."""
        with ExitStack() as stack:
            self._hook_edits(stack, edits, len(ids), prompt_len)
            with torch.no_grad():
                return self.model(torch.tensor([ids])).logits[0]

    def hidden(self, ids: list[int], hooks: list[str], edits: list[Edit] = (),
               prompt_len: int = 0) -> dict[str, torch.Tensor]:
        """Each of ``hooks`` (``blocks.L.hook_<resid_post|resid_pre|attn_out|mlp_out>``,
        ``blocks.L.attn.hook_z``, ``blocks.L.ln2.hook_normalized``) as [T, d], captured by
        plain forward hooks on HF's modules, registered after the edits' hooks, so they see
        the edited values (the documented "after edits"). ``z`` is the input of the
        attention's ``o_proj``; ``ln2.hook_normalized`` is computed here from the input of
        the pre-MLP RMSNorm (``x / sqrt(mean(x^2) + eps)``, before its weight)."""
        out: dict[str, torch.Tensor] = {}
        blocks = self.model.model.layers
        with ExitStack() as stack:
            self._hook_edits(stack, list(edits), len(ids), prompt_len)
            for name in hooks:
                layer_s, site = _HOOK.match(name).groups()
                layer = int(layer_s)
                if site in ("z", "normalized"):
                    block = blocks[layer]
                    mod = block.self_attn.o_proj if site == "z" else block.post_attention_layernorm

                    def grab_in(module, inputs, name=name, site=site):
                        x = inputs[0][0].detach().float()
                        if site == "normalized":
                            eps = module.variance_epsilon
                            x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
                        out[name] = x.clone()

                    h = mod.register_forward_pre_hook(grab_in)
                    stack.callback(h.remove)
                    continue
                if site == "resid_pre":
                    mod = blocks[layer - 1]
                elif site == "attn_out":
                    mod = blocks[layer].self_attn
                elif site == "mlp_out":
                    mod = blocks[layer].mlp
                else:
                    mod = blocks[layer]

                def grab(module, inputs, output, name=name):
                    out[name] = (output[0] if isinstance(output, tuple) else output)[0].detach().clone()

                h = mod.register_forward_hook(grab)
                stack.callback(h.remove)
            with torch.no_grad():
                self.model(torch.tensor([ids]))
        return out

    def _hook_edits(self, stack: ExitStack, edits: list[Edit], T: int, prompt_len: int) -> None:
        pos = torch.arange(T)
        for sid in self.order:
            mine = [e for e in edits if e.sae == sid]
            if not mine:
                continue
            sae = self.saes[sid]
            seen: dict[str, torch.Tensor] = {}
            if sid in self.transcoders:  # keep the MLP input; edit the MLP output with it

                def grab(x, seen=seen):
                    seen["x"] = x
                    return x

                stack.enter_context(edit_site(self.model, *self.read_site(sid), grab))

            def fn(h, sae=sae, mine=mine, seen=seen):  # h: [1, T, d]
                f = sae.encode(seen.get("x", h))
                delta = torch.zeros_like(h)
                for e in mine:
                    a = f[..., e.feature]
                    new = {CLAMP: torch.full_like(a, e.value), ABLATE: torch.zeros_like(a),
                           SCALE: a * e.value, ADD: a + e.value}[e.mode]
                    if e.at is not None:
                        mask = torch.tensor([p in e.at for p in range(T)], dtype=torch.bool)
                    elif e.scope == GENERATION_ONLY:
                        mask = pos >= prompt_len
                    else:
                        mask = torch.ones(T, dtype=torch.bool)
                    if e.when is not None:
                        c, op, thr = e.when
                        fc = f[0, :, c]
                        ok = (fc > thr if op == ">" else fc < thr) & mask
                        if e.latch:  # on from the first hit on (inside the window)
                            ok = ok | (torch.cumsum(ok.long(), 0) > 0)
                        mask = ok & mask
                    delta = delta + ((new - a) * mask.to(a.dtype))[..., None] * sae.W_dec[e.feature]
                return h + delta

            stack.enter_context(edit_site(self.model, *self.sites[sid], fn))


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


def render_chat_reference(tokenizer, template: str, messages) -> list[int]:
    """A chat rendered by Jinja itself, then tokenized without added special tokens.

    This is what Hugging Face documents ``apply_chat_template(tokenize=True)`` to do (the
    template places BOS/EOS itself), written without calling it. ``messages``: (role, content).
    """
    import jinja2

    def raise_exception(msg):
        raise jinja2.TemplateError(msg)

    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)
    text = env.from_string(template).render(
        messages=[{"role": r, "content": c} for r, c in messages], add_generation_prompt=True,
        bos_token=tokenizer.bos_token, eos_token=tokenizer.eos_token,
        raise_exception=raise_exception)
    return tokenizer.encode(text, add_special_tokens=False)
