"""EleutherAI sparsify on-disk format (also its predecessor, EleutherAI ``sae``).

One folder per hookpoint, named after it (``layers.12``, ``layers.12.mlp``), holding
``cfg.json`` (``SparseCoderConfig`` plus ``d_in``) and ``sae.safetensors`` with
``encoder.weight [num_latents, d_in]``, ``encoder.bias [num_latents]``,
``W_dec [num_latents, d_in]`` and ``b_dec [d_in]``.

The math is ``SparseCoder.encode``/``decode`` (``sparsify/sparse_coder.py``,
``fused_encoder.py``): ``pre = (x - b_dec) @ encoder.weight.T + encoder.bias``, then

- ``activation: topk``: ReLU, then the k largest -> our ``topk`` (ReLU before or after the
  selection gives the same dense activations);
- ``activation: groupmax``: ReLU, then the maximum of each of k contiguous groups ->
  ``groupmax``;
- ``signed: true`` (EleutherAI ``sae``): no ReLU, the k largest by magnitude keep their
  signs -> ``abstopk``;

and ``x_hat = f @ W_dec + b_dec``. The hook comes from the folder name (a module path,
see ``parse_hook_name``) unless given explicitly. Transcoders (``transcode: true`` at an
MLP hookpoint such as ``layers.12.mlp``) encode the MLP's input without subtracting
``b_dec`` and write the MLP's output; their ``skip_connection`` (``W_skip``) is checked and
not used (an edit moves the latents only). Skip connections on SAEs, ``embed_skip`` and
n-gram lookups (``gram_lookup``) change what the coder reads or writes and are rejected.
"""

from __future__ import annotations

from pathlib import Path

from sae_runtime.errors import SAEFormatError
from sae_runtime.loading import parse_hook_name
from sae_runtime.loading._files import (
    build_sae,
    check_shapes,
    read_json,
    safetensors_dtype,
    safetensors_shapes,
    safetensors_tensors,
)
from sae_runtime.saes.base import SAE, SAEConfig

NAME = "sparsify"
LAYOUT = "cfg.json + sae.safetensors (EleutherAI sparsify)"
CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae.safetensors"
_UNSUPPORTED = {
    "embed_skip": "an embedding skip connection",
    "gram_lookup": "an n-gram lookup table",
}


def detect(path: Path) -> bool:
    return (path / CFG_FILE).is_file() and (path / WEIGHTS_FILE).is_file()


def read_config(path: Path, hook_name: str | None = None) -> SAEConfig:
    return _config(path, hook_name)


def load(path: Path, hook_name: str | None = None) -> SAE:
    cfg = _config(path, hook_name)
    t = safetensors_tensors(path / WEIGHTS_FILE, ["encoder.weight", "encoder.bias", "W_dec",
                                                   "b_dec"])
    return build_sae(cfg, W_enc=t["encoder.weight"].t(), W_dec=t["W_dec"],
                     b_enc=t["encoder.bias"], b_dec=t["b_dec"])


def _config(path: Path, hook_name: str | None) -> SAEConfig:
    cfg_path, w_path = path / CFG_FILE, path / WEIGHTS_FILE
    raw = read_json(cfg_path)
    for key, what in _UNSUPPORTED.items():
        if raw.get(key):
            raise SAEFormatError(f"{cfg_path}: {key}=true ({what}) is not supported")
    transcode = bool(raw.get("transcode"))
    if raw.get("skip_connection") and not transcode:
        raise SAEFormatError(f"{cfg_path}: skip_connection=true on an SAE (not a transcoder) "
                             "is not supported")
    activation = str(raw.get("activation", "topk"))
    if raw.get("signed"):
        arch = "abstopk"
    elif activation in ("topk", "groupmax"):
        arch = activation
    else:
        raise SAEFormatError(f"{cfg_path}: activation {activation!r} is not supported; "
                             "supported: topk, groupmax")
    for key in ("d_in", "k"):
        if raw.get(key) is None:
            raise SAEFormatError(f"{cfg_path}: missing key {key!r}")
    try:
        d_in = int(raw["d_in"])
        d_sae = int(raw.get("num_latents") or 0) or d_in * int(raw["expansion_factor"])
        k = int(raw["k"])
    except KeyError as e:
        raise SAEFormatError(f"{cfg_path}: missing key {e.args[0]!r}") from None
    except (TypeError, ValueError) as e:
        raise SAEFormatError(f"{cfg_path}: {e}") from None
    if arch == "groupmax" and d_sae % k:
        raise SAEFormatError(f"{cfg_path}: groupmax needs num_latents ({d_sae}) to be a "
                             f"multiple of k ({k})")
    hook = hook_name or path.resolve().name
    try:
        layer, site = parse_hook_name(hook, str(path))
    except SAEFormatError as e:
        if hook_name is not None:
            raise
        raise SAEFormatError(
            f"{path}: the folder name {hook!r} is not a hookpoint this runtime knows (a "
            "sparsify SAE folder is named after its hookpoint, e.g. layers.12 or "
            "layers.12.mlp); pass the hook explicitly, e.g. NAME=PATH@layers.12"
        ) from e
    extra: dict = {}
    if transcode:  # predicts the MLP's output from its input (sparsify's trainer hooks both)
        if site != "mlp_out":
            raise SAEFormatError(f"{cfg_path}: transcode=true at {hook!r}; only transcoders of "
                                 "an MLP (a hookpoint such as layers.L.mlp) are supported")
        extra = {"input_site": "mlp_in", "hook_name_out": hook,
                 "training_architecture": "topk_transcoder"}
    shapes = safetensors_shapes(w_path)
    expected = {"encoder.weight": (d_sae, d_in), "encoder.bias": (d_sae,),
                "W_dec": (d_sae, d_in), "b_dec": (d_in,)}
    if raw.get("skip_connection"):
        expected["W_skip"] = (d_in, d_in)  # checked; an edit never uses the skip
    check_shapes(w_path, shapes, expected, f"{CFG_FILE} (d_in={d_in}, num_latents={d_sae})")
    model_name = ""
    run_cfg = path.parent / "config.json"
    if run_cfg.is_file():
        model_name = str(read_json(run_cfg).get("model") or "")
    try:
        return SAEConfig(
            architecture=arch, d_in=d_in, d_sae=d_sae, hook_name=hook, layer=layer, site=site,
            apply_b_dec_to_input=not transcode, k=k, model_name=model_name,
            dtype=safetensors_dtype(w_path, "encoder.weight"), format=NAME, **extra,
        )
    except (TypeError, ValueError) as e:
        raise SAEFormatError(f"{cfg_path}: {e}") from None
