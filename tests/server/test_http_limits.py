"""The HTTP door's own limits (issue 25, part 2), on the real app and, where sockets matter,
a real uvicorn on loopback; the core runs over a stand-in engine (no model needed)."""

from __future__ import annotations

import asyncio
import json
import socket
import time

import httpx
import pytest

from server.core.service import Core
from server.core.validate import Limits
from server.http.app import MAX_JSON_DEPTH, HttpLimits, build_app
from server.http.server import ConnectionLimits, HttpServer
from tests.server.engines import FakeEngine

MODEL = "m"


def make_core(**kw) -> Core:
    return Core(FakeEngine(text_len=3), model=MODEL, saes={},
                limits=Limits(max_interventions=8, vocab_size=100), compiled=False, **kw)


def client(core: Core | None = None, **limits) -> httpx.AsyncClient:
    app = build_app(core or make_core(), model=MODEL, limits=HttpLimits(**limits))
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app, raise_app_exceptions=False),
                             base_url="http://localhost")


def call(fn):
    return asyncio.run(fn())


def _error(res: httpx.Response, status: int) -> dict:
    assert res.status_code == status, res.text
    assert res.headers["content-type"].startswith("application/json"), res.headers
    return res.json()["error"]


# ---------------------------------------------------------------------------- bodies


class LiveServer:
    """The app under a real uvicorn on 127.0.0.1 (a thread of its own would race the core's
    event loop; this runs in the test's loop)."""

    def __init__(self, app, **limits) -> None:
        self.http = HttpServer("127.0.0.1", 0, grace_s=0.1, limits=ConnectionLimits(**limits))
        self.app = app

    async def __aenter__(self) -> LiveServer:
        self.refused = 0

        def refused() -> None:
            self.refused += 1

        await self.http.start(self.app, refused)
        self.port = self.http.port
        return self

    async def __aexit__(self, *exc) -> None:
        await self.http.stop()


def _chunked_until_answered(port: int, path: str, total: int, chunk: int = 64 * 1024) -> tuple[int, bytes]:
    """POST a chunked body of ``total`` bytes (no Content-Length) chunk by chunk; stop when
    the server answers. Returns (bytes sent, the answer)."""
    import select

    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 * 1024)
    s.sendall(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
              "Transfer-Encoding: chunked\r\n\r\n".encode())
    sent = 0
    try:
        while sent < total and not select.select([s], [], [], 0)[0]:
            try:
                s.sendall(f"{chunk:x}\r\n".encode() + b" " * chunk + b"\r\n")
            except OSError:  # the server answered and closed, or stopped reading
                break
            sent += chunk
        answer = b""
        while True:
            head, sep, rest = answer.partition(b"\r\n\r\n")
            length = next((int(ln.split(b":")[1]) for ln in head.split(b"\r\n")
                           if ln.lower().startswith(b"content-length:")), None)
            if sep and length is not None and len(rest) >= length:
                break
            part = s.recv(65536)
            if not part:
                break
            answer += part
    finally:
        s.close()
    return sent, answer


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/token_pieces"])
def test_a_chunked_body_is_refused_while_it_arrives(path):
    """A body without Content-Length over the cap gets 413 after about the cap (plus what the
    kernel's socket buffers hold), not after the whole body was read into memory."""
    cap = 1 << 20

    async def go():
        async with LiveServer(build_app(make_core(), model=MODEL,
                                        limits=HttpLimits(max_body_bytes=cap))) as srv:
            return await asyncio.to_thread(_chunked_until_answered, srv.port, path, 64 * cap)

    sent, answer = call(go)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert sent < 16 * cap, f"the server took {sent} bytes before answering"
    assert b'"param"' in answer and b"over the server's limit" in answer


def test_a_declared_length_over_the_cap_is_refused_before_reading():
    async def go():
        async with client(max_body_bytes=1024) as c:
            return await c.post("/v1/completions", content=b"{" + b" " * 2000 + b"}",
                                headers={"content-type": "application/json"})

    assert "limit of 1024" in _error(call(go), 413)["message"]


