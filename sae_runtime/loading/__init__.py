"""On-disk SAE formats. ``load_sae`` detects the format of a directory."""

from __future__ import annotations

import re
from pathlib import Path

from sae_runtime.errors import SAEFormatError
from sae_runtime.saes.base import SAE, HookSite, SAEConfig

_HOOK_RE = re.compile(r"^blocks\.(\d+)\.hook_(resid_post|resid_pre)$")


def parse_hook_name(hook_name: str, source: str) -> tuple[int, HookSite]:
    """``blocks.L.hook_resid_post`` -> ``(L, "resid_post")``; other sites raise SAEFormatError."""
    m = _HOOK_RE.match(hook_name)
    if not m:
        raise SAEFormatError(
            f"{source}: hook_name {hook_name!r} is not supported; supported sites are "
            "blocks.L.hook_resid_post and blocks.L.hook_resid_pre (L >= 1)"
        )
    layer, site = int(m.group(1)), m.group(2)
    if site == "resid_pre" and layer == 0:
        raise SAEFormatError(
            f"{source}: blocks.0.hook_resid_pre (the embedding output) is not supported; "
            "hook a later block"
        )
    return layer, site  # type: ignore[return-value]


def load_sae(path: str | Path, hook_name: str | None = None) -> SAE:
    """Load the SAE in directory ``path``; ``hook_name`` overrides the one in its config."""
    from sae_runtime.loading.sae_lens import load_sae_lens

    return load_sae_lens(_detect(path), hook_name=hook_name)


def load_sae_config(path: str | Path, hook_name: str | None = None) -> SAEConfig:
    """Config of the SAE in ``path``, with tensor names and shapes checked (not loaded)."""
    from sae_runtime.loading.sae_lens import read_sae_lens_config

    return read_sae_lens_config(_detect(path), hook_name=hook_name)


def _detect(path: str | Path) -> Path:
    from sae_runtime.loading.sae_lens import CFG_FILE

    p = Path(path)
    if not p.is_dir():
        raise SAEFormatError(f"{p}: not a directory")
    if (p / CFG_FILE).is_file():
        return p
    raise SAEFormatError(
        f"{p}: no recognised SAE format (expected {CFG_FILE} and sae_weights.safetensors "
        "in the SAELens layout)"
    )
