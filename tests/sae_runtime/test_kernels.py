"""The compact CPU splice equals the fixed-shape reference splice on awkward inputs, and the
reference applies exactly the edits whose position window holds the token."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from sae_runtime import ops, registry
from sae_runtime.kernels import splice_compact, splice_reference
from sae_runtime.saes.base import NORMALIZATIONS, SAE
from tests.sae_runtime._factories import edit_tables, random_sae

TOL = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (3e-2, 3e-2), torch.float16: (5e-3, 5e-3)}


def _sae(arch: str, d_in: int, d_sae: int, **kw) -> SAE:
    return random_sae(arch, d_in, d_sae, **kw)


def _tables(T: int, S: int, K: int, d_sae: int, tokens: bool = True):
    """Random tables: slots of random length, edits with random windows, tokens at random
    positions (some inside, some outside each window), and token-id conditions on some
    edits, each row's token matching some of them."""
    tok_slot = torch.randint(-1, S, (T + 3,))  # a few trailing padding entries too
    feat = torch.randint(0, d_sae, (S, K))
    feat[0, 1] = feat[0, 0]  # the same feature twice in one slot: deltas add up
    mode = torch.randint(0, 5, (S, K), dtype=torch.int32)
    val = torch.randn(S, K) * 3  # negative values included
    lo = torch.randint(0, 20, (S, K))
    hi = lo + torch.randint(0, 20, (S, K))
    hi[0, 0] = 2**62  # an open-ended window
    tables = edit_tables(tok_slot, feat, mode, val, tok_pos=torch.randint(0, 40, (T + 3,)),
                         pos_lo=lo, pos_hi=hi, slot_len=torch.randint(0, K + 1, (S,)),
                         by_token=torch.rand(S, K) < 0.4 if tokens else None,
                         tok_match=torch.rand(T + 3, K) < 0.5 if tokens else None)
    return tok_slot, tables


@pytest.mark.parametrize("arch", registry.names())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("T", [0, 1, 37])
@pytest.mark.parametrize("d_in", [48, 128])
def test_compact_equals_reference(arch, dtype, T, d_in):
    sae = _sae(arch, d_in, 200)
    tok_slot, tables = _tables(T, 4, 3, 200)
    h = torch.randn(T, d_in).to(dtype)
    resid = (h.float() + torch.randn(T, d_in)).to(dtype)
    rows = torch.nonzero(tok_slot[:T] >= 0).flatten()
    want = splice_reference(h, resid, sae, tables)
    got = splice_compact(h, resid, sae, rows, tables)
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(got, want, atol=atol, rtol=rtol)
    # untouched rows are bit-identical to the input
    untouched = tok_slot[:T] < 0
    assert torch.equal(got[untouched], h[untouched])


@pytest.mark.parametrize("arch", registry.names())
@pytest.mark.parametrize("normalization", NORMALIZATIONS)
def test_compact_equals_reference_normalised(arch, normalization):
    """Normalised SAEs (per-token output scale) and rank scales: both kernels still agree."""
    sae = _sae(arch, 48, 120, normalization=normalization, rank_scale=True)
    tok_slot, tables = _tables(29, 4, 3, 120, tokens=False)
    h = torch.randn(29, 48)
    resid = h + torch.randn(29, 48)
    resid[torch.nonzero(tok_slot[:29] < 0).flatten()[:1]] = 0.0  # an all-zero idle row
    rows = torch.nonzero(tok_slot[:29] >= 0).flatten()
    want = splice_reference(h, resid, sae, tables)
    got = splice_compact(h, resid, sae, rows, tables)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    untouched = tok_slot[:29] < 0
    assert torch.equal(want[untouched], h[untouched])  # the reference leaves them exact too
    assert not torch.equal(got[~untouched], h[~untouched]), "no row was edited"


