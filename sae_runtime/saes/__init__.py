"""One module per SAE architecture; importing this package registers all of them."""

from sae_runtime.saes import jumprelu, relu, topk  # noqa: F401
