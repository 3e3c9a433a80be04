"""Gemma Scope 2 multi-layer files: cross-layer transcoders (``clt/``) and crosscoders
(``crosscoder/``), Google DeepMind's ``JumpReLUMultiLayerSAE`` checkpoints.

Layout (``google/gemma-scope-2-*``)::

    clt/width_262k_l0_medium_affine/params_layer_{0..L-1}.safetensors (+ config.json)
    crosscoder/layer_7_13_17_22_width_262k_l0_medium/params_layer_{0..3}.safetensors

One file per slot ``i`` with ``w_enc [d, F]``, ``b_enc [F]``, ``threshold [F]``,
``w_dec [F, L, d]`` (slot ``i``'s decoder to *every* slot, earlier ones included),
``b_dec [d]`` (output slot ``i``'s bias) and, in ``_affine`` CLTs,
``affine_skip_connection [d_in, d_out]``. GDM's math (``JumpReLUMultiLayerSAE``)::

    pre   = einsum("...ld,ldf->...lf", x, w_enc) + b_enc
    acts  = relu(pre) * (pre > threshold)
    recon = einsum("...if,ifjd->...jd", acts, w_dec) + b_dec (+ einsum("...ld,lde->...le", x, skip))

It sums over every source slot, earlier and later; causality lives in the weights. Like
circuit-tracer's ``load_gemma_scope_2_clt`` this loader keeps only ``w_dec[i][:, i:]`` (the
decoders into the same and later slots), reading the dropped block once to check it is
zero: up to ``ACAUSAL_WARN`` of the causal block's largest entry it is dropped silently,
up to ``ACAUSAL_REFUSE`` with a warning, and above that the files are refused (they decode
into earlier layers, which one forward pass cannot serve).

Sites: a CLT reads the MLP input (``pre_feedforward_layernorm.output``, weighted) and writes
``mlp_out`` (``post_feedforward_layernorm.output``), as SAELens infers for ``clt`` folders and
the single-layer Gemma Scope 2 configs name them; ``config.json`` ``hf_hook_point_in``/
``hf_hook_point_out``, when present, decide. A crosscoder reads and writes the residual
stream (``model.layers.L.output``) of the blocks its folder names.

Where circuit-tracer differs: its ``JumpReLU`` is ``pre * (pre > threshold)`` (no ReLU; the
same wherever ``threshold >= 0``); these files follow GDM's formula. Its loader reads
``range(max(paths))``, one file short of the ``L`` it is given.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import torch
from safetensors import safe_open

from sae_runtime.errors import SAEFormatError
from sae_runtime.loading._files import read_json, safetensors_shapes
from sae_runtime.saes.clt import CLT, CLTConfig

log = logging.getLogger(__name__)

NAME = "gemma_scope_2"
LAYOUT = "params_layer_{i}.safetensors (Gemma Scope 2 clt/ or crosscoder/ folder)"
FILE = "params_layer_{}.safetensors"
_FILE_RE = re.compile(r"^params_layer_(\d+)\.safetensors$")
_CROSSCODER_LAYERS = re.compile(r"(?:^|_)layer_((?:\d+_)*\d+)_width")
_HF_HOOK = re.compile(r"^model\.layers\.(?:\d+|\{\w*\})\.(.+)$")
_HF_SITES = {"pre_feedforward_layernorm.output": "mlp_in",
             "post_feedforward_layernorm.output": "mlp_out", "output": "resid_post"}
_MODELS = re.compile(r"gemma-scope-2-(\w+?)-(pt|it)(?=$|[-_/])")
_ANCESTORS = 4
ACAUSAL_WARN = 1e-6
"""Dropped decoder entries up to this fraction of the causal block's largest are ~zero."""
ACAUSAL_REFUSE = 1e-2
"""Above this fraction the files are refused (see the module docstring)."""


def detect_clt(path: Path) -> bool:
    return (path / FILE.format(0)).is_file()


