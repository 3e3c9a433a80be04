"""On-disk SAE formats. ``load_sae`` detects the format of a directory.

| format        | directory holds                                              | module          |
| ------------- | ------------------------------------------------------------ | --------------- |
| ``sparsify``  | ``cfg.json`` + ``sae.safetensors`` (EleutherAI sparsify/sae)  | ``sparsify``    |
| ``saelens``   | ``cfg.json`` + ``sae_weights.safetensors``                    | ``sae_lens``    |
| ``gemma_scope`` | ``params.npz`` (Gemma Scope) or ``params.safetensors`` (Gemma Scope 2) | ``gemma_scope`` |
| ``llama_scope`` | ``hyperparams.json`` + ``checkpoints/final.safetensors``   | ``llama_scope`` |
| ``circuit_tracer`` | ``config.yaml`` + ``layer_{i}.safetensors`` (a per-layer ``transcoder_set``; one layer per SAE) | ``circuit_tracer`` |

Every loader returns the SAELens tensor layout (``sae_runtime.saes.base``) in float32 and a
``SAEConfig`` whose ``format`` names the format. ``hook_name`` (``NAME=PATH@HOOK`` on the
command line) overrides the hook the files give or imply. Each format is a module with the
``SAEFormat`` interface.

Cross-layer transcoders and multi-layer crosscoders are not SAEs (a feature writes several
layers); ``load_clt`` reads them into ``sae_runtime.saes.clt.CLT`` (modules with the
``CLTFormat`` interface):

| format           | directory holds                                                    | module |
| ---------------- | ------------------------------------------------------------------ | ------ |
| ``circuit_tracer`` | ``config.yaml`` (``cross_layer_transcoder``) + ``W_enc_{i}``/``W_dec_{i}.safetensors`` | ``circuit_tracer`` |
| ``gemma_scope_2``  | ``params_layer_{i}.safetensors`` under ``clt/`` or ``crosscoder/`` | ``gemma_scope_2_clt`` |

``load_sae`` on a CLT folder raises, saying so; ``load_hook_config`` (what ``--sae`` reads)
describes a CLT the server can serve as one hook with flat feature indices
(``clt_hook_config``) and refuses the others naming why.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Protocol

import torch

from sae_runtime.errors import SAEFormatError
from sae_runtime.saes.base import SAE, HookSite, SAEConfig
from sae_runtime.saes.clt import CLT, CLTConfig


class SAEFormat(Protocol):
    """A module that reads one on-disk SAE format."""

    NAME: str
    """Format name (``SAEConfig.format``)."""
    LAYOUT: str
    """What a directory of this format holds (for error messages)."""

    def detect(self, path: Path) -> bool:
        """True when directory ``path`` looks like this format (cheap: file names)."""
        ...

    def read_config(self, path: Path, hook_name: str | None = None) -> SAEConfig:
        """The config, with tensor names and shapes checked from file headers."""
        ...

    def load(self, path: Path, hook_name: str | None = None) -> SAE:
        """The SAE, every tensor float32."""
        ...


class CLTFormat(Protocol):
    """A module that reads one on-disk format of cross-layer transcoders / crosscoders."""

    NAME: str
    LAYOUT: str

    def detect_clt(self, path: Path) -> bool:
        """True when directory ``path`` looks like this format."""
        ...

    def read_clt_config(self, path: Path) -> CLTConfig:
        """The config, with every file's tensors and shapes checked from headers."""
        ...

    def load_clt(self, path: Path, dtype: torch.dtype = torch.float32) -> CLT:
        """The CLT, each tensor cast to ``dtype`` as it is read (a CLT's decoder is large:
        the model's dtype avoids a float32 copy)."""
        ...

_SAELENS_RE = re.compile(
    r"^blocks\.(\d+)\.(hook_resid_post|hook_resid_pre|hook_mlp_out|hook_attn_out|attn\.hook_z)$"
)
_SAELENS_SITES: dict[str, HookSite] = {
    "hook_resid_post": "resid_post", "hook_resid_pre": "resid_pre", "hook_mlp_out": "mlp_out",
    "hook_attn_out": "attn_out", "attn.hook_z": "z",
}
# Hugging Face module paths as sparsify names its hookpoints: ``layers.12`` (block output),
# ``layers.12.mlp``, ``layers.12.self_attn``, optionally under a prefix such as ``model.``,
# ``gpt_neox.`` or ``transformer.`` (GPT-2 names its blocks ``h``).
_MODULE_RE = re.compile(
    r"^(?:[A-Za-z_][\w.]*\.)?(?:layers|h)\.(\d+)(?:\.(mlp|self_attn|attn|attention))?$"
)
_MODULE_SITES: dict[str | None, HookSite] = {
    None: "resid_post", "mlp": "mlp_out", "self_attn": "attn_out", "attn": "attn_out",
    "attention": "attn_out",
}

SUPPORTED_HOOKS = (
    "blocks.L.hook_resid_post, blocks.L.hook_resid_pre (L >= 1), blocks.L.hook_mlp_out, "
    "blocks.L.hook_attn_out, blocks.L.attn.hook_z, or module paths layers.L, layers.L.mlp, "
    "layers.L.self_attn"
)


