"""The reads side channel fails closed: real ZMQ sockets, the server's ``ReadRouter`` and the
worker's ``ReadPublisher``.

A private ``ipc://`` directory; CURVE on ``tcp://`` (a peer without the server's keys cannot
deliver); capped messages; every record checked; a bad one dropped and counted while the
good ones after it still arrive.
"""

from __future__ import annotations

import asyncio
import os
import stat

import msgspec
import numpy as np
import pytest
import zmq

from sae_runtime.step.config import ReadsKeys
from sae_runtime.step.records import READ_DECODER, READ_ENCODER, ReadRecord
from sae_runtime.vllm.side_channel import ReadPublisher, pack
from server.core.metrics import Metrics
from server.core.reads import ReadRouter, RecordLimits, RequestReads, check_record

D_SAE = 16
LIMITS = RecordLimits(d_sae=(D_SAE, D_SAE), max_top_k=4, max_watch=2, max_positions=64)
CAP = 1 << 20  # the smallest cap the server accepts


def rec(pos0=0, n=2, k=2, w=1, rid="r", sae=0, pooled=False, **kw) -> ReadRecord:
    idx = (np.arange(n * k, dtype=np.int32) % D_SAE).reshape(n, k)
    val = np.arange(n * k, dtype=np.float32).reshape(n, k) + pos0
    wv = np.full((n, w), 0.5, dtype=np.float32)
    pool = {"psum": np.ones(D_SAE, np.float32).tobytes(),
            "pmax": np.ones(D_SAE, np.float32).tobytes()} if pooled else {}
    fields = dict(rid=rid, read=0, sae=sae, pos0=pos0, n=n, k=k, idx=idx.tobytes(),
                  val=val.tobytes(), w=w, wv=wv.tobytes(), **pool)
    return ReadRecord(**{**fields, **kw})


async def until(cond, timeout=5.0) -> bool:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not cond():
        if loop.time() > end:
            return False
        await asyncio.sleep(0.02)
    return True


def run(coro_fn):
    """Run ``coro_fn(router_factory)`` with every router closed afterwards."""
    routers: list[ReadRouter] = []

    def make(*a, **kw) -> ReadRouter:
        r = ReadRouter(*a, **kw)
        r.start()
        routers.append(r)
        return r

    async def go():
        try:
            await coro_fn(make)
        finally:
            for r in routers:
                r.close()
    asyncio.run(go())


def push(addr: str, keys: ReadsKeys | None = None, server_key: bytes | None = None) -> zmq.Socket:
    """A raw PUSH peer: no keys, someone else's keys, or the channel's own."""
    s = zmq.Context.instance().socket(zmq.PUSH)
    s.setsockopt(zmq.LINGER, 0)
    if keys is not None:
        s.curve_serverkey = server_key or keys.server_public.encode()
        s.curve_publickey = keys.client_public.encode()
        s.curve_secretkey = keys.client_secret.encode()
    s.connect(addr)
    return s


def test_ipc_socket_lives_in_a_private_directory_removed_at_close():
    async def go(make):
        r = make()
        path = r.addr.removeprefix("ipc://")
        d = os.path.dirname(path)
        assert stat.S_IMODE(os.stat(d).st_mode) == 0o700
        assert os.stat(d).st_uid == os.getuid() and os.path.exists(path)
        buf = r.register("r")
        ReadPublisher(r.addr).send([rec()])
        assert await until(lambda: buf.complete({0: {0}, 1: {0}}))
        r.close()
        assert not os.path.exists(d)
    run(go)


def test_a_given_ipc_path_must_be_in_a_private_directory(tmp_path):
    async def go(make):
        open_dir = tmp_path / "open"
        open_dir.mkdir(mode=0o755)
        os.chmod(open_dir, 0o755)
        with pytest.raises(ValueError, match=r"--reads-address .* open to other users \(mode 0755"):
            make(f"ipc://{open_dir}/r.sock")
        r = make(f"ipc://{tmp_path}/new/r.sock")  # made here, private
        assert stat.S_IMODE(os.stat(tmp_path / "new").st_mode) == 0o700
        r.close()
        assert not (tmp_path / "new").exists()
    run(go)