@pytest.mark.parametrize("raw", [b"[" * 200_000, b'{"model": "m", "prompt": "x", "x": '
                                 + b"[" * (MAX_JSON_DEPTH + 5) + b"]" * (MAX_JSON_DEPTH + 5) + b"}"])
def test_deeply_nested_json_is_a_400(raw):
    async def go():
        async with client() as c:
            return await c.post("/v1/completions", content=raw,
                                headers={"content-type": "application/json"})

    assert "nested more than" in _error(call(go), 400)["message"]


@pytest.mark.parametrize("ctype", [None, "text/plain", "application/x-www-form-urlencoded",
                                   "multipart/form-data; boundary=x"])
def test_json_routes_take_only_application_json(ctype):
    body = json.dumps({"model": MODEL, "prompt": [1, 2], "max_tokens": 1}).encode()

    async def go():
        async with client() as c:
            headers = {} if ctype is None else {"content-type": ctype}
            a = await c.post("/v1/completions", content=body, headers=headers)
            b = await c.post("/v1/token_pieces", content=b'{"token_ids": [1]}', headers=headers)
            ok = await c.post("/v1/completions", content=body,
                              headers={"content-type": "application/json; charset=utf-8"})
            return a, b, ok

    a, b, ok = call(go)
    assert _error(a, 415)["code"] == "unsupported_media_type"
    _error(b, 415)
    assert ok.status_code == 200, ok.text


def test_a_body_that_stalls_is_refused_at_its_deadline():
    async def body():
        yield b'{"model": '
        await asyncio.sleep(5)
        yield b'"m"}'

    async def go():
        async with client(body_timeout_s=0.3) as c:
            t0 = time.monotonic()
            res = await c.post("/v1/completions", content=body(),
                               headers={"content-type": "application/json"})
            return res, time.monotonic() - t0

    res, took = call(go)
    assert _error(res, 408)["code"] == "timeout" and took < 3


# ---------------------------------------------------------------------------- errors


@pytest.mark.parametrize("index", ["²", "٣", "1e3", "0x1", "-0", " 1"])
def test_every_bad_path_parameter_is_a_4xx(index):
    async def go():
        async with client() as c:
            return await c.get(f"/v1/features/s/{index}")

    err = _error(call(go), 400)
    assert err["param"] == "index"


def test_an_unexpected_error_is_a_json_500_without_detail(caplog):
    core = make_core()

    def boom():
        raise RuntimeError("secret internals /etc/passwd")

    core.list_saes = boom

    async def go():
        async with client(core) as c:
            return await c.get("/v1/saes"), await c.get("/nope"), await c.delete("/v1/saes")

    res, missing, verb = call(go)
    err = _error(res, 500)
    assert err == {"message": "internal error", "type": "server_error", "param": None,
                   "code": "internal"}
    assert "secret" not in res.text and "Traceback" not in res.text
    assert "secret internals" in caplog.text  # logged for the operator
    assert _error(missing, 404)["code"] == "not_found"
    _error(verb, 405)


# ---------------------------------------------------------------------------- cross-site


LOOPBACK = ("localhost", "127.0.0.1", "::1")


@pytest.mark.parametrize("headers, status", [
    ({"host": "evil.example:8000"}, 403),  # DNS rebinding: a foreign name for our address
    ({"host": "127.0.0.1:8000", "origin": "http://evil.example"}, 403),
    ({"host": "127.0.0.1:8000", "origin": "http://127.0.0.1:9999"}, 403),  # another port
    ({"host": "127.0.0.1:8000", "origin": "http://127.0.0.1:8000"}, 200),  # our own page
    ({"host": "localhost:8000"}, 200),
    ({"host": "[::1]:8000"}, 200),
    ({"host": "127.0.0.1:8000", "origin": "https://app.example"}, 200),  # allowed
])
def test_requests_another_site_drives_are_refused(headers, status):
    async def go():
        async with client(allowed_hosts=LOOPBACK, allowed_origins=("https://app.example",)) as c:
            return (await c.get("/v1/saes", headers=headers),
                    await c.post("/v1/completions", headers=headers,
                                 json={"model": MODEL, "prompt": [1], "max_tokens": 1}),
                    await c.get("/", headers=headers))

    for res in call(go):
        assert res.status_code == status, (headers, res.text[:200])
        if status == 403:
            assert res.json()["error"]["code"] == "cross_site"


