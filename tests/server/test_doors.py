"""Every route answers the same through both doors: one table of calls, each made through the
gRPC door (a real in-process grpc.aio server) and the HTTP door (the real Starlette app),
and both answers compared with the core's own.

The core runs over a stand-in engine and read channel (``tests.server.engines``: it only
scripts tokens and reads; what is compared here is conversion, not generation) with the
embedded default's SAE and labels, and one steering-vector bank (vector ``v`` at layer 0),
so requests that name the bank as an SAE are refused alike everywhere.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest
from google.protobuf.json_format import MessageToDict

from clients.client import SteeringClient, activation_read, activations_of, clamp, read, when
from sae_runtime.labels.store import load_beside
from sae_runtime.loading import load_sae_config
from sae_runtime.loading.vectors import Bank
from sae_runtime.spec.activations import DeclaredSites, edit_positions
from sae_runtime.spec.vectors import VectorIndex
from server.core.errors import Code, code_of, field_of
from server.core.service import Core
from server.core.types import EncodeRequest, GenerateRequest, Prompt
from server.core.validate import Limits
from server.grpc import convert
from server.grpc.server import add_servicer
from server.grpc.servicer import SteeringServicer
from server.http import names
from server.http.app import build_app
from steering.v1 import steering_pb2 as pb
from steering.v1 import steering_pb2_grpc as pb_grpc
from tests.server.engines import FakeEngine, FakeRouter, act_rows

EMBEDDED = Path(__file__).resolve().parents[2] / "server" / "embedded"
SAE = "topics_l1"
MODEL = str(EMBEDDED / "model")  # the logit effects read its unembedding
BANK = Bank(0, ("v",), np.ones((1, 256), np.float32))
build = SteeringClient.build_request
HOOKS = tuple(f"blocks.{L}.hook_resid_post" for L in range(3))
# the bank edits block 0's output and the SAE block 1's: those two sites have twins (worker
# sites 3 and 4), block 2's has none (test_declared_sites_twin_where_the_sae_and_bank_edit)
SITES = DeclaredSites(("blocks.*.hook_resid_post",), HOOKS, (256,) * 3, (0, 1))


def proto_dict(msg) -> dict:
    return MessageToDict(msg, preserving_proto_field_name=True,
                         always_print_fields_with_no_presence=True, use_integers_for_enums=True)


def make_core(tok, labels=True) -> Core:
    cfg = load_sae_config(EMBEDDED / "saes" / SAE)
    lab = {SAE: load_beside(EMBEDDED / "saes" / SAE, SAE, cfg.d_sae)} if labels else {}
    router = FakeRouter()
    engine = FakeEngine(tok, max_model_len=256, saes={SAE: EMBEDDED / "saes" / SAE},
                        router=router, vocab_size=len(tok), text_len=3)
    return Core(engine, model=MODEL, saes={SAE: cfg}, labels=lab, sae_dtypes={SAE: "float32"},
                limits=Limits(max_interventions=8, vocab_size=len(tok),
                              max_activation_positions=100), compiled=True,
                router=router, vectors=VectorIndex.of([BANK]), sites=SITES)


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(EMBEDDED / "model")


class Doors:
    """The same core behind both doors, in one event loop."""

    def __init__(self, core: Core) -> None:
        self.core = core

    async def __aenter__(self) -> Doors:
        self.server = grpc.aio.server()
        add_servicer(SteeringServicer(self.core), self.server)
        port = self.server.add_insecure_port("127.0.0.1:0")
        await self.server.start()
        self.channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        self.stub = pb_grpc.SteeringServiceStub(self.channel)
        self.http = httpx.AsyncClient(transport=httpx.ASGITransport(app=build_app(self.core, model=MODEL)),
                                      base_url="http://localhost")
        return self

    async def __aexit__(self, *exc) -> None:
        await self.http.aclose()
        await self.channel.close()
        await self.server.stop(None)


def run(core: Core, fn):
    async def go():
        async with Doors(core) as d:
            return await fn(d)

    return asyncio.run(go())


# ---------------------------------------------------------------------------- info routes


def test_list_saes_is_the_same_through_both_doors(tok):
    core = make_core(tok)

    async def calls(d):
        return (await d.stub.ListSAEs(pb.ListSAEsRequest()),
                (await d.http.get("/v1/saes")).json()["data"])

    got_grpc, got_http = run(core, calls)
    want = [dataclasses.asdict(s) for s in core.list_saes()]
    assert [s["id"] for s in want] == [SAE]  # the vector bank is not an SAE
    for w, g, h in zip(want, proto_dict(got_grpc)["saes"], got_http, strict=True):
        labelled = w.pop("labelled")
        w["input_site"] = w["input_site"] or 0
        w["layers"] = list(w["layers"])  # a CLT's blocks (a tuple in the record)
        assert g == w
        h = {**h, "site": int(names.SITES[h["site"]]),
             "input_site": int(names.SITES[h["input_site"]]) if h["input_site"] else 0}
        assert h.pop("labelled") is labelled
        assert h == w


FEATURES = [("labelled", 213), ("dead", None), ("unlabelled", 5)]


@pytest.mark.parametrize("kind, index", FEATURES, ids=[k for k, _ in FEATURES])
def test_get_feature_is_the_same_through_both_doors_with_logit_effects(tok, kind, index):
    core = make_core(tok, labels=kind != "unlabelled")
    if index is None:
        index = next(iter(sorted(json.loads((EMBEDDED / "saes" / SAE / "feature_labels.json")
                                            .read_text())["dead_features"])))

    async def calls(d):
        return (await d.stub.GetFeature(pb.GetFeatureRequest(sae=SAE, index=index)),
                (await d.http.get(f"/v1/features/{SAE}/{index}")).json())

    g, h = run(core, calls)
    want = proto_dict(convert.feature(asyncio.run(core.get_feature(SAE, index))))
    assert proto_dict(g) == want
    assert set(h) == set(want)
    for key, v in want.items():
        assert h[key] == (pytest.approx(v, rel=1e-6) if isinstance(v, float) else
                          _approx_tree(v)), key
    # both doors computed the decoder row's logit effects (the labels file may carry them)
    assert want["promoted"] and want["suppressed"], want["logit_effects_unavailable"]


def _approx_tree(v):
    if isinstance(v, float):
        return pytest.approx(v, rel=1e-6)
    if isinstance(v, list):
        return [_approx_tree(x) for x in v]
    if isinstance(v, dict):
        return {k: _approx_tree(x) for k, x in v.items()}
    return v


def test_search_is_the_same_through_both_doors(tok):
    core = make_core(tok)

    async def calls(d):
        return (await d.stub.SearchFeatures(pb.SearchFeaturesRequest(query="ocean", limit=7)),
                (await d.http.get("/v1/features/search", params={"q": "ocean", "limit": 7})).json())

    g, h = run(core, calls)
    want = [f.index for f in core.search_features("ocean", limit=7)]
    assert len(want) == 7
    assert [f.index for f in g.features] == [f["index"] for f in h["data"]] == want


# ---------------------------------------------------------------------------- generation

GENERATIONS = {
    "plain": build([5, 6, 7], max_tokens=4),
    "steered_reads": build("the sea", max_tokens=5, interventions=[clamp(SAE, 213, 40.0)],
                           reads=[read(SAE, 3, watch=[213])]),
    "guarded": build([5, 6, 7], max_tokens=12, reads=[read(SAE, 2)],
                     abort_when=[when(SAE, 213, ">", 6.5)]),
    "vector": build([9, 8], max_tokens=3, vectors=[pb.VectorSteer(name="v", strength=2.0)]),
}


def _http_body(req: pb.GenerateRequest) -> dict:
    """The same request as an OpenAI completion body."""
    d = MessageToDict(req, preserving_proto_field_name=True)
    body = {"model": MODEL, "stream": True, "return_token_ids": True,
            "prompt": d["prompt"].get("text") or [int(x) for x in d["prompt"]["token_ids"]["ids"]]}
    if req.sampling.HasField("max_tokens"):
        body["max_tokens"] = req.sampling.max_tokens
    for iv in req.interventions:
        body.setdefault("interventions", []).append(
            {"sae": iv.sae, "feature": iv.feature, "value": iv.value,
             "mode": pb.InterventionMode.Name(iv.mode).removeprefix("INTERVENTION_MODE_").lower()})
    for r in req.reads:
        body.setdefault("reads", []).append({"sae": r.sae, "top_k": r.top_k, "watch": list(r.watch)})
    for g in req.abort_when:
        c = g.condition
        body.setdefault("abort_when", []).append(
            {"sae": c.sae, "feature": c.feature, "threshold": c.threshold,
             "op": pb.Comparison.Name(c.op).removeprefix("COMPARISON_").lower()})
    for v in req.vectors:
        body.setdefault("vectors", []).append({"name": v.name, "strength": v.strength})
    for a in req.activation_reads:
        body.setdefault("activation_reads", []).append(
            {"hook": a.hook, **({"before_edits": True} if a.before_edits else {})})
    return body


def _sse(text: str) -> list[dict]:
    return [json.loads(ln[6:]) for ln in text.split("\n\n")
            if ln.startswith("data: ") and ln != "data: [DONE]"]


@pytest.mark.parametrize("name", list(GENERATIONS))
def test_generate_is_the_same_through_both_doors(tok, name):
    req = GENERATIONS[name]
    core = make_core(tok)

    async def calls(d):
        want = [c async for c in await core.generate(convert.generate_request(req))]
        got = [m async for m in d.stub.Generate(req)]
        res = await d.http.post("/v1/completions", json=_http_body(req))
        return want, got, res

    want, got, res = run(core, calls)
    assert res.status_code == 200, res.text
    events = _sse(res.text)
    toks = [t for c in want for t in c.token_ids]
    assert [t for m in got for t in m.token_ids] == toks
    assert [t for e in events for ch in e["choices"] for t in ch.get("token_ids", [])] == toks
    assert "".join(m.text for m in got) == "".join(c.text for c in want) == \
        "".join(ch["text"] for e in events for ch in e["choices"])
    feats = [(f.position, f.token_id, f.sae, f.indices.tolist(), f.watch_values.tolist())
             for c in want for f in c.features]
    assert [(f.position, f.token_id, f.sae, list(f.indices), list(f.watch_values))
            for m in got for f in m.features] == feats
    assert [(f["position"], f["token_id"], f["sae"], f["indices"], f["watch_values"])
            for e in events for ch in e["choices"] for f in ch.get("features", [])] == feats
    if GENERATIONS[name].reads:
        assert feats
    last = want[-1]
    assert got[-1].finish_reason == int(last.finish_reason)
    assert events[-1]["choices"][0]["finish_reason"] == names.FINISH[last.finish_reason]
    if name == "guarded":
        assert last.guardrail is not None and got[-1].guardrail.position == last.guardrail.position
        assert events[-1]["choices"][0]["guardrail"]["position"] == last.guardrail.position
    assert got[-1].usage.completion_tokens == last.usage.completion_tokens == len(toks)


# ---------------------------------------------------------------------------- activation reads


def test_declared_sites_twin_where_the_sae_and_bank_edit():
    cfg = load_sae_config(EMBEDDED / "saes" / SAE)  # blocks.1.hook_resid_post
    assert SITES == DeclaredSites.of(("blocks.*.hook_resid_post",), 3, 256, 256,
                                     edit_positions([cfg, BANK.config()]))


def test_before_and_after_edits_reads_are_told_apart_through_both_doors(tok):
    """One request reads block 1's output after and before edits (its twin, worker site
    4) and block 2's before edits (no twin: its own site 2); the fake worker's rows say
    which site each came from (``engines.act_rows``)."""
    reads = [activation_read(HOOKS[1]), activation_read(HOOKS[1], before_edits=True),
             activation_read(HOOKS[2], before_edits=True)]
    req = build([5, 6, 7], max_tokens=3, activation_reads=reads)
    core = make_core(tok)

    async def calls(d):
        want = [c async for c in await core.generate(convert.generate_request(req))]
        got = [m async for m in d.stub.Generate(req)]
        res = await d.http.post("/v1/completions", json={**_http_body(req), "stream": False})
        enc = await d.stub.Encode(pb.EncodeRequest(inputs=[pb.Prompt(token_ids=pb.TokenIds(
            ids=[5, 6, 7]))], activation_reads=reads))
        return want, got, res, enc

    want, got, res, enc = run(core, calls)
    fed = list(range(3 + 3 - 1))
    expect = {(HOOKS[1], False): 1, (HOOKS[1], True): 4, (HOOKS[2], True): 2}  # -> worker site
    core_rows = {}
    for c in want:
        for a in c.activations:
            core_rows.setdefault((a.hook, a.before_edits), []).append(a.values)
    assert core_rows.keys() == expect.keys()
    for key, site in expect.items():
        np.testing.assert_array_equal(np.concatenate(core_rows[key]), act_rows(site, fed, 256))
    # gRPC: the flag comes back on each entry; the client keeps the two apart
    msgs = [a for m in got for a in m.activations]
    after, after_pos = activations_of(msgs)
    before, before_pos = activations_of(msgs, before_edits=True)
    assert list(after) == [HOOKS[1]] and sorted(before) == [HOOKS[1], HOOKS[2]]
    assert after_pos[HOOKS[1]] == before_pos[HOOKS[1]] == fed
    np.testing.assert_array_equal(after[HOOKS[1]], act_rows(1, fed, 256))
    np.testing.assert_array_equal(before[HOOKS[1]], act_rows(4, fed, 256))
    np.testing.assert_array_equal(before[HOOKS[2]], act_rows(2, fed, 256))
    # HTTP: one entry per read, "before_edits" on each
    assert res.status_code == 200, res.text
    entries = res.json()["choices"][0]["activations"]
    assert [(e["hook"], e["before_edits"]) for e in entries] == list(expect)
    for e, site in zip(entries, expect.values(), strict=True):
        rows = np.frombuffer(base64.b64decode(e["data"]), "<f4").reshape(e["shape"])
        np.testing.assert_array_equal(rows, act_rows(site, fed, 256))
    # Encode: the same sites for the prompt's positions
    (r,) = enc.results
    assert [(a.hook, a.before_edits) for a in r.activations] == list(expect)
    b, _ = activations_of(r.activations, before_edits=True)
    np.testing.assert_array_equal(b[HOOKS[1]], act_rows(4, [0, 1, 2], 256))


def test_model_info_names_the_hooks_with_edits(tok):
    core = make_core(tok)

    async def calls(d):
        return await d.stub.GetModelInfo(pb.GetModelInfoRequest())

    info = run(core, calls)
    assert list(info.activation_hooks) == list(HOOKS)
    assert list(info.activation_hooks_with_edits) == list(HOOKS[:2])


# ---------------------------------------------------------------------------- refusals

REFUSALS = [
    ("unknown SAE", build("x", interventions=[clamp("nope", 1, 1.0)]), Code.NOT_FOUND,
     "interventions[0].sae"),
    ("bank as an SAE", build("x", interventions=[clamp("vectors@L0", 0, 1.0)]), Code.NOT_FOUND,
     "interventions[0].sae"),
    ("bank read", build("x", reads=[read("vectors@L0", 1)]), Code.NOT_FOUND, "reads[0].sae"),
    ("feature range", build("x", interventions=[clamp(SAE, 5000, 1.0)]), Code.INVALID_ARGUMENT,
     "interventions[0].feature"),
    ("top_k cap", build("x", reads=[read(SAE, 65)]), Code.INVALID_ARGUMENT, "reads[0].top_k"),
    ("vector name", build("x", vectors=[pb.VectorSteer(name="w", strength=1.0)]),
     Code.INVALID_ARGUMENT, "vectors[0].name"),
    ("guard feature", build("x", abort_when=[when(SAE, 5000, ">", 1.0)]), Code.INVALID_ARGUMENT,
     "abort_when[0].condition.feature"),
    ("prompt ids", build([5, 10**6]), Code.INVALID_ARGUMENT, "prompt.token_ids.ids[1]"),
    ("max_tokens", build("x", max_tokens=300), Code.INVALID_ARGUMENT, "sampling.max_tokens"),
    ("undeclared activation hook", build("x", activation_reads=[
        activation_read("blocks.0.hook_resid_post"), activation_read("blocks.0.hook_mlp_out")]),
     Code.INVALID_ARGUMENT, "activation_reads[1].hook"),
    ("activation read both ways where nothing edits", build("x", activation_reads=[
        activation_read(HOOKS[2]), activation_read(HOOKS[0], before_edits=True),
        activation_read(HOOKS[2], before_edits=True)]),
     Code.INVALID_ARGUMENT, "activation_reads[2].before_edits"),
    ("activation read twice before edits", build("x", activation_reads=[
        activation_read(HOOKS[1], before_edits=True), activation_read(HOOKS[1], before_edits=True)]),
     Code.INVALID_ARGUMENT, "activation_reads[1].hook"),
    ("activation positions cap", build("x", max_tokens=120, activation_reads=[
        activation_read("blocks.1.hook_resid_post")]),
     Code.INVALID_ARGUMENT, "activation_reads[0].positions"),
]


@pytest.mark.parametrize("what, req, code, field", REFUSALS, ids=[r[0] for r in REFUSALS])
def test_refusals_are_the_same_through_both_doors(tok, what, req, code, field):
    from server.http.bodies import CompletionBody, body_field, field_table
    from server.http.errors import HTTP_STATUS

    core = make_core(tok)

    async def calls(d):
        try:
            await core.admit_generate(convert.generate_request(req))
            raise AssertionError("the core admitted it")
        except Exception as e:  # noqa: BLE001 - the core's refusal, compared below
            err = e
        with pytest.raises(grpc.aio.AioRpcError) as ei:
            [m async for m in d.stub.Generate(req)]
        body = _http_body(req)
        res = await d.http.post("/v1/completions", json={**body, "stream": False})
        return err, ei.value, res, body

    err, g, res, body = run(core, calls)
    assert (code_of(err), field_of(err)) == (code, field)
    assert "vectors@" not in str(err).split("loaded SAEs:")[-1]
    assert g.code().name == code.value and g.details() == str(err)
    param = body_field(field, field_table(CompletionBody.model_validate(body)))
    assert res.status_code == HTTP_STATUS[code][0]
    e = res.json()["error"]
    assert (e["code"], e["param"]) == (code.value.lower(), param)
    assert e["message"] == f"{param}: {err.description}"


def test_encode_refuses_a_bank_as_generate_does(tok):
    core = make_core(tok)

    async def calls(d):
        req = pb.EncodeRequest(inputs=[pb.Prompt(text="the sea")],
                               reads=[pb.FeatureRead(sae="vectors@L0", top_k=1)])
        with pytest.raises(grpc.aio.AioRpcError) as ei:
            await d.stub.Encode(req)
        try:
            await core.encode(EncodeRequest((Prompt(text="the sea"),),
                                            convert.encode_request(req).reads))
        except Exception as e:  # noqa: BLE001
            return ei.value, e
        raise AssertionError("the core encoded a bank")

    g, err = run(core, calls)
    assert code_of(err) == Code.NOT_FOUND and field_of(err) == "reads[0].sae"
    assert g.code() == grpc.StatusCode.NOT_FOUND and g.details() == str(err)
    gen = asyncio.run(_refusal(core, GenerateRequest(Prompt(text="x"), reads=convert.encode_request(
        pb.EncodeRequest(reads=[pb.FeatureRead(sae="vectors@L0", top_k=1)])).reads)))
    assert str(gen) == str(err)


async def _refusal(core, req):
    try:
        await core.admit_generate(req)
    except Exception as e:  # noqa: BLE001
        return e
    raise AssertionError("admitted")


def test_metrics_count_both_doors_alike(tok):
    core = make_core(tok)

    async def calls(d):
        await d.stub.ListSAEs(pb.ListSAEsRequest())
        await d.http.get("/v1/saes")
        [m async for m in d.stub.Generate(GENERATIONS["plain"])]
        await d.http.post("/v1/completions", json={**_http_body(GENERATIONS["plain"]), "stream": False})
        bad = REFUSALS[0][1]
        with pytest.raises(grpc.aio.AioRpcError):
            [m async for m in d.stub.Generate(bad)]
        await d.http.post("/v1/completions", json=_http_body(bad))
        with pytest.raises(grpc.aio.AioRpcError):
            await d.stub.GetFeature(pb.GetFeatureRequest(sae=SAE, index=99999))
        await d.http.get(f"/v1/features/{SAE}/99999")

    run(core, calls)
    counts = {}
    for metric in core.metrics.registry.collect():
        if metric.name == "steerd_requests":
            for s in metric.samples:
                if s.name.endswith("_total"):
                    counts[(s.labels["method"], s.labels["code"], s.labels["door"])] = s.value
    by_door = {door: {(m, c): v for (m, c, dr), v in counts.items() if dr == door}
               for door in ("grpc", "http")}
    assert by_door["grpc"] == by_door["http"] == {
        ("ListSAEs", "OK"): 1, ("Generate", "OK"): 1, ("Generate", "NOT_FOUND"): 1,
        ("GetFeature", "INVALID_ARGUMENT"): 1}
