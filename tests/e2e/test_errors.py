"""Bad input gets a clear status; the server keeps serving; cancellation; the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from clients.client import SteeringClient, clamp
from steering.v1 import steering_pb2 as pb
from tests.e2e.conftest import SAE_IDS

pytestmark = pytest.mark.e2e
build = SteeringClient.build_request
INV, NF = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND

def with_reads(req, *reads):
    req.reads.extend(reads)
    return req


RES = grpc.StatusCode.RESOURCE_EXHAUSTED
BAD = [
    (build("x", interventions=[clamp("nope", 1, 1.0)]), NF, "unknown SAE 'nope'"),
    (build("x", interventions=[clamp("resid_l1", 256, 1.0)]), INV, "interventions[0].feature"),
    (build("x", interventions=[clamp("resid_l1", 1, float("nan"))]), INV, "interventions[0].value: must be finite"),
    (build("x", interventions=[clamp("tk", 1, float("-inf"))]), INV, "must be finite"),
    (build(""), INV, "prompt.text: must not be empty"),
    (build([]), INV, "prompt.token_ids.ids"),
    (pb.GenerateRequest(), INV, "prompt: required"),
    (build([1, 99999]), INV, "prompt.token_ids.ids[1]"),
    (build("x", max_tokens=0), INV, "sampling.max_tokens: must be >= 1"),
    (build([3] * 10, max_tokens=247), INV, "exceeds the model length 256"),
    (build([3] * 256, max_tokens=1), INV, "prompt: prompt is 256 tokens"),
    (build("x", interventions=[clamp("resid_l1", i, 1.0) for i in range(9)]), INV, "at most 8 per request"),
    (build("x", interventions=[clamp("resid_l1", 4, 1.0), clamp("resid_l1", 4, 2.0)]), INV, "already edited"),
    (build("x", temperature=-1.0), INV, "sampling.temperature"),
    (build("x", top_p=2.0), INV, "sampling.top_p"),
    (build("x", top_p=0.0), INV, "sampling.top_p"),
    (build("x", temperature=float("inf")), INV, "sampling.temperature: must be finite"),
    (build("x", top_k=513), INV, "sampling.top_k"),
    (build("x", stop=[""]), INV, "sampling.stop[0]"),
    (build("x", stop_token_ids=[512]), INV, "sampling.stop_token_ids[0]"),
    (build("x", request_id="r" * 129), INV, "request_id: at most 128"),
    (build("x", interventions=[pb.Intervention(sae="resid_l1", feature=1)]), INV, "interventions[0].mode: must be set"),
    (build("x", interventions=[pb.Intervention(sae="resid_l1", feature=1, mode=7)]), INV, "interventions[0].mode"),
    (build("x", interventions=[pb.Intervention(sae="resid_l1", feature=1, mode=1, scope=9)]), INV,
     "interventions[0].scope"),
    (build("x", interventions=[pb.Intervention(sae="", feature=1, mode=1)]), INV, "interventions[0].sae"),
    (build("x", interventions=[clamp("tk", 0, 1.0), clamp("tk", 1, float("nan"))]), INV, "interventions[1].value"),
    (build("x", interventions=[clamp("jr", 4096, 1.0)]), INV, "valid: 0..255"),
    (build([0] * 300), INV, "prompt: prompt is 300 tokens"),
    (build("ocean " * 400, max_tokens=1), INV, "prompt: prompt is"),
    (build("x", max_tokens=256), INV, "exceeds the model length"),
    (with_reads(build("x"), pb.FeatureRead(sae="ghost", top_k=1)), NF, "reads[0].sae: unknown SAE 'ghost'"),
    (with_reads(build("x"), pb.FeatureRead(sae="tk")), INV, "reads[0]: set top_k > 0 or a watch list"),
    (with_reads(build("x"), pb.FeatureRead(sae="tk", top_k=65)), INV, "reads[0].top_k"),
    (with_reads(build("x"), pb.FeatureRead(sae="tk", watch=[256])), INV, "reads[0].watch[0]"),
    (with_reads(build("x"), pb.FeatureRead(sae="tk", watch=[3, 3])), INV, "reads[0].watch[1]: feature 3 is listed twice"),
    (with_reads(build("x"), pb.FeatureRead(sae="tk", watch=list(range(257)) + [0])), INV, "reads[0].watch"),
    (with_reads(build("x"), pb.FeatureRead(sae="tk", top_k=1, scope=5)), INV, "reads[0].scope"),
    (with_reads(build("x"), pb.FeatureRead(sae="tk", top_k=1), pb.FeatureRead(sae="tk", top_k=2)), INV,
     "reads[1].sae: SAE 'tk' is already read"),
    (build("x" * (5 * 1024 * 1024)), RES, "larger than max"),
    (build("x", interventions=[pb.Intervention(sae="jr", feature=2, mode=3, value=float("inf"))]), INV,
     "interventions[0].value"),
    (build("x", interventions=[pb.Intervention(sae="tk", feature=9, mode=4, value=float("nan"))]), INV,
     "interventions[0].value"),
    (build([5, 6], stop_token_ids=[1, 70000]), INV, "sampling.stop_token_ids[1]"),
]


def test_the_suite_is_broad():
    assert len(BAD) >= 40


@pytest.mark.parametrize("req, code, text", BAD, ids=[f"{i}-{b[2][:30]}" for i, b in enumerate(BAD)])
def test_bad_request_status_then_good_request(server, req, code, text):
    with server.client() as c:
        with pytest.raises(grpc.RpcError) as ei:
            list(c.stub.Generate(req, timeout=60))
        assert ei.value.code() == code
        assert text in ei.value.details()
        status = rpc_status.from_call(ei.value)
        if status is not None and status.details:
            br = error_details_pb2.BadRequest()
            status.details[0].Unpack(br)
            assert br.field_violations[0].field
        assert len(c.generate_text([5, 6, 7], max_tokens=2, temperature=0.0).token_ids) == 2


def test_unparseable_request_is_invalid_argument(server):
    # GenerateRequest{prompt{text: b"\xff\xfe"}}: a proto3 string with invalid UTF-8
    raw = b"\x0a\x04\x0a\x02\xff\xfe"
    with grpc.insecure_channel(server.target) as ch:
        call = ch.unary_stream("/steering.v1.SteeringService/Generate", request_serializer=None,
                               response_deserializer=pb.GenerateResponse.FromString)
        with pytest.raises(grpc.RpcError) as ei:
            list(call(raw, timeout=30))
    assert ei.value.code() == INV and "bad UTF-8" in ei.value.details()
    with server.client() as c:
        assert len(c.generate_text([1, 2], max_tokens=1).token_ids) == 1


def test_fuzzed_requests_never_crash_the_server(server):
    """Random requests get OK, INVALID_ARGUMENT or NOT_FOUND, never an internal error."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    ivs = st.builds(pb.Intervention, sae=st.sampled_from(["resid_l1", "tk", "jr", "zz", ""]),
                    feature=st.integers(0, 300), mode=st.integers(0, 6),
                    value=st.floats(allow_nan=True, allow_infinity=True, width=32), scope=st.integers(0, 3))
    reads = st.builds(pb.FeatureRead, sae=st.sampled_from(["resid_l1", "tk", "nope"]),
                      top_k=st.integers(0, 300), watch=st.lists(st.integers(0, 300), max_size=4),
                      scope=st.integers(0, 4))
    prompts = st.one_of(st.builds(pb.Prompt, text=st.text(max_size=40)),
                        st.builds(pb.Prompt, token_ids=st.builds(pb.TokenIds, ids=st.lists(st.integers(0, 600), max_size=20))))
    sampling = st.builds(pb.SamplingParams, max_tokens=st.integers(0, 300),
                         temperature=st.floats(-1, 3, width=32), top_p=st.floats(-0.5, 1.5, width=32))
    requests = st.builds(pb.GenerateRequest, prompt=prompts, sampling=sampling,
                         interventions=st.lists(ivs, max_size=4), reads=st.lists(reads, max_size=2))
    ok_codes = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND}

    with server.client(timeout=120) as c:
        @settings(max_examples=40, deadline=None, derandomize=True,
                  suppress_health_check=list(HealthCheck))
        @given(requests)
        def check(req):
            if req.sampling.max_tokens > 4:
                req.sampling.max_tokens = 4  # keep accepted requests quick
            try:
                list(c.stub.Generate(req, timeout=120))
            except grpc.RpcError as e:
                assert e.code() in ok_codes, (e.code(), e.details(), req)

        check()
        assert c.health() == "SERVING"


