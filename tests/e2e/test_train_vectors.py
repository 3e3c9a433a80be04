"""``TrainVector`` on the shared server (tests/e2e/conftest.py: every block's
``hook_resid_post`` declared, ``--runtime-vectors 1,2``, an admin token): the vectors and
statistics against the same math done by hand in torch on HF ``transformers`` activations
(forward hooks on ``model.model.layers[L]``: the output of block L, fp32), PCA against
``repeng.read_representations`` itself, a trained-and-registered vector's steered tokens
teacher-forced against HF with the vector added by a forward hook, the errors, HTTP and the
CLI. Every test unloads what it registered."""

from __future__ import annotations

import json
import subprocess
import sys

import grpc
import httpx
import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from clients.client import trained_json, vector
from sae_runtime.loading.vectors import read_vector_metadata
from tests.e2e.conftest import ADMIN_TOKEN
from tests.e2e.reference import check_teacher_forced
from tests.e2e.steering_ref import PROMPT, P, greedy, hf_inline

pytestmark = pytest.mark.e2e

POS = ["the ocean waves roll over the sand", "a ship sails across the deep sea",
       "salt water and tides at the harbour", "the whale swims under the blue waves",
       "fish and coral live on the reef", "the tide comes in over the beach",
       "sailors watch the storm at sea"]
NEG = ["chop the onions and fry them in butter", "bake the bread for twenty minutes",
       "stir the soup and add some salt", "the chef cooks pasta in a large pot",
       "roast the chicken with garlic and herbs", "whisk the eggs with sugar and flour",
       "simmer the sauce over a low heat"]
LAYERS = (0, 1, 2)
VEC_TOL = 2e-4  # fp32 engine vs fp32 HF, on a mean of activations


@pytest.fixture(scope="module")
def tok(server):
    return AutoTokenizer.from_pretrained(server.model_dir)


def hf_acts(hf, tok, texts, layers, position="last") -> dict[int, torch.Tensor]:
    """``[n, d]`` float64 per layer: each text's block-L output at its last token (or the
    mean over its tokens), captured by a forward hook on ``model.model.layers[L]``."""
    out: dict[int, list] = {k: [] for k in layers}
    got: dict[int, torch.Tensor] = {}
    for text in texts:
        ids = tok(text, return_tensors="pt").input_ids
        hooks = [hf.model.layers[k].register_forward_hook(
            lambda m, a, o, k=k: got.__setitem__(k, (o[0] if isinstance(o, tuple) else o)[0]))
            for k in layers]
        try:
            with torch.no_grad():
                hf(ids)
        finally:
            for h in hooks:
                h.remove()
        for k in layers:
            h = got[k].double()
            out[k].append(h[-1] if position == "last" else h.mean(0))
    return {k: torch.stack(v) for k, v in out.items()}


def ref_stats(v: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor) -> tuple[float, float, float]:
    u = v / v.norm()
    mp, mn = float((pos @ u).mean()), float((neg @ u).mean())
    thr = (mp + mn) / 2
    acc = (int((pos @ u > thr).sum()) + int((neg @ u < thr).sum())) / (len(pos) + len(neg))
    return mp, mn, acc


def check_vec(got, want: torch.Tensor, tol: float = VEC_TOL) -> None:
    torch.testing.assert_close(torch.tensor(list(got), dtype=torch.float64), want, atol=tol,
                               rtol=0)


@pytest.mark.parametrize("position", ["last", "mean"])
def test_mean_diff_equals_the_same_math_on_hf_activations(server, hf, tok, position):
    with server.client() as c:
        r = c.train_vector("md", POS, NEG, LAYERS, position=position)
    assert not r.HasField("vector"), "trained without register: nothing loaded"
    acts = hf_acts(hf, tok, POS + NEG, LAYERS, position)
    for lv, st in zip(r.layers, r.stats, strict=True):
        h = acts[lv.layer]
        pos, neg = h[:len(POS)], h[len(POS):]
        want = pos.mean(0) - neg.mean(0)
        check_vec(lv.values, want)
        mp, mn, acc = ref_stats(want, pos, neg)
        assert (st.mean_positive, st.mean_negative) == pytest.approx((mp, mn), abs=1e-3)
        assert st.accuracy == pytest.approx(acc)
        # held out: every 5th of each side (index 4), the direction refitted on the rest
        keep = [i for i in range(len(POS)) if i != 4]
        w = pos[keep].mean(0) - neg[keep].mean(0)
        u = w / w.norm()
        thr_w = float((pos[keep] @ u).mean() + (neg[keep] @ u).mean()) / 2
        held = (int(pos[4] @ u > thr_w) + int(neg[4] @ u < thr_w)) / 2
        assert (st.held_out, st.held_out_accuracy) == (2, pytest.approx(held))


def test_pca_equals_the_first_component_of_hf_paired_differences(server, hf, tok):
    with server.client() as c:
        r = c.train_vector("pc", POS, NEG, LAYERS, method="pca")
    acts = hf_acts(hf, tok, POS + NEG, LAYERS)
    for lv in r.layers:
        h = acts[lv.layer]
        pos, neg = h[:len(POS)], h[len(POS):]
        d = pos - neg
        d = d - d.mean(0)
        _, vecs = torch.linalg.eigh(d.T @ d)
        top = vecs[:, -1]
        if ((pos @ top > neg @ top).double().mean() < 0.5):
            top = -top
        check_vec(lv.values, top, tol=1e-3)


