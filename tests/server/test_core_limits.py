"""The core's own limits and fail-closed choices (issue 25, parts 2 and 3), over a stand-in
engine and read channel: long prompts' reads split instead of refused, Encode answers
capped, large prompts tokenized off the event loop, guardrails over missing reads, and the
prefix cache salted per tenant."""

from __future__ import annotations

import asyncio
import math
import threading
import time
from types import SimpleNamespace

import grpc
import pytest

from clients.client import SteeringClient, read, when
from sae_runtime.errors import ResourceLimitError
from sae_runtime.saes.base import SAEConfig
from server.auth import Auth
from server.core.service import Core
from server.core.types import EncodeRequest, FinishReason, Prompt
from server.core.validate import Limits
from server.grpc import convert
from tests.server.engines import FakeEngine, FakeRouter, read_value

SAES = {"s": SAEConfig("standard", 8, 64, "blocks.1.hook_resid_post", 1, "resid_post")}
build = SteeringClient.build_request


def make_core(router=None, engine=None, **kw) -> Core:
    router = router if router is not None else FakeRouter()
    engine = engine or FakeEngine(router=router, d_sae=64, text_len=1, vocab_size=100)
    return Core(engine, model="m", saes=SAES, compiled=False, router=router,
                limits=Limits(max_interventions=8, vocab_size=100, max_read_top_k=64), **kw)


async def _all(core: Core, req) -> list:
    return [c async for c in await core.generate(convert.generate_request(req))]


def test_a_long_prompts_reads_are_split_not_refused():
    """Prompt reads arrive at once after prefill, however fast the client reads: over the
    stream cap they go out in parts (each under it), and the stream completes."""
    core = make_core(max_stream_buffer_bytes=8192)
    req = build(list(range(1, 91)), max_tokens=3, reads=[read("s", 16, watch=[1, 2])])
    chunks = asyncio.run(_all(core, req))
    positions = [f.position for c in chunks for f in c.features]
    assert positions == list(range(92))  # every prompt and fed position, once, in order
    assert sum(f.nbytes() for c in chunks for f in c.features) > 8192  # over the cap in all
    assert len(chunks) > 3 and max(c.nbytes() for c in chunks) <= 8192
    assert chunks[0].prompt_token_ids == list(range(1, 91)) and chunks[-1].finish_reason
    assert [t for c in chunks for t in c.token_ids] == [7, 7, 7]
    assert core.metrics.rejected.labels("stream_buffer")._value.get() == 0


def test_a_client_that_stops_reading_is_still_cut_off_past_the_cap():
    core = make_core(max_stream_buffer_bytes=4096,
                     engine=FakeEngine(d_sae=64, text_len=300, vocab_size=100))

    async def go():
        stream = await core.generate(convert.generate_request(build([1, 2], max_tokens=5000)))
        await anext(stream)
        for _ in range(300):
            await asyncio.sleep(0.01)
            if core.engine.aborted:
                break
        with pytest.raises(ResourceLimitError, match="client is not reading"):
            async for _ in stream:
                pass

    asyncio.run(go())
    assert core.engine.steps < 100


def test_an_encode_answer_over_the_cap_is_refused():
    router = FakeRouter()
    core = make_core(router=router, max_stream_buffer_bytes=20_000)
    small = EncodeRequest((Prompt(ids=(1, 2, 3)),), (convert.encode_request(
        _encode_pb(8)).reads))
    big = EncodeRequest(tuple(Prompt(ids=tuple(range(1, 60))) for _ in range(4)),
                        convert.encode_request(_encode_pb(32)).reads)
    (res,) = asyncio.run(core.encode(small))
    assert [f.position for f in res.features] == [0, 1, 2] and res.pooled[0].features
    with pytest.raises(ResourceLimitError, match="Encode answer is over the server's cap"):
        asyncio.run(core.encode(big))
    assert core.active_streams == 0 and router.in_flight == 0


def _encode_pb(k: int):
    from steering.v1 import steering_pb2 as pb

    return pb.EncodeRequest(reads=[pb.FeatureRead(sae="s", top_k=k)])


def test_a_large_prompt_is_tokenized_off_the_event_loop():
    """A slow tokenization of a long prompt must not stall the loop (other streams)."""
    from server.core import prompts

    seen = []

    def slow_encode(text):
        seen.append(threading.current_thread() is threading.main_thread())
        time.sleep(0.5)
        return [1] * 3

    engine = FakeEngine(SimpleNamespace(encode=slow_encode, chat_template=None), vocab_size=100)
    core = make_core(engine=engine)

    async def go():
        ticks = 0

        async def ticker():
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        t = asyncio.create_task(ticker())
        await _all(core, build("y" * (prompts.OFFLOAD_CHARS + 1), max_tokens=1))
        t.cancel()
        return ticks

    ticks = asyncio.run(go())
    assert seen == [False] and ticks > 20  # the loop kept turning during the 0.5 s encode
    asyncio.run(_all(core, build("short", max_tokens=1)))
    assert seen == [False, True]  # a short prompt stays on the loop (no thread hop)


