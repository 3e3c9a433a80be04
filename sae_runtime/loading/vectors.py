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

Self-describing files: ``write_vector_gguf`` writes a llama.cpp control-vector GGUF (llama.cpp
and repeng read it as any other: they ignore keys they do not know) whose metadata says what
the vector is for (``META_KEYS``: hook names, layer convention, model id, hidden size,
method, date). ``read_vector_metadata`` reads those keys back (empty for foreign files), and
``check_vector_metadata`` refuses a described file made for another model or width.

Inline vectors (``GenerateRequest.inline_vectors``: a request's own ``d_model`` floats at
one layer) use the same banks: a layer named by ``--inline-vectors`` gets a bank (with or
without named vectors) with one scratch decoder row per edit slot; each step the planner
copies the request's vector into the row of its slot (``HookTables.write_inline``) and its
ADD edit names that row, so the edit is exactly ``s * v`` again.
"""

from __future__ import annotations

import dataclasses
import datetime
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


META_PREFIX = "steerd."
META_KEYS = ("hook_names", "layer_convention", "model_id", "hidden_size", "method", "created")
"""Metadata keys (``steerd.<key>``) of the GGUF files ``write_vector_gguf`` writes."""

LAYER_CONVENTION = ("llama.cpp: direction.k is added to the output of block k (0-based), "
                    "blocks.k.hook_resid_post, HF hidden_states[k + 1]")


def write_vector_gguf(path: str | Path, vectors: Mapping[int, np.ndarray], *, model_id: str,
                      hidden_size: int, method: str = "", created: str | None = None) -> Path:
    """Write ``{layer: vector}`` as a llama.cpp control-vector GGUF (``direction.{layer}``,
    the module doc's convention) with ``steerd.*`` metadata: the hook names, the layer
    convention, ``model_id``, ``hidden_size``, ``method`` and ``created`` (UTC, ISO 8601;
    now by default). Refuses vectors of another width than ``hidden_size`` or layer 0 (which
    llama.cpp cannot hold)."""
    import gguf

    p = Path(path)
    for layer, v in vectors.items():
        if int(layer) <= 0:
            raise SAEFormatError(f"{p}: layer {layer}: llama.cpp's control vectors start at "
                                 "block 1 (direction.0 would be the embeddings)")
        if np.asarray(v).shape != (hidden_size,):
            raise SAEFormatError(f"{p}: the vector of layer {layer} has shape "
                                 f"{np.asarray(v).shape}, the hidden size is {hidden_size}")
    arch = "controlvector"
    w = gguf.GGUFWriter(str(p), arch)
    w.add_string(f"{arch}.model_hint", model_id)
    w.add_uint32(f"{arch}.layer_count", len(vectors))
    layers = sorted(int(k) for k in vectors)
    w.add_string(META_PREFIX + "hook_names",
                 ",".join(f"blocks.{k}.hook_resid_post" for k in layers))
    w.add_string(META_PREFIX + "layer_convention", LAYER_CONVENTION)
    w.add_string(META_PREFIX + "model_id", model_id)
    w.add_uint32(META_PREFIX + "hidden_size", int(hidden_size))
    w.add_string(META_PREFIX + "method", method)
    w.add_string(META_PREFIX + "created", created or datetime.datetime.now(
        datetime.timezone.utc).isoformat(timespec="seconds"))
    for k in layers:
        w.add_tensor(f"direction.{k}", np.asarray(vectors[k], dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return p


def read_vector_metadata(path: str | Path) -> dict[str, str]:
    """The ``steerd.*`` metadata of a GGUF vector file (keys without the prefix, values as
    text); empty for a file that has none (llama.cpp's, repeng's) or another format."""
    p = Path(path)
    if p.suffix.lower() != ".gguf":
        return {}
    from gguf import GGUFReader

    try:
        r = GGUFReader(str(p))
    except Exception as e:  # noqa: BLE001 - a broken file becomes one clear error
        raise SAEFormatError(f"{p}: cannot read steering vectors: {e}") from None
    out = {}
    for key in META_KEYS:
        f = r.fields.get(META_PREFIX + key)
        if f is None:
            continue
        part = f.parts[f.data[0]]
        out[key] = bytes(part).decode() if key != "hidden_size" else str(int(part[0]))
    return out


def model_name(model_id: str) -> str:
    """The part of a model id two servers of one model share: its last path component
    (``/models/Llama-3.1-8B`` and ``meta-llama/Llama-3.1-8B`` are one model)."""
    return Path(model_id.rstrip("/")).name


def check_vector_metadata(meta: Mapping[str, str], *, model_id: str, hidden_size: int,
                          where: str) -> None:
    """Refuse a described vector file (``read_vector_metadata``) made for another model
    (``model_name`` differs) or hidden size; the message names both. A file without the keys
    passes (its widths are still checked against the model when loaded)."""
    theirs = meta.get("model_id")
    if theirs and model_name(theirs) != model_name(model_id):
        raise SAEFormatError(f"{where}: the vector was made for model {theirs!r}; this server "
                             f"serves {model_id!r}")
    width = meta.get("hidden_size")
    if width and int(width) != int(hidden_size):
        raise SAEFormatError(f"{where}: the vector was made for hidden size {width} (model "
                             f"{theirs or '?'}); this server's model {model_id!r} has "
                             f"{hidden_size}")


UPLOAD_FORMATS = ("gguf", "safetensors")
"""File formats a vector may be sent in at run time (``LoadVector.file``)."""


def load_vector_bytes(data: bytes, fmt: str) -> tuple[dict[int, np.ndarray], dict[str, str]]:
    """``({layer: vector}, steerd metadata)`` of a vector file's bytes in ``fmt`` (one of
    ``UPLOAD_FORMATS``), read exactly as ``load_vector_file`` reads that file."""
    import tempfile

    if fmt not in UPLOAD_FORMATS:
        raise SAEFormatError(f"format {fmt!r}: one of {', '.join(UPLOAD_FORMATS)}")
    with tempfile.TemporaryDirectory(prefix="steerd-vector-") as d:
        p = Path(d) / f"upload.{fmt}"
        p.write_bytes(data)
        values = load_vector_file(p)
        meta = read_vector_metadata(p)
    return values, meta


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

    ``runtime``: rows after the named ones, zero at start, that vectors loaded while the
    server runs (``LoadVector``, ``--runtime-vectors`` / ``--max-runtime-vectors``) are
    written into (``runtime_rows``). They exist from install on, so a load changes no
    table size and no compiled graph: it only writes decoder rows.

    ``inline``: the layer also takes per-request inline vectors (``--inline-vectors``). The
    server sees one more row, ``inline_row`` (after the named and runtime rows), which an
    inline vector's ADD edit names; the worker's bank holds one scratch row per edit slot
    from there on (``bank_sae(..., scratch=)``), and each step the planner writes each
    request's vector into the row of the slot it got and points its edit there."""

    layer: int
    names: tuple[str, ...]
    matrix: np.ndarray  # [len(names), d_model] float32
    inline: bool = False
    runtime: int = 0

    @property
    def id(self) -> str:
        return bank_id(self.layer)

    @property
    def runtime_rows(self) -> range:
        """The rows runtime-loaded vectors go into."""
        return range(len(self.names), len(self.names) + self.runtime)

    @property
    def inline_row(self) -> int:
        return len(self.names) + self.runtime

    def config(self) -> SAEConfig:
        n, d = self.matrix.shape
        return SAEConfig("standard", d, n + self.runtime + int(self.inline),
                         f"blocks.{self.layer}.hook_resid_post", self.layer, "resid_post",
                         apply_b_dec_to_input=False)


