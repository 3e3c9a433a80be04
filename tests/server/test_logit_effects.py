"""GetFeature / SearchFeatures over a real in-process gRPC server, with a stand-in engine.

The engine is a stand-in (the core reads only its model config, tokenizer and the worker
config it was started with); the weights are the tiny model's and SAEs' real files. Logit
effects are checked against the HF model's own ``lm_head`` and final norm applied to the
decoder row read straight from the SAE's safetensors.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import grpc
import pytest
import torch

from sae_runtime.labels import store as feats
from sae_runtime.loading import load_sae_config
from server.core.service import Core
from server.core.validate import Limits
from server.grpc.servicer import SteeringServicer
from steering.v1 import steering_pb2 as pb
from steering.v1 import steering_pb2_grpc as pb_grpc
from tests.fixtures.tiny import MODEL_DIR, corpus
from tests.server.engines import FakeEngine


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def write_z_sae(out: Path) -> Path:
    from safetensors.torch import save_file

    w = torch.randn(16, 128)
    out.mkdir(parents=True, exist_ok=True)
    save_file({"W_enc": w.t().contiguous(), "W_dec": w, "b_enc": torch.zeros(16), "b_dec": torch.zeros(128)},
              str(out / "sae_weights.safetensors"))
    (out / "cfg.json").write_text(json.dumps({
        "d_in": 128, "d_sae": 16, "architecture": "standard", "apply_b_dec_to_input": False,
        "normalize_activations": "none", "metadata": {"hook_name": "blocks.1.attn.hook_z"}}))
    return out


async def _call(servicer, fn):
    server = grpc.aio.server()
    pb_grpc.add_SteeringServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            return await fn(pb_grpc.SteeringServiceStub(ch))
    finally:
        await server.stop(None)


def _servicer(tiny_dir: Path, saes: dict[str, Path], labels=None) -> SteeringServicer:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_dir / MODEL_DIR)
    return SteeringServicer(Core(
        FakeEngine(tok, max_model_len=512, saes=saes), model=str(tiny_dir / MODEL_DIR),
        saes={k: load_sae_config(p) for k, p in saes.items()},
        limits=Limits(max_interventions=8, vocab_size=512), compiled=False, labels=labels))


def _hf_reference(tiny_dir: Path, sae_dir: Path, index: int, k: int = 10):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_dir / MODEL_DIR, dtype=torch.float32).eval()
    w_dec = load_file(str(sae_dir / "sae_weights.safetensors"))["W_dec"]
    with torch.no_grad():
        logits = model.lm_head(model.model.norm.weight * w_dec[index])
    return logits.topk(k), logits.topk(k, largest=False)


def test_get_feature_of_an_unlabelled_sae_returns_its_logit_effects(tiny_dir, tmp_path):
    saes = {"resid_l1": tiny_dir / "saes" / "resid_l1", "z": write_z_sae(tmp_path / "z")}
    s = _servicer(tiny_dir, saes)  # no labels file anywhere

    async def calls(stub):
        out = {"f7": await stub.GetFeature(pb.GetFeatureRequest(sae="resid_l1", index=7)),
               "f7again": await stub.GetFeature(pb.GetFeatureRequest(sae="resid_l1", index=7)),
               "z": await stub.GetFeature(pb.GetFeatureRequest(sae="z", index=3))}
        for name, req in (("unknown", pb.GetFeatureRequest(sae="nope", index=1)),
                          ("range", pb.GetFeatureRequest(sae="resid_l1", index=256))):
            try:
                await stub.GetFeature(req)
            except grpc.aio.AioRpcError as e:
                out[name] = (e.code(), e.details())
        try:
            await stub.SearchFeatures(pb.SearchFeaturesRequest(query="ocean"))
        except grpc.aio.AioRpcError as e:
            out["search"] = (e.code(), e.details())
        return out

    got = asyncio.run(_call(s, calls))
    hi, lo = _hf_reference(tiny_dir, saes["resid_l1"], 7)
    f = got["f7"]
    assert (f.sae, f.index, f.label, f.logit_effects_unavailable) == ("resid_l1", 7, "", "")
    assert [t.token_id for t in f.promoted][:3] == hi.indices.tolist()[:3]
    assert [t.logit for t in f.promoted] == pytest.approx(hi.values.tolist(), rel=1e-4, abs=1e-4)
    assert [t.logit for t in f.suppressed] == pytest.approx(lo.values.tolist(), rel=1e-4, abs=1e-4)
    assert f.promoted[0].token == s.core.tokenizer.decode([hi.indices[0].item()])
    assert got["f7again"] == f
    z = got["z"]
    assert not z.promoted and not z.suppressed and "hook_z" in z.logit_effects_unavailable
    assert got["unknown"][0] == grpc.StatusCode.NOT_FOUND and "unknown SAE 'nope'" in got["unknown"][1]
    assert got["range"][0] == grpc.StatusCode.INVALID_ARGUMENT and "out of range" in got["range"][1]
    # search still needs a labels file
    assert got["search"][0] == grpc.StatusCode.FAILED_PRECONDITION


def test_a_built_labels_file_serves_get_feature_and_search(tiny_dir, tmp_path):
    from sae_runtime.labels.build import BuildConfig, build

    sae_dir = tiny_dir / "saes" / "resid_l1"
    text = tmp_path / "corpus.txt"
    text.write_text("\n".join(corpus(60, seed=9)) + "\n")
    out = build(BuildConfig(model=tiny_dir / MODEL_DIR, sae=sae_dir, corpus=text, tokens=300,
                            context=30, batch=5, out=tmp_path / feats.LABELS_FILE), progress=False)
    doc = json.loads(out.read_text())
    rec = next(r for r in doc["features"] if r["top_tokens"][0].isalpha())
    # a labelled feature without stored logit effects (as an imported label has): the server
    # computes them
    bare = next(r for r in doc["features"] if r["index"] != rec["index"])
    del bare["promoted"], bare["suppressed"]
    out.write_text(json.dumps(doc))
    labels = {"resid_l1": feats.load_beside(tmp_path, "resid_l1", 256)}
    s = _servicer(tiny_dir, {"resid_l1": sae_dir}, labels)

    async def calls(stub):
        return {"f": await stub.GetFeature(pb.GetFeatureRequest(sae="resid_l1", index=rec["index"])),
                "bare": await stub.GetFeature(pb.GetFeatureRequest(sae="resid_l1", index=bare["index"])),
                "search": await stub.SearchFeatures(pb.SearchFeaturesRequest(query=rec["top_tokens"][0],
                                                                             limit=100))}

    got = asyncio.run(_call(s, calls))
    f = got["f"]
    assert f.label == rec["label"] and f.density == pytest.approx(rec["density"])
    assert [t.token for t in f.promoted] == [t["token"] for t in rec["promoted"]]
    assert f.examples[0].token == rec["examples"][0]["token"]
    assert rec["index"] in [x.index for x in got["search"].features]
    hi, _ = _hf_reference(tiny_dir, sae_dir, bare["index"])
    assert got["bare"].label == bare["label"]
    assert [t.token_id for t in got["bare"].promoted][:2] == hi.indices.tolist()[:2]
