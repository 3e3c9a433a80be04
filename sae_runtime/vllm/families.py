"""Where each SAE hook site lives inside a supported model family's decoder layer.

Pure data (no vLLM import), so the server can validate a model before starting the engine.
Paths are attribute paths relative to one decoder layer of vLLM's implementation; the
SAELens / TransformerLens site each one implements:

- ``resid_post`` (``blocks.L.hook_resid_post``): the decoder layer's output. For
  ``residual_tuple`` layers (Llama-style) vLLM returns ``(hidden_states, residual)`` with
  the add deferred to the next layer, so the stream is their sum.
- ``resid_pre`` of block L: ``resid_post`` of block L-1.
- ``attn_out`` (``hook_attn_out``): output of the module at ``attn_out``.
- ``mlp_out`` (``hook_mlp_out``): output of the module at ``mlp_out``.
- ``z`` (``attn.hook_z``): input of the attention output projection at ``z`` (heads
  concatenated, ``[tokens, n_heads * head_dim]``).
- ``mlp_in`` (a transcoder's input, circuit-tracer ``blocks.L.mlp.hook_in``): input of the
  module at ``mlp_in``, the MLP itself, which every family feeds the pre-MLP norm's output.
- ``ln2_normalized`` (``blocks.L.ln2.hook_normalized``): the pre-MLP norm (``mlp_norm``)'s
  normalised input *before* its weight. Served from ``mlp_in``: the MLP input is
  ``x_hat * g + b`` with ``g`` the norm's weight (plus ``norm_weight_offset``: Gemma's
  RMSNorm scales by ``1 + weight``) and ``b`` its bias (GPT-2's LayerNorm), which the worker
  folds into the SAE's encoder (``mlp_norm_affine``, ``ops.fold_norm_weight``).

Gemma 2/3 normalise the attention and MLP outputs before adding them to the stream
(``post_attention_layernorm``, ``post_feedforward_layernorm``); TransformerLens' hooks,
and so Gemma Scope's SAEs, sit after those norms, and so do ours.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from sae_runtime.spec.activations import site_position


@dataclass(frozen=True)
class Family:
    residual_tuple: bool  # layer returns (hidden_states, residual); else the full stream
    attn_out: str
    mlp_out: str
    z: str
    mlp_norm: str  # the pre-MLP norm, whose output is the MLP's input
    mlp_in: str = "mlp"
    norm_weight_offset: float = 0.0  # the norm scales by weight + this (Gemma: 1)


_LLAMA = Family(residual_tuple=True, attn_out="self_attn", mlp_out="mlp", z="self_attn.o_proj",
                mlp_norm="post_attention_layernorm")
_GEMMA = Family(residual_tuple=True, attn_out="post_attention_layernorm",
                mlp_out="post_feedforward_layernorm", z="self_attn.o_proj",
                mlp_norm="pre_feedforward_layernorm", norm_weight_offset=1.0)

FAMILIES: dict[str, Family] = {
    "LlamaForCausalLM": _LLAMA,
    "MistralForCausalLM": _LLAMA,
    "Qwen2ForCausalLM": _LLAMA,
    "Qwen3ForCausalLM": _LLAMA,
    "Gemma2ForCausalLM": _GEMMA,
    "Gemma3ForCausalLM": _GEMMA,
    "GPT2LMHeadModel": Family(residual_tuple=False, attn_out="attn", mlp_out="mlp", z="attn.c_proj",
                              mlp_norm="ln_2"),
}

# Module names of decoder layers: model.layers.N (most), transformer.h.N (GPT-2).
LAYER_NAME = re.compile(r"(?:^|\.)(?:layers|h)\.(\d+)$")


def family_of(architectures: list[str] | None) -> Family | None:
    for a in architectures or ():
        if a in FAMILIES:
            return FAMILIES[a]
    return None


def block_of(layer: int, site: str) -> int:
    """Decoder layer whose module hosts an SAE at (layer, site)
    (``spec.activations.site_position``: resid_pre of L is block L-1's output)."""
    return site_position(layer, site).block


def mlp_norm_affine(layer, family: Family):
    """``(gain [d], bias [d] or None)`` of the pre-MLP norm of decoder layer module ``layer``:
    the MLP input is ``ln2.hook_normalized * gain + bias``. Reads only the norm's ``weight``
    (and ``bias``) parameters, which vLLM's and Hugging Face's modules of these families
    share (the same attribute paths, Gemma's ``1 + weight`` included), in float32 on CPU."""
    norm = layer.get_submodule(family.mlp_norm)
    gain = norm.weight.detach().float().cpu() + family.norm_weight_offset
    bias = getattr(norm, "bias", None)
    return gain, None if bias is None else bias.detach().float().cpu()


def supported() -> str:
    return ", ".join(sorted(FAMILIES))
