"""Name -> architecture registry. Architectures register themselves next to their definition."""

from __future__ import annotations

from typing import TYPE_CHECKING

from sae_runtime.errors import SAEFormatError

if TYPE_CHECKING:
    from sae_runtime.saes.base import Architecture

_ARCHITECTURES: dict[str, Architecture] = {}


def register(arch: Architecture) -> Architecture:
    """Register ``arch`` under ``arch.name``; a second registration of a name raises."""
    if arch.name in _ARCHITECTURES:
        raise ValueError(f"SAE architecture {arch.name!r} is registered twice")
    _ARCHITECTURES[arch.name] = arch
    return arch


def get(name: str) -> Architecture:
    """Look up an architecture by name; unknown names raise SAEFormatError listing known ones."""
    _ensure_loaded()
    try:
        return _ARCHITECTURES[name]
    except KeyError:
        raise SAEFormatError(
            f"unknown SAE architecture {name!r}; supported: {', '.join(names())}"
        ) from None


def names() -> list[str]:
    """Names of every registered architecture, sorted."""
    _ensure_loaded()
    return sorted(_ARCHITECTURES)


def _ensure_loaded() -> None:
    # Importing the package registers every architecture module it lists.
    import sae_runtime.saes  # noqa: F401
