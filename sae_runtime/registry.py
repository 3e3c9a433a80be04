"""Name -> architecture lookup.

Architectures register themselves next to their definition (``saes.base.register``);
importing ``sae_runtime.saes`` here loads every architecture module, so a lookup never
misses one. The dependency runs one way: registry -> saes.
"""

from __future__ import annotations

import sae_runtime.saes  # noqa: F401  (registers every architecture)
from sae_runtime.errors import SAEFormatError
from sae_runtime.saes.base import ARCHITECTURES, Architecture

__all__ = ["get", "names"]


def get(name: str) -> Architecture:
    """Look up an architecture by name; unknown names raise SAEFormatError listing known ones."""
    try:
        return ARCHITECTURES[name]
    except KeyError:
        raise SAEFormatError(
            f"unknown SAE architecture {name!r}; supported: {', '.join(names())}"
        ) from None


def names() -> list[str]:
    """Names of every registered architecture, sorted."""
    return sorted(ARCHITECTURES)
