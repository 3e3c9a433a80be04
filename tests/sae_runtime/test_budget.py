"""The capacity budget (``sae_runtime.spec.budget``): what a request needs, what the tables
hold, the admission check's errors, and that ``HookTables`` is built from the same numbers.

The counts below are written from the rules in words (one edit row per window of each
selector; an own read and a guard read per SAE; one pooled read per SAE), not from the
module's own arithmetic.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sae_runtime.errors import InvalidRequestError
from sae_runtime.ops import Mode
from sae_runtime.saes.base import SAEConfig
from sae_runtime.spec import budget
from sae_runtime.spec.guardrails import MAX_GUARDRAILS, Guardrail, GuardSpec
from sae_runtime.spec.interventions import Condition, Intervention, SteeringSpec
from sae_runtime.spec.payloads import RequestPayload
from sae_runtime.spec.reads import Read, ReadSpec
from sae_runtime.spec.selectors import Frame, Range, Selector
from sae_runtime.step.edits import Cond
from sae_runtime.step.planner import compile_request
from sae_runtime.step.tables import HookTables
from tests.sae_runtime._factories import random_sae

A = Frame.ABSOLUTE
SAES = {"s": SAEConfig("standard", 8, 100, "blocks.1.hook_resid_post", 1, "resid_post"),
        "t": SAEConfig("standard", 8, 4096, "blocks.2.hook_resid_post", 2, "resid_post"),
        "vectors@L1": SAEConfig("standard", 8, 3, "blocks.1.hook_resid_post", 1, "resid_post")}
INDEX = {sid: i for i, sid in enumerate(SAES)}
CAPS = SimpleNamespace(max_interventions=4, max_watch=3, max_guardrails=MAX_GUARDRAILS)


def windows(n: int) -> Selector:
    return Selector(tuple(Range(A, 3 * i, 3 * i + 1) for i in range(n)))


def iv(sae="s", feature=1, sel=None, vector=None) -> Intervention:
    return Intervention(sae, feature, Mode.ADD, 1.0, positions=sel, vector=vector)


INLINE = b"\0" * 32  # 8 float32


NO_EDITS, NO_READS, NO_GUARDS = SteeringSpec(), ReadSpec(), GuardSpec()


def check(spec=NO_EDITS, reads=NO_READS, guards=NO_GUARDS):
    return budget.check_request(spec, reads, guards, SAES, CAPS)


# --------------------------------------------------------------------------- table sizes


def test_table_sizes_follow_the_engine_budgets():
    z = budget.TableSizes.of(max_num_seqs=64, max_num_batched_tokens=8192, max_interventions=32,
                             max_watch=256)
    assert (z.edit_slots, z.edit_width, z.edit_rows) == (64, 32, 64 * 32)
    assert (z.read_slots, z.read_rows, z.pool_slots) == (2 * 64, 2 * 8192, 64)
    assert z.watch_width == 256
    # a guard read watches one feature per guardrail: the width never falls below that
    assert budget.TableSizes.of(max_num_seqs=1, max_num_batched_tokens=16, max_interventions=1,
                                max_watch=0).watch_width == MAX_GUARDRAILS
    # the wide SAE: 131k features, float32, 32 MiB chunks -> 64 rows at once
    assert budget.pool_chunk_rows(131072) == 64 and budget.pool_chunk_rows(2**30) == 1
    assert z.pool_bytes(131072) == 2 * 65 * 131072 * 4


def test_hook_tables_are_sized_by_the_budget():
    sae = random_sae("standard", 8, 40, seed=0)
    t = HookTables(sae, max_tokens=24, max_slots=5, max_feats=3, max_watch=2, staged=True)
    z = t.sizes
    assert z == budget.TableSizes.of(max_num_seqs=5, max_num_batched_tokens=24,
                                     max_interventions=3, max_watch=2)
    want = {"tok_slot": (24,), "tok_pos": (24,), "tok_match": (24, 3), "rows": (24,),
            "slot_start": (5,), "slot_len": (5,), "edit_feature": (15,), "edit_by_token": (15,),
            "latch_pos": (16,), "read_rows": (48,), "read_slot": (48,), "read_pool": (48,),
            "rslot_watch": (10, MAX_GUARDRAILS)}
    for name, shape in want.items():
        assert tuple(t.host[name].shape) == shape == tuple(t.dev[name].shape), name
    assert tuple(t.pool_sum.shape) == tuple(t.pool_max.shape) == (6, 40)


# --------------------------------------------------------------------------- needs


def test_needs_count_every_window_vectors_inline_and_guard_reads():
    spec = SteeringSpec((iv("s", 1, windows(2)), iv("s", 2),
                         iv("vectors@L1", 0, windows(3)), iv("vectors@L1", 2, vector=INLINE)))
    reads = ReadSpec((Read("s", 3, (1, 2)), Read("t", 0, (5,))))
    guards = GuardSpec((Guardrail(Condition("s", 4, Cond.GT, 1.0)),
                        Guardrail(Condition("s", 9, Cond.LT, 0.0))))
    n = budget.needs(spec, reads, guards, SAES)
    assert n.edit_rows == {"s": 3, "vectors@L1": 4}  # named and inline rows together
    assert n.edit_slots == {"s": 1, "vectors@L1": 1}
    assert n.read_slots == {"s": 2, "t": 1}  # the read of s and the guard read of s
    assert n.watch == {"s": 2, "t": 1}
    assert n.pooled_bytes == 0
    pooled = budget.needs(SteeringSpec(), ReadSpec(reads.reads, pooled=True), GuardSpec(), SAES)
    assert pooled.pooled_reads == {"s": 1, "t": 1}
    assert pooled.pooled_bytes == 2 * (100 + 4096) * 4


# --------------------------------------------------------------------------- the check


@pytest.mark.parametrize("spec, field, words", [
    (SteeringSpec((iv("s", 1, windows(3)), iv("s", 2, windows(2)))), "interventions",
     "need 5 edit rows"),
    (SteeringSpec((iv("vectors@L1", 0, windows(5)),)), "vectors", "need 5 edit rows"),
    # named vectors fill the bank, the inline vector takes it past the limit
    (SteeringSpec((iv("vectors@L1", 0, windows(4)), iv("vectors@L1", 2, vector=INLINE))),
     "inline_vectors[0]", "5 edit rows (vectors: 4, inline_vectors[0]: 1)"),
    (SteeringSpec((iv("vectors@L1", 0, windows(2)), iv("vectors@L1", 2, windows(3), INLINE))),
     "inline_vectors[0]", "at most 4 per layer per request, named and inline vectors together"),
])
def test_a_request_over_the_edit_width_is_refused_naming_the_field(spec, field, words):
    with pytest.raises(InvalidRequestError) as ei:
        check(spec)
    assert ei.value.field == field and words in str(ei.value), str(ei.value)
    assert "--max-interventions" in str(ei.value)


def test_reads_guards_and_pooling_within_the_limits_pass_and_over_them_are_refused():
    guard = GuardSpec((Guardrail(Condition("s", 4, Cond.GT, 1.0)),))
    check(SteeringSpec((iv("s", 1, windows(3)), iv("s", 2))), ReadSpec((Read("s", 2),)), guard)
    with pytest.raises(InvalidRequestError) as ei:  # (ReadSpec.validate refuses this first)
        check(reads=ReadSpec((Read("s", 2), Read("s", 1))), guards=guard)
    assert ei.value.field == "reads[0].sae" and "at most 2" in str(ei.value)
    with pytest.raises(InvalidRequestError) as ei:
        check(reads=ReadSpec((Read("s", 2), Read("s", 1)), pooled=True))
    assert ei.value.field == "reads[0].sae" and "pooling" in str(ei.value)
    with pytest.raises(InvalidRequestError) as ei:
        check(reads=ReadSpec((Read("s", 2),), pooled=True), guards=guard)
    assert ei.value.field == "abort_when"
    with pytest.raises(InvalidRequestError) as ei:
        check(reads=ReadSpec((Read("s", 0, tuple(range(MAX_GUARDRAILS + 1))),)))
    assert ei.value.field == "reads[0].watch"


# --------------------------------------------------------------------------- door -> worker


def _selectors():
    rng = st.builds(lambda a, n: Range(A, a, a + n), st.integers(0, 40), st.integers(1, 10))
    return st.builds(Selector, st.lists(rng, max_size=4).map(tuple), st.booleans(),
                     st.lists(st.integers(0, 9), max_size=3, unique=True).map(tuple),
                     st.booleans()).filter(lambda s: (s.ranges or not s.exclude_ranges)
                                           and (s.token_ids or not s.exclude_token_ids))


@settings(max_examples=150, deadline=None)
@given(sels=st.lists(st.tuples(st.sampled_from(["s", "t", "vectors@L1"]), _selectors(),
                               st.booleans(), st.booleans()), max_size=6),
       reads=st.lists(st.sampled_from(["s", "t"]), unique=True, max_size=2),
       guarded=st.lists(st.sampled_from(["s", "t"]), max_size=3),
       prompt_len=st.integers(1, 60))
def test_an_admitted_request_always_fits_its_slot(sels, reads, guarded, prompt_len):
    """Whatever the door admits compiles, at every prompt length, to at most ``edit_width``
    edit rows per hook and ``READS_PER_SAE`` reads per SAE (with watch lists that fit): the
    invariants ``HookTables.add_edits`` / ``add_read_rows`` assert."""
    ivs, inline_seen = [], set()
    for j, (sae, sel, inline, latch) in enumerate(sels):
        vec = INLINE if inline and sae == "vectors@L1" and sae not in inline_seen else None
        if vec is not None:
            inline_seen.add(sae)
        cond = Condition(sae, 1, Cond.GT, 0.0) if latch and vec is None else None
        ivs.append(Intervention(sae, j % 3, Mode.ADD, 1.0, positions=sel, vector=vec, when=cond,
                                latch=cond is not None))
    spec = SteeringSpec(tuple(ivs))
    rspec = ReadSpec(tuple(Read(s, 2, (1,)) for s in reads))
    guards = GuardSpec(tuple(Guardrail(Condition(s, 7, Cond.GT, 0.5)) for s in guarded))
    try:
        check(spec, rspec, guards)
    except InvalidRequestError:
        return
    all_reads = ReadSpec(rspec.reads + guards.reads())  # guard reads ride after the own ones
    payload = RequestPayload("r", spec.to_payload(INDEX), all_reads.to_payload(INDEX))
    plan = compile_request(payload, prompt_len)
    z = budget.TableSizes.of(max_num_seqs=4, max_num_batched_tokens=64,
                             max_interventions=CAPS.max_interventions, max_watch=CAPS.max_watch)
    assert all(len(rows) <= z.edit_width for rows in plan.edits.values())
    per_hook: dict[int, int] = {}
    for rp in plan.reads:
        per_hook[rp.hook_id] = per_hook.get(rp.hook_id, 0) + 1
        assert len(rp.watch) <= z.watch_width
    assert all(n <= budget.READS_PER_SAE for n in per_hook.values())
    for h, state in plan.latch_state.items():
        latch = plan.edits[h]["latch"]
        assert set(latch[latch >= 0].tolist()) == set(range(len(state)))  # one per latched edit
