"""The prompt a steered request hands vLLM: its cache salt, by spec and prompt length."""

from __future__ import annotations

from sae_runtime.ops import Mode
from sae_runtime.spec.interventions import Intervention, Scope, SteeringSpec
from sae_runtime.vllm.engine import make_prompt


def _salt(spec: SteeringSpec, n: int):
    return make_prompt(list(range(1, n + 1)), spec).get("cache_salt")


def test_plain_prompts_carry_no_salt():
    assert _salt(SteeringSpec(), 5) is None


def test_generation_window_salts_by_prompt_length():
    # Prompt B = prompt A + A's generation: under GENERATION_ONLY, A's generated positions were
    # edited, but the same positions are prompt (unedited) for B, so B must not reuse A's KV.
    gen = SteeringSpec((Intervention("s", 3, Mode.CLAMP, 2.0, Scope.GENERATION_ONLY),))
    assert _salt(gen, 5) != _salt(gen, 8)
    assert _salt(gen, 5) == _salt(gen, 5)


def test_absolute_spec_shares_kv_across_prompt_lengths():
    # Edits at every position do not depend on where the prompt ends: one salt, so a longer
    # prompt with the same prefix reuses the steered KV.
    every = SteeringSpec((Intervention("s", 3, Mode.CLAMP, 2.0, Scope.ALL),))
    assert _salt(every, 5) == _salt(every, 8) is not None
