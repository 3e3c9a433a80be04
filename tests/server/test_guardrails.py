"""Guardrails on the server side (no engine): the hidden guard reads, and the trip check over
buffered reads in position order, prompt and generated positions."""

from __future__ import annotations

import asyncio

import numpy as np

from sae_runtime.ops import Cond
from sae_runtime.spec.guardrails import Guardrail, GuardSpec
from sae_runtime.spec.interventions import Condition
from sae_runtime.spec.reads import Read
from sae_runtime.spec.selectors import ALL, GENERATION
from sae_runtime.step.records import ReadRecord
from server.core.feed import ReadFeed
from server.core.reads import RequestReads


def rec(read, pos0, watch_rows):
    wv = np.asarray(watch_rows, dtype=np.float32)
    n, w = wv.shape
    return ReadRecord(rid="r", read=read, sae=0, pos0=pos0, n=n, k=0, idx=b"", val=b"", w=w,
                      wv=wv.tobytes())


def test_guard_reads_one_per_sae_over_the_positions_they_need():
    g = GuardSpec((Guardrail(Condition("a", 3, Cond.GT, 1.0)),
                   Guardrail(Condition("a", 5, Cond.LT, 0.0), ALL),
                   Guardrail(Condition("b", 3, Cond.GT, 1.0)),
                   Guardrail(Condition("a", 3, Cond.GT, 2.0))))
    reads = g.reads()
    assert [(r.sae, r.top_k, r.watch, r.selector) for r in reads] == [
        ("a", 0, (3, 5), ALL), ("b", 0, (3,), GENERATION)]


def test_first_trip_in_position_order_with_the_user_read_untouched():
    async def go():
        guards = GuardSpec((Guardrail(Condition("a", 3, Cond.GT, 1.0)),
                            Guardrail(Condition("a", 5, Cond.LT, -1.0), ALL)))
        user = Read("a", 0, (9,))
        hidden = guards.reads()  # one read of SAE a watching (3, 5) at every position
        b = RequestReads()
        feed = ReadFeed(b, (user, *hidden), prompt=[7, 8, 9], shown=1)
        # positions 0..2 prompt, 3.. generated; watch (3, 5) values per position
        b.add(rec(1, 0, [[5.0, 0.0], [0.0, 0.0], [0.0, 0.0]]))  # 0: f3 > 1 but prompt: guard 0
        b.add(rec(0, 0, [[1.0], [2.0], [3.0]]))                  # watches generated only
        feed.generated = [11]
        assert feed.first_trip(guards, feed.fed()) is None        # prompt: only guard 1 looks
        b.add(rec(1, 3, [[0.5, 0.0], [0.0, -2.0], [4.0, 0.0]]))
        b.add(rec(0, 3, [[4.0], [5.0], [6.0]]))
        feed.generated = [11, 12, 13, 14]  # positions 3..5 fed
        assert feed.first_trip(guards, feed.fed()) == (1, 4, -2.0)  # 4 before 5's f3 = 4
        sent = feed.take(final=True, fed=5)
        assert [(f.position, list(f.watch_values)) for f in sent] == [
            (0, [1.0]), (1, [2.0]), (2, [3.0]), (3, [4.0]), (4, [5.0])]  # hidden reads never sent
    asyncio.run(go())


def test_a_lost_guard_read_never_trips():
    guards = GuardSpec((Guardrail(Condition("a", 3, Cond.LT, 100.0)),))
    b = RequestReads()
    feed = ReadFeed(b, guards.reads(), prompt=[1, 2], shown=0)
    feed.generated = [3, 4]
    assert feed.first_trip(guards, feed.fed()) is None  # NaN < 100 is False
