"""On-disk SAE formats. ``load_sae`` detects the format of a directory.

| format        | directory holds                                              | module          |
| ------------- | ------------------------------------------------------------ | --------------- |
| ``sparsify``  | ``cfg.json`` + ``sae.safetensors`` (EleutherAI sparsify/sae)  | ``sparsify``    |
| ``saelens``   | ``cfg.json`` + ``sae_weights.safetensors``                    | ``sae_lens``    |
| ``gemma_scope`` | ``params.npz`` (Gemma Scope) or ``params.safetensors`` (Gemma Scope 2) | ``gemma_scope`` |
| ``llama_scope`` | ``hyperparams.json`` + ``checkpoints/final.safetensors``   | ``llama_scope`` |

Every loader returns the SAELens tensor layout (``sae_runtime.saes.base``) in float32 and a
``SAEConfig`` whose ``format`` names the format. ``hook_name`` (``NAME=PATH@HOOK`` on the
command line) overrides the hook the files give or imply.
"""

from __future__ import annotations

import re
from pathlib import Path
from types import ModuleType

from sae_runtime.errors import SAEFormatError
from sae_runtime.saes.base import SAE, HookSite, SAEConfig

_SAELENS_RE = re.compile(
    r"^blocks\.(\d+)\.(hook_resid_post|hook_resid_pre|hook_mlp_out|hook_attn_out|attn\.hook_z)$"
)
_SAELENS_SITES: dict[str, HookSite] = {
    "hook_resid_post": "resid_post", "hook_resid_pre": "resid_pre", "hook_mlp_out": "mlp_out",
    "hook_attn_out": "attn_out", "attn.hook_z": "z",
}
# Hugging Face module paths as sparsify names its hookpoints: ``layers.12`` (block output),
# ``layers.12.mlp``, ``layers.12.self_attn``, optionally under a prefix such as ``model.``,
# ``gpt_neox.`` or ``transformer.`` (GPT-2 names its blocks ``h``).
_MODULE_RE = re.compile(
    r"^(?:[A-Za-z_][\w.]*\.)?(?:layers|h)\.(\d+)(?:\.(mlp|self_attn|attn|attention))?$"
)
_MODULE_SITES: dict[str | None, HookSite] = {
    None: "resid_post", "mlp": "mlp_out", "self_attn": "attn_out", "attn": "attn_out",
    "attention": "attn_out",
}

SUPPORTED_HOOKS = (
    "blocks.L.hook_resid_post, blocks.L.hook_resid_pre (L >= 1), blocks.L.hook_mlp_out, "
    "blocks.L.hook_attn_out, blocks.L.attn.hook_z, or module paths layers.L, layers.L.mlp, "
    "layers.L.self_attn"
)


def parse_hook_name(hook_name: str, source: str) -> tuple[int, HookSite]:
    """Hook name -> ``(layer, site)``; unsupported names raise SAEFormatError.

    SAELens names: ``blocks.L.hook_resid_post`` -> ``resid_post``, ``blocks.L.hook_resid_pre``
    -> ``resid_pre`` (L >= 1), ``blocks.L.hook_mlp_out`` -> ``mlp_out``,
    ``blocks.L.hook_attn_out`` -> ``attn_out``, ``blocks.L.attn.hook_z`` -> ``z``.
    Module paths (sparsify hookpoints): ``layers.L`` -> ``resid_post`` (the block's output),
    ``layers.L.mlp`` -> ``mlp_out``, ``layers.L.self_attn`` -> ``attn_out``.
    """
    m = _SAELENS_RE.match(hook_name)
    if m:
        layer, site = int(m.group(1)), _SAELENS_SITES[m.group(2)]
    else:
        m = _MODULE_RE.match(hook_name)
        if not m:
            raise SAEFormatError(
                f"{source}: hook_name {hook_name!r} is not supported; supported hooks are "
                f"{SUPPORTED_HOOKS}"
            )
        layer, site = int(m.group(1)), _MODULE_SITES[m.group(2)]
    if site == "resid_pre" and layer == 0:
        raise SAEFormatError(
            f"{source}: blocks.0.hook_resid_pre (the embedding output) is not supported; "
            "hook a later block"
        )
    return layer, site


def load_sae(path: str | Path, hook_name: str | None = None) -> SAE:
    """Load the SAE in directory ``path``; ``hook_name`` overrides the one in its config."""
    p, fmt = _detect(path)
    return fmt.load(p, hook_name)


def load_sae_config(path: str | Path, hook_name: str | None = None) -> SAEConfig:
    """Config of the SAE in ``path``, with tensor names and shapes checked (not loaded)."""
    p, fmt = _detect(path)
    return fmt.read_config(p, hook_name)


def detect_format(path: str | Path) -> str:
    """Name of the on-disk format of directory ``path`` (raises SAEFormatError if none)."""
    return _detect(path)[1].NAME


def _formats() -> list[ModuleType]:
    from sae_runtime.loading import gemma_scope, llama_scope, sae_lens, sparsify

    # sparsify before SAELens: both have cfg.json; the weights file tells them apart.
    return [sparsify, sae_lens, gemma_scope, llama_scope]


def _detect(path: str | Path) -> tuple[Path, ModuleType]:
    p = Path(path)
    if not p.is_dir():
        raise SAEFormatError(f"{p}: not a directory")
    formats = _formats()
    for fmt in formats:
        if fmt.detect(p):
            return p, fmt
    expected = "; ".join(f"{fmt.LAYOUT} ({fmt.NAME})" for fmt in formats)
    raise SAEFormatError(f"{p}: no recognised SAE format; expected one of: {expected}")