def test_tcp_peers_without_the_keys_cannot_deliver_and_are_counted():
    async def go(make):
        metrics = Metrics()
        r = make("tcp://127.0.0.1:0", dropped_metric=metrics.reads_dropped)
        assert r.addr.startswith("tcp://127.0.0.1:") and r.keys is not None
        buf = r.register("r")
        strangers = zmq.curve_keypair()
        other = ReadsKeys(r.keys.server_public, strangers[0].decode(), strangers[1].decode())
        wrong_server = zmq.curve_keypair()[0]
        peers = [push(r.addr),  # no CURVE at all
                 push(r.addr, other),  # the server's key, but not the workers' client key
                 push(r.addr, r.keys, server_key=wrong_server)]  # the workers' keys, wrong server
        for p in peers:
            p.send(READ_ENCODER.encode([rec(pos0=0, n=1)]))
        assert await until(lambda: r.dropped["unauthenticated"] >= 3), r.dropped
        await asyncio.sleep(0.3)
        assert buf.by_pos == {}  # nothing a stranger sent arrived
        assert metrics.reads_dropped.labels("unauthenticated")._value.get() == r.dropped["unauthenticated"]
        pub = ReadPublisher(r.addr, r.keys)  # a worker with the channel's keys
        pub.send([rec(pos0=0, n=2)])
        assert await until(lambda: buf.complete({0: {0}, 1: {0}}))
        for p in peers:
            p.close()
        pub.close()
    run(go)


def test_a_tcp_publisher_without_keys_sends_nothing_until_it_gets_them():
    async def go(make):
        r = make("tcp://127.0.0.1:0")
        buf = r.register("r")
        pub = ReadPublisher(r.addr)  # an engine node's worker before the keys arrive
        pub.send([rec(pos0=0, n=1)])  # dropped on the worker's side, never raises
        pub.set_keys(r.keys)
        pub.send([rec(pos0=1, n=1)])
        assert await until(lambda: buf.complete({1: {0}}))
        assert 0 not in buf.by_pos and r.dropped["unauthenticated"] == 0
        pub.close()
    run(go)


@pytest.mark.parametrize("addr", [None, "tcp://127.0.0.1:0"])
def test_oversized_and_malformed_records_are_dropped_and_counted_and_later_ones_arrive(addr):
    async def go(make):
        r = make(addr, max_message_bytes=CAP, limits=LIMITS)
        buf = r.register("r")
        s = push(r.addr, r.keys)
        bad = [
            b"\x00not msgpack",  # not a record list at all
            READ_ENCODER.encode([{"rid": "r"}]),  # a record missing its fields
            READ_ENCODER.encode([rec(pos0=0, n=3, idx=b"\x00" * 4)]),  # sizes disagree with n, k
            READ_ENCODER.encode([rec(pos0=62, n=3)]),  # positions past max_model_len
            READ_ENCODER.encode([rec(sae=5)]),  # no such SAE
            READ_ENCODER.encode([rec(idx=np.full(4, D_SAE, np.int32).tobytes())]),  # feature >= d_sae
            READ_ENCODER.encode([rec(k=5, n=1, idx=bytes(20), val=bytes(20))]),  # k over the cap
            READ_ENCODER.encode([rec(pooled=True, psum=bytes(8))]),  # pooled width != d_sae
            READ_ENCODER.encode([rec(rid="forged")]),  # a request the server does not know
            b"\x91" + b"\xc6" + (CAP + 16).to_bytes(4, "big") + bytes(CAP + 16),  # over the cap
        ]
        for i, m in enumerate(bad):
            s.send(m)
            s.send(READ_ENCODER.encode([rec(pos0=i, n=1)]))  # a good one right after each
        assert await until(lambda: buf.complete({i: {0} for i in range(len(bad))})), r.dropped
        assert r.dropped == {"malformed": 8, "unknown_request": 1, "oversized": 1}
        # the good record in a message with bad ones arrives too
        s.send(READ_ENCODER.encode([rec(pos0=20, n=1, sae=9), rec(pos0=21, n=1)]))
        assert await until(lambda: buf.complete({21: {0}}))
        assert 20 not in buf.by_pos and r.dropped["malformed"] == 9
        s.close()
    run(go)


