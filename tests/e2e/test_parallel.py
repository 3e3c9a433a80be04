"""Tensor and pipeline parallel on vLLM's own mp executor (CPU, one core per rank).

One real steerd per layout (TP=2, PP=2) on the family Llama with SAEs at every site
(resid_post, attn_out, mlp_out and the head-sharded attn.hook_z), checked against the
independent HF + sae-lens reference exactly like the single-rank family tests, plus plain
requests against plain vLLM at the same parallelism, and a steering vector loaded at run
time (``--runtime-vectors 1``: written on every rank, or on the stage holding block 1).
Under TP=2 the engine also serves a cross-layer transcoder over blocks 0..2 (``clt``, written
with circuit-tracer's own classes; PP refuses CLTs at startup), checked against
circuit-tracer's intervention and encode on HF.
Every layout also declares raw activation sites (``ACT_HOOKS``, ``--activation-hooks``) on
both PP stages, the head-sharded ``attn.hook_z`` (gathered over the TP group) among them,
checked against plain forward hooks on the HF model (``HFReference.hidden``). The family
model's pre-MLP norm weights are not ones (tests/fixtures/tiny.py), so ``ln2.hook_normalized``
(read at the MLP input and divided by that weight) is checked with a real division.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from clients.client import activation_read, clamp, collect, read, vector
from sae_runtime.labels.hf_sites import site_activations
from tests import clt_refs
from tests.e2e.conftest import (
    ADMIN_TOKEN,
    MAX_BATCHED_TOKENS,
    MAX_MODEL_LEN,
    free_port,
    start_server,
    stop_server,
)
from tests.e2e.reference import CLAMP, Edit, HFReference, check_teacher_forced
from tests.e2e.steering_ref import hf_inline
from tests.fixtures.tiny import FAMILY_SAES, LAYERS, make_clt, make_family_set
from tests.vector_files import random_directions

pytestmark = pytest.mark.e2e
PROMPTS = [[5, 100, 200, 300, 45, 67, 12, 400], [7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17] * 7]
SITES = tuple(FAMILY_SAES)
LAYOUTS = {"tp2": ("--tensor-parallel-size", "2"), "pp2": ("--pipeline-parallel-size", "2"),
           "dp2": ("--data-parallel-size", "2"),
           "ray_tp2": ("--tensor-parallel-size", "2", "--distributed-executor-backend", "ray")}
# In `make test`: TP=2 and PP=2. DP=2 and Ray (an engine start each, Ray a large optional
# dependency) run in `make test-parallel-extra`.
EXTRA = {"dp2", "ray_tp2"}
PARAMS = [pytest.param(k, marks=pytest.mark.parallel_extra) if k in EXTRA else k for k in LAYOUTS]
CLT = "clt"
CLT_LAYOUTS = {"tp2", "ray_tp2"}  # the layouts that also serve the CLT (PP refuses it)
# Raw activation sites of every layout (--activation-hooks). The 3 blocks split [0, 1] | [2]
# under PP=2 (resid_pre of 2 is block 1's output: stage 0); z is head-sharded under TP=2.
ACT_HOOKS = ("blocks.*.hook_resid_post,blocks.0.attn.hook_z,blocks.2.attn.hook_z,"
             "blocks.2.hook_resid_pre,blocks.1.hook_attn_out,blocks.0.hook_mlp_out,"
             "blocks.1.ln2.hook_normalized")
HOOKS = [*(f"blocks.{L}.hook_resid_post" for L in range(LAYERS)), "blocks.0.attn.hook_z",
         "blocks.2.attn.hook_z", "blocks.2.hook_resid_pre", "blocks.1.hook_attn_out",
         "blocks.0.hook_mlp_out", "blocks.1.ln2.hook_normalized"]
Z = ["blocks.0.attn.hook_z", "blocks.2.attn.hook_z"]
ACT_TOL = 1e-4  # fp32, as tests/e2e/test_activations.py


@pytest.fixture(scope="module")
def family_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("parallel")
    model = make_family_set(root, "llama")
    make_clt(root / "clt", model)
    return root, model


@pytest.fixture(scope="module", params=PARAMS)
def layout(request, family_root, tmp_path_factory):
    root, model = family_root
    sae_dirs = {name: root / "saes" / name for name in SITES}
    served = {**sae_dirs, CLT: root / "clt"} if request.param in CLT_LAYOUTS else sae_dirs
    log_dir = tmp_path_factory.mktemp(request.param)
    if request.param == "ray_tp2" and not _ray_supported():
        pytest.skip("vLLM 0.32's CPU platform has no Ray executor (ray_device_key is empty); "
                    "steerd refuses ray there (test_startup.py), this layout runs on GPUs")
    admin = log_dir / "admin-tokens"
    admin.write_text(ADMIN_TOKEN + "\n")
    with ray_head(log_dir) if request.param == "ray_tp2" else contextlib.nullcontext():
        srv = start_server(model, served, log_dir, *LAYOUTS[request.param],
                           "--runtime-vectors", "1", "--admin-tokens-file", str(admin),
                           "--activation-hooks", ACT_HOOKS,
                           "--max-activation-reads", str(len(HOOKS)))  # one request reads all
        ref = HFReference(model, sae_dirs, SITES)
        yield request.param, srv, ref
        stop_server(srv)


def _ray_supported() -> bool:
    r = subprocess.run([sys.executable, "-c", "from sae_runtime.vllm.engine import ray_supported;"
                        "print(ray_supported())"], capture_output=True, text=True, timeout=300)
    return r.stdout.strip().endswith("True")


@contextlib.contextmanager
def ray_head(log_dir):
    """A local Ray head on loopback only; steerd (vLLM's Ray executor) attaches to it."""
    ray = str(Path(sys.executable).with_name("ray"))
    port = free_port()
    env_add = {"RAY_ADDRESS": f"127.0.0.1:{port}", "VLLM_HOST_IP": "127.0.0.1",
               "RAY_USAGE_STATS_ENABLED": "0"}
    subprocess.run([ray, "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(port),
                    "--num-cpus", str(len(os.sched_getaffinity(0))), "--include-dashboard=false",
                    "--disable-usage-stats", "--temp-dir", str(log_dir / "ray")],
                   check=True, capture_output=True, timeout=180, env={**os.environ, **env_add})
    old = {k: os.environ.get(k) for k in env_add}
    os.environ.update(env_add)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        subprocess.run([ray, "stop", "--force"], capture_output=True, timeout=120)


def plain_vllm_tokens(model, kind: str, prompts, n: int) -> list[list[int]]:
    # DP replicas are single-rank engines: their plain baseline is plain vLLM at TP=1.
    tp, pp = {"tp2": (2, 1), "ray_tp2": (2, 1), "pp2": (1, 2), "dp2": (1, 1)}[kind]
    env = dict(os.environ)
    env.pop("VLLM_CPU_OMP_THREADS_BIND", None)
    r = subprocess.run(
        [sys.executable, "-m", "tests.e2e.plain_vllm", str(model), "--tp", str(tp), "--pp", str(pp),
         "--prompts", json.dumps(prompts), "--max-tokens", str(n), "--max-model-len",
         str(MAX_MODEL_LEN), "--max-num-batched-tokens", str(MAX_BATCHED_TOKENS)],
        capture_output=True, text=True, timeout=600, env=env)
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("TOKENS ")]
    assert r.returncode == 0 and lines, f"plain vLLM failed:\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}"
    return json.loads(lines[-1].removeprefix("TOKENS "))


