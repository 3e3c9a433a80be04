"""Fail closed at startup (issue 25, part 3), without an engine: a tokens file with no token,
unusable TLS files and busy or clashing ports are refused while binding, before the engine
would start; the metrics port binds loopback unless told otherwise and, exposed, asks for
the bearer token."""

from __future__ import annotations

import asyncio
import socket

import httpx
import pytest

from server.app import bind_ports
from server.auth import Auth, AuthConfigError, load_tokens
from server.config import ServerConfig
from server.core.metrics import Metrics
from server.http.app import metrics_app
from server.startup import StartupError


def test_a_tokens_file_with_no_token_is_a_startup_error(tmp_path, monkeypatch):
    monkeypatch.delenv("STEERD_AUTH_TOKENS", raising=False)
    f = tmp_path / "tokens"
    f.write_text("# nobody yet\n\n   \n")
    with pytest.raises(AuthConfigError, match="holds no token"):
        load_tokens(f)
    monkeypatch.setenv("STEERD_AUTH_TOKENS", "env-token")
    with pytest.raises(AuthConfigError, match="holds no token"):  # the file itself is wrong
        load_tokens(f)
    with pytest.raises(AuthConfigError, match="cannot read it"):
        load_tokens(tmp_path / "missing")
    f.write_text("# one\ns3cret\n")
    assert load_tokens(f) == [b"s3cret", b"env-token"]
    assert load_tokens(None) == [b"env-token"]


def _busy() -> socket.socket:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    return s


def _bind(**kw):
    async def go():
        ports = bind_ports(ServerConfig(model="m", **kw), Auth(), Metrics())
        out = (ports.grpc.port, ports.http and ports.http.port,
               ports.metrics and ports.metrics._sock.getsockname())
        await ports.close()
        return out

    return asyncio.run(go())


@pytest.mark.parametrize("which", ["port", "http_port", "metrics_port"])
def test_a_busy_port_is_refused_while_binding(which):
    busy = _busy()
    try:
        kw = {"port": 0, "http_port": 0, "metrics_port": 0} | {which: busy.getsockname()[1]}
        with pytest.raises(StartupError, match=f"--{which.replace('_', '-')}: cannot bind"):
            _bind(**kw)
    finally:
        busy.close()


def test_the_metrics_port_may_not_be_the_api_port():
    with pytest.raises(StartupError, match="--metrics-port 50123: the same port"):
        _bind(port=50123, metrics_port=50123)


def test_unusable_tls_files_are_refused_while_binding(tmp_path):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.write_text("-----BEGIN CERTIFICATE-----\nnot a certificate\n-----END CERTIFICATE-----\n")
    key.write_text("nope")
    with pytest.raises(StartupError, match="--tls-cert .* cannot use them"):
        _bind(port=0, tls_cert=cert, tls_key=key)
    with pytest.raises(StartupError, match="cannot use them"):
        _bind(port=0, tls_cert=tmp_path / "absent.pem", tls_key=key)


def test_the_metrics_port_binds_loopback_unless_told_otherwise():
    assert ServerConfig(model="m").metrics_host == "127.0.0.1"
    _, _, addr = _bind(port=0, host="0.0.0.0", metrics_port=0)
    assert addr[0] == "127.0.0.1"  # the API on every address, metrics on loopback only


def test_exposed_metrics_ask_for_the_bearer_token():
    m = Metrics()
    app = metrics_app(m, Auth((b"tok",)))

    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                     base_url="http://x") as c:
            return (await c.get("/metrics"),
                    await c.get("/metrics", headers={"authorization": "Bearer tok"}))

    no, yes = asyncio.run(go())
    assert no.status_code == 401 and yes.status_code == 200
    assert "steerd_requests_total" in yes.text or "steerd_active_streams" in yes.text
