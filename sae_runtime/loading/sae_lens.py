"""SAELens on-disk format: ``cfg.json`` + ``sae_weights.safetensors`` (+ optional
``sparsity.safetensors``, ignored, and a training checkpoint's ``activation_scaler.json``).

Reads the SAELens 6 layout (``metadata.hook_name``, ``k`` at top level), the older flat one
(``hook_name``/``hook_point``, ``activation_fn_kwargs.k``) and training checkpoints
(``TrainingSAE.save_model``). Architectures and how they map to ours:

- ``standard``, ``jumprelu``, ``topk``, ``gated``, ``abstopk``: as SAELens computes them
  (``sae_lens/saes/*.py``). ``rescale_acts_by_decoder_norm`` (TopK family) is folded into
  the weights exactly as SAELens does when saving an inference model. An old JumpReLU
  checkpoint's ``log_threshold`` becomes ``threshold = exp(log_threshold)``.
- ``batchtopk``, ``matryoshka_batchtopk`` (training-only classes in SAELens): SAELens saves
  them for inference as JumpReLU SAEs with the learned global ``topk_threshold`` as every
  feature's threshold; a training checkpoint is converted the same way here, so it loads as
  ``jumprelu`` with ``SAEConfig.training_architecture`` recording the original.
- ``groupmax``, ``top_afa``: this runtime's extensions (no SAELens class); same tensors as
  ``topk``.
- Transcoders (``transcoder``, ``skip_transcoder``, ``jumprelu_transcoder``,
  ``jumprelu_skip_transcoder``): served as ``standard`` / ``jumprelu`` reading the MLP input
  (``hook_name``: ``blocks.L.ln2.hook_normalized``, the normalised input without the
  norm's weight, as TransformerLens defines it; ``hook_mlp_in`` or ``mlp.hook_in``, the
  MLP's input itself; ``saes.base.InputSite``) and
  writing ``hook_name_out`` (``blocks.L.hook_mlp_out``); ``d_out`` must equal ``d_in``. A
  skip transcoder's ``W_skip`` is checked and not used: edits move ``f`` only.

``normalize_activations``: ``none``; ``constant_norm_rescale`` -> ``token_norm``;
``layer_norm`` -> ``layer_norm``; ``expected_average_only_in`` -> ``constant_scale`` with
the ``scaling_factor`` of ``activation_scaler.json`` (what the SAELens trainer applies;
without that file SAELens' own ``encode`` treats the mode as the identity, and so do we,
with a warning); ``covariance_whitening`` -> the whitening of
``activation_whitening.safetensors`` folded into the weights exactly as
``SAE.fold_activation_whitening`` does (identity with a warning if absent).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sae_runtime.errors import SAEFormatError
from sae_runtime.loading import parse_hook_name, parse_transcoder_hooks, transcoder_input_site
from sae_runtime.loading._files import (
    architecture_or_error,
    build_sae,
    check_shapes,
    fold_decoder_norm,
    read_json,
    safetensors_shapes,
    safetensors_tensors,
)
from sae_runtime.saes.base import SAE, SAEConfig

log = logging.getLogger(__name__)

NAME = "saelens"
LAYOUT = "cfg.json + sae_weights.safetensors"
CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
SCALER_FILE = "activation_scaler.json"
WHITENING_FILE = "activation_whitening.safetensors"

# SAELens training architectures that are JumpReLU SAEs at inference.
_JUMPRELU_AT_INFERENCE = ("batchtopk", "matryoshka_batchtopk")
_TOPK_FAMILY = ("topk", "abstopk", "groupmax", "top_afa", *_JUMPRELU_AT_INFERENCE)
_TRANSCODERS = ("transcoder", "skip_transcoder", "jumprelu_transcoder",
                "jumprelu_skip_transcoder")
_NORMALIZE = {
    "none": "none",
    "constant_norm_rescale": "token_norm",
    "layer_norm": "layer_norm",
    "expected_average_only_in": "constant_scale",  # needs activation_scaler.json
    "covariance_whitening": "none",  # folded into the weights
}


def detect(path: Path) -> bool:
    return (path / CFG_FILE).is_file()


@dataclass(frozen=True)
class _Plan:
    cfg: SAEConfig
    weights: Path
    source_arch: str  # the architecture cfg.json names (after legacy defaulting)
    rescale_by_decoder_norm: bool
    threshold_key: str | None  # tensor holding the JumpReLU threshold, if any
    whitening: Path | None  # activation_whitening.safetensors to fold, if any


def read_config(path: Path, hook_name: str | None = None) -> SAEConfig:
    return _plan(path, hook_name).cfg


def load(path: Path, hook_name: str | None = None) -> SAE:
    plan = _plan(path, hook_name)
    cfg = plan.cfg
    t = {k: v.to(torch.float32) for k, v in safetensors_tensors(plan.weights).items()}
    W_enc, W_dec, b_dec = t["W_enc"], t["W_dec"], t["b_dec"]
    b_enc = t["b_gate"] if plan.source_arch == "gated" else t["b_enc"]
    threshold = None
    if plan.threshold_key == "log_threshold":
        threshold = t["log_threshold"].exp()
    elif plan.threshold_key == "topk_threshold":
        threshold = torch.full((cfg.d_sae,), float(t["topk_threshold"]))
    elif plan.threshold_key is not None:
        threshold = t[plan.threshold_key]
    if plan.rescale_by_decoder_norm:
        # SAELens ranks (and reports) pre * ||W_dec[i]|| and decodes acts / ||W_dec[i]||;
        # folding the norms computes exactly that (_fold_norm_topk, fold_W_dec_norm).
        W_enc, b_enc, W_dec = fold_decoder_norm(W_enc, b_enc, W_dec)
    b_mag, r_mag = t.get("b_mag"), t.get("r_mag")
    if plan.whitening is not None:
        W_enc, b_enc, W_dec, b_dec, b_mag = _fold_whitening(
            plan.whitening, cfg, W_enc, b_enc, W_dec, b_dec, b_mag, r_mag)
    return build_sae(cfg, W_enc=W_enc, W_dec=W_dec, b_enc=b_enc, b_dec=b_dec,
                     threshold=threshold, b_mag=b_mag, r_mag=r_mag)


# Kept for callers of the first version of this module.
load_sae_lens = load
read_sae_lens_config = read_config


def _plan(path: Path, hook_name: str | None) -> _Plan:
    cfg_path, w_path = path / CFG_FILE, path / WEIGHTS_FILE
    raw = read_json(cfg_path)
    if not w_path.is_file():
        raise SAEFormatError(f"{w_path}: missing weights file")
    meta = raw.get("metadata") or {}
    if not isinstance(meta, dict):
        raise SAEFormatError(f"{cfg_path}: 'metadata' must be an object")

    source_arch = str(raw.get("architecture") or "standard")
    if source_arch == "standard" and _legacy_architecture(raw) == "topk":
        source_arch = "topk"  # SAELens < 6 named TopK by its activation function
    transcoder = source_arch in _TRANSCODERS
    if transcoder:
        # SAELens' Transcoder / SkipTranscoder (ReLU) and JumpReLU(Skip)Transcoder: the
        # same encoder math as "standard" / "jumprelu", reading the MLP input.
        arch_name = "jumprelu" if source_arch.startswith("jumprelu") else "standard"
    else:
        arch_name = "jumprelu" if source_arch in _JUMPRELU_AT_INFERENCE else source_arch
    arch = architecture_or_error(arch_name, str(cfg_path))
    training_arch = source_arch if source_arch != arch_name else ""
    if not training_arch and meta.get("training_architecture") not in (None, arch_name):
        training_arch = str(meta["training_architecture"])

    hook = hook_name or raw.get("hook_name") or raw.get("hook_point") or meta.get("hook_name")
    if not hook:
        raise SAEFormatError(f"{cfg_path}: no hook_name; pass one with NAME=PATH@HOOK")
    if raw.get("hook_head_index", meta.get("hook_head_index")) is not None:
        raise SAEFormatError(
            f"{cfg_path}: hook_head_index is set (an SAE on one attention head); only SAEs on "
            "whole activations are supported"
        )
    if raw.get("finetuning_scaling_factor"):
        raise SAEFormatError(f"{cfg_path}: finetuning_scaling_factor is not supported")
    transcoder_kwargs: dict[str, Any] = {}
    if transcoder:
        hook_out = raw.get("hook_name_out") or meta.get("hook_name_out")
        layer = parse_transcoder_hooks(str(hook), hook_out and str(hook_out), str(cfg_path))
        site = "mlp_out"
        transcoder_kwargs = {"input_site": transcoder_input_site(str(hook)),
                             "hook_name_out": str(hook_out or f"blocks.{layer}.hook_mlp_out")}
        if raw.get("apply_b_dec_to_input"):
            raise SAEFormatError(f"{cfg_path}: apply_b_dec_to_input is true, which a transcoder "
                                 "cannot have (SAELens refuses it too)")
    else:
        layer, site = parse_hook_name(str(hook), str(cfg_path))

    k: Any = raw.get("k", (raw.get("activation_fn_kwargs") or {}).get("k"))
    if arch.needs_k:
        if k is None:
            raise SAEFormatError(f"{cfg_path}: {arch_name} architecture needs 'k'")
        if not float(k).is_integer():
            raise SAEFormatError(f"{cfg_path}: {arch_name} architecture needs an integer k, "
                                 f"got {k!r}")

    norm_raw = raw.get("normalize_activations", "none")
    if isinstance(norm_raw, bool):  # SAELens < 6 wrote a boolean
        norm_raw = "expected_average_only_in" if norm_raw else "none"
    norm_raw = norm_raw or "none"
    if norm_raw not in _NORMALIZE:
        raise SAEFormatError(
            f"{cfg_path}: normalize_activations={norm_raw!r} is not supported; supported: "
            f"{', '.join(_NORMALIZE)}"
        )
    norm_kwargs, whitening = _normalization(path, str(norm_raw), cfg_path)

    try:
        cfg = SAEConfig(
            architecture=arch_name,
            d_in=int(raw["d_in"]),
            d_sae=int(raw["d_sae"]),
            hook_name=str(hook),
            layer=layer,
            site=site,
            apply_b_dec_to_input=not transcoder and bool(raw.get("apply_b_dec_to_input", True)),
            k=int(k) if arch.needs_k else None,
            model_name=str(raw.get("model_name") or meta.get("model_name") or ""),
            dtype=str(raw.get("dtype", "float32")),
            format=NAME,
            training_architecture=training_arch,
            **norm_kwargs,
            **transcoder_kwargs,
        )
    except KeyError as e:
        raise SAEFormatError(f"{cfg_path}: missing key {e.args[0]!r}") from None
    except (TypeError, ValueError) as e:
        raise SAEFormatError(f"{cfg_path}: {e}") from None
    if arch_name == "groupmax" and cfg.d_sae % (cfg.k or 1):
        raise SAEFormatError(f"{cfg_path}: groupmax needs d_sae ({cfg.d_sae}) to be a "
                             f"multiple of k ({cfg.k})")

    shapes = safetensors_shapes(w_path)
    d_in, d_sae = cfg.d_in, cfg.d_sae
    expected: dict[str, tuple[int, ...]] = {
        "W_enc": (d_in, d_sae), "W_dec": (d_sae, d_in), "b_dec": (d_in,),
    }
    if transcoder:
        d_out = int(raw.get("d_out", d_in))
        if d_out != d_in:
            raise SAEFormatError(f"{cfg_path}: d_out={d_out} differs from d_in={d_in}; an MLP "
                                 "transcoder reads and writes the model's hidden size")
        if "skip" in source_arch:
            expected["W_skip"] = (d_out, d_in)  # checked; an edit never uses it
    if source_arch == "gated":
        expected.update(b_gate=(d_sae,), b_mag=(d_sae,), r_mag=(d_sae,))
    else:
        expected["b_enc"] = (d_sae,)
    threshold_key = None
    if source_arch in _JUMPRELU_AT_INFERENCE:
        threshold_key = "topk_threshold" if "topk_threshold" in shapes else "threshold"
        expected[threshold_key] = () if threshold_key == "topk_threshold" else (d_sae,)
    elif arch_name == "jumprelu":
        threshold_key = "log_threshold" if "log_threshold" in shapes else "threshold"
        expected[threshold_key] = (d_sae,)
    origin = f"{CFG_FILE} (d_in={d_in}, d_sae={d_sae})"
    check_shapes(w_path, shapes, expected, origin)
    for extra in ("finetuning_scaling_factor", "scaling_factor"):
        if extra in shapes:
            raise SAEFormatError(f"{w_path}: tensor {extra!r} (a finetuning scaling factor) "
                                 "is not supported")

    rescale = bool(raw.get("rescale_acts_by_decoder_norm", False))
    if rescale and source_arch not in _TOPK_FAMILY:
        raise SAEFormatError(f"{cfg_path}: rescale_acts_by_decoder_norm is only defined for "
                             f"TopK-family architectures, not {source_arch!r}")
    if whitening is not None:
        check_shapes(whitening, safetensors_shapes(whitening),
                     {"mean": (d_in,), "matrix": (d_in, d_in), "inverse_matrix": (d_in, d_in)},
                     origin)
    return _Plan(cfg, w_path, source_arch, rescale, threshold_key, whitening)


def _normalization(path: Path, mode: str, cfg_path: Path) -> tuple[dict[str, Any], Path | None]:
    """SAEConfig normalisation fields and the whitening file to fold, for ``mode``.

    For the two modes the SAELens trainer implements outside the SAE, apply what its
    ``ActivationScaler`` (saved next to a checkpoint) holds: ``x * scaling_factor``, then
    the whitening ``(x - mean) @ matrix``.
    """
    if mode not in ("expected_average_only_in", "covariance_whitening"):
        return {"normalization": _NORMALIZE[mode]}, None
    scaler_path = path / SCALER_FILE
    scaler = read_json(scaler_path) if scaler_path.is_file() else {}
    kwargs: dict[str, Any] = {"normalization": "none"}
    factor = scaler.get("scaling_factor")
    if factor is not None:
        try:
            factor = float(factor)
        except (TypeError, ValueError):
            raise SAEFormatError(f"{scaler_path}: scaling_factor must be a number, "
                                 f"got {factor!r}") from None
        if not math.isfinite(factor) or factor <= 0:
            raise SAEFormatError(f"{scaler_path}: scaling_factor must be positive and finite, "
                                 f"got {factor}")
        kwargs = {"normalization": "constant_scale", "norm_scale_in": factor,
                  "norm_scale_out": 1.0 / factor}
    whitening = path / WHITENING_FILE
    fold = whitening if scaler.get("has_whitening", True) and whitening.is_file() else None
    if factor is None and fold is None:
        log.warning(
            "%s: normalize_activations=%r but no %s (with a scaling factor or whitening) next "
            "to it; SAELens encodes such an SAE without normalisation (its trainer folds the "
            "normalisation into the weights at the end), and so does this runtime",
            cfg_path, mode, SCALER_FILE)
    return kwargs, fold


def _fold_whitening(path: Path, cfg: SAEConfig, W_enc, b_enc, W_dec, b_dec, b_mag, r_mag):
    """SAELens ``SAE.fold_activation_whitening`` (and the gated override)."""
    t = {k: v.to(torch.float64) for k, v in safetensors_tensors(path).items()}
    mean, M, M_inv = t["mean"], t["matrix"], t["inverse_matrix"]
    W_enc64 = M @ W_enc.to(torch.float64)
    if not cfg.apply_b_dec_to_input:
        shift = mean @ W_enc64
        b_enc = b_enc.to(torch.float64) - shift
        if b_mag is not None and r_mag is not None:
            b_mag = b_mag.to(torch.float64) - shift * r_mag.to(torch.float64).exp()
    W_dec = W_dec.to(torch.float64) @ M_inv
    b_dec = b_dec.to(torch.float64) @ M_inv + mean
    return W_enc64, b_enc, W_dec, b_dec, b_mag


def _legacy_architecture(raw: dict[str, Any]) -> str:
    act = raw.get("activation_fn_str") or raw.get("activation_fn") or "relu"
    return "topk" if act == "topk" else "standard"
