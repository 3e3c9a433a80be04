"""sae-lens's own reading of a transcoder folder: the independent reference for transcoders.

SAELens-format folders load with ``sae_lens.SAE.load_from_disk`` (its ``Transcoder``
classes). Gemma Scope 2 folders go through sae-lens's ``gemma_3`` Hugging Face loader, the
code that converts the published files, with its two downloads pointed at the local folder
(no network): its config and tensor renaming (``w_enc`` -> ``W_enc``, the affine skip
transposed into ``W_skip``) are sae-lens's, not ours.
"""

from __future__ import annotations

import json
from pathlib import Path
from unittest import mock

from safetensors import safe_open


def gemma_scope_2_folder(path: Path) -> tuple[Path, str]:
    """``(root, folder_name)``: a Gemma Scope 2 SAE folder as (repo root, path inside it)."""
    path = Path(path).resolve()
    return path.parent.parent, f"{path.parent.name}/{path.name}"


def load_sae_lens_transcoder(path: Path):
    """The sae-lens SAE object for the transcoder in ``path`` (either format)."""
    from sae_lens import SAE
    from sae_lens.loading import pretrained_sae_loaders as loaders

    path = Path(path)
    if (path / "cfg.json").is_file():
        return SAE.load_from_disk(str(path), device="cpu")
    root, folder = gemma_scope_2_folder(path)

    def download(repo_id=None, filename=None, subfolder=None, **_):
        f = root / (f"{subfolder}/{filename}" if subfolder else filename)
        if not f.is_file():
            raise loaders.EntryNotFoundError(str(f))
        return str(f)

    def shapes(repo_id, filename):
        with safe_open(str(root / filename), framework="pt") as f:
            return {k: list(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118

    with mock.patch.object(loaders, "hf_hub_download", download), \
            mock.patch.object(loaders, "get_safetensors_tensor_shapes", shapes):
        def convert(_path, device, cfg_overrides=None):
            cfg, state, _ = loaders.gemma_3_sae_huggingface_loader(
                "google/gemma-scope-2-tiny-pt", folder, device=device, cfg_overrides=cfg_overrides)
            return cfg, state

        return SAE.load_from_disk(str(path), device="cpu", converter=convert)


def transcoder_input_site(path: Path) -> str:
    """Where a test transcoder folder reads, by TransformerLens' definitions:
    ``ln2_normalized`` for ``blocks.L.ln2.hook_normalized`` (the norm's normalised input,
    without its weight), else the MLP's input (Gemma Scope 2: ``pre_feedforward_layernorm``
    output)."""
    path = Path(path).resolve()
    if (path / "cfg.json").is_file():
        hook = json.loads((path / "cfg.json").read_text())["metadata"]["hook_name"]
        return "ln2_normalized" if hook.endswith(".ln2.hook_normalized") else "mlp_in"
    return "mlp_in"


def transcoder_layer(path: Path) -> int:
    """The block a test transcoder folder reads (its hook name or its folder name)."""
    path = Path(path).resolve()
    if (path / "cfg.json").is_file():
        hook = json.loads((path / "cfg.json").read_text())["metadata"]["hook_name"]
        return int(hook.split(".")[1])
    return int(path.name.split("_")[1])
