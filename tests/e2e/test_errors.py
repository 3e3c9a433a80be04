"""Bad input gets a clear status; the server keeps serving; cancellation; the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from clients.client import SteeringClient, clamp
from steering.v1 import steering_pb2 as pb

pytestmark = pytest.mark.e2e
build = SteeringClient.build_request
INV, NF = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND

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
]


@pytest.mark.parametrize("req, code, text", BAD, ids=[b[2][:40] for b in BAD])
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
