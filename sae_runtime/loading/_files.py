"""File helpers shared by the format loaders. Every error names the file and the problem."""

from __future__ import annotations

import json
import zipfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open

from sae_runtime import registry
from sae_runtime.errors import SAEFormatError
from sae_runtime.saes.base import SAE, SAEConfig

Shapes = dict[str, tuple[int, ...]]


def read_json(path: Path) -> dict[str, Any]:
    """Parse a JSON object file."""
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SAEFormatError(f"{path}: cannot read JSON config: {e}") from None
    if not isinstance(raw, dict):
        raise SAEFormatError(f"{path}: expected a JSON object, got {type(raw).__name__}")
    return raw


def require_file(path: Path, what: str = "file") -> Path:
    if not path.is_file():
        raise SAEFormatError(f"{path}: missing {what}")
    return path


def safetensors_shapes(path: Path) -> Shapes:
    """Tensor shapes from a safetensors header (no data read)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
    except Exception as e:  # safetensors raises its own error types
        raise SAEFormatError(f"{path}: cannot read safetensors: {e}") from None


_ST_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16"}


def safetensors_dtype(path: Path, name: str) -> str:
    """Torch dtype name of tensor ``name`` from the safetensors header, e.g. ``bfloat16``."""
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = f.get_slice(name).get_dtype()
    except Exception as e:  # safetensors raises its own error types
        raise SAEFormatError(f"{path}: cannot read safetensors: {e}") from None
    return _ST_DTYPES.get(raw, raw.lower())


def safetensors_tensors(path: Path, names: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
    try:
        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys()) if names is None else list(names)
            return {k: f.get_tensor(k) for k in keys}
    except Exception as e:  # safetensors raises its own error types
        raise SAEFormatError(f"{path}: cannot read safetensors: {e}") from None


def npz_shapes(path: Path) -> Shapes:
    """Array shapes from the ``.npy`` headers inside an ``.npz`` (no array data read)."""
    shapes: Shapes = {}
    try:
        with zipfile.ZipFile(path) as z:
            for name in z.namelist():
                if not name.endswith(".npy"):
                    continue
                with z.open(name) as f:
                    version = np.lib.format.read_magic(f)
                    if version == (1, 0):
                        shape, _, _ = np.lib.format.read_array_header_1_0(f)
                    else:
                        shape, _, _ = np.lib.format.read_array_header_2_0(f)
                shapes[name[: -len(".npy")]] = tuple(int(d) for d in shape)
    except (OSError, zipfile.BadZipFile, ValueError) as e:
        raise SAEFormatError(f"{path}: cannot read npz archive: {e}") from None
    return shapes


def npz_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        with np.load(path) as data:
            return {k: torch.from_numpy(np.array(data[k])) for k in data.files}
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise SAEFormatError(f"{path}: cannot read npz archive: {e}") from None


def check_shapes(path: Path, shapes: Shapes, expected: Mapping[str, tuple[int, ...]],
                 origin: str) -> None:
    """Every ``expected`` tensor is present in ``path`` with its shape.

    ``origin`` says where the expected shapes come from, e.g. ``cfg.json (d_in=8, d_sae=16)``.
    """
    for name, shape in expected.items():
        if name not in shapes:
            raise SAEFormatError(f"{path}: missing tensor {name!r} (has {sorted(shapes)})")
        if shapes[name] != tuple(shape):
            raise SAEFormatError(
                f"{path}: tensor {name!r} has shape {shapes[name]}, expected {tuple(shape)} "
                f"from {origin}"
            )


def architecture_or_error(name: str, source: str):
    """The registered architecture ``name``; unknown names raise naming ``source``."""
    try:
        return registry.get(name)
    except SAEFormatError as e:
        raise SAEFormatError(f"{source}: {e}") from None


def f32(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.to(torch.float32).contiguous()


def build_sae(cfg: SAEConfig, **tensors: torch.Tensor | None) -> SAE:
    """An SAE with every tensor as contiguous float32."""
    return SAE(cfg, **{k: f32(v) for k, v in tensors.items()})


def fold_decoder_norm(W_enc: torch.Tensor, b_enc: torch.Tensor, W_dec: torch.Tensor):
    """Fold the decoder row norms into the encoder (SAELens ``_fold_norm_topk``).

    Returns ``W_enc * n, b_enc * n, W_dec / n`` with ``n = ||W_dec[i]||`` (clamped at 1e-8
    as SAELens does); used where a library scales pre-activations by ``n`` and divides them
    out again before decoding (SAELens ``rescale_acts_by_decoder_norm``), which the folded
    SAE computes directly.
    """
    n = W_dec.norm(dim=-1).clamp(min=1e-8)
    return W_enc * n, b_enc * n, W_dec / n[:, None]