def test_startup_reports_every_rank(layout):
    kind, srv, _ = layout
    log = srv.log.read_text()
    # Each SAE: on both TP ranks (tp2), or on the one stage that holds its block (pp2).
    installed = [ln for ln in log.splitlines() if " installed on " in ln and "vectors@" not in ln]
    assert len(installed) == len(SITES) + (kind in CLT_LAYOUTS), log[-3000:]
    # every DP replica reports too: 2 ranks per SAE under dp2, like under tp2
    want = "installed on 1 rank(s)" if kind == "pp2" else "installed on 2 rank(s)"
    assert all(want in ln for ln in installed), installed
    if kind == "pp2":  # both stages hold hooks: blocks 0..2 split over two stages
        stages = {ln.split("dp/pp/tp: ")[1].split("/")[1] for ln in installed}
        assert stages == {"0", "1"}, installed
    with srv.client() as c:
        info = c.model_info()
    assert (info.tensor_parallel_size, info.pipeline_parallel_size, info.data_parallel_size) == {
        "tp2": (2, 1, 1), "ray_tp2": (2, 1, 1), "pp2": (1, 2, 1), "dp2": (1, 1, 2)}[kind]
    if kind == "ray_tp2":
        assert info.distributed_executor_backend == "ray"


@pytest.mark.parametrize("site", SITES)
def test_steering_at_site_matches_reference(layout, site):
    _, srv, ref = layout
    prompt = PROMPTS[0]
    feature = int(ref.latents(prompt, site).sum(0).argmax())
    value = 10.0 * float(ref.activation(prompt, site).norm(dim=-1).mean())
    with srv.client() as c:
        out = c.generate_text(prompt, max_tokens=10, temperature=0.0, ignore_eos=True,
                              interventions=[clamp(site, feature, value)])
    edits = [Edit(site, feature, CLAMP, value)]
    steered = ref.logits(prompt + out.token_ids, edits, len(prompt))
    check_teacher_forced(steered, len(prompt), out.token_ids)
    moved = float((steered - ref.logits(prompt + out.token_ids, [], len(prompt))).abs().max())
    assert moved > 1.0, f"clamping at {site} had no effect ({moved})"