def test_no_rows_is_exact_copy_not_alias():
    sae = _sae("standard", 16, 32)
    h = torch.randn(5, 16)
    none = torch.zeros(0, dtype=torch.long)
    tables = edit_tables(torch.full((5,), -1), torch.zeros(1, 1, dtype=torch.long),
                         torch.zeros(1, 1, dtype=torch.int32), torch.zeros(1, 1))
    out = splice_compact(h, h, sae, none, tables)
    assert torch.equal(out, h) and out.data_ptr() != h.data_ptr()


def test_reference_applies_the_documented_formula():
    """One token, one clamp: out = h + (v - f_i(resid)) * W_dec[i]."""
    sae = _sae("standard", 8, 10)
    h, resid = torch.randn(1, 8), torch.randn(1, 8)
    i, v = 4, 3.0
    f_i = ops.encode(sae, resid)[0, i]
    out = splice_reference(h, resid, sae, edit_tables(
        torch.tensor([0]), torch.tensor([[i]]),
        torch.tensor([[int(ops.Mode.CLAMP)]], dtype=torch.int32), torch.tensor([[v]])))
    torch.testing.assert_close(out, h + (v - f_i) * sae.W_dec[i], atol=1e-6, rtol=0)


@pytest.mark.parametrize("arch", ["standard", "topk"])
def test_reference_masks_each_edit_by_its_window_and_token(arch):
    """Per token: only the slot's first ``slot_len`` edits with ``pos_lo <= pos < pos_hi``
    whose token condition, if any, matches the row (``tok_match[t, k]``) apply (a per-token
    oracle over the dense encoding, independent of ``row_edits``)."""
    sae = _sae(arch, 16, 40, seed=3)
    T, S, K = 23, 3, 4
    tok_slot, tables = _tables(T, S, K, 40)
    h, resid = torch.randn(T, 16), torch.randn(T, 16)
    want = h.clone()
    for t in range(T):
        s = int(tok_slot[t])
        if s < 0:
            continue
        act = ops.encode(sae, resid[t : t + 1])[0]
        p = int(tables.tok_pos[t])
        for e in range(s * K, s * K + int(tables.slot_len[s])):
            if not int(tables.pos_lo[e]) <= p < int(tables.pos_hi[e]):
                continue
            if tables.by_token[e] and not tables.tok_match[t, e - s * K]:
                continue
            i, m, v = int(tables.feature[e]), int(tables.mode[e]), float(tables.value[e])
            a = act[i]
            new = {ops.Mode.NONE: a, ops.Mode.CLAMP: torch.tensor(v),
                   ops.Mode.ABLATE: torch.tensor(0.0), ops.Mode.SCALE: a * v,
                   ops.Mode.ADD: a + v}[ops.Mode(m)]
            want[t] += (new - a) * sae.W_dec[i]
    got = splice_reference(h, resid, sae, tables)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert not torch.equal(got, h), "no edit applied: the check would be vacuous"
    # the token conditions decided something: without them the output differs
    plain = dataclasses.replace(tables, by_token=torch.zeros_like(tables.by_token))
    assert not torch.allclose(splice_reference(h, resid, sae, plain), got)


@pytest.mark.parametrize("arch", registry.names())
def test_bf16_sae_close_to_fp32_reference(arch):
    """SAEs compute in the model's dtype by default; bf16 stays close to the fp32 result."""
    sae = _sae(arch, 64, 128)
    sae_bf16 = sae.to("cpu", torch.bfloat16)
    tok_slot, tables = _tables(16, 3, 2, 128, tokens=False)
    tables.mode[tables.mode == int(ops.Mode.CLAMP)] = int(ops.Mode.ADD)  # membership-independent
    h = torch.randn(16, 64)
    rows = torch.nonzero(tok_slot[:16] >= 0).flatten()
    want = splice_reference(h, h, sae, tables)
    got = splice_compact(h.bfloat16(), h.bfloat16(), sae_bf16, rows, tables)
    torch.testing.assert_close(got.float(), want, atol=0.15, rtol=0.05)
