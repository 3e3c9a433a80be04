"""Steering vectors loaded at run time (``LoadVector`` / ``UnloadVector``) on the shared
server (tests/e2e/conftest.py: ``--runtime-vectors 1,2 --max-runtime-vectors 3
--admin-tokens-file``): a loaded vector's tokens teacher-forced against HF ``transformers``
with the vector added by a forward hook after each block (as tests/e2e/test_vectors.py does
for startup vectors), a self-describing GGUF, loads and an unload while a request streams
(its tokens equal the same request run alone), the admin check, the errors, HTTP and CLI.

Every test unloads what it loaded (``loaded``), so the server's vector list is as the other
files expect it.
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import threading
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest
import torch

from clients.client import vector
from sae_runtime.loading.vectors import read_vector_metadata, write_vector_gguf
from tests.e2e.conftest import ADMIN_TOKEN, MAX_RUNTIME_VECTORS
from tests.e2e.reference import check_teacher_forced
from tests.e2e.steering_ref import PROMPT, N, P, S, greedy, hf_inline
from tests.fixtures.tiny import HIDDEN
from tests.vector_files import random_directions

pytestmark = pytest.mark.e2e

def check_against_hf(hf, out, dirs: dict[int, np.ndarray], strength: float):
    full = PROMPT + out.token_ids
    logits = hf_inline(hf, full, [(torch.from_numpy(v), k, strength, None)
                                  for k, v in dirs.items()])
    check_teacher_forced(logits, P, out.token_ids)


def test_a_loaded_vector_steers_as_adding_it_in_hf(server, hf, admin):
    dirs = random_directions((1, 2), HIDDEN, 21)
    info = admin.load_vector("rt", dirs, metadata={"method": "test"})
    assert (list(info.layers), info.runtime, dict(info.metadata)) == ([1, 2], True,
                                                                      {"method": "test"})
    listed = {v.name: (list(v.layers), v.runtime) for v in admin.model_info().vectors}
    assert listed == {"happy": ([1, 2], False), "calm": ([0], False), "rt": ([1, 2], True)}
    out = greedy(server, [vector("rt", S)])
    check_against_hf(hf, out, dirs, S)
    assert out.token_ids != greedy(server).token_ids, "the loaded vector had no effect"
    sub = greedy(server, [vector("rt", -S, (2,))])
    check_against_hf(hf, sub, {2: dirs[2]}, -S)
    info = admin.model_info()
    assert list(info.runtime_vector_layers) == [1, 2]
    assert info.max_runtime_vectors == MAX_RUNTIME_VECTORS


def test_a_self_describing_gguf_loads_and_another_models_is_refused(server, hf, admin, tmp_path):
    dirs = random_directions((2,), HIDDEN, 22)
    mine = write_vector_gguf(tmp_path / "mine.gguf", dirs, model_id=str(server.model_dir),
                             hidden_size=HIDDEN, method="mean_diff")
    info = admin.load_vector("from_file", file=str(mine))
    meta = dict(info.metadata)
    assert list(info.layers) == [2] and meta["method"] == "mean_diff"
    assert meta["hook_names"] == "blocks.2.hook_resid_post"
    check_against_hf(hf, greedy(server, [vector("from_file", S)]), dirs, S)
    other = write_vector_gguf(tmp_path / "other.gguf", dirs, model_id="meta-llama/Llama-3.1-8B",
                              hidden_size=HIDDEN)
    with pytest.raises(grpc.RpcError) as ei:
        admin.load_vector("other", file=str(other))
    assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    d = ei.value.details()
    assert d.startswith("file: ") and "meta-llama/Llama-3.1-8B" in d and "tiny-llama" in d


def test_loads_and_an_unload_while_a_request_streams_leave_its_tokens(server, admin):
    """The running request steers with ``x``; meanwhile ``y`` is loaded, ``x`` unloaded and
    ``z`` loaded. Were ``x``'s row freed at the unload, ``z`` would take it (the lowest free
    row) and change the running request's later tokens."""
    long_prompt = [(7 * j + 3) % 500 + 3 for j in range(12)]
    n = 150
    x = random_directions((1,), HIDDEN, 31)
    admin.load_vector("x", x)
    alone = greedy(server, [vector("x", S)], prompt=long_prompt, n=n).token_ids
    got: list[int] = []
    started, done = threading.Event(), threading.Event()

    def run():
        with server.client() as c:
            for msg in c.generate(long_prompt, max_tokens=n, temperature=0.0, ignore_eos=True,
                                  vectors=[vector("x", S)]):
                got.extend(msg.token_ids)
                if len(got) >= 3:
                    started.set()
        done.set()

    t = threading.Thread(target=run)
    t.start()
    assert started.wait(120)
    admin.load_vector("y", random_directions((1,), HIDDEN, 32))
    admin.unload_vector("x")
    with pytest.raises(grpc.RpcError) as ei:  # new requests no longer see x
        greedy(server, [vector("x", S)], n=1)
    assert ei.value.details().startswith("vectors[0].name: unknown steering vector 'x'")
    admin.load_vector("z", random_directions((1,), HIDDEN, 33, scale=3.0))
    still_running = not done.is_set()
    t.join(300)
    assert still_running, "the request ended before the loads: the test proves nothing"
    assert got == alone
    # x's row is free again now: three vectors fit at block 1 (y, z and one more)
    admin.load_vector("w", random_directions((1,), HIDDEN, 34))
    assert {v.name for v in admin.list_vectors() if v.runtime} == {"y", "z", "w"}


