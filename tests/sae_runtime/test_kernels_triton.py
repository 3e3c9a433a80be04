"""The Triton kernels equal their references, run on CPU by Triton's interpreter.

Triton decides between compiling and interpreting when it is first imported, and other
test modules import it earlier, so this file runs only in a process started with
``TRITON_INTERPRET=1``: ``test_kernels_fused.test_triton_kernels_in_the_interpreter``
starts one (so ``make test`` covers it), and ``make test-triton`` runs it directly. Skipped
when Triton is not installed.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from sae_runtime import ops, registry
from sae_runtime.kernels import read_reference, sparse_decode_reference, splice_reference
from sae_runtime.saes.base import NORMALIZATIONS
from tests.sae_runtime._factories import edit_tables, random_sae
from tests.sae_runtime.test_kernels_fused import (
    TOL,
    _edits,
    _untied_rows,
    assert_reads_match,
    assert_splice_matches,
    no_splice_fallback,
    ranking_score,
)

triton = pytest.importorskip("triton")
if not triton.knobs.runtime.interpret:
    pytest.skip("needs a process started with TRITON_INTERPRET=1", allow_module_level=True)

from sae_runtime.kernels import (  # noqa: E402  (after the interpreter check)
    triton_decode,
    triton_splice,
    triton_topk_read,
)

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N,k", [(0, 4), (1, 1), (37, 8), (5, 40)])
def test_triton_sparse_decode(dtype, N, k):
    W_dec = torch.randn(300, 48).to(dtype)
    idx = torch.randint(0, 300, (N, k))
    if N and k >= 2:
        idx[0, 1] = idx[0, 0]
    vals = (torch.randn(N, k) * 2).to(dtype)
    got = triton_decode.sparse_decode_triton(vals, idx, W_dec)
    want = sparse_decode_reference(vals, idx, W_dec)
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(got, want, atol=atol * 10, rtol=rtol)


def test_triton_splice_fuses_all_but_top_afa():
    """The TopK family is fused with a per-row threshold; only top-AFA falls back."""
    assert set(triton_splice.SPLICE_RULES) == set(registry.names()) - {"top_afa"}
    assert sorted(triton_splice.THRESHOLD_RULES) == ["abstopk", "groupmax", "topk"]


@pytest.mark.parametrize("arch", registry.names())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T", [0, 1, 37])
def test_triton_splice(arch, dtype, T, monkeypatch):
    if arch in triton_splice.SPLICE_RULES:
        no_splice_fallback(monkeypatch)  # the fused kernel runs (top-AFA falls back)
    sae = random_sae(arch, 48, 200).to("cpu", dtype)
    S, K = 4, 3
    tok_slot = torch.randint(-1, S, (T + 3,))  # trailing padding entries
    feat = torch.randint(0, 200, (S, K))
    feat[0, 1] = feat[0, 0]
    mode = torch.randint(0, 5, (S, K), dtype=torch.int32)
    val = torch.randn(S, K) * 3
    lo = torch.randint(0, 20, (S, K))  # windows: some tokens inside, some outside
    hi = lo + torch.randint(0, 20, (S, K))
    tables = edit_tables(tok_slot, feat, mode, val, tok_pos=torch.randint(0, 40, (T + 3,)),
                         pos_lo=lo, pos_hi=hi, slot_len=torch.tensor([3, 2, 0, 3]))
    h = torch.randn(T, 48).to(dtype)
    resid = (h.float() + torch.randn(T, 48)).to(dtype)
    got = triton_splice.splice_triton(h, resid, sae, tables)
    want = splice_reference(h, resid, sae, tables)
    assert_splice_matches(got, want, dtype)
    untouched = tok_slot[:T] < 0
    assert torch.equal(got[untouched], h[untouched])


@pytest.mark.parametrize("arch", sorted(triton_splice.SPLICE_RULES))
@pytest.mark.parametrize("normalization", NORMALIZATIONS)
def test_triton_splice_normalised(arch, normalization, monkeypatch):
    no_splice_fallback(monkeypatch)
    sae = random_sae(arch, 40, 96, normalization=normalization, rank_scale=True)
    tok_slot = torch.randint(-1, 3, (11,))
    feat, mode = torch.randint(0, 96, (3, 4)), torch.randint(0, 5, (3, 4), dtype=torch.int32)
    val = torch.randn(3, 4)
    h = torch.randn(11, 40)
    resid = h + torch.randn(11, 40)
    tables = edit_tables(tok_slot, feat, mode, val)
    got = triton_splice.splice_triton(h, resid, sae, tables)
    want = splice_reference(h, resid, sae, tables)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def _member_edits(sae, resid):
    """One slot per row, editing the row's own boundary: for topk/abstopk the k-th and the
    (k+1)-th ranked features, for groupmax the max and the runner-up of a group, plus the
    row's top member twice (one duplicate) and a fixed feature. Every mode appears."""
    T = resid.shape[0]
    score = ranking_score(sae, ops.pre_activations(sae, resid))
    k = sae.cfg.k
    if sae.cfg.architecture == "groupmax":
        g = sae.cfg.d_sae // k
        top2 = score[:, :g].topk(2, dim=1).indices  # group 0: its max and runner-up
        boundary = top2
        first = top2[:, :1]
    else:
        order = score.topk(k + 1, dim=1).indices
        boundary, first = order[:, k - 1:], order[:, :1]
    feat = torch.cat([boundary, first, first, torch.full((T, 1), 7)], dim=1)  # [T, 5]
    modes = torch.tensor([int(m) for m in ops.Mode if m != ops.Mode.NONE], dtype=torch.int32)
    mode = modes[(torch.arange(T)[:, None] + torch.arange(5)[None, :]) % 4]
    val = torch.randn(T, 5) * 3
    return feat, mode, val