def test_hundred_cancelled_streams_leak_nothing(server):
    import random

    rng = random.Random(7)
    key = 'steerd_requests_total{code="CANCELLED",door="grpc",method="Generate"}'
    before = server.metrics().get(key, 0.0)

    def one(i):
        with server.client() as c:
            kw = {"interventions": [clamp("resid_l1", i % 50, 4.0)]} if i % 3 else {}
            if i % 2:
                kw["reads"] = [pb.FeatureRead(sae="tk", top_k=3)]
            s = c.generate([5 + i % 7, 6, 7], max_tokens=60, temperature=0.0, ignore_eos=True, **kw)
            n = rng.randint(0, 3)
            for _ in range(n):
                next(s)
            s.cancel()
            return n > 0  # the server saw this stream (a 0-message cancel may never reach it)

    import concurrent.futures as cf

    with cf.ThreadPoolExecutor(10) as pool:
        reached = sum(pool.map(one, range(100)))
    deadline = time.monotonic() + 60
    keys = ("steerd_active_streams", "steerd_read_buffers", "steerd_distinct_configs_in_flight",
            "steerd_engine_unfinished_requests")
    while True:
        m = server.metrics()
        left = {k: m[k] for k in keys}
        if not any(left.values()) or time.monotonic() > deadline:
            break
        time.sleep(0.25)
    assert not any(left.values()), f"leaked after 100 cancellations: {left}"
    assert m[key] - before >= reached > 50


