"""The playground's HTTP JSON routes on the embedded default's SAE and labels, in-process
through the real app (``server.http.app.build_app``) over the core, with a stand-in engine.

References are the files on disk (cfg.json, feature_labels.json) read here with ``json``,
and the tokenizer's decode of a whole sequence."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from starlette.testclient import TestClient

from sae_runtime.labels.store import load_beside
from sae_runtime.loading import load_sae_config
from server.auth import Auth
from server.core.service import Core
from server.core.validate import Limits
from server.http.app import build_app
from tests.server.engines import FakeEngine

EMBEDDED = Path(__file__).resolve().parents[2] / "server" / "embedded"
SAE_DIR = EMBEDDED / "saes" / "topics_l1"
RAW_CFG = json.loads((SAE_DIR / "cfg.json").read_text())
RAW_LABELS = json.loads((SAE_DIR / "feature_labels.json").read_text())
TOKEN = "s3cret"


def _core() -> Core:
    from transformers import AutoTokenizer

    cfg = load_sae_config(SAE_DIR)
    tok = AutoTokenizer.from_pretrained(EMBEDDED / "model")
    return Core(FakeEngine(tok, max_model_len=256, saes={"topics_l1": SAE_DIR}), model="m",
                saes={"topics_l1": cfg}, labels={"topics_l1": load_beside(SAE_DIR, "topics_l1", cfg.d_sae)},
                sae_dtypes={"topics_l1": "float32"},
                limits=Limits(max_interventions=8, vocab_size=len(tok)), compiled=False)


@pytest.fixture(scope="module")
def servicer():
    return _core()


@pytest.fixture(scope="module")
def http(servicer):
    with TestClient(build_app(servicer, model="m")) as c:
        yield c


def _error(res, status: int, param: str | None) -> str:
    assert res.status_code == status, res.text
    err = res.json()["error"]
    assert err["param"] == param, err
    if status == 400:
        assert err["type"] == "invalid_request_error" and err["code"] != "ok", err
    return err["message"]


def test_saes_lists_the_loaded_sae(http):
    (s,) = http.get("/v1/saes").json()["data"]
    assert s["id"] == "topics_l1" and s["labelled"] is True
    assert (s["d_sae"], s["d_in"], s["k"]) == (RAW_CFG["d_sae"], RAW_CFG["d_in"], RAW_CFG["k"])
    assert s["architecture"] == RAW_CFG["architecture"]
    assert s["hook_name"] == RAW_CFG["metadata"]["hook_name"] and s["layer"] == 1


def test_search_finds_exactly_the_features_whose_text_has_the_word(http):
    want = {f["index"] for f in RAW_LABELS["features"]
            if "ocean" in " ".join([f["label"], f.get("topic", ""), *f.get("top_tokens", [])]).lower()}
    assert 0 < len(want) <= 100
    data = http.get("/v1/features/search", params={"q": "Ocean", "limit": 100}).json()["data"]
    assert {f["index"] for f in data} == want
    assert len(data) == len(want)
    assert all(f["sae"] == "topics_l1" for f in data)
    # the same words in the same order as the gRPC default limit (10) and with an explicit sae
    top = http.get("/v1/features/search", params={"q": "ocean", "sae": "topics_l1"}).json()["data"]
    assert [f["index"] for f in top] == [f["index"] for f in data[:10]]


def test_feature_json_is_the_labels_file_record(http):
    rec = next(f for f in RAW_LABELS["features"] if f.get("steer_value") and f.get("examples"))
    got = http.get(f"/v1/features/topics_l1/{rec['index']}").json()
    assert got["index"] == rec["index"] and got["label"] == rec["label"]
    for key in ("density", "max_activation", "mean_activation", "score", "steer_value",
                "steer_success", "topic_selectivity", "topic_coverage"):
        assert got[key] == pytest.approx(rec[key], rel=1e-6), key
    assert got["top_tokens"] == rec["top_tokens"]
    assert [(e["context"], e["token"]) for e in got["examples"]] == \
        [(e["context"], e["token"]) for e in rec["examples"]]
    assert [e["activation"] for e in got["examples"]] == \
        pytest.approx([e["activation"] for e in rec["examples"]], rel=1e-6)
    assert got["topic_means"] == pytest.approx(rec["topic_means"], rel=1e-6)
    assert got["site_norm"] == pytest.approx(RAW_LABELS["site_norm"], rel=1e-6)


def test_fields_at_their_default_are_present(http):
    dead = RAW_LABELS["dead_features"][0]  # 0 on the embedded default: index 0 must not vanish
    got = http.get(f"/v1/features/topics_l1/{dead}").json()
    assert got["index"] == dead and got["dead"] is True
    assert got["density"] == 0 and got["examples"] == [] and got["steer_value"] == 0


def test_errors_name_the_parameter(http):
    assert "at least one word" in _error(http.get("/v1/features/search"), 400, "q")
    _error(http.get("/v1/features/search", params={"q": "  "}), 400, "q")
    _error(http.get("/v1/features/search", params={"q": "x" * 600}), 400, "q")
    assert "'abc'" in _error(http.get("/v1/features/search", params={"q": "ocean", "limit": "abc"}),
                             400, "limit")
    _error(http.get("/v1/features/search", params={"q": "ocean", "limit": "101"}), 400, "limit")
    _error(http.get("/v1/features/search", params={"q": "ocean", "limit": "0"}), 400, "limit")
    msg = _error(http.get("/v1/features/search", params={"query": "ocean"}), 400, "query")
    assert "unknown parameter" in msg and "q, sae, limit" in msg
    assert "nope" in _error(http.get("/v1/features/search", params={"q": "a", "sae": "nope"}),
                            400, "sae")
    _error(http.get("/v1/features/nope/3"), 400, "sae")
    assert "1024 features" in _error(http.get("/v1/features/topics_l1/1024"), 400, "index")
    _error(http.get("/v1/features/topics_l1/-1"), 400, "index")
    _error(http.get("/v1/features/topics_l1/abc"), 400, "index")
    _error(http.get(f"/v1/features/topics_l1/{2**32}"), 400, "index")


def test_token_pieces_are_each_token_decoded(http, servicer):
    text = "The sailors sailed toward the harbor. Then"
    ids = servicer.tokenizer.encode(text, add_special_tokens=False)
    pieces = http.post("/v1/token_pieces", json={"token_ids": ids}).json()["pieces"]
    assert len(pieces) == len(ids) > 3
    assert "".join(pieces) == servicer.tokenizer.decode(ids) == text
    vocab = servicer.limits.vocab_size
    _error(http.post("/v1/token_pieces", json={}), 400, "token_ids")
    _error(http.post("/v1/token_pieces", json={"token_ids": "1 2"}), 400, "token_ids")
    _error(http.post("/v1/token_pieces", json={"token_ids": [1, vocab]}), 400, "token_ids[1]")
    _error(http.post("/v1/token_pieces", json={"token_ids": [1.5]}), 400, "token_ids[0]")
    _error(http.post("/v1/token_pieces", json={"token_ids": [1] * 257}), 400, "token_ids")
    _error(http.post("/v1/token_pieces", content=b"{nope",
                     headers={"content-type": "application/json"}), 400, None)


def test_metrics_are_labelled_by_core_method_and_door(servicer):
    srv = _core()
    with TestClient(build_app(srv, model="m")) as c:
        c.get("/v1/features/topics_l1/39")
        c.get("/v1/features/topics_l1/40")
        c.get("/v1/features/topics_l1/5000")
    req = srv.metrics.requests
    assert req.labels("GetFeature", "http", "OK")._value.get() == 2
    assert req.labels("GetFeature", "http", "INVALID_ARGUMENT")._value.get() == 1


def test_json_routes_follow_auth_and_the_page_does_not(servicer):
    app = build_app(servicer, model="m", auth=Auth((TOKEN.encode(),)))
    with TestClient(app) as c:
        for res in (c.get("/v1/saes"), c.get("/v1/features/search", params={"q": "ocean"}),
                    c.get("/v1/features/topics_l1/39"),
                    c.post("/v1/token_pieces", json={"token_ids": [1]}),
                    c.get("/v1/saes", headers={"Authorization": "Bearer wrong"})):
            assert res.status_code == 401, res.request.url
            assert res.json()["error"]["code"] == "unauthenticated"
            assert res.headers["www-authenticate"] == "Bearer"
        ok = {"Authorization": f"Bearer {TOKEN}"}
        assert c.get("/v1/saes", headers=ok).status_code == 200
        assert c.get("/v1/features/topics_l1/39", headers=ok).json()["index"] == 39
        page = c.get("/")
        assert page.status_code == 200 and "text/html" in page.headers["content-type"]
        assert '<script type="module" src="/playground/app.js">' in page.text
        for name, kind in (("app.js", "javascript"), ("style.css", "text/css")):
            res = c.get(f"/playground/{name}")
            assert res.status_code == 200 and kind in res.headers["content-type"]
            assert res.text == (Path(__file__).resolve().parents[2] / "server" / "playground"
                                / name).read_text()