def read_clt_config(path: Path) -> CLTConfig:
    kind, layers = _kind(path)
    files = layer_files(path)
    if kind == "crosscoder" and len(layers) != len(files):
        raise SAEFormatError(f"{path}: the folder name names {len(layers)} layers {layers} but "
                             f"there are {len(files)} {FILE.format('i')} files")
    if kind == "clt":
        layers = tuple(range(len(files)))
    site_in, site_out = _sites(path, kind)
    return read_files(files, kind=kind, layers=layers, input_site=site_in, output_site=site_out,
                      model_name=_model_name(path))


def load_clt(path: Path, dtype: torch.dtype = torch.float32) -> CLT:
    return load_files(layer_files(path), read_clt_config(path), dtype)


def layer_files(path: Path) -> list[Path]:
    """``params_layer_{0..L-1}.safetensors`` of ``path``; a gap raises."""
    found = {int(m.group(1)): path / m.group(0) for p in path.iterdir()
             if (m := _FILE_RE.match(p.name))}
    if not found:
        raise SAEFormatError(f"{path}: no {FILE.format('i')} files")
    missing = sorted(set(range(max(found) + 1)) - set(found))
    if missing:
        raise SAEFormatError(f"{path}: missing {FILE.format(missing[0])} (slots must be "
                             f"0..{max(found)} without gaps)")
    return [found[i] for i in range(len(found))]


def read_files(files: list[Path], *, kind: str, layers: tuple[int, ...], input_site: str,
               output_site: str, model_name: str = "", input_hook: str = "",
               output_hook: str = "") -> CLTConfig:
    """The config of the multi-layer files ``files`` (slot ``i`` = ``files[i]``), from their
    headers: every tensor present with its shape, the skip in all files or none."""
    L = len(files)
    first = safetensors_shapes(files[0])
    if len(first.get("w_enc", ())) != 2:
        raise SAEFormatError(f"{files[0]}: missing 2-D tensor 'w_enc' [d_in, d_sae] (has "
                             f"{sorted(first)})")
    d, F = first["w_enc"]
    skip = "affine_skip_connection" in first
    want = {"w_enc": (d, F), "b_enc": (F,), "threshold": (F,), "w_dec": (F, L, d), "b_dec": (d,)}
    if skip:
        want["affine_skip_connection"] = (d, d)
    for f in files:
        shapes = safetensors_shapes(f)
        for name, shape in want.items():
            if name not in shapes:
                raise SAEFormatError(f"{f}: missing tensor {name!r} (has {sorted(shapes)})")
            if shapes[name] != shape:
                raise SAEFormatError(f"{f}: tensor {name!r} has shape {shapes[name]}, expected "
                                     f"{shape} from {files[0].name}'s w_enc (d_in={d}, "
                                     f"d_sae={F}) and {L} slot files")
        if ("affine_skip_connection" in shapes) != skip:
            raise SAEFormatError(f"{f}: 'affine_skip_connection' must be in every slot file "
                                 f"or in none ({files[0].name} {'has' if skip else 'has not'})")
    try:
        return CLTConfig(kind=kind, n_layers=L, d_in=d, d_sae=F, activation="jumprelu",
                         layers=layers, input_site=input_site, output_site=output_site,
                         input_hook=input_hook, output_hook=output_hook, skip=skip, format=NAME,
                         model_name=model_name, dtype="float32")
    except ValueError as e:
        raise SAEFormatError(f"{files[0].parent}: {e}") from None