def parse_hook_name(hook_name: str, source: str) -> tuple[int, HookSite]:
    """Hook name -> ``(layer, site)``; unsupported names raise SAEFormatError.

    SAELens names: ``blocks.L.hook_resid_post`` -> ``resid_post``, ``blocks.L.hook_resid_pre``
    -> ``resid_pre`` (L >= 1), ``blocks.L.hook_mlp_out`` -> ``mlp_out``,
    ``blocks.L.hook_attn_out`` -> ``attn_out``, ``blocks.L.attn.hook_z`` -> ``z``.
    Module paths (sparsify hookpoints): ``layers.L`` -> ``resid_post`` (the block's output),
    ``layers.L.mlp`` -> ``mlp_out``, ``layers.L.self_attn`` -> ``attn_out``.
    """
    m = _SAELENS_RE.match(hook_name)
    if m:
        layer, site = int(m.group(1)), _SAELENS_SITES[m.group(2)]
    else:
        m = _MODULE_RE.match(hook_name)
        if not m:
            raise SAEFormatError(
                f"{source}: hook_name {hook_name!r} is not supported; supported hooks are "
                f"{SUPPORTED_HOOKS}"
            )
        layer, site = int(m.group(1)), _MODULE_SITES[m.group(2)]
    if site == "resid_pre" and layer == 0:
        raise SAEFormatError(
            f"{source}: blocks.0.hook_resid_pre (the embedding output) is not supported; "
            "hook a later block"
        )
    return layer, site


# Where a transcoder reads, under the names the libraries give it: TransformerLens
# ``ln2.hook_normalized`` (the pre-MLP norm's normalised input without its weight: SAELens'
# Gemma Scope transcoders, circuit-tracer sets) and the MLP's input itself, circuit-tracer /
# mwhanna ``mlp.hook_in`` and SAELens' Gemma Scope 2 ``hook_mlp_in`` (its ``hf_hook_name`` is
# ``...pre_feedforward_layernorm.output``; plain TransformerLens' ``hook_mlp_in`` would be the
# pre-norm stream). Module paths such as sparsify's ``layers.L.mlp`` with ``transcode`` read
# the MLP's input too.
_TRANSCODER_IN_RE = re.compile(r"^blocks\.(\d+)\.(ln2\.hook_normalized|hook_mlp_in|mlp\.hook_in)$")
_TRANSCODER_IN_SITES = {"ln2.hook_normalized": "ln2_normalized", "hook_mlp_in": "mlp_in",
                        "mlp.hook_in": "mlp_in"}
TRANSCODER_HOOKS = ("input blocks.L.ln2.hook_normalized, blocks.L.hook_mlp_in or "
                    "blocks.L.mlp.hook_in, output blocks.L.hook_mlp_out")


def transcoder_input_site(hook_in: str) -> str:
    """The ``SAEConfig.input_site`` a transcoder input hook names: ``ln2_normalized`` for
    ``blocks.L.ln2.hook_normalized`` (without the norm's weight), else ``mlp_in``."""
    m = _TRANSCODER_IN_RE.match(hook_in)
    return _TRANSCODER_IN_SITES[m.group(2)] if m else "mlp_in"


def is_transcoder_input(hook_name: str) -> bool:
    """True when ``hook_name`` names an MLP's input (where a transcoder reads)."""
    return _TRANSCODER_IN_RE.match(hook_name) is not None


def parse_transcoder_hooks(hook_in: str, hook_out: str | None, source: str) -> int:
    """The block of a transcoder reading the MLP input ``hook_in`` and writing the MLP output
    ``hook_out`` (None: the same block's ``hook_mlp_out``); anything else raises
    SAEFormatError naming what is supported."""
    m = _TRANSCODER_IN_RE.match(hook_in)
    if not m:
        raise SAEFormatError(
            f"{source}: transcoder input hook {hook_in!r} is not supported; supported: "
            f"{TRANSCODER_HOOKS} (the MLP's input and output in one block)")
    layer = int(m.group(1))
    if hook_out is not None:
        out_layer, site = parse_hook_name(hook_out, source)
        if site != "mlp_out" or out_layer != layer:
            raise SAEFormatError(
                f"{source}: a transcoder reading {hook_in} must write blocks.{layer}."
                f"hook_mlp_out, not {hook_out!r} (only MLP transcoders within one block are "
                "supported)")
    return layer


def load_sae(path: str | Path, hook_name: str | None = None) -> SAE:
    """Load the SAE in directory ``path``; ``hook_name`` overrides the one in its config."""
    p, fmt = _detect(path)
    return fmt.load(p, hook_name)


def load_sae_config(path: str | Path, hook_name: str | None = None) -> SAEConfig:
    """Config of the SAE in ``path``, with tensor names and shapes checked (not loaded)."""
    p, fmt = _detect(path)
    return fmt.read_config(p, hook_name)


def detect_format(path: str | Path) -> str:
    """Name of the on-disk format of directory ``path`` (raises SAEFormatError if none)."""
    return _detect(path)[1].NAME