def test_reads_at_every_site_arrive_once_and_match_reference(layout):
    _, srv, ref = layout
    prompt = PROMPTS[1]  # 77 tokens: chunked over two steps (64-token budget)
    with srv.client() as c:
        out = c.generate_text(prompt, max_tokens=4, temperature=0.0, ignore_eos=True,
                              reads=[read(site, top_k=5, watch=[3]) for site in SITES])
    full = prompt + out.token_ids
    # one FeatureActivations per (position, SAE): never duplicated, in position order
    seen = [(f.position, f.sae) for f in out.features]
    assert len(seen) == len(set(seen)) == (len(full) - 1) * len(SITES)
    assert [p for p, _ in seen] == sorted(p for p, _ in seen)
    for site in SITES:
        dense = ref.latents(full, site)
        for f in (f for f in out.features if f.sae == site):
            want = dense[f.position].topk(5).values
            assert list(f.values) == pytest.approx(want.tolist(), abs=1e-4), (site, f.position)
            assert list(f.watch_values) == pytest.approx([float(dense[f.position, 3])], abs=1e-4)


def test_plain_requests_equal_plain_vllm_and_steering_is_per_request(layout, family_root):
    kind, srv, ref = layout
    _, model = family_root
    n = 12
    site = "z"  # the sharded site: a steered neighbour in the same batch must not leak
    feature = int(ref.latents(PROMPTS[0], site).sum(0).argmax())
    value = 10.0 * float(ref.activation(PROMPTS[0], site).norm(dim=-1).mean())

    def gen(prompt, ivs):
        with srv.client() as c:
            return c.generate_text(prompt, max_tokens=n, temperature=0.0, ignore_eos=True,
                                   interventions=ivs).token_ids

    with cf.ThreadPoolExecutor(4) as ex:
        futs = [ex.submit(gen, p, []) for p in PROMPTS] + \
               [ex.submit(gen, p, [clamp(site, feature, value)]) for p in PROMPTS]
        plain = [f.result() for f in futs[:2]]
        steered = [f.result() for f in futs[2:]]
    assert plain == plain_vllm_tokens(model, kind, PROMPTS, n)
    for p, toks in zip(PROMPTS, steered, strict=True):
        check_teacher_forced(ref.logits(p + toks, [Edit(site, feature, CLAMP, value)], len(p)),
                             len(p), toks)


def test_a_vector_loaded_at_run_time_steers_on_every_rank(layout):
    """LoadVector writes the row on every worker (both TP ranks; under PP the stage that
    holds block 1) before it returns; the tokens match HF with the vector added after
    block 1 by a forward hook."""
    _, srv, ref = layout
    dirs = random_directions((1,), ref.model.config.hidden_size, 51)
    prompt = PROMPTS[0]
    with srv.client(admin_token=ADMIN_TOKEN) as c:
        c.load_vector("rt", dirs)
        try:
            out = c.generate_text(prompt, max_tokens=10, temperature=0.0, ignore_eos=True,
                                  vectors=[vector("rt", 4.0)])
        finally:
            c.unload_vector("rt")
    full = prompt + out.token_ids
    steered = hf_inline(ref.model, full, [(torch.from_numpy(dirs[1]), 1, 4.0, None)])
    check_teacher_forced(steered, len(prompt), out.token_ids)
    moved = float((steered - hf_inline(ref.model, full, [])).abs().max())
    assert moved > 1.0, f"the vector had no effect ({moved})"


