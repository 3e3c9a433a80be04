"""A served cross-layer transcoder's tables (``sae_runtime.step.clt_tables``): the carry.

Oracles: circuit-tracer's own ``CrossLayerTranscoder`` (its ``encode_layer`` and
``_get_decoder_vectors``, the intervention of ``tests.clt_refs.hf_clt_steered_logits``) in
a Hugging Face forward of the tiny Llama, against the same forward with our tables planned
by the step planner and called as the worker calls them (stash at every MLP input, hook at
every MLP output); and the pure ``clt.edit_delta`` (proved equal to circuit-tracer in
``test_clt.py``) for batches with plain rows and padding.
"""

from __future__ import annotations

from contextlib import ExitStack

import pytest
import torch

from sae_runtime import ops
from sae_runtime.errors import SAEFormatError
from sae_runtime.labels.hf_sites import edit_site
from sae_runtime.loading import clt_hook_config, load_clt, load_hook_config
from sae_runtime.saes import clt as clt_math
from sae_runtime.spec.interventions import Scope
from sae_runtime.spec.payloads import EditPayload, ReadPayload, RequestPayload
from sae_runtime.step.clt_tables import CLTHookTables
from sae_runtime.step.planner import (
    ScheduledRequest,
    StepDescription,
    collect_reads,
    compile_request,
    plan_step,
)
from tests import clt_refs
from tests.fixtures.tiny import LAYERS, make_clt, make_model

F = 64


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("clt_serving") / "tiny-llama"
    make_model(d)
    return d


