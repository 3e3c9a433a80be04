"""Typed Python client for steering.v1 and the ``steer`` CLI."""

from clients.client import GenerationResult, SteeringClient, ablate, add, clamp, read, scale

__all__ = ["GenerationResult", "SteeringClient", "ablate", "add", "clamp", "read", "scale"]
