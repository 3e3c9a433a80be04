"""Independent references for cross-layer transcoders (CLTs) and crosscoders.

- circuit-tracer itself (``circuit_tracer.transcoder``, PyPI 0.5.0, installed without its
  dependencies: its CLT and per-layer transcoder modules need only torch, safetensors and
  transformers): its loaders read the files, its ``encode``/``decode`` compute.
- Gemma Scope 2's ``JumpReLUMultiLayerSAE`` (GDM's Gemma Scope 2 tutorial), written out in
  ``gdm_multilayer``: it sums over every source slot, earlier ones included.
- The feature intervention of circuit-tracer's replacement model
  (``_get_feature_intervention_hooks``), re-enacted on a Hugging Face forward in
  ``hf_clt_steered_logits``: at source layer ``s`` the activation of the feature is read from
  the current (already steered) MLP input, ``delta = v - f``, and ``delta *
  _get_decoder_vectors(s, [j])`` is added to ``layer_deltas[s:]``; every layer's MLP output
  adds its row. (The replacement model itself needs TransformerLens < 4 and nnsight.)
"""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path

import einops
import torch

from sae_runtime.labels.hf_sites import edit_site

CPU = torch.device("cpu")


def ct_load_clt(folder: Path):
    """circuit-tracer's own reading of a native CLT folder (eager, float32, CPU)."""
    from circuit_tracer.transcoder.cross_layer_transcoder import load_clt

    return load_clt(str(folder), device=CPU, dtype=torch.float32, lazy_decoder=False,
                    lazy_encoder=False)


def ct_load_gemma_scope_2_clt(folder: Path, n_layers: int):
    """circuit-tracer's ``load_gemma_scope_2_clt`` on a Gemma Scope 2 CLT folder.

    It reads ``range(max(paths))`` files, one short of ``{0..L-1}`` (circuit-tracer 0.5.0 and
    upstream HEAD), so it is handed one extra, unused key.
    """
    from circuit_tracer.transcoder.cross_layer_transcoder import load_gemma_scope_2_clt

    paths = {i: str(folder / f"params_layer_{i}.safetensors") for i in range(n_layers)}
    paths[n_layers] = "unused"
    return load_gemma_scope_2_clt(paths, device=CPU, dtype=torch.float32)


def ct_load_transcoder_set(folder: Path, n_layers: int, input_hook: str, output_hook: str):
    from circuit_tracer.transcoder.single_layer_transcoder import load_transcoder_set

    paths = {i: str(folder / f"layer_{i}.safetensors") for i in range(n_layers)}
    return load_transcoder_set(paths, scan="test", feature_input_hook=input_hook,
                               feature_output_hook=output_hook, device=CPU,
                               dtype=torch.float32, lazy_encoder=False, lazy_decoder=False)


def stacked(folder: Path, n_layers: int) -> dict[str, torch.Tensor]:
    """The ``params_layer_{i}`` files stacked over slots, as GDM's tutorial loads them."""
    from safetensors.torch import load_file

    files = [load_file(str(folder / f"params_layer_{i}.safetensors")) for i in range(n_layers)]
    return {k: torch.stack([f[k] for f in files]) for k in files[0]}


def gdm_multilayer(x: torch.Tensor, p: dict[str, torch.Tensor]):
    """``JumpReLUMultiLayerSAE`` encode and forward; ``x [..., layer, d]`` ->
    ``(acts [..., layer, F], recon [..., layer, d])``."""
    pre = einops.einsum(x, p["w_enc"], "... layer d_in, layer d_in d_sae -> ... layer d_sae")
    pre = pre + p["b_enc"]
    acts = (pre > p["threshold"]) * torch.relu(pre)
    recon = einops.einsum(acts, p["w_dec"], "... layer_in d_sae, layer_in d_sae layer_out d_dec"
                          " -> ... layer_out d_dec") + p["b_dec"]
    if "affine_skip_connection" in p:
        recon = recon + einops.einsum(x, p["affine_skip_connection"],
                                      "... layer d_in, layer d_in d_dec -> ... layer d_dec")
    return acts, recon


@torch.no_grad()
def hf_clt_steered_logits(model, ids: torch.Tensor, ct_clt, edits, n_layers: int):
    """Logits ``[T, vocab]`` of ``ids [T]`` with circuit-tracer's feature intervention.

    ``edits``: ``(layer, feature, value)`` clamps; ``ct_clt``: circuit-tracer's
    ``CrossLayerTranscoder`` reading the MLP input and writing the MLP output (Llama).
    """
    T, d = ids.shape[0], model.config.hidden_size
    layer_deltas = torch.zeros(n_layers, T, d)

    with ExitStack() as stack:
        for layer in range(n_layers):
            mine = [(f, v) for lay, f, v in edits if lay == layer]

            def grab(x, layer=layer, mine=mine):  # the input hook: cache this layer's features
                if mine:
                    acts = ct_clt.encode_layer(x[0], layer)  # [T, F], the current forward
                    for f, v in mine:
                        delta = v - acts[:, f]  # [T]
                        dec = ct_clt._get_decoder_vectors(layer, torch.tensor([f]))[0]  # [L-s, d]
                        layer_deltas[layer:] += dec[:, None, :] * delta[None, :, None]
                return x

            def add(y, layer=layer):  # the output hook
                return y + layer_deltas[layer]

            stack.enter_context(edit_site(model, layer, "mlp_in", grab))
            stack.enter_context(edit_site(model, layer, "mlp_out", add))
        return model(ids[None]).logits[0]
