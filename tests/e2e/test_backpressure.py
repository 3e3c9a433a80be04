"""Reliability under hostile clients, on one real server with small caps (issue 16).

Clients that stop reading, floods of calls over the concurrency cap, and request ids built
to forge log lines. The server runs with a 64 KiB stream buffer, 4 stream slots and JSON
logs; the text log format is checked on the shared server.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import threading
import time

import grpc
import psutil
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from clients.client import SteeringClient, read
from tests.e2e.conftest import SAE_DIRS, SAE_IDS, early, server_for, start_server, stop_server

pytestmark = pytest.mark.e2e
CAP_BYTES = 64 * 1024
SLOTS = 4
RES = grpc.StatusCode.RESOURCE_EXHAUSTED


@early("tight")
def _tight_server(request):
    tiny_dir, tmp = request.getfixturevalue("tiny_dir"), request.getfixturevalue("tmp_path_factory")
    log_dir = tmp.mktemp("tight")
    return lambda: start_server(
        tiny_dir / "tiny-llama", {sid: tiny_dir / "saes" / SAE_DIRS[sid] for sid in SAE_IDS},
        log_dir, "--max-stream-buffer-bytes", str(CAP_BYTES),
        "--max-concurrent-streams", str(SLOTS), "--log-format", "json")


@pytest.fixture(scope="module")
def tight(request):
    srv = server_for("tight", request)
    yield srv
    stop_server(srv)


def _tree_rss(pid: int) -> int:
    p = psutil.Process(pid)
    return sum(q.memory_info().rss for q in [p, *p.children(recursive=True)])


def _wait_metric(srv, want: dict[str, float], timeout: float = 60.0) -> dict[str, float]:
    deadline = time.monotonic() + timeout
    while True:
        m = srv.metrics()
        got = {k: m.get(k, 0.0) for k in want}
        if got == want or time.monotonic() > deadline:
            return got
        time.sleep(0.2)


# Every position reads the top 64 features of each SAE and 128 watched ones: ~1.7 KB per
# position, ~390 KB for a full stream, far over the 64 KiB cap plus the client's window.
HEAVY_READS = [read(sid, top_k=64, watch=list(range(128)) if sid == "tk" else ()) for sid in SAE_IDS]
NORMAL = {"max_tokens": 40, "temperature": 0.0, "ignore_eos": True,
          "reads": [read("tk", top_k=4)]}


def _stalled_client(srv) -> SteeringClient:
    # No BDP probing: the connection keeps HTTP/2's 64 KiB initial stream window, so what
    # the client leaves unread piles up in the server, not in the client's own buffers.
    ch = grpc.insecure_channel(srv.target, options=[("grpc.http2.bdp_probe", 0)])
    return SteeringClient(srv.target, channel=ch, timeout=120)


def test_stalled_readers_end_resource_exhausted_and_others_are_unaffected(tight):
    with tight.client() as c:
        want = c.generate_text([9, 8, 7], **NORMAL)  # the same request, nothing stalled
    rej = 'steerd_rejected_total{cap="stream_buffer"}'
    before = tight.metrics().get(rej, 0.0)
    rss0 = _tree_rss(tight.proc.pid)
    with _stalled_client(tight) as stalled, tight.client() as c:
        # opened and never read: the server keeps generating until the cap trips
        calls = [stalled.generate([5 + i, 6, 7], max_tokens=230, temperature=0.0, ignore_eos=True,
                                  reads=HEAVY_READS) for i in range(SLOTS - 1)]
        got = c.generate_text([9, 8, 7], **NORMAL)
        assert got.token_ids == want.token_ids
        assert [(f.position, list(f.indices)) for f in got.features] == \
            [(f.position, list(f.indices)) for f in want.features]
        # each stalled stream was ended on the server while its client still reads nothing:
        # engine request aborted, slot and read buffer given back
        keys = {rej: before + len(calls), "steerd_active_streams": 0.0,
                "steerd_engine_unfinished_requests": 0.0, "steerd_read_buffers": 0.0}
        assert _wait_metric(tight, keys) == keys
        grown = _tree_rss(tight.proc.pid) - rss0
        assert c.health() == "SERVING"
        assert len(c.generate_text([1, 2], max_tokens=3).token_ids) == 3
        for call in calls:  # the client reads at last: what its window held, then the status
            n = 0
            with pytest.raises(grpc.RpcError) as ei:
                for msg in call:
                    n += len(msg.token_ids)
            assert ei.value.code() == RES and "client is not reading" in ei.value.details()
            assert n < 230
    assert grown < 200 * 2**20, f"server grew {grown / 2**20:.0f} MiB with stalled readers"
    warn = [json.loads(ln) for ln in tight.log.read_text().splitlines()
            if ln.startswith("{") and "client is not reading" in ln]
    assert len(warn) >= len(calls) and all(r["level"] == "WARNING" for r in warn)


def test_flood_over_the_cap_is_refused_at_once_and_admitted_streams_are_right(tight):
    reqs = [SteeringClient.build_request([20 + i, 6, 7], max_tokens=60, temperature=0.0,
                                         ignore_eos=True) for i in range(4 * SLOTS)]
    with tight.client() as c:
        want = [list(c.generate_text([20 + i, 6, 7], max_tokens=60, temperature=0.0,
                                     ignore_eos=True).token_ids) for i in range(4 * SLOTS)]
    out: dict[int, tuple] = {}
    health: list[str] = []
    with tight.client() as c, tight.client() as probe:
        t0 = time.monotonic()
        calls = [c.stub.Generate(r, timeout=120) for r in reqs]  # all sent at once

        def drain(i):
            try:
                toks = [t for m in calls[i] for t in m.token_ids]
                out[i] = ("OK", toks, time.monotonic() - t0)
            except grpc.RpcError as e:
                out[i] = (e.code(), e.details(), time.monotonic() - t0)

        watcher = threading.Thread(target=lambda: health.extend(probe.health() for _ in range(5)))
        watcher.start()
        with cf.ThreadPoolExecutor(len(calls)) as pool:
            list(pool.map(drain, range(len(calls))))
        watcher.join(60)
        ok = {i: o for i, o in out.items() if o[0] == "OK"}
        refused = {i: o for i, o in out.items() if o[0] != "OK"}
        assert all(o[0] == RES and f"{SLOTS} concurrent streams" in o[1] for o in refused.values())
        assert len(refused) >= 2 * SLOTS and 1 <= len(ok) <= len(reqs) - len(refused)
        assert all(o[1] == want[i] for i, o in ok.items())
        assert max(o[2] for o in refused.values()) < min(o[2] for o in ok.values())
        assert health == ["SERVING"] * 5 and probe.health() == "SERVING"


@pytest.mark.parametrize("rid", ["a\n{\"level\": \"ERROR\", \"msg\": \"forged\"}", "a\rforged",
                                 "\x1b[2Jforged"])
def test_control_characters_in_request_id_are_refused_on_both_formats(server, tight, rid):
    import openai

    for srv in (server, tight):  # text logs, JSON logs
        with srv.client() as c, pytest.raises(grpc.RpcError) as ei:
            c.generate_text([1, 2], max_tokens=1, request_id=rid)
        assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert ei.value.details().startswith("request_id: control character")
        br = error_details_pb2.BadRequest()
        rpc_status.from_call(ei.value).details[0].Unpack(br)
        assert br.field_violations[0].field == "request_id"
        assert "forged" not in srv.log.read_text(errors="replace")  # refused before any log line
    with server.openai() as o, pytest.raises(openai.BadRequestError) as hei:
        o.completions.create(model=o.models.list().data[0].id, prompt="x", max_tokens=1,
                             extra_body={"request_id": rid})
    assert hei.value.body["param"] == "request_id"
