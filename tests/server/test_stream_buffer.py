"""The core's stream buffer, admission order and id checks, against a scripted engine.

The engine is a stand-in (pure conversion and flow logic, as tests/server allows); the same
behaviours run against the real engine in tests/e2e/test_backpressure.py.
"""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from clients.client import SteeringClient
from sae_runtime.errors import InvalidRequestError, ResourceLimitError
from server.core.service import Core
from server.core.validate import Limits
from server.grpc import convert
from tests.server.engines import FakeEngine as ScriptedEngine

build = SteeringClient.build_request


def core(engine, **kw) -> Core:
    return Core(engine, model="m", saes={}, limits=Limits(max_interventions=8, vocab_size=100),
                compiled=False, **kw)


def admit(c: Core, req):
    return asyncio.run(c.admit_generate(convert.generate_request(req)))


async def start(c: Core, req):
    return c.stream(await c.admit_generate(convert.generate_request(req)))


def test_a_stalled_consumer_ends_resource_exhausted_and_frees_everything():
    async def go():
        eng = ScriptedEngine()
        s = core(eng, max_stream_buffer_bytes=2048)
        stream = await start(s, build([1, 2], max_tokens=10_000))
        first = await anext(stream)  # then the client stops reading
        assert first.token_ids == [7]
        for _ in range(200):
            await asyncio.sleep(0.005)
            if eng.aborted:
                break
        # ~2 KB of ~110-byte messages: the engine request was stopped after a few dozen steps
        assert eng.aborted and eng.steps < 100 and eng.running == 0
        assert s.active_streams == 0  # the slot is back although the consumer is stuck
        assert s.metrics.rejected.labels("stream_buffer")._value.get() == 1
        with pytest.raises(ResourceLimitError, match="client is not reading"):
            await anext(stream)  # what the client sees once it reads again
        await stream.aclose()
        assert s.active_streams == 0

    asyncio.run(go())


def test_a_reading_consumer_gets_every_token_under_a_small_cap():
    async def go():
        eng = ScriptedEngine()
        s = core(eng, max_stream_buffer_bytes=4096)
        msgs = [m async for m in await start(s, build([1], max_tokens=300))]
        assert sum(len(m.token_ids) for m in msgs) == 300 and msgs[-1].finish_reason
        assert not eng.aborted and s.active_streams == 0

    asyncio.run(go())


def test_closing_the_stream_aborts_the_engine_request():
    async def go():
        eng = ScriptedEngine()
        s = core(eng)
        stream = await start(s, build([1], max_tokens=10_000))
        await anext(stream)
        await stream.aclose()  # what gRPC does when the client cancels
        assert len(eng.aborted) == 1 and eng.running == 0 and s.active_streams == 0

    asyncio.run(go())


def test_an_engine_failure_reaches_the_consumer_after_the_messages_before_it():
    from sae_runtime.errors import InternalServerError

    async def go():
        eng = ScriptedEngine(fail_after=5)
        s = core(eng)
        got = []
        with pytest.raises(InternalServerError):
            async for m in await start(s, build([1], max_tokens=50)):
                got.append(m)
        assert sum(len(m.token_ids) for m in got) == 5 and s.active_streams == 0

    asyncio.run(go())


def test_a_full_server_refuses_before_parsing_or_tokenizing():
    eng = ScriptedEngine()
    s = core(eng, max_concurrent_streams=1)
    held = admit(s, build([1], max_tokens=3))
    calls = []
    s.tokenizer = SimpleNamespace(encode=lambda t: calls.append(t) or [1], chat_template=None)
    with pytest.raises(ResourceLimitError, match="1 concurrent streams"):
        admit(s, build("some text", max_tokens=3))
    with pytest.raises(ResourceLimitError):  # refused before validation too
        admit(s, build("", max_tokens=0))
    assert calls == []
    held.release()
    held.release()  # idempotent: the slot is given back once
    assert s.active_streams == 0
    admit(s, build("ok", max_tokens=3))
    assert calls == ["ok"]