def build_banks(files: Sequence[tuple[str, str | Path]], *, d_model: int | None = None,
                n_layers: int | None = None, inline_layers: Sequence[int] = (),
                runtime_layers: Sequence[int] = (), runtime_rows: int = 0) -> list[Bank]:
    """Banks (by layer) of the named vector files, of the layers that take inline vectors
    (``inline_layers``) and of those that keep ``runtime_rows`` rows for vectors loaded at
    run time (``runtime_layers``; ``d_model`` is required for either); checks sizes
    against the model."""
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
    runtime = set(runtime_layers) if runtime_rows > 0 else set()
    if (inline or runtime) and d_model is None:
        raise ValueError("build_banks: inline and runtime layers need d_model")
    for flag, layers in (("--inline-vectors", inline), ("--runtime-vectors", runtime)):
        for layer in sorted(layers):
            if n_layers is not None and not 0 <= layer < n_layers:
                raise SAEFormatError(f"{flag}: layer {layer}, but the model has blocks "
                                     f"0..{n_layers - 1}")
            per_layer.setdefault(layer, [])
    width = d_model or 0
    return [Bank(layer, tuple(n for n, _ in items),
                 np.stack([v for _, v in items]) if items else np.zeros((0, width), np.float32),
                 inline=layer in inline, runtime=runtime_rows if layer in runtime else 0)
            for layer, items in sorted(per_layer.items())]


def bank_sae(bank: Bank, scratch: int = 0) -> SAE:
    """The bank as a pseudo-SAE: zero encoder (every activation 0), decoder rows = vectors,
    so an ADD edit of strength s on row i adds exactly ``s * v_i``. Then zero rows: the
    runtime rows (``Bank.runtime_rows``) and ``scratch``, one per edit slot, for inline
    vectors (``Bank.inline``)."""
    named = torch.from_numpy(bank.matrix.copy())
    d = named.shape[1]
    extra = bank.runtime + scratch
    W_dec = torch.cat([named, torch.zeros(extra, d)]) if extra else named
    n = W_dec.shape[0]
    cfg = dataclasses.replace(bank.config(), d_sae=n)
    return SAE(cfg, W_enc=torch.zeros(d, n), W_dec=W_dec, b_enc=torch.zeros(n),
               b_dec=torch.zeros(d))