def test_deadline_exceeded_aborts_the_engine_request(server):
    before = server.metrics()
    with server.client(timeout=0.25) as c, pytest.raises(grpc.RpcError) as ei:
        c.generate_text([5, 6, 7], max_tokens=240, temperature=0.0, ignore_eos=True)
    assert ei.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    deadline = time.monotonic() + 30
    while server.metrics()["steerd_engine_unfinished_requests"] and time.monotonic() < deadline:
        time.sleep(0.2)
    m = server.metrics()
    assert m["steerd_engine_unfinished_requests"] == 0 and m["steerd_active_streams"] == 0
    # 240 tokens take over a second here even alone, so the engine stopped early
    assert m["steerd_generated_tokens_total"] - before["steerd_generated_tokens_total"] < 240


def test_cancel_mid_stream_aborts_and_others_continue(server):
    with server.client() as c:
        other = {}
        t = threading.Thread(target=lambda: other.update(r=c.generate_text(
            [9, 8, 7], max_tokens=30, temperature=0.0, ignore_eos=True)))
        stream = c.generate([5, 6, 7, 8], max_tokens=240, temperature=0.0, ignore_eos=True,
                            interventions=[clamp("resid_l1", 2, 5.0)])
        t.start()
        got = [next(stream), next(stream)]
        stream.cancel()
        with pytest.raises(grpc.RpcError) as ei:
            for _ in stream:
                pass
        assert ei.value.code() == grpc.StatusCode.CANCELLED
        t.join(120)
        assert len(other["r"].token_ids) == 30
        assert sum(len(m.token_ids) for m in got) < 240
        assert len(c.generate_text([1, 2], max_tokens=3, temperature=0.0).token_ids) == 3


def _steer(server, *args):
    exe = str(Path(sys.executable).with_name("steer"))
    return subprocess.run([exe, "--target", server.target, *args], capture_output=True, text=True, timeout=120)


def test_cli_generate_json_matches_client(server):
    r = _steer(server, "generate", "--prompt-ids", "5,100,200", "--max-tokens", "6", "--temperature", "0",
               "--clamp", "resid_l1:3=30", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    with server.client() as c:
        want = c.generate_text([5, 100, 200], max_tokens=6, temperature=0.0,
                               interventions=[clamp("resid_l1", 3, 30.0)])
    assert out["token_ids"] == want.token_ids and out["text"] == want.text
    assert out["finish_reason"] == want.finish_reason


def test_cli_streams_text_and_reports_errors(server):
    r = _steer(server, "generate", "--prompt", "the ocean", "--max-tokens", "4", "--temperature", "0")
    assert r.returncode == 0 and "[finish:" in r.stderr
    r = _steer(server, "generate", "--prompt", "the ocean", "--ablate", "resid_l1:9999")
    assert r.returncode == 1
    assert "INVALID_ARGUMENT" in r.stderr and "interventions[0].feature" in r.stderr
    r = _steer(server, "generate", "--prompt", "hi", "--scale", "ghost:1=2")
    assert r.returncode == 1 and "NOT_FOUND" in r.stderr


def test_feature_rpcs_on_unlabelled_saes(server):
    """Search needs labels (FAILED_PRECONDITION); GetFeature answers for any SAE: an empty
    label and the decoder row's logit effects."""
    with server.client() as c:
        with pytest.raises(grpc.RpcError) as e:
            c.search_features("ocean")
        assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "no loaded SAE" in e.value.details()
        f = c.get_feature(SAE_IDS[0], 0)
        assert f.label == "" and (len(f.promoted) == 10 or f.logit_effects_unavailable)
        assert c.list_saes()  # still serving
