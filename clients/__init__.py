"""Typed Python client for steering.v1 and the ``steer`` CLI."""

from clients.client import (
    GenerationResult,
    SteeringClient,
    ablate,
    absolute_range,
    add,
    clamp,
    conditional,
    generation_range,
    guardrail,
    inline_vector,
    parse_condition,
    parse_range,
    position_range,
    positions,
    prompt_range,
    read,
    scale,
    vector,
    when,
)

__all__ = ["GenerationResult", "SteeringClient", "absolute_range", "ablate", "add", "clamp",
           "conditional", "generation_range", "guardrail", "inline_vector", "parse_condition", "parse_range",
           "position_range", "positions", "prompt_range", "read", "scale", "vector", "when"]