def test_a_message_over_twice_the_cap_is_refused_by_libzmq_and_the_peer_recovers():
    async def go(make):
        r = make(None, max_message_bytes=CAP, limits=LIMITS)
        buf = r.register("r")
        s = push(r.addr)
        s.send(bytes(2 * CAP + 1))  # never buffered whole: libzmq drops the connection
        await asyncio.sleep(0.5)  # ZMQ reconnects (100 ms)
        s.send(READ_ENCODER.encode([rec(pos0=0, n=1)]))
        assert await until(lambda: buf.complete({0: {0}}))
        s.close()
    run(go)


def test_pack_splits_over_the_cap_by_positions_and_the_router_sees_the_same_reads():
    big = rec(pos0=3, n=40000, k=4, w=2, pooled=True)  # 40000 * 40 bytes: two messages and more
    small = [rec(pos0=i, n=1, rid="s") for i in range(3)]
    msgs = pack([*small, big], CAP)
    assert len(msgs) >= 2 and all(len(m) <= CAP for m in msgs)
    got = [x for m in msgs for x in READ_DECODER.decode(m)]
    assert [x.rid for x in got[:3]] == ["s"] * 3
    pieces = got[3:]
    assert sum(p.n for p in pieces) == big.n and pieces[0].pos0 == 3
    assert [p.pos0 for p in pieces] == sorted(p.pos0 for p in pieces)
    assert pieces[0].psum == big.psum and all(p.psum is None for p in pieces[1:])

    async def same():
        whole, split = RequestReads(), RequestReads()
        whole.add(big)
        for p in pieces:
            split.add(p)
        for pos in (3, 20000, 40002):
            assert split.by_pos[pos][0].values.tolist() == whole.by_pos[pos][0].values.tolist()
        assert split.pooled[0].total.tolist() == whole.pooled[0].total.tolist()
    asyncio.run(same())
    assert pack([rec(n=1)], CAP) == [READ_ENCODER.encode([rec(n=1)])]  # what decoders read


def test_check_record_accepts_what_a_worker_sends():
    assert check_record(rec(pooled=True), LIMITS) is None
    assert check_record(rec(k=0, idx=b"", val=b""), LIMITS) is None  # watch-only read
    assert check_record(rec(sae=7), None) is None  # no limits: shapes only
    assert "byte sizes" in check_record(rec(wv=b""), None)
    assert "pooled" in check_record(msgspec.structs.replace(rec(pooled=True), pmax=None), None)


def test_tcp_refuses_to_start_without_curve(monkeypatch):
    monkeypatch.setattr(zmq, "has", lambda what: False if what == "curve" else True)
    with pytest.raises(ValueError, match=r"no CURVE support .*zmq.has\('curve'\)"):
        ReadRouter("tcp://127.0.0.1:0")


def test_a_tcp_host_name_is_bound_at_its_address_and_reached_by_name():
    async def go(make):
        r = make("tcp://localhost:0")  # every node given the same name (a k8s leader's DNS name)
        assert r.addr.startswith("tcp://127.0.0.1:")
        buf = r.register("r")
        pub = ReadPublisher(r.addr.replace("127.0.0.1", "localhost"), r.keys)
        pub.send([rec(pos0=0, n=1)])
        assert await until(lambda: buf.complete({0: {0}}))
        pub.close()
    run(go)


def test_a_watching_worker_gives_up_once_the_server_has_been_gone_long_enough():
    """An engine node's worker watches the API node's read socket: a server that goes away
    for longer than ``lost_after_s`` calls ``on_lost`` (the worker exits); one that was
    reached again in time does not."""
    async def go(make):
        r = make("tcp://127.0.0.1:0")
        lost = asyncio.Event()
        loop = asyncio.get_running_loop()
        pub = ReadPublisher(r.addr, r.keys, on_lost=lambda: loop.call_soon_threadsafe(lost.set),
                            lost_after_s=1.5)
        buf = r.register("r")
        pub.send([rec(pos0=0, n=1)])
        assert await until(lambda: buf.complete({0: {0}}))
        await asyncio.sleep(1.0)
        assert not lost.is_set()  # connected and quiet: nothing to give up on
        t0 = loop.time()
        r.close()  # the API node goes away
        await asyncio.wait_for(lost.wait(), 10)
        assert loop.time() - t0 >= 1.5
        pub.close()
    run(go)
