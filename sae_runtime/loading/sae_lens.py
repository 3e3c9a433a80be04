"""SAELens on-disk format: ``cfg.json`` + ``sae_weights.safetensors``.

Reads both the SAELens 6 layout (``metadata.hook_name``, ``k`` at top level) and the older
flat one (``hook_name``, ``activation_fn_kwargs.k``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from sae_runtime import registry
from sae_runtime.errors import SAEFormatError
from sae_runtime.loading import parse_hook_name
from sae_runtime.saes.base import SAE, SAEConfig

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"


def load_sae_lens(path: Path, hook_name: str | None = None) -> SAE:
    """Config and tensors (as float32) of the SAELens SAE in ``path``."""
    cfg = read_sae_lens_config(path, hook_name)
    tensors = _read_tensors(path / WEIGHTS_FILE)
    f32 = {n: t.to(torch.float32).contiguous() for n, t in tensors.items()}
    return SAE(
        cfg, f32["W_enc"], f32["W_dec"], f32["b_enc"], f32["b_dec"], f32.get("threshold")
    )


def read_sae_lens_config(path: Path, hook_name: str | None = None) -> SAEConfig:
    """Parse ``cfg.json`` and check tensor names and shapes without loading the tensors."""
    cfg_path, w_path = path / CFG_FILE, path / WEIGHTS_FILE
    try:
        raw: dict[str, Any] = json.loads(cfg_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise SAEFormatError(f"{cfg_path}: cannot read JSON config: {e}") from None
    if not w_path.is_file():
        raise SAEFormatError(f"{w_path}: missing weights file")
    meta = raw.get("metadata") or {}

    arch_name = raw.get("architecture") or _legacy_architecture(raw)
    registry.get(arch_name)  # raises with the supported list
    norm = raw.get("normalize_activations", "none") or "none"
    if norm != "none":
        raise SAEFormatError(
            f"{cfg_path}: normalize_activations={norm!r} is not supported yet (only 'none')"
        )
    hook = hook_name or raw.get("hook_name") or meta.get("hook_name")
    if not hook:
        raise SAEFormatError(f"{cfg_path}: no hook_name; pass one with NAME=PATH@HOOK")
    layer, site = parse_hook_name(hook, str(cfg_path))
    k = raw.get("k", (raw.get("activation_fn_kwargs") or {}).get("k"))
    try:
        cfg = SAEConfig(
            architecture=arch_name,
            d_in=int(raw["d_in"]),
            d_sae=int(raw["d_sae"]),
            hook_name=hook,
            layer=layer,
            site=site,
            apply_b_dec_to_input=bool(raw.get("apply_b_dec_to_input", False)),
            k=int(k) if arch_name == "topk" and k is not None else None,
            model_name=str(raw.get("model_name") or meta.get("model_name") or ""),
            dtype=str(raw.get("dtype", "float32")),
            format="saelens",
        )
    except KeyError as e:
        raise SAEFormatError(f"{cfg_path}: missing key {e.args[0]!r}") from None
    except (TypeError, ValueError) as e:
        raise SAEFormatError(f"{cfg_path}: {e}") from None
    if arch_name == "topk" and cfg.k is None:
        raise SAEFormatError(f"{cfg_path}: topk architecture needs 'k'")

    shapes = _read_shapes(w_path)
    expected = {
        "W_enc": (cfg.d_in, cfg.d_sae),
        "W_dec": (cfg.d_sae, cfg.d_in),
        "b_enc": (cfg.d_sae,),
        "b_dec": (cfg.d_in,),
    }
    if arch_name == "jumprelu":
        expected["threshold"] = (cfg.d_sae,)
    for name, shape in expected.items():
        if name not in shapes:
            raise SAEFormatError(f"{w_path}: missing tensor {name!r} (has {sorted(shapes)})")
        if shapes[name] != shape:
            raise SAEFormatError(
                f"{w_path}: tensor {name!r} has shape {shapes[name]}, "
                f"expected {shape} from {CFG_FILE} (d_in={cfg.d_in}, d_sae={cfg.d_sae})"
            )
    return cfg


def _legacy_architecture(raw: dict[str, Any]) -> str:
    act = raw.get("activation_fn_str") or raw.get("activation_fn") or "relu"
    return "topk" if act == "topk" else "standard"


def _read_shapes(w_path: Path) -> dict[str, tuple[int, ...]]:
    try:
        with safe_open(str(w_path), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
    except Exception as e:  # safetensors raises its own error types
        raise SAEFormatError(f"{w_path}: cannot read safetensors: {e}") from None


def _read_tensors(w_path: Path) -> dict[str, torch.Tensor]:
    try:
        with safe_open(str(w_path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    except Exception as e:  # safetensors raises its own error types
        raise SAEFormatError(f"{w_path}: cannot read safetensors: {e}") from None