@torch.no_grad()
def test_a_clt_under_tensor_parallel_is_circuit_tracers_intervention_and_encode(layout, family_root):
    """Both TP ranks hold the CLT and add the same edit to the all-reduced MLP outputs: a
    clamp of a layer-0 feature is teacher-forced equal to circuit-tracer's intervention on
    HF (it writes blocks 0, 1 and 2), and reads (TP rank 0 alone publishes) arrive once per
    position and equal circuit-tracer's ``encode``, flat ``slot * F + j``."""
    kind, srv, ref = layout
    if kind not in CLT_LAYOUTS:
        pytest.skip("the CLT is served in the TP layouts only (PP refuses it at startup: "
                    "test_clt_serving.py)")
    root, _ = family_root
    ct = clt_refs.ct_load_clt(root / "clt")
    F = ct.W_enc[0].shape[0]
    prompt = PROMPTS[0]
    ids = torch.tensor(prompt)
    xs = torch.stack([site_activations(ref.model, ids[None], s, "mlp_in")[0]
                      for s in range(LAYERS)])
    acts0 = ct.encode(xs)[0]  # [T, F] at layer 0
    j = int(acts0.sum(0).argmax())
    value = 5.0 * float(acts0[:, j].max())
    watch = [j, F + 3, 2 * F + 7]
    with srv.client() as c:
        out = c.generate_text(prompt, max_tokens=10, temperature=0.0, ignore_eos=True,
                              interventions=[clamp(CLT, j, value)])
        plain = c.generate_text(prompt, max_tokens=6, temperature=0.0, ignore_eos=True,
                                reads=[read(CLT, top_k=5, watch=watch)])
    full = torch.tensor(prompt + out.token_ids)
    steered = clt_refs.hf_clt_steered_logits(ref.model, full, ct, [(0, j, value)], LAYERS)
    check_teacher_forced(steered, len(prompt), out.token_ids)
    moved = float((steered - ref.logits(prompt + out.token_ids, [], len(prompt))).abs().max())
    assert moved > 1.0, f"the CLT clamp had no effect ({moved})"
    full = torch.tensor(prompt + plain.token_ids)
    xs = torch.stack([site_activations(ref.model, full[None], s, "mlp_in")[0]
                      for s in range(LAYERS)])
    flat = ct.encode(xs).permute(1, 0, 2).reshape(len(full), LAYERS * F)  # [T, L * F]
    seen = [f.position for f in plain.features]
    assert seen == sorted(set(seen)) and len(seen) == len(full) - 1, seen
    for f in plain.features:
        want = flat[f.position]
        assert list(f.values) == pytest.approx(want.topk(5).values.tolist(), abs=1e-4)
        assert all(abs(float(want[i]) - v) <= 1e-4 for i, v in zip(f.indices, f.values, strict=True))
        assert list(f.watch_values) == pytest.approx(want[watch].tolist(), abs=1e-4)


# ----------------------------------------------------------------- raw activation reads


def _close(got: np.ndarray, want: torch.Tensor, what: str) -> None:
    torch.testing.assert_close(torch.from_numpy(np.array(got, dtype=np.float32)),
                               want.to(torch.float32), atol=ACT_TOL, rtol=0, msg=lambda m: f"{what}: {m}")


def _generate(srv, prompt, **kw):
    with srv.client() as c:
        return c.generate_text(prompt, temperature=0.0, ignore_eos=True, **kw)


def _stage_of(log: str, sae: str) -> str:
    (line,) = [ln for ln in log.splitlines() if f"SAE {sae} installed on " in ln]
    return line.split("dp/pp/tp: ")[1].split("/")[1]


def test_model_info_lists_the_declared_activation_sites(layout):
    kind, srv, ref = layout
    with srv.client() as c:
        info = c.model_info()
    assert sorted(info.activation_hooks) == sorted(HOOKS), list(info.activation_hooks)
    assert info.max_activation_reads == len(HOOKS)
    if kind == "pp2":  # blocks 0, 1 on stage 0 and block 2 on stage 1: sites on both stages
        log = srv.log.read_text()
        assert (_stage_of(log, "resid"), _stage_of(log, "z")) == ("0", "1")