def load_files(files: list[Path], cfg: CLTConfig, dtype: torch.dtype = torch.float32) -> CLT:
    """The CLT in ``files`` (config from ``read_files``), every tensor cast to ``dtype`` as it
    is read; only the causal part of each ``w_dec`` is kept (see the module docstring)."""
    L = cfg.n_layers
    W_enc, b_enc, thr, b_dec, W_dec, skips = [], [], [], [], [], []
    for s, f in enumerate(files):
        try:
            with safe_open(str(f), framework="pt") as h:
                W_enc.append(h.get_tensor("w_enc").to(dtype))
                b_enc.append(h.get_tensor("b_enc").to(dtype))
                thr.append(h.get_tensor("threshold").to(dtype))
                b_dec.append(h.get_tensor("b_dec").to(dtype))
                dec = h.get_slice("w_dec")
                causal = dec[:, s:, :]
                if s:
                    _check_acausal(f, s, dec[:, :s, :], causal)
                W_dec.append(causal.to(dtype).contiguous())
                if cfg.skip:
                    skips.append(h.get_tensor("affine_skip_connection").to(dtype))
        except SAEFormatError:
            raise
        except Exception as e:  # safetensors raises its own error types
            raise SAEFormatError(f"{f}: cannot read safetensors: {e}") from None
    assert len(W_dec) == L
    return CLT(cfg, torch.stack(W_enc), torch.stack(b_enc), tuple(W_dec), torch.stack(b_dec),
               torch.stack(thr), torch.stack(skips) if cfg.skip else None)


def _check_acausal(f: Path, s: int, acausal: torch.Tensor, causal: torch.Tensor) -> None:
    """Slot ``s``'s decoder into slots ``< s`` must be (near) zero; see the module docstring."""
    worst = float(acausal.abs().max())
    ref = float(causal.abs().max()) or 1.0
    if worst <= ACAUSAL_WARN * ref:
        return
    msg = (f"{f}: w_dec[:, :{s}] (slot {s}'s decoder into earlier slots) has entries up to "
           f"{worst:.3g}, {worst / ref:.2%} of the causal decoder's largest ({ref:.3g})")
    if worst > ACAUSAL_REFUSE * ref:
        raise SAEFormatError(f"{msg}: these files decode into earlier layers, which a forward "
                             "pass cannot serve (circuit-tracer drops those entries too); refused")
    log.warning("%s; dropped, as circuit-tracer does", msg)


def _kind(path: Path) -> tuple[str, tuple[int, ...]]:
    """``("clt", ())`` or ``("crosscoder", layers)`` from the folder names around ``path``."""
    for part in reversed(path.resolve().parts[-_ANCESTORS - 1:]):
        if part == "crosscoder" or part.startswith("crosscoder"):
            m = _CROSSCODER_LAYERS.search(path.name)
            if not m:
                raise SAEFormatError(f"{path}: a crosscoder folder must name its layers like "
                                     "'layer_7_13_17_22_width_262k_l0_medium'")
            return "crosscoder", tuple(int(x) for x in m.group(1).split("_"))
        if part == "clt" or part.startswith("clt"):
            return "clt", ()
    raise SAEFormatError(f"{path}: cannot tell a cross-layer transcoder from a crosscoder: "
                         "expected the folder under a 'clt/' or 'crosscoder/' folder")


def _sites(path: Path, kind: str) -> tuple[str, str]:
    sites = ("mlp_in", "mlp_out") if kind == "clt" else ("resid_post", "resid_post")
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        return sites
    raw = read_json(cfg_path)
    out = list(sites)
    for i, key in enumerate(("hf_hook_point_in", "hf_hook_point_out")):
        hook = raw.get(key)
        if hook is None:
            continue
        m = _HF_HOOK.match(str(hook))
        site = _HF_SITES.get(m.group(1)) if m else None
        if site is None or (i == 0 and site == "mlp_out") or (i == 1 and site == "mlp_in"):
            raise SAEFormatError(f"{cfg_path}: {key} {hook!r} is not supported; supported: "
                                 "model.layers.L.pre_feedforward_layernorm.output (input), "
                                 "model.layers.L.post_feedforward_layernorm.output (output), "
                                 "model.layers.L.output")
        out[i] = site
    return out[0], out[1]


def _model_name(path: Path) -> str:
    cfg_path = path / "config.json"
    if cfg_path.is_file():
        name = read_json(cfg_path).get("model_name")
        if name:
            return str(name)
    for part in reversed(path.resolve().parts[-_ANCESTORS - 2:]):
        m = _MODELS.search(part)
        if m:
            return f"gemma-3-{m.group(1)}" + ("-it" if m.group(2) == "it" else "-pt")
    return ""
