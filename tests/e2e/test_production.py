"""Production behaviour on a second real server: auth, mutual TLS, caps, metrics, engine death.

This server runs with bearer-token auth, mutual TLS (a self-signed certificate made here
serves as CA, server and client certificate), and tight caps so the limits are reachable.
Its last test kills the engine and checks the server fails loudly.
"""

from __future__ import annotations

import concurrent.futures as cf
import datetime
import ipaddress
import time

import grpc
import psutil
import pytest

from clients.client import SteeringClient, clamp
from tests.e2e.conftest import SAE_DIRS, SAE_IDS, start_server, stop_server

pytestmark = pytest.mark.e2e
TOKEN = "s3cret-token-for-tests"


def self_signed(tmp):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    (tmp / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp / "key.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                    serialization.NoEncryption()))
    return tmp / "cert.pem", tmp / "key.pem"


@pytest.fixture(scope="module")
def secure(tiny_dir, tmp_path_factory):
    # Not started early (tests/e2e/conftest.py): it would sit through the family servers'
    # module, and memory, not CPU, is what runs short there.
    tmp = tmp_path_factory.mktemp("secure")
    cert, key = self_signed(tmp)
    (tmp / "tokens").write_text(f"# accepted tokens\n{TOKEN}\nother-token\n")
    tls = {"tls_ca": str(cert), "tls_cert": str(cert), "tls_key": str(key)}
    srv = start_server(
        tiny_dir / "tiny-llama", {sid: tiny_dir / "saes" / SAE_DIRS[sid] for sid in SAE_IDS}, tmp,
        "--auth-tokens-file", str(tmp / "tokens"), "--tls-cert", str(cert), "--tls-key", str(key),
        "--tls-client-ca", str(cert), "--max-concurrent-streams", "3", "--max-distinct-configs", "2",
        "--max-prompt-tokens", "200", "--max-new-tokens", "200", "--log-format", "json",
        client_kwargs={"token": TOKEN, **tls}, host="localhost", http=True)
    srv.tls = tls
    yield srv
    if srv.proc.poll() is None:  # the engine-death test normally ends it
        stop_server(srv)  # SIGTERM, so steerd stops its engine processes too


def test_auth_required_and_constant_message(secure):
    for token in (None, "wrong", TOKEN + "x"):
        with secure.client(token=token) as c, pytest.raises(grpc.RpcError) as ei:
            c.list_saes()
        assert ei.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "bearer token" in ei.value.details()
    with secure.client(token=None) as c, pytest.raises(grpc.RpcError) as ei:
        c.generate_text([1, 2], max_tokens=1)
    assert ei.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with secure.client(token=None) as c:
        assert c.health() == "SERVING"  # health stays open for probes
    with secure.client(token="other-token") as c:
        assert len(c.generate_text([1, 2, 3], max_tokens=3, temperature=0.0).token_ids) == 3


def _tls_context(secure, client_cert=True):
    import ssl

    ctx = ssl.create_default_context(cafile=secure.tls["tls_ca"])
    if client_cert:
        ctx.load_cert_chain(secure.tls["tls_cert"], secure.tls["tls_key"])
    return ctx


def _oai(secure, token=TOKEN, client_cert=True):
    """The OpenAI SDK over mutual TLS (the HTTP front end uses the gRPC certificates)."""
    import httpx

    http = httpx.Client(verify=_tls_context(secure, client_cert), timeout=60)
    return secure.openai(api_key=token, http_client=http)


def test_http_shares_auth_and_tls(secure):
    import httpx
    import openai

    with _oai(secure) as c:
        (m,) = c.models.list().data
        r = c.completions.create(model=m.id, prompt="the ocean", max_tokens=3, temperature=0,
                                 extra_body={"interventions": [{"sae": "resid_l1", "feature": 3,
                                                                "mode": "clamp", "value": 9.0}]})
        assert r.usage.completion_tokens == 3
    for token in ("wrong", TOKEN + "x"):
        with _oai(secure, token=token) as c:
            for call in (lambda: c.models.list(),
                         lambda: c.completions.create(model=m.id, prompt="x", max_tokens=1)):
                with pytest.raises(openai.AuthenticationError) as ei:
                    call()
                assert ei.value.body["type"] == "authentication_error"
                assert ei.value.body["code"] == "unauthenticated"
    r = httpx.post(secure.http_url + "/completions", json={"model": m.id, "prompt": "x"},
                   verify=_tls_context(secure))
    assert r.status_code == 401  # no Authorization header at all
    with _oai(secure, client_cert=False) as c, pytest.raises(openai.APIConnectionError):
        c.models.list()  # mTLS: no client certificate, no connection


def test_chat_without_a_template_is_failed_precondition(secure):
    import openai

    with secure.client() as c, pytest.raises(grpc.RpcError) as ei:
        c.generate_text([("user", "hi")], max_tokens=2)
    assert ei.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "tiny-llama has no chat template" in ei.value.details()
    with _oai(secure) as c, pytest.raises(openai.BadRequestError) as ei:
        c.chat.completions.create(model=c.models.list().data[0].id,
                                  messages=[{"role": "user", "content": "hi"}])
    assert ei.value.body["code"] == "failed_precondition" and ei.value.body["param"] == "messages"


def test_mutual_tls_round_trip_and_rejections(secure):
    with secure.client() as c:
        out = c.generate_text("the ocean", max_tokens=4, temperature=0.0,
                              interventions=[clamp("resid_l1", 3, 9.0)])
        assert len(out.token_ids) == 4
    # TLS without a client certificate, and plaintext, are both refused
    for kwargs in ({"tls_cert": None, "tls_key": None}, {"tls_ca": None, "tls_cert": None, "tls_key": None}):
        with secure.client(timeout=10, **kwargs) as c, pytest.raises(grpc.RpcError) as ei:
            c.list_saes()
        assert ei.value.code() == grpc.StatusCode.UNAVAILABLE


def test_length_caps_are_invalid_argument(secure):
    with secure.client() as c:
        for kw, text in (({"max_tokens": 201}, "cap of 200"),):
            with pytest.raises(grpc.RpcError) as ei:
                c.generate_text([1, 2], **kw)
            assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT and text in ei.value.details()
        with pytest.raises(grpc.RpcError) as ei:
            c.generate_text([3] * 201, max_tokens=1)
        assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "at most 200" in ei.value.details()
    import openai

    with _oai(secure) as o:
        model = o.models.list().data[0].id
        for kw, param, text in (({"max_tokens": 201}, "max_tokens", "cap of 200"),
                                ({"prompt": [3] * 201}, "prompt", "at most 200")):
            with pytest.raises(openai.BadRequestError) as ei:
                o.completions.create(model=model, **{"prompt": [1, 2], **kw})
            assert ei.value.body["param"] == param and text in ei.value.body["message"]


def test_one_tenant_never_reads_anothers_prompts_from_the_prefix_cache(secure):
    """With auth on, every request is salted by its caller's token (--cache-salt-per-token,
    the default): a token's repeated prompt hits the cache, another token's never does."""
    prompt = [(7 * i) % 500 + 3 for i in range(150)]  # over one 128-token KV block
    with secure.client(token=TOKEN) as a, secure.client(token="other-token") as b:
        a.generate_text(prompt, max_tokens=1)
        again = a.generate_text(prompt, max_tokens=1)
        other = b.generate_text(prompt, max_tokens=1)
        other_again = b.generate_text(prompt, max_tokens=1)
    assert again.usage.cached_prompt_tokens > 0, "prefix caching is not on"
    assert other.usage.cached_prompt_tokens == 0, "a tenant read another's cached prompt"
    assert other_again.usage.cached_prompt_tokens > 0


def test_concurrency_and_distinct_config_caps_are_resource_exhausted(secure):
    def long_stream(c, ivs=()):
        s = c.generate([5, 6, 7], max_tokens=200, temperature=0.0, ignore_eos=True, interventions=list(ivs))
        next(s)  # admitted and running
        return s

    oai = _oai(secure)  # connected before the streams are held: the check below is quick
    model = oai.models.list().data[0].id
    with secure.client() as c, oai:
        held = [long_stream(c, [clamp("resid_l1", 1, 5.0)]), long_stream(c, [clamp("resid_l1", 2, 5.0)])]
        # a third distinct intervention set is over the cap of 2 ...
        with pytest.raises(grpc.RpcError) as ei:
            next(c.generate([5, 6], max_tokens=5, interventions=[clamp("resid_l1", 3, 5.0)]))
        assert ei.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "distinct intervention sets" in ei.value.details()
        # ... but reusing an in-flight set is fine, and fills the third stream slot
        held.append(long_stream(c, [clamp("resid_l1", 1, 5.0)]))
        _http_is_refused_too(oai, model)
        with pytest.raises(grpc.RpcError) as ei:
            next(c.generate([5, 6], max_tokens=5))
        assert ei.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "3 concurrent streams" in ei.value.details()
        for s in held:
            s.cancel()
        _wait_idle(secure)
        assert len(c.generate_text([5, 6], max_tokens=2).token_ids) == 2
    m = secure.metrics()
    assert m['steerd_rejected_total{cap="distinct_configs"}'] >= 1
    assert m['steerd_rejected_total{cap="concurrent_streams"}'] >= 1


def _http_is_refused_too(oai, model):
    """The caps count both front ends: with three gRPC streams held, HTTP gets 429."""
    import openai

    for stream in (False, True):
        with pytest.raises(openai.RateLimitError) as ei:
            oai.completions.create(model=model, prompt="x", max_tokens=2, stream=stream)
        assert ei.value.body["code"] == "resource_exhausted"
        assert "3 concurrent streams" in ei.value.body["message"]
        assert ei.value.response.headers["retry-after"] == "1"


def _wait_idle(srv, timeout=60.0):
    deadline = time.monotonic() + timeout
    keys = ("steerd_active_streams", "steerd_read_buffers", "steerd_distinct_configs_in_flight",
            "steerd_engine_unfinished_requests")
    while True:
        m = srv.metrics()
        if all(m[k] == 0 for k in keys) or time.monotonic() > deadline:
            return {k: m[k] for k in keys}
        time.sleep(0.2)


def test_metrics_report_requests_and_latencies(secure):
    m = secure.metrics()
    assert m['steerd_requests_total{code="OK",door="grpc",method="Generate"}'] >= 1
    assert m['steerd_requests_total{code="INVALID_ARGUMENT",door="grpc",method="Generate"}'] >= 1
    assert m["steerd_ttft_seconds_count"] >= 1 and m["steerd_tpot_seconds_count"] >= 1
    assert m["steerd_generated_tokens_total"] >= 1 and m["steerd_interventions_total"] >= 1


def test_json_logs_carry_request_ids(secure):
    import json

    with secure.client() as c:
        c.generate_text([4, 4], max_tokens=1, request_id="trace-me-42")
    lines = [ln for ln in secure.log.read_text().splitlines() if ln.startswith("{")]
    recs = [json.loads(ln) for ln in lines]
    assert any(r.get("request_id") == "trace-me-42" and r["level"] == "INFO" for r in recs)


def test_engine_death_fails_streams_flips_health_and_exits_nonzero(secure):
    import openai

    with secure.client() as c, _oai(secure) as o:
        stream = c.generate([5, 6, 7], max_tokens=200, temperature=0.0, ignore_eos=True)
        next(stream)
        http = o.completions.create(model=o.models.list().data[0].id, prompt=[5, 6, 7],
                                    max_tokens=200, temperature=0, stream=True,
                                    extra_body={"ignore_eos": True})
        chunks = iter(http)
        next(chunks)
        for child in psutil.Process(secure.proc.pid).children(recursive=True):
            child.kill()
        with pytest.raises(grpc.RpcError) as ei:
            for _ in stream:
                pass
        assert ei.value.code() == grpc.StatusCode.UNAVAILABLE
        # the HTTP stream's headers were sent: the 503 travels as an error event
        with pytest.raises(openai.APIError) as hei:
            for _ in chunks:
                pass
        assert hei.value.body["code"] == "unavailable" and "engine stopped" in hei.value.body["message"]
    assert secure.proc.wait(timeout=60) == 1, "steerd must exit non-zero when its engine dies"


def test_server_is_gone_after_engine_death(secure):
    with cf.ThreadPoolExecutor(1) as pool, SteeringClient(secure.target, timeout=5, **secure.tls) as c:
        with pytest.raises(grpc.RpcError):
            pool.submit(c.health).result()
