"""The server-side read buffer: de-duplication, pooling, and ordered hand-out."""

from __future__ import annotations

import asyncio

import numpy as np

from sae_runtime.spec.reads import Read, ReadScope, ReadSpec
from sae_runtime.step.records import ReadRecord
from server.core.feed import ReadFeed
from server.core.reads import RequestReads


def rec(pos0, n, k=2, sae=0, base=0.0, pooled=False):
    idx = np.arange(n * k, dtype=np.int32).reshape(n, k)
    val = (base + np.arange(n * k, dtype=np.float32)).reshape(n, k)
    pool = {}
    if pooled:
        pool = {"psum": np.full(4, float(n), dtype=np.float32).tobytes(),
                "pmax": np.full(4, base, dtype=np.float32).tobytes()}
    return ReadRecord(rid="r", read=sae, sae=sae, pos0=pos0, n=n, k=k, idx=idx.tobytes(),
                      val=val.tobytes(), w=1, wv=val[:, :1].copy().tobytes(), **pool)


def test_recomputed_positions_and_chunks_are_not_counted_twice():
    async def go():
        b = RequestReads()
        b.add(rec(0, 3, pooled=True))
        b.add(rec(0, 3, base=100.0, pooled=True))  # a preempted request recomputes positions 0-2
        b.add(rec(3, 2, base=5.0, pooled=True))
        assert float(b.by_pos[0][0].values[0]) == 0.0  # the first report wins
        assert b.pooled[0].total.tolist() == [5.0] * 4 and b.pooled[0].maximum.tolist() == [5.0] * 4
        assert await b.wait_for({4: {0}}, timeout=0.1)
        assert not await b.wait_for({5: {0}}, timeout=0.05)
    asyncio.run(go())


def test_feed_hands_out_each_position_once_in_order_and_skips_unfed():
    async def go():
        b = RequestReads()
        spec = ReadSpec((Read("a", 2, (), ReadScope.ALL),))
        feed = ReadFeed(b, spec.reads, prompt=[7, 8, 9])
        b.add(rec(0, 2))
        assert [f.position for f in feed.take()] == [0, 1]
        b.add(rec(3, 1))  # position 2 missing: 3 must wait to keep order
        feed.generated = [11, 12]  # positions 3 and 4 sampled; 4 not fed yet
        assert feed.take() == []
        b.add(rec(2, 1))
        out = feed.take()
        assert [(f.position, f.token_id) for f in out] == [(2, 9), (3, 11)]
        assert feed.take() == []
    asyncio.run(go())


def test_feed_keeps_only_positions_whose_token_the_read_selects():
    from sae_runtime.spec.selectors import Selector

    async def go():
        b = RequestReads()
        # Report positions consuming token 8 or 11 (prompt and generated alike).
        spec = ReadSpec((Read("a", 2, (), ReadScope.ALL, Selector(token_ids=(8, 11))),))
        feed = ReadFeed(b, spec.reads, prompt=[7, 8, 9])
        feed.generated = [11, 12, 13]  # positions 3, 4 fed; 5 not yet
        b.add(rec(0, 5))  # the worker reads the whole window
        out = feed.take()
        assert [(f.position, f.token_id) for f in out] == [(1, 8), (3, 11)]
        assert feed._expected(5) == {}  # nothing more is awaited: 4 consumes 12
        excl = ReadSpec((Read("a", 2, (), ReadScope.ALL,
                              Selector(token_ids=(8, 11), exclude_token_ids=True)),))
        b2 = RequestReads()
        b2.add(rec(0, 5))
        feed2 = ReadFeed(b2, excl.reads, prompt=[7, 8, 9])
        feed2.generated = [11, 12, 13]
        assert [f.position for f in feed2.take()] == [0, 2, 4]
    asyncio.run(go())


def act(pos0, n, read=0, d=3, base=0.0):
    from sae_runtime.step.records import ActRecord

    rows = (base + np.arange(n * d, dtype=np.float32)).reshape(n, d)
    return ActRecord(rid="r", read=read, site=0, pos0=pos0, n=n, d=d, data=rows.tobytes()), rows


def test_feed_hands_out_activation_rows_once_in_order_and_pools_at_the_end():
    from sae_runtime.spec.activations import ActivationRead, ActPool
    from sae_runtime.spec.selectors import GENERATION

    async def go():
        b = RequestReads()
        acts = (ActivationRead("h0"), ActivationRead("h1", GENERATION, ActPool.MAX))
        feed = ReadFeed(b, (), prompt=[7, 8, 9], acts=acts)
        r0, rows0 = act(0, 2)
        b.add_act(r0)
        feed.take()
        (a,) = feed.activations()
        assert a.hook == "h0" and a.positions == [0, 1]
        np.testing.assert_array_equal(a.values, rows0)
        assert feed.activations() == []  # handed out once
        r1, rows1 = act(2, 2, base=10.0)  # positions 2, 3 of h0
        b.add_act(r1)
        b.add_act(act(2, 1, base=99.0)[0])  # a recomputed position: the first report wins
        feed.generated = [11, 12]  # position 3 fed; 4 not yet
        feed.take()
        (a,) = feed.activations()  # position 2; h1's row of position 3 is missing: it waits
        assert a.positions == [2]
        np.testing.assert_array_equal(a.values, rows1[:1])
        h1, h1rows = act(3, 1, read=1, base=5.0)
        b.add_act(h1)
        feed.take()
        (a,) = feed.activations()
        assert a.positions == [3]
        np.testing.assert_array_equal(a.values, rows1[1:])
        feed.generated = [11, 12, 13]
        b.add_act(act(4, 1, base=20.0)[0])
        b.add_act(act(4, 1, read=1, base=1.0)[0])
        feed.take()
        per_pos, pooled = feed.activations(final=True)
        assert per_pos.positions == [4]
        assert pooled.hook == "h1" and pooled.positions == [3, 4]
        np.testing.assert_array_equal(pooled.values, np.maximum(h1rows, [[1.0, 2.0, 3.0]]))
    asyncio.run(go())


def test_malformed_activation_records_are_named():
    from server.core.reads import RecordLimits, check_act_record

    lim = RecordLimits(d_sae=(), max_top_k=1, max_watch=1, max_positions=10, act_widths=(3, 3),
                       max_act_reads=4)
    good, _ = act(0, 2)
    assert check_act_record(good, lim) is None
    import msgspec

    for bad, why in ((msgspec.structs.replace(good, data=good.data[:-4]), "disagree"),
                     (msgspec.structs.replace(good, site=2), "declared sites"),
                     (msgspec.structs.replace(good, d=4, data=b"\0" * 32), "width"),
                     (msgspec.structs.replace(good, pos0=9), "max_model_len")):
        assert why in check_act_record(bad, lim)
