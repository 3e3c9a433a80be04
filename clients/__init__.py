"""Typed Python client for steering.v1 and the ``steer`` CLI."""

from clients.client import (
    GenerationResult,
    SteeringClient,
    ablate,
    absolute_range,
    add,
    clamp,
    generation_range,
    parse_range,
    position_range,
    positions,
    prompt_range,
    read,
    scale,
)

__all__ = ["GenerationResult", "SteeringClient", "absolute_range", "ablate", "add", "clamp",
           "generation_range", "parse_range", "position_range", "positions", "prompt_range",
           "read", "scale"]
