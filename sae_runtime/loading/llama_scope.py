"""Llama Scope on-disk format (OpenMOSS ``lm_saes``, the library that trained Llama Scope).

A folder such as ``Llama3_1-8B-Base-L15R-8x/`` holds ``hyperparams.json`` (or
``config.json``) and ``checkpoints/final.safetensors`` (``sae_weights.safetensors`` and
``checkpoints/pruned.safetensors`` are tried first, as ``lm_saes`` does). Tensors are
``encoder.weight [d_sae, d_model]``, ``encoder.bias [d_sae]``, ``decoder.weight
[d_model, d_sae]`` (transposed with respect to SAELens) and ``decoder.bias [d_model]``; the
later ``lm_saes`` names ``W_E [d_model, d_sae]``, ``b_E``, ``W_D [d_sae, d_model]``, ``b_D``
are read too.

Hyper-parameters read (the keys of the published ``hyperparams.json``; the defaults are
the ``lm_saes`` ones of that release): ``d_model``, ``d_sae`` (or ``expansion_factor``),
``hook_point_in``/``hook_point_out`` (must be equal: transcoders are rejected), ``act_fn``
(``relu``, ``jumprelu`` with scalar ``jump_relu_threshold``, or ``topk`` with ``top_k``),
``norm_activation`` (``dataset-wise`` with ``dataset_average_activation_norm``
``{"in": .., "out": ..}``, ``token-wise``, or ``inference`` = none),
``use_decoder_bias`` (true), ``apply_decoder_bias_to_pre_encoder`` (true),
``sparsity_include_decoder_norm`` (true), ``use_glu_encoder`` (must be false).

The math is ``lm_saes``' ``SparseAutoEncoder.encode``/``decode`` in ``dataset-wise`` mode
with the caller's normalise/denormalise around it:

    x' = x * sqrt(d_model) / avg_norm_in           (token-wise: / ||x||)
    pre = (x' - b_D [if apply_decoder_bias_to_pre_encoder]) @ W_E + b_E
    mask = act_fn(pre * ||W_D[i]|| [if sparsity_include_decoder_norm])
    f = pre * mask                                  (reported feature values)
    x_hat = (f @ W_D + b_D) * avg_norm_out / sqrt(d_model)

so the scalar threshold and the TopK ranking see ``pre`` times the decoder column norms
(``SAE.rank_scale``) while the feature values stay ``pre``. One deliberate difference:
``lm_saes``' TopK mask lets every non-positive pre-activation through when fewer than k
are positive; here (as in SAELens and sparsify) only the positive ones are kept.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from sae_runtime.errors import SAEFormatError
from sae_runtime.loading import parse_hook_name
from sae_runtime.loading._files import (
    build_sae,
    check_shapes,
    read_json,
    safetensors_shapes,
    safetensors_tensors,
)
from sae_runtime.saes.base import SAE, SAEConfig

NAME = "llama_scope"
LAYOUT = "hyperparams.json + checkpoints/final.safetensors (Llama Scope)"
CONFIG_FILES = ("hyperparams.json", "config.json")
WEIGHT_FILES = ("sae_weights.safetensors", "checkpoints/pruned.safetensors",
                "checkpoints/final.safetensors")
_ACT_FNS = {"relu": "standard", "jumprelu": "jumprelu", "topk": "topk"}
_NORMS = ("dataset-wise", "token-wise", "inference")


def detect(path: Path) -> bool:
    if (path / "hyperparams.json").is_file():
        return True
    return (path / "config.json").is_file() and (path / "checkpoints").is_dir()


def read_config(path: Path, hook_name: str | None = None) -> SAEConfig:
    return _parse(path, hook_name)[0]


def load(path: Path, hook_name: str | None = None) -> SAE:
    cfg, hp, w_path, names = _parse(path, hook_name)
    t = {k: v.to(torch.float32) for k, v in safetensors_tensors(w_path).items()}
    if names == "linear":
        W_enc, b_enc, W_dec = t["encoder.weight"].t(), t["encoder.bias"], t["decoder.weight"].t()
        b_dec = t.get("decoder.bias")
    else:
        W_enc, b_enc, W_dec, b_dec = t["W_E"], t["b_E"], t["W_D"], t.get("b_D")
    if b_dec is None:  # use_decoder_bias = false
        b_dec = torch.zeros(cfg.d_in)
    threshold = None
    if cfg.architecture == "jumprelu":
        threshold = torch.full((cfg.d_sae,), float(hp.get("jump_relu_threshold", 0.0)))
    rank_scale = W_dec.norm(dim=-1) if hp.get("sparsity_include_decoder_norm", True) else None
    return build_sae(cfg, W_enc=W_enc, W_dec=W_dec, b_enc=b_enc, b_dec=b_dec,
                     threshold=threshold, rank_scale=rank_scale)


def _parse(path: Path, hook_name: str | None) -> tuple[SAEConfig, dict[str, Any], Path, str]:
    cfg_path = next((path / n for n in CONFIG_FILES if (path / n).is_file()), None)
    if cfg_path is None:
        raise SAEFormatError(f"{path}: missing hyperparams.json")
    hp = read_json(cfg_path)
    w_path = next((path / n for n in WEIGHT_FILES if (path / n).is_file()), None)
    if w_path is None:
        raise SAEFormatError(
            f"{path / WEIGHT_FILES[-1]}: missing weights file (also looked for "
            f"{', '.join(WEIGHT_FILES[:-1])})"
        )

    def need(key: str) -> Any:
        if key not in hp:
            raise SAEFormatError(f"{cfg_path}: missing key {key!r}")
        return hp[key]

    try:
        d_model = int(need("d_model"))
        d_sae = int(hp["d_sae"]) if hp.get("d_sae") else d_model * int(need("expansion_factor"))
    except (TypeError, ValueError) as e:
        raise SAEFormatError(f"{cfg_path}: {e}") from None
    hook_in = str(need("hook_point_in"))
    hook_out = str(hp.get("hook_point_out") or hook_in)
    if hook_out != hook_in:
        raise SAEFormatError(
            f"{cfg_path}: hook_point_in {hook_in!r} differs from hook_point_out {hook_out!r} "
            "(a transcoder); only SAEs are supported"
        )
    if hp.get("use_glu_encoder"):
        raise SAEFormatError(f"{cfg_path}: use_glu_encoder is not supported")
    act_fn = str(hp.get("act_fn", "relu")).lower()
    if act_fn not in _ACT_FNS:
        raise SAEFormatError(f"{cfg_path}: act_fn {act_fn!r} is not supported; supported: "
                             f"{', '.join(_ACT_FNS)}")
    arch = _ACT_FNS[act_fn]
    hook = hook_name or hook_in
    layer, site = parse_hook_name(hook, str(cfg_path))

    norm = str(hp.get("norm_activation", "dataset-wise"))
    if norm not in _NORMS:
        raise SAEFormatError(f"{cfg_path}: norm_activation {norm!r} is not supported; "
                             f"supported: {', '.join(_NORMS)}")
    norm_kwargs: dict[str, Any] = {"normalization": "none"}
    if norm == "token-wise":
        norm_kwargs = {"normalization": "token_norm"}
    elif norm == "dataset-wise":
        avg = hp.get("dataset_average_activation_norm")
        if not isinstance(avg, dict):
            raise SAEFormatError(f"{cfg_path}: norm_activation 'dataset-wise' needs "
                                 "dataset_average_activation_norm {\"in\": .., \"out\": ..}")
        n_in, n_out = avg.get("in", avg.get(hook_in)), avg.get("out", avg.get(hook_out))
        try:
            n_in, n_out = float(n_in), float(n_out)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            raise SAEFormatError(f"{cfg_path}: dataset_average_activation_norm needs numeric "
                                 f"'in' and 'out', got {avg!r}") from None
        if not (n_in > 0 and n_out > 0 and math.isfinite(n_in) and math.isfinite(n_out)):
            raise SAEFormatError(f"{cfg_path}: dataset_average_activation_norm must be "
                                 f"positive, got {avg!r}")
        root = math.sqrt(d_model)
        norm_kwargs = {"normalization": "constant_scale", "norm_scale_in": root / n_in,
                       "norm_scale_out": n_out / root}

    use_bias = bool(hp.get("use_decoder_bias", True))
    k = None
    if arch == "topk":
        try:
            k = int(need("top_k"))
        except (TypeError, ValueError) as e:
            raise SAEFormatError(f"{cfg_path}: top_k: {e}") from None
    try:
        cfg = SAEConfig(
            architecture=arch, d_in=d_model, d_sae=d_sae, hook_name=hook, layer=layer,
            site=site,
            apply_b_dec_to_input=use_bias and bool(hp.get("apply_decoder_bias_to_pre_encoder",
                                                          True)),
            k=k, model_name=str(hp.get("model_name") or ""),
            dtype=str(hp.get("dtype", "float32")).removeprefix("torch."), format=NAME,
            **norm_kwargs,
        )
    except (TypeError, ValueError) as e:
        raise SAEFormatError(f"{cfg_path}: {e}") from None

    shapes = safetensors_shapes(w_path)
    if "encoder.weight" in shapes or "W_E" not in shapes:
        names = "linear"
        expected = {"encoder.weight": (d_sae, d_model), "encoder.bias": (d_sae,),
                    "decoder.weight": (d_model, d_sae)}
        if use_bias:
            expected["decoder.bias"] = (d_model,)
    else:
        names = "W"
        expected = {"W_E": (d_model, d_sae), "b_E": (d_sae,), "W_D": (d_sae, d_model)}
        if use_bias:
            expected["b_D"] = (d_model,)
    check_shapes(w_path, shapes, expected,
                 f"{cfg_path.name} (d_model={d_model}, d_sae={d_sae})")
    return cfg, hp, w_path, names