@pytest.mark.parametrize("arch,rank_scale", [("topk", False), ("topk", True),
                                             ("abstopk", False), ("groupmax", False)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_splice_topk_family_at_the_boundary(arch, rank_scale, dtype, monkeypatch):
    """Edits of members, of the last member and of the first non-member, duplicates and
    padding rows: the gathered pre-activations and per-row thresholds decide membership
    exactly as the reference does, in every dtype (a flipped member would move the output
    by a whole activation times a decoder row)."""
    no_splice_fallback(monkeypatch)
    sae = random_sae(arch, 48, 200, rank_scale=rank_scale, seed=1).to("cpu", dtype)
    T = 13
    resid = (torch.randn(T, 48, generator=torch.Generator().manual_seed(2)) * 2).to(dtype)
    h = torch.zeros(T, 48, dtype=dtype)  # the output is the delta alone
    feat, mode, val = _member_edits(sae, resid)
    tok_slot = torch.arange(T)
    tok_slot[[2, 9]] = -1  # padding rows
    tables = edit_tables(tok_slot, feat, mode, val)
    got = triton_splice.splice_triton(h, resid, sae, tables)
    want = splice_reference(h, resid, sae, tables)
    assert_splice_matches(got, want, dtype)
    assert not got[[2, 9]].any()
    acts = ops.encode(sae, resid).gather(1, feat)
    assert (acts[:, 0] != 0).all() and (acts[:, 2] != 0).all(), "members edited"
    assert (acts[:, 1] == 0).any(), "a non-member edited"
    if arch == "abstopk":
        assert (acts < 0).any(), "the test should edit negative activations"


def _integer_sae(arch, dtype, rank_scale=False):
    """An SAE whose pre-activations are small integers (exact in every dtype), so that a
    row's k-th value, or a group's max, is often shared by several features."""
    g = torch.Generator().manual_seed(3)
    sae = random_sae(arch, 16, 64, apply_b_dec_to_input=False, rank_scale=rank_scale)
    W_enc = torch.randint(-1, 2, (16, 64), generator=g).float()
    rs = None
    if rank_scale:  # powers of two keep the products exact, and tied
        rs = 2.0 ** torch.randint(-1, 2, (64,), generator=g).float()
    return dataclasses.replace(sae, W_enc=W_enc, b_enc=torch.zeros(64),
                               b_dec=torch.zeros(16), rank_scale=rs).to("cpu", dtype)


@pytest.mark.parametrize("arch,rank_scale", [("topk", False), ("topk", True),
                                             ("abstopk", False), ("groupmax", False)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_splice_topk_family_ties(arch, rank_scale, dtype, monkeypatch):
    """Features tied with the k-th value (or their group's max) are all members."""
    no_splice_fallback(monkeypatch)
    sae = _integer_sae(arch, dtype, rank_scale)
    T = 12
    resid = torch.randint(-2, 3, (T, 16), generator=torch.Generator().manual_seed(4)).to(dtype)
    score = ranking_score(sae, ops.pre_activations(sae, resid)).float()
    if arch == "groupmax":
        grouped = score.unflatten(1, (sae.cfg.k, -1))
        tied = (grouped == grouped.amax(dim=2, keepdim=True)) & (grouped > 0)
        assert (tied.sum(dim=2) > 1).any(), "no tie at a group's max"
    else:
        kth = score.topk(sae.cfg.k, dim=1).values[:, -1:]
        assert ((score >= kth).sum(dim=1) > sae.cfg.k).any(), "no tie at the k-th value"
    feat, mode, val = _member_edits(sae, resid)
    h = torch.randn(T, 16).to(dtype)
    tok_slot = torch.arange(T)
    tables = edit_tables(tok_slot, feat, mode, val)
    got = triton_splice.splice_triton(h, resid, sae, tables)
    want = splice_reference(h, resid, sae, tables)
    assert_splice_matches(got, want, dtype)


# The interpreter runs tl.topk slowly (about a second per program), so the cases are picked
# rather than crossed: every dtype, zero rows, one row, a full and a partial block of 16.
READ_CASES = [(torch.float32, 0, 16), (torch.float32, 1, 0), (torch.float32, 20, 16),
              (torch.bfloat16, 20, 16), (torch.float16, 1, 16)]


@pytest.mark.parametrize("arch", registry.names())
@pytest.mark.parametrize("dtype,R,top_k", READ_CASES)
def test_triton_read(arch, dtype, R, top_k):
    sae = random_sae(arch, 48, 200).to("cpu", dtype)
    x = (torch.randn(R, 48) * 2).to(dtype)
    feat, mode, val, watch = _edits(R, 4, 200, 3)
    want = read_reference(sae, x, feat, mode, val, top_k, watch)
    got = triton_topk_read.read_triton(sae, x, feat, mode, val, top_k, watch)
    assert_reads_match(got, want, ops.read_latents(sae, x, feat, mode, val), dtype,
                       _untied_rows(sae, x))


@pytest.mark.parametrize("arch", sorted(["standard", "jumprelu", "gated"]))
def test_triton_read_rank_scaled_normalised(arch):
    sae = random_sae(arch, 40, 200, normalization="layer_norm", rank_scale=True)
    x = torch.randn(5, 40)
    feat, mode, val, watch = _edits(5, 2, 200, 2)
    want = read_reference(sae, x, feat, mode, val, 7, watch)
    got = triton_topk_read.read_triton(sae, x, feat, mode, val, 7, watch)
    assert_reads_match(got, want, ops.read_latents(sae, x, feat, mode, val), torch.float32)


@pytest.mark.parametrize("arch", ["standard", "topk", "jumprelu"])
def test_triton_splice_conditional_and_latched(arch, monkeypatch):
    """Conditional entries (GT / LT on another feature) and a latch: the kernel's on/off
    mask equals the reference's decision, and both equal an unconditional splice where
    every condition holds."""
    from sae_runtime.step.edits import POS_INF, Cond

    no_splice_fallback(monkeypatch)
    sae = random_sae(arch, 40, 96, seed=4)
    T, S, K = 23, 3, 4
    tok_slot = torch.randint(-1, S, (T,))
    feat = torch.randint(0, 96, (S, K))
    mode = torch.randint(1, 5, (S, K), dtype=torch.int32)
    val = torch.randn(S, K) * 3
    h = torch.randn(T, 40)
    resid = h + torch.randn(T, 40)
    acts = ops.encode(sae, resid)
    cond_f = torch.randint(0, 96, (S * K,))
    thr = acts[:, cond_f].median(dim=0).values  # each condition splits the rows
    op = torch.randint(0, 3, (S * K,), dtype=torch.int32)  # NONE, GT, LT
    latch = torch.where(torch.arange(S * K) % 3 == 0, torch.arange(S * K), -1)

    def tables(latch_col):
        t = edit_tables(tok_slot, feat, mode, val, tok_pos=torch.arange(T))
        return dataclasses.replace(
            t, cond_feature=cond_f, cond_op=op, cond_threshold=thr.float(), latch=latch_col,
            latch_pos=torch.full((S * K + 1,), POS_INF, dtype=torch.int64))

    for latch_col in (torch.full((S * K,), -1), latch):
        a, b = tables(latch_col), tables(latch_col)
        got = triton_splice.splice_triton(h, resid, sae, a, conditions=True)
        want = splice_reference(h, resid, sae, b)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        assert torch.equal(a.latch_pos, b.latch_pos)
    assert (op != Cond.NONE).any() and (a.latch_pos[:-1] < POS_INF).any()
    plain = splice_reference(h, resid, sae, edit_tables(tok_slot, feat, mode, val,
                                                        tok_pos=torch.arange(T)))
    assert not torch.allclose(got, plain)  # the conditions switched some entries off


@pytest.mark.parametrize("arch", ["jumprelu", "topk", "groupmax"])  # rule, threshold, group
def test_triton_splice_replays_over_changing_tables(arch, monkeypatch):
    """The kernel launched again and again on the same table tensors (a CUDA graph replays
    launches with the pointers it captured), the tables rewritten in place between
    launches by the planner (``plan_step``, ``upload``): conditions, a latch persisting
    across steps, padding rows. Each launch equals the reference on a twin (host tables,
    no upload) fed the same steps."""
    import numpy as np

    from sae_runtime.step.tables import HookTables
    from tests.sae_runtime.test_graph_capture import (
        D_IN,
        MAX_FEATS,
        MAX_SLOTS,
        T,
        fill,
        make_requests,
        make_sae,
        schedule,
    )

    no_splice_fallback(monkeypatch)
    sae = make_sae(arch, False)
    hook = HookTables(sae, T, MAX_SLOTS, MAX_FEATS, staged=True)
    twin = HookTables(sae, T, MAX_SLOTS, MAX_FEATS, staged=False)  # host tables, no upload
    rng = np.random.default_rng(2)
    requests = make_requests(rng)
    edits = hook.edits  # one set of tensors for every launch
    g = torch.Generator().manual_seed(2)
    for _ in range(3):
        step = schedule(rng, requests)
        fill(hook, step)
        fill(twin, step)
        h = torch.randn(T, D_IN, generator=g)
        resid = h + torch.randn(T, D_IN, generator=g)
        got = triton_splice.splice_triton(h, resid, sae, edits, conditions=True)
        want = splice_reference(h, resid, sae, twin.edits)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert hook.edits.tok_slot.data_ptr() == edits.tok_slot.data_ptr()