@pytest.fixture(scope="module")
def hf_model(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def folder(model_dir, tmp_path_factory):
    return make_clt(tmp_path_factory.mktemp("clt") / "clt", model_dir)


def _tables(clt, max_tokens=64):
    return CLTHookTables(clt, max_tokens, max_slots=4, max_feats=4, max_watch=4)


def _plan(tables, requests):
    """``requests``: (rows a, b, payload, prompt_len); plans one step (hook id 0)."""
    tables.clear()
    return plan_step([tables], StepDescription([
        ScheduledRequest(f"r{i}", a, b, 0, compile_request(p, n))
        for i, (a, b, p, n) in enumerate(requests)]))


@torch.no_grad()
def _served_logits(model, ids, tables):
    """The tables called as the worker calls them, in a Hugging Face forward."""
    with ExitStack() as stack:
        for s in range(tables.n_slots_clt):
            stack.enter_context(edit_site(model, s, "mlp_in",
                                          lambda x, s=s: tables.stash_slot(x[0], s)[None]))
            stack.enter_context(edit_site(model, s, "mlp_out",
                                          lambda y, s=s: tables.apply_slot(y[0], s)[None]))
        return model(ids[None]).logits[0]


@torch.no_grad()
def _ct_logits(model, ids, ct, edits, from_pos):
    """circuit-tracer's intervention (``clt_refs.hf_clt_steered_logits``) with each clamp
    applied from its own first position on: ``edits`` = (slot, feature, value, first)."""
    T, d = ids.shape[0], model.config.hidden_size
    deltas = torch.zeros(LAYERS, T, d)
    with ExitStack() as stack:
        for s in range(LAYERS):
            mine = [(f, v, p) for lay, f, v, p in edits if lay == s]

            def grab(x, s=s, mine=mine):
                acts = ct.encode_layer(x[0], s)
                for f, v, p in mine:
                    delta = (v - acts[:, f]) * (torch.arange(T) >= p)
                    dec = ct._get_decoder_vectors(s, torch.tensor([f]))[0]
                    deltas[s:] += dec[:, None, :] * delta[None, :, None]
                return x

            stack.enter_context(edit_site(model, s, "mlp_in", grab))
            stack.enter_context(edit_site(model, s, "mlp_out", lambda y, s=s: y + deltas[s]))
        return model(ids[None]).logits[0]


def test_clamps_at_two_slots_match_circuit_tracer_in_a_forward(hf_model, folder):
    """A slot-0 clamp at every position and a slot-1 clamp at generated positions (its
    activation read in the steered forward): every later layer gets its share."""
    clt, ct = load_clt(folder), clt_refs.ct_load_clt(folder)
    ids = torch.randint(3, 512, (24,), generator=torch.Generator().manual_seed(2))
    xs = torch.stack([clt_refs_site(hf_model, ids, s) for s in range(LAYERS)])
    f = clt_math.encode(clt, xs)
    j0, j1 = int(f[0].sum(0).argmax()), int(f[1].sum(0).argmax())
    prompt_len = 8
    payload = RequestPayload(rid="a", edits=(
        EditPayload(0, j0, int(ops.Mode.CLAMP), 3.0),
        EditPayload(0, F + j1, int(ops.Mode.CLAMP), -2.0, Scope.GENERATION_ONLY.selector)))
    tables = _tables(clt)
    _plan(tables, [(0, 24, payload, prompt_len)])
    got = _served_logits(hf_model, ids, tables)
    want = _ct_logits(hf_model, ids, ct, [(0, j0, 3.0, 0), (1, j1, -2.0, prompt_len)], 0)
    clean = hf_model(ids[None]).logits[0].detach()
    assert float((want - clean).abs().max()) > 1.0, "the edit must move the logits"
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    # the carry is the CLT's edit: the source layer's share alone is not
    tables.decoders = [d.clone() for d in tables.decoders]
    for s in range(1, LAYERS):
        tables.decoders[s][: s * F] = 0  # drop every earlier slot's share
    _plan(tables, [(0, 24, payload, prompt_len)])
    assert float((_served_logits(hf_model, ids, tables) - want).abs().max()) > 1e-2


@torch.no_grad()
def clt_refs_site(model, ids, layer):
    from sae_runtime.labels.hf_sites import site_activations

    return site_activations(model, ids[None], layer, "mlp_in")[0]


@torch.no_grad()
def test_plain_rows_and_padding_get_nothing_and_reads_are_the_flat_encode(folder):
    """Two requests and padding in one step, called slot by slot on random activations:
    the edited request's rows get ``clt.edit_delta``'s shares, the plain request's rows and
    the padding rows are copies; a read reports the top-k of the flat features and watched
    ids of every slot."""
    clt = load_clt(folder)
    g = torch.Generator().manual_seed(4)
    T, d = 20, clt.cfg.d_in
    xs = torch.randn(LAYERS, T, d, generator=g)
    hs = torch.randn(LAYERS, T, d, generator=g)
    j = 7
    payload = RequestPayload(rid="a", edits=(EditPayload(0, F + j, int(ops.Mode.CLAMP), 2.5),),
                             reads=(ReadPayload(0, 5, (3, F + j, 2 * F + 1)),))
    plain = RequestPayload(rid="b", reads=(ReadPayload(0, 4, ()),))
    tables = _tables(clt)
    segs = _plan(tables, [(0, 6, plain, 6), (6, 16, payload, 10)])  # rows 16..19: padding
    outs = []
    for s in range(LAYERS):
        tables.stash_slot(xs[s], s)
        outs.append(tables.apply_slot(hs[s], s))
    a = clt_math.encode_layer(clt, xs[1, 6:16], 1)[:, j]
    want = clt_math.edit_delta(clt, 1, torch.full((10, 1), j), (2.5 - a)[:, None])  # [10, 3, d]
    for s in range(LAYERS):
        torch.testing.assert_close(outs[s][:6], hs[s][:6], atol=0, rtol=0)
        torch.testing.assert_close(outs[s][16:], hs[s][16:], atol=0, rtol=0)
        add = torch.zeros(10, d) if s < 1 else want[:, s - 1]
        torch.testing.assert_close(outs[s][6:16], hs[s][6:16] + add, atol=1e-5, rtol=1e-5)
    recs = {r.rid: r for r in collect_reads([tables], segs)}
    import numpy as np

    flat = clt_math.encode(clt, xs).permute(1, 0, 2).reshape(T, LAYERS * F)  # [T, L * F]
    edited = flat.clone()
    edited[6:16, F + j] = 2.5  # a read reports the request's own edits
    for rid, rows, k, dense in (("b", slice(0, 6), 4, flat), ("a", slice(6, 16), 5, edited)):
        r = recs[rid]
        vals = np.frombuffer(r.val, np.float32).reshape(r.n, r.k)
        top = dense[rows].topk(k).values
        np.testing.assert_allclose(vals, top.numpy(), atol=1e-5)
    r = recs["a"]
    wv = np.frombuffer(r.wv, np.float32).reshape(r.n, r.w)
    np.testing.assert_allclose(wv, edited[6:16][:, [3, F + j, 2 * F + 1]].numpy(), atol=1e-5)
    assert np.allclose(wv[:, 1], 2.5)


@torch.no_grad()
def test_pooled_reads_are_circuit_tracers_flat_latents_summed_and_maxed(folder):
    """Two pooled reads (``Encode``) and a plain one in one step, folded ``pool_chunk`` rows
    at a time (the chunk loop ``HookTables`` shares): per pool the sums and maxima over its
    rows of circuit-tracer's ``encode`` flattened ``slot * F + j``; top-k and watch values
    per row as well."""
    clt, ct = load_clt(folder), clt_refs.ct_load_clt(folder)
    g = torch.Generator().manual_seed(8)
    T, d = 20, clt.cfg.d_in
    xs = torch.randn(LAYERS, T, d, generator=g)
    tables = _tables(clt)
    tables.pool_chunk = 3
    tables.clear()
    segs = [tables.add_read_rows(0, 7, 3, (3, F + 5), pooled=True),
            tables.add_read_rows(7, 10, 2, (), pooled=False),
            tables.add_read_rows(10, 20, 4, (2 * F + 1,), pooled=True)]
    assert [p for _, p in segs] == [0, -1, 1]
    for s in range(LAYERS):
        tables.stash_slot(xs[s], s)
        tables.apply_slot(xs[s], s)
    vals, _, watch, (psum, pmax) = tables.read_out_host()
    flat = ct.encode(xs).permute(1, 0, 2).reshape(T, LAYERS * F)  # [T, L * F]
    for (off, pool), (lo, hi), k, w in zip(segs, [(0, 7), (7, 10), (10, 20)], [3, 2, 4],
                                           [[3, F + 5], [], [2 * F + 1]], strict=True):
        dense = flat[lo:hi]
        sl = slice(off, off + hi - lo)
        torch.testing.assert_close(vals[sl, :k], dense.topk(k, dim=1).values, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(watch[sl, : len(w)], dense[:, w], atol=1e-5, rtol=1e-5)
        if pool >= 0:
            torch.testing.assert_close(psum[pool], dense.sum(0), atol=1e-4, rtol=1e-5)
            torch.testing.assert_close(pmax[pool], dense.max(0).values, atol=1e-5, rtol=1e-5)


def test_a_clt_folder_is_one_hook_with_flat_features(folder, tmp_path, model_dir):
    c = load_hook_config(folder)
    assert (c.d_sae, c.clt_layers, c.features_per_layer, c.layer, c.site, c.input_site) == (
        LAYERS * F, (0, 1, 2), F, 0, "mlp_out", "mlp_in")
    assert (c.hook_name, c.hook_name_out) == ("blocks.0.mlp.hook_in", "blocks.2.hook_mlp_out")
    with pytest.raises(SAEFormatError, match="drop the @"):
        load_hook_config(folder, "blocks.0.mlp.hook_in")
    mid = make_clt(tmp_path / "mid", model_dir, input_hook="hook_resid_mid")
    with pytest.raises(SAEFormatError, match="cannot be served: input hook_resid_mid"):
        clt_hook_config(mid)


def test_startup_refuses_a_clt_on_cuda_and_under_pp(folder):
    from server.app import Hooks
    from server.startup import StartupError, check_clt_serving

    saes = Hooks({"clt": load_hook_config(folder)}).saes
    check_clt_serving(saes, cpu=True, pp=1)  # served (at any TP size: test_parallel.py)
    with pytest.raises(StartupError, match=r"--sae clt: .*CPU path only so far"):
        check_clt_serving(saes, cpu=False, pp=1)
    with pytest.raises(StartupError, match=r"--sae clt: .*--pipeline-parallel-size 2 .*does "
                                           r"not cross pipeline stages"):
        check_clt_serving(saes, cpu=True, pp=2)


def test_a_condition_reads_the_edited_features_own_layer(folder):
    from sae_runtime.errors import InvalidRequestError
    from sae_runtime.spec.interventions import Condition, Intervention, SteeringSpec
    from sae_runtime.step.edits import Cond

    saes = {"clt": load_hook_config(folder)}
    ok = Intervention("clt", F + 3, ops.Mode.CLAMP, 1.0, when=Condition("clt", F + 9, Cond.GT, 0.1))
    SteeringSpec((ok,)).validate(saes, 8)
    bad = Intervention("clt", F + 3, ops.Mode.CLAMP, 1.0, when=Condition("clt", 9, Cond.GT, 0.1))
    with pytest.raises(InvalidRequestError, match="own layer") as e:
        SteeringSpec((bad,)).validate(saes, 8)
    assert e.value.field == "interventions[0].when.feature"
    with pytest.raises(InvalidRequestError, match="out of range"):
        SteeringSpec((Intervention("clt", LAYERS * F, ops.Mode.CLAMP, 1.0),)).validate(saes, 8)


def test_a_clt_longer_than_the_model_is_refused_before_the_engine(model_dir):
    from pathlib import Path

    from server.app import load_hooks
    from server.config import SAESource, ServerConfig

    embedded = Path(__file__).resolve().parents[2] / "server" / "embedded" / "saes" / "topics_clt"
    cfg = ServerConfig(model=str(model_dir), saes=(SAESource(id="clt", path=embedded),))
    with pytest.raises(SAEFormatError, match=r"'clt' spans blocks 0\.\.3, but the model has "
                                             r"blocks 0\.\.2"):
        load_hooks(cfg)