def test_allowed_hosts_default_to_loopback_names_on_a_loopback_bind():
    from server.config import ServerConfig

    assert set(ServerConfig(model="m").allowed_hosts()) >= set(LOOPBACK)
    assert ServerConfig(model="m", host="0.0.0.0").allowed_hosts() is None
    assert ServerConfig(model="m", http_allowed_hosts="*").allowed_hosts() is None
    assert ServerConfig(model="m", http_allowed_hosts="a.example, B.example").allowed_hosts() == \
        ("a.example", "b.example")


# ---------------------------------------------------------------------------- replies


def test_a_non_streamed_reply_is_capped_like_a_stream():
    core = Core(FakeEngine(text_len=200), model=MODEL, saes={}, compiled=False,
                limits=Limits(max_interventions=8, vocab_size=100), max_stream_buffer_bytes=4096)

    async def go():
        async with client(core) as c:
            big = await c.post("/v1/completions", json={"model": MODEL, "prompt": [1],
                                                        "max_tokens": 100})
            small = await c.post("/v1/completions", json={"model": MODEL, "prompt": [1],
                                                          "max_tokens": 5})
            streamed = await c.post("/v1/completions", json={"model": MODEL, "prompt": [1],
                                                             "max_tokens": 100, "stream": True})
            return big, small, streamed

    big, small, streamed = call(go)
    err = _error(big, 429)
    assert "cap of 4096 bytes" in err["message"] and "stream it" in err["message"]
    assert small.status_code == 200 and streamed.status_code == 200
    assert core.active_streams == 0 and core.engine.running == 0


# ---------------------------------------------------------------------------- connections


async def _closed(reader: asyncio.StreamReader, within: float) -> bool:
    try:
        return await asyncio.wait_for(reader.read(1), within) == b""
    except (TimeoutError, ConnectionResetError):
        return False


def test_stalled_connections_are_capped_and_timed_out():
    """Sockets that never finish their headers (slowloris) are closed after the header
    deadline, and at most ``max_connections`` are open at once; a real request still works."""

    async def go():
        app = build_app(make_core(), model=MODEL)
        async with LiveServer(app, max_connections=4, header_timeout_s=0.5,
                              idle_timeout_s=5) as srv:
            conns = [await asyncio.open_connection("127.0.0.1", srv.port) for _ in range(10)]
            for _, w in conns[:2]:
                w.write(b"GET /v1/saes HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # never ends
            deadline = time.monotonic() + 5  # a loaded machine accepts late; the cap is exact
            while srv.refused < 6 and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            over = await asyncio.gather(*(_closed(r, 0.1) for r, _ in conns[:4]),
                                        *(_closed(r, 2.0) for r, _ in conns[4:]))
            assert over == [False] * 4 + [True] * 6 and srv.refused == 6, over  # on arrival
            t0 = time.monotonic()
            timed = await asyncio.gather(*(_closed(r, 2.0) for r, _ in conns[:4]))
            took = time.monotonic() - t0
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{srv.port}") as c:
                ok = await c.get("/v1/saes")
            for _, w in conns:
                w.close()
            return timed, took, ok

    timed, took, ok = call(go)
    assert all(timed) and took < 1.5, (timed, took)
    assert ok.status_code == 200


def test_a_keep_alive_connection_must_send_its_next_request_in_time():
    async def go():
        async with LiveServer(build_app(make_core(), model=MODEL), header_timeout_s=0.5,
                              idle_timeout_s=30) as srv:
            r, w = await asyncio.open_connection("127.0.0.1", srv.port)
            w.write(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            head = await r.readuntil(b"\r\n\r\n")
            w.write(b"GET /health HTTP/1.1\r\n")  # the next request's headers never end
            closed = await _closed(r, 2.0)
            w.close()
            return head, closed

    head, closed = call(go)
    assert head.startswith(b"HTTP/1.1 200") and closed