# ---------------------------------------------------------------------------- guardrails


class LosingRouter(FakeRouter):
    """Delivers a request's own reads but loses the hidden guard reads."""

    def register(self, rid):
        buf = super().register(rid)
        add = buf.add

        def add_but_guards(rec):
            if rec.read == 0:
                add(rec)

        buf.add = add_but_guards
        return buf


@pytest.mark.parametrize("missing", ["pass", "trip"])
def test_a_guarded_position_whose_read_never_arrives(missing):
    """Fail open (``pass``, the default: the position is not checked, the request goes on,
    the gap is logged) or closed (``trip``: the stream ends FEATURE with value NaN at the
    first guarded position whose read is missing)."""
    router = LosingRouter()
    core = make_core(router=router, read_wait_s=0.05, guardrail_missing_read=missing)
    # a guardrail that would never trip on the values it would have read
    req = build([5, 6, 7], max_tokens=6, reads=[read("s", 2)], abort_when=[when("s", 3, ">", 1e9)])
    chunks = asyncio.run(_all(core, req))
    toks = [t for c in chunks for t in c.token_ids]
    last = chunks[-1]
    if missing == "pass":
        assert toks == [7] * 6 and last.finish_reason == FinishReason.LENGTH
        assert last.guardrail is None
    else:
        assert last.finish_reason == FinishReason.FEATURE and math.isnan(last.guardrail.value)
        assert last.guardrail.position == 3  # the first generated position checked
        assert toks == [7]  # tokens after the tripping position are never returned
    assert core.active_streams == 0 and router.in_flight == 0


def test_guardrails_still_trip_on_arrived_reads():
    core = make_core(guardrail_missing_read="trip")
    threshold = 7.0
    first = next(p for p in range(3, 12) if read_value(p, 3) > threshold)  # generated: p >= 3
    assert first > 3
    req = build([5, 6, 7], max_tokens=12, abort_when=[when("s", 3, ">", threshold)])
    last = asyncio.run(_all(core, req))[-1]
    assert last.finish_reason == FinishReason.FEATURE
    assert (last.guardrail.position, last.guardrail.value) == \
        (first, pytest.approx(read_value(first, 3)))


# ---------------------------------------------------------------------------- tenants


def test_auth_on_salts_every_request_by_the_callers_token():
    a, b = Auth((b"tok-a", b"tok-b")), Auth((b"tok-a",), salt_by_token=False)
    ta, tb = a.caller("Bearer tok-a").tenant, a.caller("Bearer tok-b").tenant
    assert ta and tb and ta != tb and a.caller("bearer  tok-a ").tenant == ta
    assert "tok-a" not in ta  # a digest, never the token
    assert b.caller("Bearer tok-a").tenant is None and Auth().caller("Bearer x").tenant is None


def test_the_grpc_door_passes_the_tenant_to_the_prefix_cache_salt():
    from server.grpc.server import BearerAuth, add_servicer
    from server.grpc.servicer import SteeringServicer
    from steering.v1 import steering_pb2_grpc as pb_grpc

    async def go(auth: Auth, tokens):
        core = make_core()
        server = grpc.aio.server(interceptors=[BearerAuth(auth, core.metrics)] if auth.on else [])
        add_servicer(SteeringServicer(core, auth), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
                stub = pb_grpc.SteeringServiceStub(ch)
                for tok in tokens:
                    md = (("authorization", f"Bearer {tok}"),) if tok else None
                    [m async for m in stub.Generate(build([1, 2], max_tokens=1), metadata=md)]
        finally:
            await server.stop(None)
        return [p.get("cache_salt") for p in core.engine.prompts]

    on = asyncio.run(go(Auth((b"tok-a", b"tok-b")), ["tok-a", "tok-b", "tok-a"]))
    assert on[0] and on[1] and on[0] != on[1] and on[0] == on[2]
    assert asyncio.run(go(Auth((b"tok-a", b"tok-b"), salt_by_token=False), ["tok-a", "tok-b"])) \
        == [None, None]
    assert asyncio.run(go(Auth(), [None])) == [None]  # auth off: plain requests share KV
