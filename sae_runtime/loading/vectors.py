"""Steering vectors (control vectors): files, layer convention, and their banks.

A steering vector adds ``strength * v[layer]`` to the residual stream at the output of each
of its layers (``blocks.{layer}.hook_resid_post``), at the positions of a selector.

Files (``steerd serve --vector NAME=PATH``), each ``{layer: vector of d_model}``:

- GGUF control vectors, llama.cpp's format (``general.architecture = controlvector``,
  tensors ``direction.{k}``), as written by llama.cpp's ``cvector-generator`` and repeng's
  ``export_gguf``. Layer convention: **llama.cpp's**, exactly. Its loader stores
  ``direction.k`` at ``data[n_embd * (k - 1)]`` ("buffer doesn't have data for layer 0"),
  ``llama_adapter_cvec::apply`` copies that slice into ``tensors[k]``, and every model graph
  adds ``tensors[il]`` right after block ``il``'s residual add (``cur = build_cvec(cur,
  il)``, 0-based ``il``). So ``direction.k`` is added to the output of block ``k``
  (0-based): our ``blocks.k.hook_resid_post``, HF's ``hidden_states[k + 1]``.
  ``direction.0`` is invalid there and here. Directions of one layer in one file add up,
  as in llama.cpp.
- safetensors / ``.npz``: one tensor per layer, named by a trailing integer (``direction.5``,
  ``layers.5``, ``5``): the 0-based block whose output it is added to.
- ``.pt``: a ``{layer: tensor}`` dict (int or numeric-string keys), same meaning.
- ``.npy``: a 2-D array ``[n_layers, d_model]``: row ``i`` for block ``i`` (an all-zero row
  is no vector).

Inside the engine, the vectors of one layer form a *bank*: a pseudo-SAE whose decoder rows
are the vectors and whose encoder is zero (every activation is 0), hooked at that layer's
residual output. A request's vector becomes an ADD edit of strength ``s`` on its row of each
layer's bank, so the edit is exactly ``s * v`` and everything edits have comes with it:
per-request settings in one batch, position selectors, cache salts, the compiled op, TP/PP.

Inline vectors (``GenerateRequest.inline_vectors``: a request's own ``d_model`` floats at
one layer) use the same banks: a layer named by ``--inline-vectors`` gets a bank (with or
without named vectors) with one scratch decoder row per edit slot; each step the planner
copies the request's vector into the row of its slot (``HookTables.write_inline``) and its
ADD edit names that row, so the edit is exactly ``s * v`` again.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from sae_runtime.errors import SAEFormatError
from sae_runtime.saes.base import SAE, SAEConfig
from sae_runtime.spec.vectors import BANK_PREFIX, bank_id, is_bank

_TRAILING_INT = re.compile(r"(\d+)$")


def load_vector_file(path: str | Path) -> dict[int, np.ndarray]:
    """``{layer: float32 vector}`` from one file (formats and layer convention: module doc)."""
    p = Path(path)
    if not p.is_file():
        raise SAEFormatError(f"{p}: no such steering vector file")
    suffix = p.suffix.lower()
    try:
        if suffix == ".gguf":
            out = _gguf(p)
        elif suffix in (".safetensors", ".npz"):
            out = _named(p)
        elif suffix in (".pt", ".pth"):
            obj = torch.load(p, map_location="cpu", weights_only=True)
            if not isinstance(obj, Mapping):
                raise SAEFormatError(f"{p}: a .pt steering vector file holds a {{layer: tensor}} "
                                     f"dict, got {type(obj).__name__}")
            out = {_layer(p, k): np.asarray(v, dtype=np.float32) for k, v in obj.items()}
        elif suffix == ".npy":
            arr = np.load(p, allow_pickle=False)
            if arr.ndim != 2:
                raise SAEFormatError(f"{p}: a .npy steering vector file is [n_layers, d_model], "
                                     f"got shape {arr.shape}")
            out = {i: row.astype(np.float32) for i, row in enumerate(arr) if np.any(row)}
        else:
            raise SAEFormatError(f"{p}: unknown steering vector format {suffix!r} (use .gguf, "
                                 ".safetensors, .npz, .pt or .npy)")
    except SAEFormatError:
        raise
    except Exception as e:  # noqa: BLE001 - a broken file becomes one clear error
        raise SAEFormatError(f"{p}: cannot read steering vectors: {e}") from None
    if not out:
        raise SAEFormatError(f"{p}: no steering vectors in the file")
    dims = {v.shape for v in out.values()}
    if len(dims) != 1 or len(next(iter(dims))) != 1:
        raise SAEFormatError(f"{p}: every vector must be 1-D of one length, got {sorted(dims)}")
    for layer, v in out.items():
        if not np.isfinite(v).all():
            raise SAEFormatError(f"{p}: the vector of layer {layer} has non-finite values")
    return dict(sorted(out.items()))


def _layer(p: Path, key) -> int:
    m = _TRAILING_INT.search(str(key))
    if m is None:
        raise SAEFormatError(f"{p}: tensor {key!r} does not name a layer (expected a trailing "
                             "integer, e.g. direction.5)")
    return int(m.group(1))


def _named(p: Path) -> dict[int, np.ndarray]:
    if p.suffix.lower() == ".npz":
        with np.load(p, allow_pickle=False) as z:
            items = {k: z[k] for k in z.files}
    else:
        from safetensors.numpy import load_file

        items = load_file(str(p))
    out: dict[int, np.ndarray] = {}
    for k, v in items.items():
        out[_layer(p, k)] = np.asarray(v, dtype=np.float32).reshape(-1)
    return out


def _gguf(p: Path) -> dict[int, np.ndarray]:
    from gguf import GGUFReader

    r = GGUFReader(str(p))
    arch_field = r.fields.get("general.architecture")
    arch = None
    if arch_field is not None:
        arch = bytes(arch_field.parts[arch_field.data[0]]).decode()
    if arch != "controlvector":
        raise SAEFormatError(f"{p}: general.architecture is {arch!r}, not 'controlvector'")
    out: dict[int, np.ndarray] = {}
    for t in r.tensors:
        name = t.name
        if not name.startswith("direction."):
            raise SAEFormatError(f"{p}: unexpected tensor {name!r} (llama.cpp reads only "
                                 "direction.{layer})")
        try:
            k = int(name.removeprefix("direction."))
        except ValueError:
            raise SAEFormatError(f"{p}: tensor {name!r}: the layer is not an integer") from None
        if k <= 0:
            raise SAEFormatError(f"{p}: {name}: llama.cpp's layers start at 1 (direction.0 "
                                 "would be the embeddings, which it never steers)")
        v = np.asarray(t.data, dtype=np.float32).reshape(-1)
        out[k] = out[k] + v if k in out else v  # several directions of one layer add up
    return out


@dataclass(frozen=True)
class Bank:
    """The vectors of one layer: row ``i`` is ``names[i]``'s vector.

    ``inline``: the layer also takes per-request inline vectors (``--inline-vectors``). The
    server sees one more row, ``inline_row`` (``len(names)``), which an inline vector's ADD
    edit names; the worker's bank holds one scratch row per edit slot from there on
    (``bank_sae(..., scratch=)``), and each step the planner writes each request's vector
    into the row of the slot it got and points its edit there."""

    layer: int
    names: tuple[str, ...]
    matrix: np.ndarray  # [len(names), d_model] float32
    inline: bool = False

    @property
    def id(self) -> str:
        return bank_id(self.layer)

    @property
    def inline_row(self) -> int:
        return len(self.names)

    def config(self) -> SAEConfig:
        n, d = self.matrix.shape
        return SAEConfig("standard", d, n + int(self.inline), f"blocks.{self.layer}.hook_resid_post",
                         self.layer, "resid_post", apply_b_dec_to_input=False)


def build_banks(files: Sequence[tuple[str, str | Path]], *, d_model: int | None = None,
                n_layers: int | None = None, inline_layers: Sequence[int] = ()) -> list[Bank]:
    """Banks (by layer) of the named vector files, and of the layers that take inline vectors
    (``inline_layers``; ``d_model`` is then required); checks sizes against the model."""
    per_layer: dict[int, list[tuple[str, np.ndarray]]] = {}
    seen: set[str] = set()
    for name, path in files:
        if not name or is_bank(name):
            raise SAEFormatError(f"--vector {name}={path}: give the vector a name "
                                 f"(NAME=PATH; names may not start with {BANK_PREFIX!r})")
        if name in seen:
            raise SAEFormatError(f"--vector {name}: the name is given twice")
        seen.add(name)
        for layer, v in load_vector_file(path).items():
            if d_model is not None and v.shape[0] != d_model:
                raise SAEFormatError(f"{path}: vectors have {v.shape[0]} values, the model's "
                                     f"hidden size is {d_model}")
            if n_layers is not None and not 0 <= layer < n_layers:
                raise SAEFormatError(f"{path}: a vector for layer {layer}, but the model has "
                                     f"blocks 0..{n_layers - 1}")
            per_layer.setdefault(layer, []).append((name, v))
    inline = set(inline_layers)
    if inline and d_model is None:
        raise ValueError("build_banks: inline layers need d_model")
    for layer in sorted(inline):
        if n_layers is not None and not 0 <= layer < n_layers:
            raise SAEFormatError(f"--inline-vectors: layer {layer}, but the model has blocks "
                                 f"0..{n_layers - 1}")
        per_layer.setdefault(layer, [])
    width = d_model or 0
    return [Bank(layer, tuple(n for n, _ in items),
                 np.stack([v for _, v in items]) if items else np.zeros((0, width), np.float32),
                 inline=layer in inline)
            for layer, items in sorted(per_layer.items())]


def bank_sae(bank: Bank, scratch: int = 0) -> SAE:
    """The bank as a pseudo-SAE: zero encoder (every activation 0), decoder rows = vectors,
    so an ADD edit of strength s on row i adds exactly ``s * v_i``. ``scratch``: zero rows
    after the named ones, one per edit slot, for inline vectors (``Bank.inline``)."""
    named = torch.from_numpy(bank.matrix.copy())
    d = named.shape[1]
    W_dec = torch.cat([named, torch.zeros(scratch, d)]) if scratch else named
    n = W_dec.shape[0]
    cfg = dataclasses.replace(bank.config(), d_sae=n)
    return SAE(cfg, W_enc=torch.zeros(d, n), W_dec=W_dec, b_enc=torch.zeros(n),
               b_dec=torch.zeros(d))