def load_clt(path: str | Path, dtype: torch.dtype = torch.float32) -> CLT:
    """Load the cross-layer transcoder or crosscoder in directory ``path`` in ``dtype``."""
    p, fmt = _detect_clt(path)
    return fmt.load_clt(p, dtype)


def load_clt_config(path: str | Path) -> CLTConfig:
    """Config of the CLT in ``path``, with every file's tensors and shapes checked."""
    p, fmt = _detect_clt(path)
    return fmt.read_clt_config(p)


def load_hook_config(path: str | Path, hook_name: str | None = None) -> SAEConfig:
    """The config a served ``--sae`` folder is hooked by: an SAE's (``load_sae_config``), or a
    cross-layer transcoder described as one hook (``clt_hook_config``)."""
    if is_clt(path):
        if hook_name is not None:
            raise SAEFormatError(f"{path}: a cross-layer transcoder hooks every layer it spans; "
                                 f"drop the @{hook_name}")
        return clt_hook_config(path)
    return load_sae_config(path, hook_name)


SERVED_CLT = "a circuit-tracer or Gemma Scope 2 CLT reading mlp.hook_in and writing hook_mlp_out"


def clt_hook_config(path: str | Path) -> SAEConfig:
    """A cross-layer transcoder as the server serves it: one hook whose ``d_sae`` features are
    the flat indices ``slot * d_sae + index`` (``SAEConfig.clt_layers``). What the serving
    path does not compute yet is refused, naming why."""
    c = load_clt_config(path)
    why = None
    if c.kind != "clt":
        why = "a multi-layer crosscoder (its outputs are residual states: serving it is not built)"
    elif c.activation not in ("relu", "jumprelu"):
        why = (f"activation {c.activation} (circuit-tracer's JumpReLU with a negative threshold "
               "passes negative activations; the serving kernels gate with ReLU)")
    elif c.input_site != "mlp_in":
        why = f"input {c.input_hook or c.input_site} (served: the MLP input, mlp.hook_in)"
    elif c.output_site != "mlp_out":
        why = f"output {c.output_hook or c.output_site} (served: hook_mlp_out)"
    if why is not None:
        raise SAEFormatError(f"{path}: this cross-layer transcoder cannot be served: {why}; "
                             f"served: {SERVED_CLT}")
    first, last = c.layers[0], c.layers[-1]
    return SAEConfig(
        architecture="standard" if c.activation == "relu" else "jumprelu", d_in=c.d_in,
        d_sae=c.n_features, hook_name=f"blocks.{first}.{c.input_hook or 'mlp.hook_in'}",
        layer=first, site="mlp_out", model_name=c.model_name, dtype=c.dtype, format=c.format,
        training_architecture="cross_layer_transcoder", input_site="mlp_in",
        hook_name_out=f"blocks.{last}.{c.output_hook or 'hook_mlp_out'}", clt_layers=c.layers)


def is_clt(path: str | Path) -> bool:
    """True when directory ``path`` holds a CLT or crosscoder (not an SAE)."""
    p = Path(path)
    if not p.is_dir():
        return False
    from sae_runtime.loading import circuit_tracer

    if circuit_tracer.detect(p):
        return circuit_tracer.read_yaml(p)["model_kind"] == circuit_tracer.CLT_KIND
    return any(fmt.detect_clt(p) for fmt in _clt_formats())


def _formats() -> list[SAEFormat]:
    from sae_runtime.loading import circuit_tracer, gemma_scope, llama_scope, sae_lens, sparsify

    # sparsify before SAELens: both have cfg.json; the weights file tells them apart.
    return [sparsify, sae_lens, gemma_scope, llama_scope, circuit_tracer]


def _clt_formats() -> list[CLTFormat]:
    from sae_runtime.loading import circuit_tracer, gemma_scope_2_clt

    return [circuit_tracer, gemma_scope_2_clt]


def _detect(path: str | Path) -> tuple[Path, SAEFormat]:
    p = Path(path)
    if not p.is_dir():
        raise SAEFormatError(f"{p}: not a directory")
    formats = _formats()
    for fmt in formats:
        if fmt.detect(p):
            return p, fmt
    for clt_fmt in _clt_formats():
        if clt_fmt.detect_clt(p):
            raise SAEFormatError(
                f"{p}: a cross-layer transcoder or crosscoder ({clt_fmt.NAME}), not an SAE: "
                "load it with sae_runtime.loading.load_clt (the server serves it: load_hook_config)")
    expected = "; ".join(f"{fmt.LAYOUT} ({fmt.NAME})" for fmt in formats)
    raise SAEFormatError(f"{p}: no recognised SAE format; expected one of: {expected}")


def _detect_clt(path: str | Path) -> tuple[Path, CLTFormat]:
    p = Path(path)
    if not p.is_dir():
        raise SAEFormatError(f"{p}: not a directory")
    formats = _clt_formats()
    for fmt in formats:
        if fmt.detect_clt(p):
            return p, fmt
    expected = "; ".join(f"{fmt.LAYOUT} ({fmt.NAME})" for fmt in formats)
    raise SAEFormatError(f"{p}: no recognised cross-layer transcoder format; expected one of: "
                         f"{expected}")
