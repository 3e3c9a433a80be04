"""circuit-tracer's on-disk formats: a folder with ``config.yaml`` whose ``model_kind`` is

- ``cross_layer_transcoder``: ``W_enc_{i}.safetensors`` (``W_enc_{i} [d_sae, d_in]``,
  ``b_enc_{i}``, ``b_dec_{i}``, optional ``threshold_{i}``) and ``W_dec_{i}.safetensors``
  (``W_dec_{i} [d_sae, L - i, d_in]``) for ``i`` in ``0..L-1``, as
  ``CrossLayerTranscoder.to_safetensors`` writes them and ``load_clt`` reads them (``L`` =
  the number of ``W_enc_*`` files; JumpReLU iff ``threshold_0`` exists; no skip is stored).
  ``b_dec_{i}`` is output layer ``i``'s bias. A ``transcoders:`` list of local
  ``params_layer_{i}.safetensors`` files instead makes it a Gemma Scope 2 CLT
  (``gemma_scope_2_clt``) with this file's hooks, as circuit-tracer's hub configs do;
- ``transcoder_set``: one transcoder per layer, ``layer_{i}.safetensors`` (or the files the
  ``transcoders:`` list names), each with ``W_enc [d_sae, d_in]``, ``W_dec [d_sae, d_in]``,
  ``b_enc``, ``b_dec``, optional ``activation_function.threshold`` and ``W_skip
  [d_out, d_in]`` (``TranscoderSet.to_safetensors``). Served by the transcoder path: one
  layer's transcoder is an SAE reading the MLP input and writing ``mlp_out``; pick the layer
  with the hook (``NAME=PATH@blocks.L.<feature_input_hook>``).

``feature_input_hook`` / ``feature_output_hook`` are TransformerLens hooks relative to a
block (``INPUT_HOOKS``, ``OUTPUT_HOOKS``). The math is circuit-tracer's
(``sae_runtime.saes.clt``): its ``JumpReLU`` is ``pre * (pre > threshold)``, which equals
the ReLU-gated form everywhere when every threshold is >= 0; a CLT with a negative threshold
gets the ``jumprelu_signed`` activation, a transcoder_set with one is refused (the per-layer
SAE path computes ``relu(pre) * (pre > threshold)``).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from sae_runtime.errors import SAEFormatError
from sae_runtime.loading import gemma_scope_2_clt, parse_transcoder_hooks, transcoder_input_site
from sae_runtime.loading._files import (
    build_sae,
    check_shapes,
    safetensors_dtype,
    safetensors_shapes,
    safetensors_tensors,
)
from sae_runtime.saes.base import SAE, SAEConfig
from sae_runtime.saes.clt import CLT, CLTConfig

NAME = "circuit_tracer"
LAYOUT = ("config.yaml + W_enc_{i}/W_dec_{i}.safetensors or layer_{i}.safetensors "
          "(circuit-tracer)")
CONFIG = "config.yaml"
CLT_KIND, SET_KIND = "cross_layer_transcoder", "transcoder_set"
INPUT_HOOKS = {"hook_resid_mid": "resid_mid", "ln2.hook_normalized": "ln2_normalized",
               "mlp.hook_in": "mlp_in"}
"""circuit-tracer input hooks -> ``sae_runtime.saes.clt.CLTSite``. (TransformerLens'
``hook_mlp_in`` is the pre-norm ``hook_resid_mid`` again; circuit-tracer's nnsight backend
does not map it, and it is refused.)"""
OUTPUT_HOOKS = {"hook_mlp_out": "mlp_out", "mlp.hook_out": "mlp_module_out"}
_ENC_RE = re.compile(r"^W_enc_(\d+)\.safetensors$")
_SET_RE = re.compile(r"^layer_(\d+)\.safetensors$")


def detect(path: Path) -> bool:
    return (path / CONFIG).is_file()


detect_clt = detect


def read_yaml(path: Path) -> dict[str, Any]:
    """``config.yaml`` of ``path`` with ``model_kind`` and both hooks checked."""
    import yaml

    f = path / CONFIG
    try:
        raw = yaml.safe_load(f.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise SAEFormatError(f"{f}: cannot read YAML config: {e}") from None
    if not isinstance(raw, dict):
        raise SAEFormatError(f"{f}: expected a YAML mapping, got {type(raw).__name__}")
    kind = raw.get("model_kind")
    if kind not in (CLT_KIND, SET_KIND):
        raise SAEFormatError(f"{f}: model_kind {kind!r} is not supported; supported: "
                             f"{CLT_KIND}, {SET_KIND}")
    for key, known in (("feature_input_hook", INPUT_HOOKS), ("feature_output_hook", OUTPUT_HOOKS)):
        hook = raw.get(key)
        if hook not in known:
            raise SAEFormatError(f"{f}: {key} {hook!r} is not supported; supported: "
                                 f"{', '.join(known)}")
    if raw.get("activation", "relu") != "relu" or "k" in raw:
        raise SAEFormatError(f"{f}: activation {raw.get('activation')!r} (TopK transcoders) is "
                             "not supported; supported: relu / JumpReLU (a threshold tensor)")
    return raw


# ---------------------------------------------------------------- cross_layer_transcoder

def read_clt_config(path: Path) -> CLTConfig:
    raw = read_yaml(path)
    if raw["model_kind"] != CLT_KIND:
        raise SAEFormatError(f"{path / CONFIG}: model_kind is {raw['model_kind']}, not a "
                             "cross-layer transcoder; it loads as per-layer transcoders")
    files = _listed(path, raw)
    common = dict(input_site=INPUT_HOOKS[raw["feature_input_hook"]],
                  output_site=OUTPUT_HOOKS[raw["feature_output_hook"]],
                  input_hook=raw["feature_input_hook"], output_hook=raw["feature_output_hook"],
                  model_name=str(raw.get("model_name") or ""))
    if files is not None:  # a Gemma Scope 2 CLT, named file by file
        return gemma_scope_2_clt.read_files(files, kind="clt", layers=tuple(range(len(files))),
                                            **common)
    enc = _enc_files(path)
    L = len(enc)
    shapes0 = safetensors_shapes(enc[0])
    if len(shapes0.get("W_enc_0", ())) != 2:
        raise SAEFormatError(f"{enc[0]}: missing 2-D tensor 'W_enc_0' [d_sae, d_in] (has "
                             f"{sorted(shapes0)})")
    F, d = shapes0["W_enc_0"]
    jump = "threshold_0" in shapes0
    origin = f"W_enc_0 (d_sae={F}, d_in={d}) and {L} W_enc files"
    signed = False
    for i, f in enumerate(enc):
        want = {f"W_enc_{i}": (F, d), f"b_enc_{i}": (F,), f"b_dec_{i}": (d,)}
        if jump:
            want[f"threshold_{i}"] = (F,)
        check_shapes(f, safetensors_shapes(f), want, origin)
        dec = path / f"W_dec_{i}.safetensors"
        if not dec.is_file():
            raise SAEFormatError(f"{dec}: missing decoder file of layer {i}")
        check_shapes(dec, safetensors_shapes(dec), {f"W_dec_{i}": (F, L - i, d)}, origin)
        if jump:
            signed |= bool((safetensors_tensors(f, [f"threshold_{i}"])[f"threshold_{i}"] < 0).any())
    dtype = safetensors_dtype(enc[0], "W_enc_0")
    try:
        return CLTConfig(kind="clt", n_layers=L, d_in=d, d_sae=F,
                         activation=("jumprelu_signed" if signed else "jumprelu") if jump else "relu",
                         layers=tuple(range(L)), skip=False, format=NAME, dtype=dtype, **common)
    except ValueError as e:
        raise SAEFormatError(f"{path}: {e}") from None


def load_clt(path: Path, dtype: torch.dtype = torch.float32) -> CLT:
    cfg = read_clt_config(path)
    files = _listed(path, read_yaml(path))
    if files is not None:
        return gemma_scope_2_clt.load_files(files, cfg, dtype)
    L = cfg.n_layers
    W_enc, b_enc, b_dec, thr, W_dec = [], [], [], [], []
    for i in range(L):
        t = safetensors_tensors(path / f"W_enc_{i}.safetensors")
        W_enc.append(t[f"W_enc_{i}"].to(dtype).t())  # [F, d] (nn.Linear) -> [d, F]
        b_enc.append(t[f"b_enc_{i}"].to(dtype))
        b_dec.append(t[f"b_dec_{i}"].to(dtype))
        if cfg.activation != "relu":
            thr.append(t[f"threshold_{i}"].to(dtype))
        dec = path / f"W_dec_{i}.safetensors"
        W_dec.append(safetensors_tensors(dec, [f"W_dec_{i}"])[f"W_dec_{i}"].to(dtype).contiguous())
    return CLT(cfg, torch.stack(W_enc).contiguous(), torch.stack(b_enc), tuple(W_dec),
               torch.stack(b_dec), torch.stack(thr) if thr else None)


def _enc_files(path: Path) -> list[Path]:
    found = {int(m.group(1)): path / m.group(0) for p in path.iterdir()
             if (m := _ENC_RE.match(p.name))}
    if not found:
        raise SAEFormatError(f"{path}: config.yaml says {CLT_KIND} but there is no "
                             "W_enc_0.safetensors")
    missing = sorted(set(range(max(found) + 1)) - set(found))
    if missing:
        raise SAEFormatError(f"{path}: missing W_enc_{missing[0]}.safetensors (layers must be "
                             f"0..{max(found)} without gaps)")
    return [found[i] for i in range(len(found))]


def _listed(path: Path, raw: dict[str, Any]) -> list[Path] | None:
    """The local files of the ``transcoders:`` list (index = layer), or None without one."""
    entries = raw.get("transcoders")
    if entries is None:
        return None
    if not isinstance(entries, list) or not entries:
        raise SAEFormatError(f"{path / CONFIG}: 'transcoders' must be a non-empty list of files")
    out = []
    for i, e in enumerate(entries):
        if not isinstance(e, str) or "://" in e:
            raise SAEFormatError(f"{path / CONFIG}: transcoders[{i}] {e!r} is not a local file; "
                                 "download the files and list their paths (relative to this "
                                 "folder or absolute)")
        f = Path(e) if Path(e).is_absolute() else path / e
        if not f.is_file():
            raise SAEFormatError(f"{path / CONFIG}: transcoders[{i}]: missing file {f}")
        out.append(f)
    return out


# ---------------------------------------------------------------- transcoder_set (as SAEs)

def set_files(path: Path, raw: dict[str, Any] | None = None) -> list[Path]:
    """The per-layer files of a transcoder_set, index = layer."""
    raw = raw if raw is not None else read_yaml(path)
    listed = _listed(path, raw)
    if listed is not None:
        return listed
    found = {int(m.group(1)): path / m.group(0) for p in path.iterdir()
             if (m := _SET_RE.match(p.name))}
    if not found or sorted(found) != list(range(len(found))):
        raise SAEFormatError(f"{path}: a {SET_KIND} needs layer_0.safetensors .. "
                             f"layer_N.safetensors without gaps (found layers {sorted(found)})")
    return [found[i] for i in range(len(found))]


def read_config(path: Path, hook_name: str | None = None) -> SAEConfig:
    return _set_plan(path, hook_name)[0]


def load(path: Path, hook_name: str | None = None) -> SAE:
    cfg, f = _set_plan(path, hook_name)
    t = safetensors_tensors(f)
    return build_sae(cfg, W_enc=t["W_enc"].t(), W_dec=t["W_dec"], b_enc=t["b_enc"],
                     b_dec=t["b_dec"], threshold=t.get("activation_function.threshold"))


def _set_plan(path: Path, hook_name: str | None) -> tuple[SAEConfig, Path]:
    raw = read_yaml(path)
    if raw["model_kind"] != SET_KIND:
        raise SAEFormatError(
            f"{path}: a cross-layer transcoder (each layer's features write every later "
            "layer's MLP output), not an SAE or a per-layer transcoder: load it with "
            "sae_runtime.loading.load_clt (the server serves it: load_hook_config)")
    hook_in, hook_out = raw["feature_input_hook"], raw["feature_output_hook"]
    if hook_in == "hook_resid_mid":
        raise SAEFormatError(f"{path / CONFIG}: per-layer transcoders reading hook_resid_mid "
                             "(before the pre-MLP norm) are not supported; supported inputs: "
                             "ln2.hook_normalized, mlp.hook_in")
    files = set_files(path, raw)
    expected = f"blocks.L.{hook_in} with L in 0..{len(files) - 1}"
    if hook_name is None:
        if len(files) != 1:
            raise SAEFormatError(f"{path}: a {SET_KIND} of {len(files)} layers; pick one with "
                                 f"NAME=PATH@{expected}")
        layer = 0
    else:
        m = re.match(r"^blocks\.(\d+)\.(.+)$", hook_name)
        if not m or m.group(2) != hook_in or int(m.group(1)) >= len(files):
            raise SAEFormatError(f"{path}: hook {hook_name!r} does not pick a layer of this "
                                 f"{SET_KIND}; expected {expected}")
        layer = int(m.group(1))
    f = files[layer]
    hook = f"blocks.{layer}.{hook_in}"
    parse_transcoder_hooks(hook, f"blocks.{layer}.{hook_out}", str(path / CONFIG))
    shapes = safetensors_shapes(f)
    if len(shapes.get("W_enc", ())) != 2:
        raise SAEFormatError(f"{f}: missing 2-D tensor 'W_enc' [d_sae, d_in] (has {sorted(shapes)})")
    F, d = shapes["W_enc"]
    want = {"W_enc": (F, d), "W_dec": (F, d), "b_enc": (F,), "b_dec": (d,)}
    jump = "activation_function.threshold" in shapes
    if jump:
        want["activation_function.threshold"] = (F,)
    if "W_skip" in shapes:
        want["W_skip"] = (d, d)  # checked; an edit never uses the skip
    check_shapes(f, shapes, want, f"W_enc (d_sae={F}, d_in={d})")
    if "log_thresholds" in shapes:
        raise SAEFormatError(f"{f}: 'log_thresholds' is not supported (circuit-tracer refuses "
                             "it too)")
    if jump:
        with safe_open(str(f), framework="pt") as h:
            if bool((h.get_tensor("activation_function.threshold") < 0).any()):
                raise SAEFormatError(
                    f"{f}: a negative JumpReLU threshold: circuit-tracer computes "
                    "pre * (pre > threshold), which then passes negative activations; the "
                    "transcoder path computes relu(pre) * (pre > threshold)")
    try:
        cfg = SAEConfig(
            architecture="jumprelu" if jump else "standard", d_in=d, d_sae=F, hook_name=hook,
            layer=layer, site="mlp_out", apply_b_dec_to_input=False,
            model_name=str(raw.get("model_name") or ""), dtype=safetensors_dtype(f, "W_enc"),
            format=NAME,
            training_architecture="circuit_tracer_" + ("jumprelu_" if jump else "")
            + ("skip_" if "W_skip" in shapes else "") + "transcoder",
            input_site=transcoder_input_site(hook), hook_name_out=f"blocks.{layer}.{hook_out}")
    except ValueError as e:
        raise SAEFormatError(f"{path}: {e}") from None
    return cfg, f
