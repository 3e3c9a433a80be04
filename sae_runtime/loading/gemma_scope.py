"""Gemma Scope on-disk format (Google DeepMind's JumpReLU SAEs for Gemma 2 and Gemma 3).

- Gemma Scope (Gemma 2): ``params.npz`` with ``W_enc [d_in, d_sae]``, ``W_dec [d_sae, d_in]``,
  ``b_enc``, ``b_dec`` and a per-feature ``threshold``, in folders
  ``gemma-scope-2b-pt-res/layer_20/width_16k/average_l0_71/``. The layer comes from the
  ``layer_L`` folder, the site from the release folder: ``-res`` -> ``resid_post``,
  ``-mlp`` -> ``mlp_out``, ``-att`` -> ``z`` (the attention SAEs read ``hook_z``, the
  concatenated head outputs before the output projection).
- Gemma Scope 2 (Gemma 3): ``params.safetensors`` with lower-case ``w_enc``/``w_dec`` (same
  layout), in folders ``resid_post/layer_17_width_16k_l0_medium/`` (``attn_out`` folders
  hold SAEs on the output projection's input, i.e. ``z``), with an optional
  ``config.json`` naming the model.

- Transcoders (Gemma Scope 2 ``transcoder/`` and ``transcoder_all/`` folders, ``..._affine``
  with an ``affine_skip_connection [d_in, d_out]``; Gemma Scope ``gemma-scope-2b-pt-
  transcoders``): JumpReLU latents of the MLP input side writing ``mlp_out`` (after
  ``post_feedforward_layernorm``), as SAELens' loaders define them: Gemma Scope 2 reads the
  MLP's input (``pre_feedforward_layernorm`` output; ``gemma_3``: ``blocks.L.hook_mlp_in``),
  Gemma Scope reads it without the norm's weight (``gemma_2_transcoder``:
  ``blocks.L.ln2.hook_normalized``, TransformerLens' normalised input). The skip is checked and not used (an edit
  moves the latents only). Cross-layer transcoders (``clt``) are refused.

The math (``f = relu(pre) * (pre > threshold)``, ``pre = x @ W_enc + b_enc``, no ``b_dec``
subtraction, no input normalisation) is the JumpReLU SAE of SAELens' Gemma Scope loaders.
When the folder names do not tell the hook (a renamed copy), pass it explicitly
(``NAME=PATH@blocks.L.hook_resid_post``).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from sae_runtime.errors import SAEFormatError
from sae_runtime.loading import (
    is_transcoder_input,
    parse_hook_name,
    parse_transcoder_hooks,
    transcoder_input_site,
)
from sae_runtime.loading._files import (
    build_sae,
    check_shapes,
    npz_shapes,
    npz_tensors,
    read_json,
    safetensors_shapes,
    safetensors_tensors,
)
from sae_runtime.saes.base import SAE, HookSite, SAEConfig  # noqa: F401

NAME = "gemma_scope"
LAYOUT = "params.npz or params.safetensors (Gemma Scope)"
NPZ_FILE = "params.npz"
SAFETENSORS_FILE = "params.safetensors"
_ANCESTORS = 6  # how far up the folder names are searched
_RELEASE_SITE = re.compile(r"-(res|mlp|att)(?=$|[-_.])")
_RELEASE_SITES: dict[str, HookSite] = {"res": "resid_post", "mlp": "mlp_out", "att": "z"}
_GS2_SITES: dict[str, HookSite] = {"resid_post": "resid_post", "mlp_out": "mlp_out",
                                   "attn_out": "z"}
# A transcoder's input: Gemma Scope's (``.npz``) read the pre-MLP norm's normalised input
# without its weight (SAELens ``gemma_2_transcoder``: ``ln2.hook_normalized``), Gemma Scope 2's
# the MLP's input (``hf_hook_point_in`` ``pre_feedforward_layernorm.output``; SAELens
# ``gemma_3``: ``hook_mlp_in``).
_SITE_HOOK = {"resid_post": "hook_resid_post", "mlp_out": "hook_mlp_out", "z": "attn.hook_z",
              "mlp_in": "hook_mlp_in", "ln2_normalized": "ln2.hook_normalized"}
_MODELS = re.compile(r"gemma-scope-(2b|9b|27b)-(pt|it)")


def detect(path: Path) -> bool:
    return (path / NPZ_FILE).is_file() or (path / SAFETENSORS_FILE).is_file()


def read_config(path: Path, hook_name: str | None = None) -> SAEConfig:
    return _config(path, hook_name, _shapes(path))


def load(path: Path, hook_name: str | None = None) -> SAE:
    cfg = read_config(path, hook_name)
    f = _weights_file(path)
    raw = npz_tensors(f) if f.suffix == ".npz" else safetensors_tensors(f)
    t = {_canonical(k): v for k, v in raw.items()}
    scale = t.get("scaling_factor")
    if scale is not None and not torch.all(scale == 1):
        raise SAEFormatError(f"{f}: a 'scaling_factor' other than 1 is not supported")
    return build_sae(cfg, W_enc=t["W_enc"], W_dec=t["W_dec"], b_enc=t["b_enc"],
                     b_dec=t["b_dec"], threshold=t["threshold"])


def _weights_file(path: Path) -> Path:
    npz = path / NPZ_FILE
    return npz if npz.is_file() else path / SAFETENSORS_FILE


def _canonical(name: str) -> str:
    return "W_" + name[2:] if name.startswith("w_") else name


def _shapes(path: Path) -> dict[str, tuple[int, ...]]:
    f = _weights_file(path)
    raw = npz_shapes(f) if f.suffix == ".npz" else safetensors_shapes(f)
    return {_canonical(k): v for k, v in raw.items()}


def _config(path: Path, hook_name: str | None, shapes: dict[str, tuple[int, ...]]) -> SAEConfig:
    f = _weights_file(path)
    if "W_enc" not in shapes or len(shapes["W_enc"]) != 2:
        raise SAEFormatError(f"{f}: missing 2-D tensor 'W_enc' (has {sorted(shapes)})")
    d_in, d_sae = shapes["W_enc"]
    check_shapes(f, shapes, {"W_dec": (d_sae, d_in), "b_enc": (d_sae,), "b_dec": (d_in,),
                             "threshold": (d_sae,)},
                 f"W_enc's shape (d_in={d_in}, d_sae={d_sae})")
    if hook_name is None:
        hook_name = _hook_from_folders(path, f)
    extra: dict = {}
    if is_transcoder_input(hook_name):  # a transcoder: reads the MLP input, writes mlp_out
        layer, site = parse_transcoder_hooks(hook_name, None, str(f)), "mlp_out"
        extra = {"input_site": transcoder_input_site(hook_name),
                 "hook_name_out": f"blocks.{layer}.hook_mlp_out",
                 "training_architecture": "jumprelu_skip_transcoder"
                 if "affine_skip_connection" in shapes else "jumprelu_transcoder"}
        if "affine_skip_connection" in shapes:  # checked; an edit never uses the skip
            check_shapes(f, shapes, {"affine_skip_connection": (d_in, d_in)},
                         f"W_enc's shape (d_in={d_in}, d_sae={d_sae})")
    else:
        layer, site = parse_hook_name(hook_name, str(f))
    model_name = ""
    cfg_json = path / "config.json"
    if cfg_json.is_file():
        model_name = str(read_json(cfg_json).get("model_name") or "")
    if not model_name:
        for part in reversed(path.resolve().parts[-_ANCESTORS - 1:]):
            m = _MODELS.search(part)
            if m:
                model_name = f"gemma-2-{m.group(1)}" + ("-it" if m.group(2) == "it" else "")
                break
    return SAEConfig(
        architecture="jumprelu", d_in=d_in, d_sae=d_sae, hook_name=hook_name, layer=layer,
        site=site, apply_b_dec_to_input=False, model_name=model_name, dtype="float32",
        format=NAME, **extra,
    )


def _hook_from_folders(path: Path, f: Path) -> str:
    """SAELens hook name implied by the Gemma Scope folder names around ``path``.

    Folders are read nearest first, up to the one that names the site.
    """
    layer: int | None = None
    site: str | None = None
    for part in reversed(path.resolve().parts[-_ANCESTORS - 1:]):
        if part.startswith("clt") or part.endswith("-clt"):
            raise SAEFormatError(f"{path}: folder {part!r} holds cross-layer transcoders (each "
                                 "layer's latents write to every later layer); only SAEs and "
                                 "per-layer transcoders are supported")
        if part == "embedding":
            raise SAEFormatError(f"{path}: embedding SAEs are not supported; hook a block")
        m = re.search(r"(?:^|_)layer_(\d+)(?=$|_)", part)
        if layer is None and m:
            layer = int(m.group(1))
        gs2 = next((s for key, s in _GS2_SITES.items() if key in part), None)
        m = _RELEASE_SITE.search(part)
        site = gs2 or (_RELEASE_SITES[m.group(1)] if m else None)
        if "transcoder" in part:  # transcoder/, transcoder_all/, gemma-scope-2b-pt-transcoders
            site = "ln2_normalized" if f.suffix == ".npz" else "mlp_in"
        if site is not None:
            break
    if layer is None or site is None:
        missing = "layer (a 'layer_L' folder)" if layer is None else (
            "site (a release folder named like 'gemma-scope-2b-pt-res', '-mlp' or '-att', "
            "or a 'resid_post'/'mlp_out'/'attn_out' folder)")
        raise SAEFormatError(
            f"{f}: cannot tell the hook from the folder names: no {missing}; pass the hook "
            "explicitly, e.g. NAME=PATH@blocks.L.hook_resid_post"
        )
    return f"blocks.{layer}.{_SITE_HOOK[site]}"