def test_admin_calls_need_the_admin_token(server):
    with server.client() as c:  # no token (the server's ordinary auth is off)
        with pytest.raises(grpc.RpcError) as ei:
            c.load_vector("nope", {1: [0.0] * HIDDEN})
        assert ei.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert c.list_vectors()  # listing is no admin call
    with server.client(admin_token="wrong") as c:
        with pytest.raises(grpc.RpcError) as ei:
            c.unload_vector("happy")
        assert ei.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "nope" not in {v.name for v in c.list_vectors()}


def test_load_errors(server, admin):
    ok = [0.1] * HIDDEN
    cases = [
        (lambda: admin.load_vector("happy", {1: ok}), grpc.StatusCode.INVALID_ARGUMENT,
         "name: 'happy' is a startup vector"),
        (lambda: admin.load_vector("e", {1: [0.1] * 7}), grpc.StatusCode.INVALID_ARGUMENT,
         f"layers[0].values: 7 values; the model's hidden size is {HIDDEN}"),
        (lambda: admin.load_vector("e", {0: ok}), grpc.StatusCode.INVALID_ARGUMENT,
         "layers[0].layer: block 0 takes no runtime vectors"),
        (lambda: admin.load_vector("e", {9: ok}), grpc.StatusCode.INVALID_ARGUMENT,
         "layers[0].layer: block 9; the model has blocks 0..2"),
        (lambda: admin.load_vector("e", file=b"not a gguf", file_format="gguf"),
         grpc.StatusCode.INVALID_ARGUMENT, "file: "),
        (lambda: admin.unload_vector("e"), grpc.StatusCode.NOT_FOUND,
         "name: no runtime vector named 'e'"),
    ]
    for call, code, want in cases:
        with pytest.raises(grpc.RpcError) as ei:
            call()
        assert ei.value.code() == code, want
        assert ei.value.details().startswith(want), ei.value.details()
    for i in range(MAX_RUNTIME_VECTORS):
        admin.load_vector(f"full{i}", {2: ok})
    with pytest.raises(grpc.RpcError) as ei:
        admin.load_vector("one_more", {1: ok, 2: ok})
    assert ei.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert ei.value.details().startswith("layers[1].layer: all 3 runtime vector rows of block 2")
    admin.load_vector("one_more", {1: ok})  # the refused load took no row at block 1
    assert admin.health() == "SERVING"


def test_http_admin_routes_and_the_cli(server, admin):
    dirs = random_directions((1,), HIDDEN, 41)
    h_admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    with httpx.Client(timeout=120) as h:
        body = {"name": "web", "layers": [{"layer": 1, "values": dirs[1].tolist()}],
                "metadata": {"by": "http"}}
        r = h.post(server.http_url + "/admin/vectors", json=body)
        assert r.status_code == 401, r.text
        r = h.post(server.http_url + "/admin/vectors", json=body, headers=h_admin)
        assert r.status_code == 200, r.text
        assert r.json() == {"name": "web", "layers": [1], "runtime": True,
                            "metadata": {"by": "http"}}
        r = h.post(server.http_url + "/admin/vectors", headers=h_admin, json={
            "name": "web2", "file": base64.b64encode(b"junk").decode(), "file_format": "gguf"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "file", r.text
        model = h.get(server.http_url + "/models").json()["data"][0]["id"]
        r = h.post(server.http_url + "/completions", json={
            "model": model, "prompt": PROMPT, "max_tokens": N, "temperature": 0,
            "ignore_eos": True, "return_token_ids": True,
            "vectors": [{"name": "web", "strength": S}]})
        assert r.status_code == 200, r.text
        web_tokens = greedy(server, [vector("web", S)]).token_ids
        assert r.json()["choices"][0]["token_ids"] == web_tokens
        assert web_tokens != greedy(server).token_ids
        names = {v["name"] for v in h.get(server.http_url + "/vectors").json()["data"]}
        assert "web" in names
        r = h.delete(server.http_url + "/admin/vectors/web", headers=h_admin)
        assert r.status_code == 200, r.text
    exe = str(Path(sys.executable).with_name("steer"))
    values = server.log.parent / "cli_values.json"
    values.write_text(json.dumps({"vectors": {"1": dirs[1].tolist()}}))

    def steer(*args):
        run = subprocess.run([exe, "--target", server.target, "--admin-token", ADMIN_TOKEN,
                              "vectors", *args], capture_output=True, text=True, timeout=120)
        assert run.returncode == 0, run.stderr
        return json.loads(run.stdout)

    assert steer("load", "cli", "--values-json", str(values), "--metadata", "k=v") == {
        "name": "cli", "layers": [1], "runtime": True, "metadata": {"k": "v"}}
    assert "cli" in {v["name"] for v in steer("list")}
    assert greedy(server, [vector("cli", S)]).token_ids == web_tokens  # the same values
    saved = server.log.parent / "cli_saved.gguf"
    run = subprocess.run([exe, "--target", server.target, "vectors", "save", "cli", str(saved)],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    meta = read_vector_metadata(saved)
    assert (meta["model_id"], meta["hidden_size"]) == (str(server.model_dir), str(HIDDEN))
    assert steer("load", "cli_file", "--file", str(saved))["layers"] == [1]
    assert greedy(server, [vector("cli_file", S)]).token_ids == web_tokens
    assert steer("unload", "cli")["name"] == "cli"
    assert "cli" not in {v["name"] for v in steer("list")}
