"""Typed Python client for steering.v1 and the ``steer`` CLI."""

from clients.client import (
    EncodedActivations,
    GenerationResult,
    SteeringClient,
    ablate,
    absolute_range,
    activation_read,
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
    trained_json,
    unpack,
    vector,
    when,
)

__all__ = ["EncodedActivations", "GenerationResult", "SteeringClient", "absolute_range", "ablate",
           "activation_read", "add", "clamp",
           "conditional", "generation_range", "guardrail", "inline_vector", "parse_condition", "parse_range",
           "position_range", "positions", "prompt_range", "read", "scale", "trained_json", "unpack", "vector", "when"]