def test_pca_equals_repengs_reading_vector(server, hf, tok):
    if not hasattr(np, "float_"):  # repeng 0.4 annotates with np.float_, gone in numpy 2
        np.float_ = np.float64
    repeng = pytest.importorskip("repeng")
    if tok.pad_token is None:  # repeng pads its batches; one prompt a batch never pads
        tok.pad_token = tok.eos_token
    layers = [0, 1]  # repeng reads hidden_states[L + 1]; the last one is after the final norm
    dirs = repeng.extract.read_representations(
        hf, tok, [repeng.DatasetEntry(p, n) for p, n in zip(POS, NEG, strict=True)],
        hidden_layers=layers, batch_size=1, method="pca_diff")
    with server.client() as c:
        r = c.train_vector("pc", POS, NEG, layers, method="pca")
    for lv in r.layers:
        check_vec(lv.values, torch.from_numpy(dirs[lv.layer]).double(), tol=1e-3)


def test_a_registered_vector_steers_as_adding_it_in_hf(server, hf, admin):
    r = admin.train_vector("ocean", POS, NEG, (1, 2), normalize=True, register=True,
                           metadata={"demo": "e2e"})
    assert (r.vector.name, list(r.vector.layers), r.vector.runtime) == ("ocean", [1, 2], True)
    assert dict(r.vector.metadata) == {"method": "mean_diff", "position": "last", "demo": "e2e",
                                       "trained_from": "7 positive, 7 negative prompts"}
    s = 6.0
    out = greedy(server, [vector("ocean", s)])
    adds = [(torch.tensor(list(lv.values)), lv.layer, s, None) for lv in r.layers]
    check_teacher_forced(hf_inline(hf, PROMPT + out.token_ids, adds), P, out.token_ids)
    assert out.token_ids != greedy(server).token_ids, "the trained vector had no effect"


def test_errors_name_the_field(server, admin):
    def code(call):
        with pytest.raises(grpc.RpcError) as e:
            call()
        return e.value.code(), e.value.details()

    with server.client() as c:
        assert code(lambda: c.train_vector("x", POS, NEG, [3])) == (
            grpc.StatusCode.INVALID_ARGUMENT, "layers[0]: block 3; the model has blocks 0..2")
        got = code(lambda: c.train_vector("x", POS, NEG[:3], [1], method="pca"))
        assert got[0] == grpc.StatusCode.INVALID_ARGUMENT and got[1].startswith("negative: PCA")
        got = code(lambda: c.train_vector("x", POS, ["", *NEG], [1]))
        assert got[0] == grpc.StatusCode.INVALID_ARGUMENT and got[1].startswith("negative[0]")
        # registering is an admin call: no token is UNAUTHENTICATED
        assert code(lambda: c.train_vector("x", POS, NEG, [1], register=True))[0] == \
            grpc.StatusCode.UNAUTHENTICATED
    got = code(lambda: admin.train_vector("x", POS, NEG, [0, 1], register=True))
    assert got[0] == grpc.StatusCode.INVALID_ARGUMENT
    assert got[1].startswith("layers[0]: block 0 takes no runtime vectors")
    assert "x" not in {v.name for v in admin.list_vectors()}


def test_http_route_and_the_cli(server, admin, tmp_path):
    with server.client() as c:
        want = trained_json(c.train_vector("h", POS, NEG, [1]))
    with httpx.Client(timeout=120) as h:
        got = h.post(server.http_url + "/vectors/train",
                     json={"name": "h", "positive": POS, "negative": NEG, "layers": [1]}).json()
        assert (got["name"], got["vectors"], got["vector"]) == ("h", want["vectors"], None)
        for k, st in want["stats"].items():  # float32 over gRPC, float64 over HTTP
            assert got["stats"][k] == pytest.approx(st, rel=1e-6)
        bad = h.post(server.http_url + "/vectors/train",
                     json={"positive": POS, "negative": NEG, "layers": [1], "method": "svd"})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "method"
        denied = h.post(server.http_url + "/vectors/train", json={
            "name": "h", "positive": POS, "negative": NEG, "layers": [1], "register": True})
        assert denied.status_code == 401
    (tmp_path / "pos.txt").write_text("\n".join(POS) + "\n")
    (tmp_path / "neg.txt").write_text("\n".join(NEG) + "\n")
    exe = [sys.executable, "-m", "clients.cli", "--target", server.target,
           "--admin-token", ADMIN_TOKEN]
    run = subprocess.run([*exe, "vectors", "train", "cli", "--positive", str(tmp_path / "pos.txt"),
                          "--negative", str(tmp_path / "neg.txt"), "--layers", "1",
                          "--register", "--save", str(tmp_path / "cli.gguf"), "--json"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout)
    assert out["vectors"] == want["vectors"] and out["stats"] == want["stats"]
    assert out["vector"]["name"] == "cli" and out["file"] == str(tmp_path / "cli.gguf")
    meta = read_vector_metadata(tmp_path / "cli.gguf")
    assert meta["method"] == "mean_diff"
