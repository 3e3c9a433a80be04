"""One module per SAE architecture; importing this package registers all of them."""

from sae_runtime.saes import abstopk, gated, groupmax, jumprelu, relu, topafa, topk  # noqa: F401