@pytest.mark.parametrize("rid", ["a\nINFO steerd: forged", "a\rb", "\x1b[31mred", "a\u2028b",
                                 "a\x00b", "\u202eevil", "a\x7f"])
def test_control_characters_in_request_id_are_invalid_argument(rid):
    s = core(ScriptedEngine())
    with pytest.raises(InvalidRequestError) as ei:
        admit(s, build([1], max_tokens=1, request_id=rid))
    assert ei.value.field == "request_id" and "control character" in str(ei.value)
    admit(s, build([1], max_tokens=1, request_id="trace-42/ünïcode é"))  # printable is fine


def test_read_buffer_forgets_sent_positions_and_ignores_late_copies():
    from sae_runtime.spec.reads import Read, ReadScope, ReadSpec
    from server.core.feed import ReadFeed
    from server.core.reads import RequestReads
    from tests.server.test_reads_buffer import rec

    async def go():
        b = RequestReads()
        feed = ReadFeed(b, ReadSpec((Read("a", 2, (), ReadScope.ALL),)).reads, prompt=[7, 8, 9])
        b.add(rec(0, 3))
        assert [f.position for f in feed.take()] == [0, 1, 2] and b.by_pos == {}
        b.add(rec(1, 3, base=50.0))  # a recomputed chunk straddling the sent positions
        assert sorted(b.by_pos) == [3]
        feed.generated = [11, 12]
        assert [f.position for f in feed.take()] == [3] and b.by_pos == {}

    asyncio.run(go())


def test_a_lagging_reader_gets_the_backlog_as_one_message_with_nothing_lost():
    async def go():
        eng = ScriptedEngine()
        s = core(eng)
        stream = await start(s, build([1, 2], max_tokens=40))
        first = await anext(stream)
        await asyncio.sleep(0.2)  # the engine finishes meanwhile
        rest = [m async for m in stream]
        assert len(rest) == 1 and rest[0].first_position == 3 and rest[0].finish_reason
        assert len(rest[0].token_ids) == 39 and rest[0].text == "x" * 3900
        assert list(first.prompt_token_ids) == [1, 2] and not rest[0].prompt_token_ids
        assert rest[0].usage.completion_tokens == 40

    asyncio.run(go())


def test_over_grpc_a_call_never_read_is_ended_and_the_status_arrives_when_read():
    """Real grpc.aio server and client on port 0: the blocked write is what stalls."""
    import grpc

    from server.grpc.server import add_servicer
    from server.grpc.servicer import SteeringServicer
    from steering.v1 import steering_pb2_grpc as pb_grpc

    async def go():
        eng = ScriptedEngine(step_s=0.0005, text_len=1000)
        s = core(eng, max_stream_buffer_bytes=16 * 1024)
        server = grpc.aio.server()
        add_servicer(SteeringServicer(s), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            # no BDP probing: the client's stream window stays at HTTP/2's 64 KiB
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}",
                                                 options=[("grpc.http2.bdp_probe", 0)]) as ch:
                stub = pb_grpc.SteeringServiceStub(ch)
                call = stub.Generate(build([1, 2], max_tokens=50_000), timeout=60)
                other = [m async for m in stub.Generate(build([3], max_tokens=20), timeout=60)]
                assert sum(len(m.token_ids) for m in other) == 20  # same connection, unaffected
                for _ in range(400):
                    if eng.aborted:
                        break
                    await asyncio.sleep(0.01)
                # ~64 KiB in the window + 16 KiB here, of ~1 KB a step: stopped after ~100 steps
                assert eng.aborted and eng.steps < 500 and s.active_streams == 0
                n = 0
                with pytest.raises(grpc.aio.AioRpcError) as ei:
                    async for m in call:
                        n += len(m.token_ids)
                assert ei.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert "client is not reading" in ei.value.details() and 0 < n < eng.steps
        finally:
            await server.stop(0)
        assert s.metrics.requests.labels("Generate", "grpc", "RESOURCE_EXHAUSTED")._value.get() == 1

    asyncio.run(go())
