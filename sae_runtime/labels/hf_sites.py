"""Where TransformerLens/SAELens hook sites live in Hugging Face ``transformers`` models.

Test support: the reference side of the end-to-end tests (and SAE calibration in
``tiny.py``). It describes HF modules, independently of ``sae_runtime.vllm.families``,
which describes vLLM's.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager

import torch

# model_type -> (attn_out module, mlp_out module, module whose input is hook_z, pre-MLP norm)
SITES = {
    "llama": ("self_attn", "mlp", "self_attn.o_proj", "post_attention_layernorm"),
    "mistral": ("self_attn", "mlp", "self_attn.o_proj", "post_attention_layernorm"),
    "qwen2": ("self_attn", "mlp", "self_attn.o_proj", "post_attention_layernorm"),
    "qwen3": ("self_attn", "mlp", "self_attn.o_proj", "post_attention_layernorm"),
    "gemma2": ("post_attention_layernorm", "post_feedforward_layernorm", "self_attn.o_proj",
               "pre_feedforward_layernorm"),
    "gemma3_text": ("post_attention_layernorm", "post_feedforward_layernorm", "self_attn.o_proj",
                    "pre_feedforward_layernorm"),
    "gpt2": ("attn", "mlp", "attn.c_proj", "ln_2"),
}


def tl_normalized(norm: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """TransformerLens' ``hook_normalized`` of a norm module with input ``x``: RMSNorm
    ``x / sqrt(mean(x^2) + eps)``, LayerNorm ``(x - mean) / sqrt(var + eps)``; the norm's
    weight and bias are not applied (``components/rms_norm.py``, ``layer_norm.py``)."""
    eps = next(getattr(norm, a) for a in ("variance_epsilon", "eps") if hasattr(norm, a))
    if isinstance(norm, torch.nn.LayerNorm):
        x = x - x.mean(-1, keepdim=True)
    return x / (x.pow(2).mean(-1, keepdim=True) + eps).sqrt()


def layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    return model.transformer.h if hasattr(model, "transformer") else model.model.layers


@contextmanager
def edit_site(model: torch.nn.Module, layer: int, site: str,
              fn: Callable[[torch.Tensor], torch.Tensor]):
    """Replace the activation at (layer, site) by ``fn(activation)`` ([batch, T, d]) while active.

    resid_pre of layer L is the output of layer L-1; ``mlp_in`` is the input of the block's
    MLP module (every family feeds it the pre-MLP norm's output); ``ln2_normalized`` is
    TransformerLens' ``ln2.hook_normalized`` computed from the pre-MLP norm's input
    (``tl_normalized``), observe only: ``fn``'s result is not fed back. Use ``fn`` that
    returns its input unchanged to just observe.
    """
    attn, mlp, z, norm = SITES[model.config.model_type]
    block = layer - 1 if site == "resid_pre" else layer
    blk = layers(model)[block]

    def out_hook(module, inputs, output):
        if isinstance(output, tuple):
            return (fn(output[0]), *output[1:])
        return fn(output)

    def in_hook(module, args, kwargs):
        if args:
            return (fn(args[0]), *args[1:]), kwargs
        key = next(iter(kwargs))
        return args, {**kwargs, key: fn(kwargs[key])}

    if site in ("resid_post", "resid_pre"):
        h = blk.register_forward_hook(out_hook)
    elif site == "attn_out":
        h = blk.get_submodule(attn).register_forward_hook(out_hook)
    elif site == "mlp_out":
        h = blk.get_submodule(mlp).register_forward_hook(out_hook)
    elif site == "z":
        h = blk.get_submodule(z).register_forward_pre_hook(in_hook, with_kwargs=True)
    elif site == "mlp_in":  # a transcoder's input: the MLP's input (after the pre-MLP norm)
        h = blk.get_submodule("mlp").register_forward_pre_hook(in_hook, with_kwargs=True)
    elif site == "ln2_normalized":
        module = blk.get_submodule(norm)

        def norm_hook(mod, args, kwargs):
            fn(tl_normalized(mod, args[0] if args else next(iter(kwargs.values()))))

        h = module.register_forward_pre_hook(norm_hook, with_kwargs=True)
    else:
        raise ValueError(f"unknown site {site!r}")
    try:
        yield
    finally:
        h.remove()


def site_activations(model: torch.nn.Module, ids: torch.Tensor, layer: int, site: str) -> torch.Tensor:
    """Activation at (layer, site) for token ids [batch, T] -> [batch, T, d]."""
    seen = {}

    def grab(x):
        seen["x"] = x.detach().clone()
        return x

    with edit_site(model, layer, site, grab), torch.no_grad():
        model(ids)
    return seen["x"]
