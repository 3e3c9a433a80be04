"""CPU proofs that the hook's graph-mode body can live inside a captured graph.

On CUDA, a captured graph (a FULL CUDA graph of vLLM's, or ``torch.cuda.graph``) runs the
hook as it was recorded: the Python around the kernels ran once, at capture, and every
replay only reads the tables' device memory at the addresses the capture saw. Inside a
capture ``HookTables.apply`` takes one fixed path (``tables._capturing``): the fixed-shape
splice with conditions and latches evaluated on the device (``kernels.splice_fixed``),
and, for a transcoder, the stash copy (``stash_input``). No CPU stream captures, so these
tests force ``tables._capturing`` to True and check that path:

(a) it compiles with ``torch.compile(fullgraph=True)`` (no graph break) under
    ``capture_scalar_outputs = False`` (no ``.item()``, no host read of a device value:
    the host sync a replay could not do) and with static shapes (no data-dependent shape),
    and the compiled body equals the eager one (one SAE per code path of the splice; the
    backend is dynamo's ``eager``: graph breaks are dynamo's to find);
(b) replay: the body traced once (``make_fx``: Python runs once, tensors it closes over are
    kept by reference, as a CUDA graph keeps addresses), then run over a sequence of steps
    whose tables are rewritten in place (``add_edits`` + ``upload`` into the fixed device
    mirrors): splice for every architecture, conditions, latches that persist across
    steps, the transcoder stash, rows past the step's tokens as padding. Each replay
    equals an independent eager twin (the CPU path, ``splice_compact``, fed the same
    steps; the latch state is the tables' business: only its effect on outputs is compared).

(c), the Triton kernels over changing tables, runs in Triton's interpreter
(``test_kernels_triton.py::test_triton_splice_replays_over_changing_tables``).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

from sae_runtime import kernels, registry
from sae_runtime.step import tables as tables_mod
from sae_runtime.step.edits import POS_INF
from sae_runtime.step.tables import HookTables
from tests.sae_runtime import _steps as steps
from tests.sae_runtime._factories import random_sae
from tests.sae_runtime._steps import fill, transcoder

D_IN, D_SAE = 24, 48
T = 20  # the captured size: every step pads to it
MAX_SLOTS, MAX_FEATS = 4, 3


CASES = [(arch, False) for arch in registry.names()] + [("jumprelu", True), ("topk", True)]
# (a) compiles one of each code path of the splice (element-wise rule, TopK threshold,
# group max, top-AFA's sort, the transcoder stash): a dynamo trace costs seconds each
COMPILE_CASES = [("jumprelu", False), ("topk", False), ("groupmax", False),
                 ("top_afa", False), ("jumprelu", True)]


def make_sae(arch: str, is_transcoder: bool):
    return (transcoder(arch, D_IN, D_SAE, 3) if is_transcoder
            else random_sae(arch, D_IN, D_SAE, seed=3))


def make_requests(g: np.random.Generator):
    return steps.make_requests(g, D_SAE, MAX_FEATS)


def schedule(g: np.random.Generator, requests):
    return steps.schedule(g, requests, T)


@pytest.fixture
def capturing(monkeypatch):
    """``apply`` / ``stash_input`` as they run inside a CUDA capture."""
    monkeypatch.setattr(tables_mod, "_capturing", lambda t: True)
    monkeypatch.delenv(kernels.ENV, raising=False)


def body_for(hook: HookTables, is_transcoder: bool):
    """The op's work for one hook, as the model runs it: the transcoder's stash of the MLP
    input before the MLP, then the hook on the output."""
    if is_transcoder:
        def body(h, mlp_in):
            hook.stash_input(mlp_in)
            return hook.apply(h, None)
    else:
        def body(h, residual):
            return hook.apply(h, residual)
    return body


def inputs(g: torch.Generator):
    return torch.randn(T, D_IN, generator=g), torch.randn(T, D_IN, generator=g)


@pytest.mark.parametrize("arch,is_transcoder", COMPILE_CASES)
def test_graph_body_compiles_whole_without_scalar_reads(arch, is_transcoder, capturing):
    sae = make_sae(arch, is_transcoder)
    hook = HookTables(sae, T, MAX_SLOTS, MAX_FEATS, staged=True)
    twin = HookTables(sae, T, MAX_SLOTS, MAX_FEATS, staged=True)
    rng = np.random.default_rng(0)
    requests = make_requests(rng)
    body, twin_body = body_for(hook, is_transcoder), body_for(twin, is_transcoder)
    g = torch.Generator().manual_seed(0)
    body(*inputs(g))  # warm-up outside the capture, as vLLM does (the backend log fires)
    with torch._dynamo.config.patch(capture_scalar_outputs=False,
                                    capture_dynamic_output_shape_ops=False):
        torch._dynamo.reset()
        compiled = torch.compile(body, fullgraph=True, dynamic=False, backend="eager")
        for _ in range(2):
            step = schedule(rng, requests)
            fill(hook, step)
            fill(twin, step)
            x = inputs(g)
            torch.testing.assert_close(compiled(*x), twin_body(*x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch,is_transcoder", CASES)
def test_graph_traced_once_replays_over_changing_tables(arch, is_transcoder, monkeypatch):
    """make_fx records the body once, with empty tables (as vLLM captures with dummy
    inputs); then each step rewrites the tables in place and replays the same graph."""
    sae = make_sae(arch, is_transcoder)
    hook = HookTables(sae, T, MAX_SLOTS, MAX_FEATS, staged=True)  # the captured one
    twin = HookTables(sae, T, MAX_SLOTS, MAX_FEATS, staged=False)  # the CPU path, eager
    rng = np.random.default_rng(1)
    requests = make_requests(rng)
    body, twin_body = body_for(hook, is_transcoder), body_for(twin, is_transcoder)
    g = torch.Generator().manual_seed(1)
    monkeypatch.delenv(kernels.ENV, raising=False)
    with monkeypatch.context() as m:
        m.setattr(tables_mod, "_capturing", lambda t: True)
        graph = make_fx(body)(*inputs(g))
    consts = {id(getattr(graph, n)) for n in dir(graph) if n.startswith("_tensor_constant")}
    assert {id(hook.tok_slot), id(hook.tok_pos), id(hook.latch_pos)} <= consts, \
        "the graph reads the tables at their fixed addresses"
    fired = steered = 0
    for _ in range(5):
        step = schedule(rng, requests)
        fill(hook, step)
        fill(twin, step)
        x = inputs(g)
        out, want = graph(*x), twin_body(*x)
        torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)  # latches' effect included
        padding = range(max(b for _, b, _, _ in step), T)
        assert torch.equal(out[list(padding)], x[0][list(padding)])
        steered += int(not torch.equal(out, x[0]))
        fired += int((hook.latch_pos[:-1] < POS_INF).any())
    assert steered >= 3 and fired >= 1  # the steps did edit, and the latch did fire


def test_sharded_z_site_keeps_its_gather_and_edits_in_a_capture(monkeypatch):
    """A hook at ``z`` under TP (``worker._sae_hook`` with a ``_Shard``): outside a capture
    a step with no rows skips the all-gather; a capture (vLLM captures with empty tables)
    must not freeze that skip, or every replay would leave the edits (and the collective)
    out. Traced once with empty tables, replayed over filled ones: equal to the hook applied
    to the gathered ``z``, this rank's columns."""
    pytest.importorskip("vllm")
    import types

    from sae_runtime.vllm import worker

    sae = make_sae("jumprelu", False)
    hook = HookTables(sae, T, MAX_SLOTS, MAX_FEATS, staged=True)
    twin = HookTables(sae, T, MAX_SLOTS, MAX_FEATS, staged=False)
    half = D_IN // 2
    g = torch.Generator().manual_seed(5)
    other = torch.randn(T, D_IN - half, generator=g)  # the other rank's heads
    gathers = []

    def gather(x, dim=-1):
        gathers.append(tuple(x.shape))
        return torch.cat([x, other], dim=dim)

    monkeypatch.setattr(worker, "_STATE", types.SimpleNamespace(hooks=[hook]))
    monkeypatch.setitem(worker._SHARDS, 0, worker._Shard(0, half))
    monkeypatch.setattr(worker.compat, "tp_all_gather", gather)
    monkeypatch.delenv(kernels.ENV, raising=False)
    h0 = torch.randn(T, half, generator=g)
    worker._sae_hook(h0, None, 0)
    assert gathers == []  # eager, no rows: skipped
    with monkeypatch.context() as m:
        m.setattr(tables_mod, "_capturing", lambda t: True)
        graph = make_fx(lambda h: worker._sae_hook(h, None, 0))(h0)
    assert gathers == [(T, half)]  # captured
    rng = np.random.default_rng(4)
    requests = make_requests(rng)
    steered = 0
    for _ in range(4):
        step = schedule(rng, requests)
        fill(hook, step)
        fill(twin, step)
        h = torch.randn(T, half, generator=g)
        out = graph(h)
        want = twin.apply(torch.cat([h, other], dim=-1), None)[:, :half]
        torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
        steered += int(not torch.equal(out, h))
    assert steered >= 2
