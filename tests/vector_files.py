"""Steering-vector files written by the real writers (the ``gguf`` package, as llama.cpp's
cvector-generator and repeng's ``export_gguf`` write them; safetensors; numpy; torch)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def write_gguf(path: Path, directions: dict[int, np.ndarray], model_hint: str = "llama") -> Path:
    """A control-vector GGUF exactly as repeng's ``ControlVector.export_gguf`` writes it."""
    import gguf

    arch = "controlvector"
    w = gguf.GGUFWriter(str(path), arch)
    w.add_string(f"{arch}.model_hint", model_hint)
    w.add_uint32(f"{arch}.layer_count", len(directions))
    for layer, v in directions.items():
        w.add_tensor(f"direction.{layer}", np.asarray(v, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def random_directions(layers, d: int, seed: int = 0, scale: float = 1.0) -> dict[int, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {int(k): (rng.standard_normal(d) * scale).astype(np.float32) for k in layers}