def test_activation_reads_per_token_match_hf_on_every_stage(layout):
    """Two prompts in one batch (the 77-token one chunked over two steps), every declared
    site: each fed position once, in order, equal to HF's activations."""
    _, srv, ref = layout
    cfg = ref.model.config
    # the division by the pre-MLP norm's weight is exercised: that weight is not ones
    w = ref.model.model.layers[1].post_attention_layernorm.weight.detach()
    assert float((w - 1).abs().max()) > 0.1
    reads = [activation_read(h) for h in HOOKS]
    with cf.ThreadPoolExecutor(len(PROMPTS)) as ex:
        outs = list(ex.map(lambda p: _generate(srv, p, max_tokens=4, activation_reads=reads),
                           PROMPTS))
    for prompt, out in zip(PROMPTS, outs, strict=True):
        full = prompt + out.token_ids
        want = ref.hidden(full, HOOKS)
        fed = list(range(len(full) - 1))  # the last generated token is never fed
        assert sorted(out.activations) == sorted(HOOKS)
        for h in HOOKS:
            assert out.activation_positions[h] == fed, h
            assert out.activations[h].shape == (len(fed), want[h].shape[-1]), h
            _close(out.activations[h], want[h][:-1], h)
        for h in Z:  # every head, gathered under TP
            assert out.activations[h].shape[1] == cfg.num_attention_heads * cfg.head_dim == 128
        np.testing.assert_array_equal(out.activations["blocks.2.hook_resid_pre"],
                                      out.activations["blocks.1.hook_resid_post"])


def test_z_gathers_the_reading_rows_beside_a_non_reader_and_after_edits(layout):
    """A non-reading request runs first (its rows lead every batch), then three requests that
    read z: plain, with a clamp at block 1's residual SAE (after block 0's z, before block
    2's), and with a clamp at block 2's z SAE itself. Under TP every rank plans the reading
    rows and gathers their heads; each value equals HF's o_proj input with the same edit as
    a forward hook. Each also reads block 2's z before edits (its twin, gathered the same
    way): the z clamp's own edit is left out there, the residual clamp's is kept."""
    _, srv, ref = layout
    prompt = PROMPTS[0]
    edits = {}
    for sid in ("resid", "z"):
        feature = int(ref.latents(prompt, sid).sum(0).argmax())
        value = 10.0 * float(ref.activation(prompt, sid).norm(dim=-1).mean())
        edits[sid] = Edit(sid, feature, CLAMP, value)
    z_reads = [*(activation_read(h) for h in Z), activation_read(Z[1], before_edits=True)]
    with srv.client() as cb:
        stream = cb.generate(PROMPTS[1], max_tokens=48, temperature=0.0, ignore_eos=True)
        first = next(stream)  # the non-reader is running before the readers arrive
        with cf.ThreadPoolExecutor(3) as ex:
            futs = {name: ex.submit(_generate, srv, prompt, max_tokens=6, activation_reads=z_reads,
                                    interventions=[clamp(e.sae, e.feature, e.value)] if e else [])
                    for name, e in (("plain", None), ("resid", edits["resid"]),
                                    ("z", edits["z"]))}
            outs = {k: f.result() for k, f in futs.items()}
        b = collect(itertools.chain([first], stream))
    # the non-reader: no activations, and its tokens are HF's (no leak from the edits)
    assert b.activations == {}
    check_teacher_forced(ref.logits(PROMPTS[1] + b.token_ids, [], len(PROMPTS[1])),
                         len(PROMPTS[1]), b.token_ids)
    for name, out in outs.items():
        full = prompt + out.token_ids
        mine = [edits[name]] if name in edits else []
        want = ref.hidden(full, Z, mine, len(prompt))
        plain = ref.hidden(full, Z)
        for h in Z:
            assert out.activation_positions[h] == list(range(len(full) - 1)), (name, h)
            assert out.activations[h].shape == (len(full) - 1, 128), (name, h)
            _close(out.activations[h], want[h][:-1], f"{name} {h}")
        # block 0 is before either edit; block 2's z is after both
        _close(out.activations[Z[0]], plain[Z[0]][:-1], f"{name} {Z[0]} unedited")
        # before edits at block 2's z: every edit but one there (the z clamp's)
        before = plain if name == "z" else want
        assert out.activation_positions_before[Z[1]] == list(range(len(full) - 1)), name
        _close(out.activations_before[Z[1]], before[Z[1]][:-1], f"{name} {Z[1]} before edits")
        if mine:
            moved = float((want[Z[1]] - plain[Z[1]]).abs().max())
            assert moved > 1e-2, f"the {name} clamp does not reach {Z[1]} ({moved})"


def test_encode_pooled_mean_matches_hf(layout):
    _, srv, ref = layout
    with srv.client() as c:
        res = c.encode_activations(PROMPTS, [activation_read(h, pool="mean") for h in HOOKS])
    for prompt, r in zip(PROMPTS, res, strict=True):
        assert r.token_ids == prompt
        want = ref.hidden(prompt, HOOKS)
        for h in HOOKS:
            assert r.positions[h] == list(range(len(prompt))), h
            assert r.activations[h].shape == (1, want[h].shape[-1]), h
            _close(r.activations[h], want[h].mean(0, keepdim=True), h)
