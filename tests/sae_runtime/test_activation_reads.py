"""Raw activation reads without an engine: declared sites, request checks and caps (errors
name the field), packing against torch/numpy, pooling, and the worker's step (planner rows
-> the op's copy -> records -> side channel) against a per-row oracle."""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import msgspec
import numpy as np
import pytest
import torch

from sae_runtime.errors import InvalidRequestError
from sae_runtime.spec import budget
from sae_runtime.spec.activations import (
    ActDtype,
    ActivationRead,
    ActPool,
    DeclaredSites,
    SitePosition,
    declared_sites,
    edit_positions,
    hook_position,
    pack,
    parse_hook,
    pool_rows,
    site_position,
    to_payload,
    twin_sites,
    validate_reads,
)
from sae_runtime.spec.payloads import RequestPayload
from sae_runtime.spec.selectors import GENERATION, PROMPT, Frame, Range, Selector
from sae_runtime.step.act_reads import ActSite, collect_acts, plan_acts
from sae_runtime.step.planner import StepColumns, compile_request
from sae_runtime.step.records import READ_DECODER, ActRecord
from sae_runtime.vllm.side_channel import pack as pack_messages

SITES = DeclaredSites(("blocks.*.hook_resid_post", "blocks.0.hook_mlp_out"),
                      ("blocks.0.hook_mlp_out", "blocks.0.hook_resid_post",
                       "blocks.1.hook_resid_post"), (8, 8, 8))


@dataclass(frozen=True)
class Caps:
    max_activation_reads: int = 4
    max_activation_positions: int = 100
    max_activation_bytes: int = 10**9


def test_declared_sites_expand_globs_in_layer_order():
    assert declared_sites(["blocks.*.hook_resid_post", "blocks.0.hook_mlp_out"], 2) == (
        "blocks.0.hook_mlp_out", "blocks.0.hook_resid_post", "blocks.1.hook_resid_post")
    assert declared_sites(["blocks.?.hook_resid_pre"], 3) == (
        "blocks.1.hook_resid_pre", "blocks.2.hook_resid_pre")  # not block 0's embeddings
    with pytest.raises(ValueError, match="selects no site"):
        declared_sites(["blocks.7.hook_resid_post"], 3)


@pytest.mark.parametrize("reads, field, words", [
    ((ActivationRead("blocks.0.hook_resid_post"), ActivationRead("blocks.1.hook_mlp_out")),
     "activation_reads[1].hook", "blocks.*.hook_resid_post, blocks.0.hook_mlp_out"),
    ((ActivationRead("blocks.1.hook_resid_post"), ActivationRead("blocks.1.hook_resid_post")),
     "activation_reads[1].hook", "already read by activation_reads[0]"),
    ((ActivationRead("blocks.0.hook_resid_post",
                     Selector((Range(Frame.PROMPT, 3, 1),))),),
     "activation_reads[0].positions.ranges[0]", "reversed"),
    (tuple(ActivationRead(n) for n in SITES.names) * 2, "activation_reads", "at most 4"),
])
def test_bad_reads_name_the_field(reads, field, words):
    with pytest.raises(InvalidRequestError) as e:
        validate_reads(reads, SITES, max_reads=4)
    assert e.value.field == field
    assert words in str(e.value)


def test_no_sites_declared_says_how_to_declare():
    with pytest.raises(InvalidRequestError, match="--activation-hooks"):
        validate_reads((ActivationRead("blocks.0.hook_resid_post"),), DeclaredSites(), max_reads=4)


def test_caps_count_rows_over_every_read_and_name_the_read_past_the_cap():
    prompt, total = 10, 30  # a prompt of 10 and 20 tokens to generate
    sels = [PROMPT, GENERATION, Selector()]
    assert budget.check_activations(sels[:2], [8, 8], prompt, total, Caps()) == 30
    with pytest.raises(InvalidRequestError) as e:
        budget.check_activations(sels, [8, 8, 8], prompt, total, Caps(max_activation_positions=50))
    assert e.value.field == "activation_reads[2].positions" and "at most 50" in str(e.value)
    with pytest.raises(InvalidRequestError) as e:
        budget.check_activations(sels, [8, 8, 8], prompt, total, Caps(max_activation_bytes=1000))
    # 10 prompt rows x 8 floats = 320 bytes; + 20 generated rows = 960; + 30 rows > 1000
    assert e.value.field == "activation_reads[2]" and "1920 bytes" in str(e.value)


def test_pack_matches_numpy_and_torch_rounding():
    v = np.random.default_rng(0).normal(size=(5, 7)).astype(np.float32) * 100
    v[0, :3] = [np.inf, -0.0, 1e-40]
    assert pack(v, ActDtype.FLOAT32) == v.astype("<f4").tobytes()
    assert pack(v, ActDtype.FLOAT16) == v.astype("<f2").tobytes()
    want = torch.from_numpy(v).to(torch.bfloat16).view(torch.int16).numpy().astype("<i2").tobytes()
    assert pack(v, ActDtype.BFLOAT16) == want
    # the client's unpacking gives the values back (bfloat16 widened exactly)
    from clients.client import unpack
    from steering.v1 import steering_pb2 as pb

    for dt, wire in ((ActDtype.FLOAT16, "<f2"), (ActDtype.BFLOAT16, None)):
        msg = pb.Activations(hook="h", shape=[5, 7], dtype=int(dt), data=pack(v, dt))
        got = unpack(msg)
        if wire:
            np.testing.assert_array_equal(got, v.astype(wire).astype(np.float32))
        else:
            np.testing.assert_array_equal(got, torch.from_numpy(v).to(torch.bfloat16).float().numpy())


def test_pool_rows():
    rows = np.random.default_rng(1).normal(size=(4, 3)).astype(np.float32)
    np.testing.assert_allclose(pool_rows(rows, ActPool.MEAN), rows.mean(0, keepdims=True), rtol=1e-6)
    np.testing.assert_array_equal(pool_rows(rows, ActPool.MAX), rows.max(0, keepdims=True))
    np.testing.assert_array_equal(pool_rows(rows, ActPool.LAST), rows[-1:])
    assert pool_rows(rows, ActPool.NONE) is rows


def test_worker_step_copies_each_requests_selected_rows_of_the_stream():
    """Two requests in one step (a chunk of prefill and a decode row) and a plain one in
    between: the op's copy of ``hidden + residual`` at the planned rows becomes one record
    per request, whose rows are exactly the oracle's."""
    d, max_tokens = 8, 16
    sites = [ActSite(d, max_tokens, torch.device("cpu")) for _ in range(2)]
    reads_a = (ActivationRead("blocks.0.hook_resid_post", PROMPT),
               ActivationRead("blocks.1.hook_resid_post"))
    reads_b = (ActivationRead("blocks.1.hook_resid_post", GENERATION),)
    site_ix = {"blocks.0.hook_resid_post": 0, "blocks.1.hook_resid_post": 1}
    names = DeclaredSites((), tuple(site_ix), d)
    plan_a = compile_request(RequestPayload(rid="a", acts=to_payload(reads_a, names)), 6)
    plan_b = compile_request(RequestPayload(rid="b", acts=to_payload(reads_b, names)), 3)
    plain = compile_request(None, 4)
    # request a: rows 0-4 at positions 4..8 (prompt 6: positions 4, 5 are prompt);
    # the plain request: rows 5-6; request b: row 7 at position 5 (generated)
    cols = StepColumns(["a", "p", "b"], [plan_a, plain, plan_b], np.array([0, 5, 7]),
                       np.array([5, 7, 8]), np.array([4, 0, 5]))
    segs = plan_acts(sites, cols)
    g = torch.Generator().manual_seed(0)
    h, res = torch.randn(8, d, generator=g), torch.randn(8, d, generator=g)
    for s in sites:
        s.copy(h, res)
    records = collect_acts(sites, segs)
    stream = (h + res).numpy()
    want = {("a", 0): (4, stream[0:2]), ("a", 1): (4, stream[0:5]), ("b", 0): (5, stream[7:8])}
    got = {(r.rid, r.read): (r.pos0, np.frombuffer(r.data, "<f4").reshape(r.n, r.d))
           for r in records}
    assert got.keys() == want.keys()
    for k, (p0, rows) in want.items():
        assert got[k][0] == p0
        np.testing.assert_array_equal(got[k][1], rows)
    # through the side channel, split to fit a small message cap, and back
    msgs = pack_messages(records, cap=200)
    assert len(msgs) > 1
    back = [r for m in msgs for r in READ_DECODER.decode(m)]
    assert all(isinstance(r, ActRecord) for r in back)
    joined = {}
    for r in back:
        joined.setdefault((r.rid, r.read), []).append(np.frombuffer(r.data, "<f4").reshape(r.n, r.d))
    for k, (_, rows) in want.items():
        np.testing.assert_array_equal(np.concatenate(joined[k]), rows)
    for s in sites:
        s.clear()
    assert plan_acts(sites, StepColumns(["p"], [plain], np.array([0]), np.array([2]),
                                        np.array([0]))) == []


def test_act_record_round_trips_msgpack():
    r = ActRecord("r", 1, 2, 3, 1, 2, np.array([1.5, 2.5], "<f4").tobytes())
    assert READ_DECODER.decode(msgspec.msgpack.encode([r])) == [r]


def test_z_and_ln2_sites_have_their_saelens_names_and_widths():
    names = declared_sites(["blocks.1.attn.hook_z", "blocks.1.ln2.hook_normalized",
                            "blocks.1.hook_mlp_out"], 2)
    # a block's forward order: z, then the pre-MLP norm, then the MLP output
    assert names == ("blocks.1.attn.hook_z", "blocks.1.ln2.hook_normalized",
                     "blocks.1.hook_mlp_out")
    assert parse_hook("blocks.1.attn.hook_z") == (1, "z")
    assert parse_hook("blocks.3.ln2.hook_normalized") == (3, "ln2_normalized")
    assert parse_hook("blocks.3.hook_z") is None
    sites = DeclaredSites.of(["blocks.*.attn.hook_z", "blocks.0.hook_resid_post"], 2, 8, 12)
    assert sites.names == ("blocks.0.attn.hook_z", "blocks.0.hook_resid_post",
                           "blocks.1.attn.hook_z")
    assert sites.widths == (12, 8, 12)
    # the bytes cap counts each read at its own site's width
    reads = [Selector(), Selector()]
    assert budget.check_activations(reads, [12, 8], 5, 5, Caps(max_activation_bytes=400)) == 10
    with pytest.raises(InvalidRequestError, match="12 values wide"):
        budget.check_activations(reads, [12, 12], 5, 5, Caps(max_activation_bytes=400))


def test_ln2_site_gives_the_norms_input_before_its_weight_and_bias():
    g = torch.Generator().manual_seed(0)
    x_hat = torch.randn(6, 4, generator=g)
    gain, bias = torch.rand(4, generator=g) + 0.5, torch.randn(4, generator=g)
    site = ActSite(4, 8, torch.device("cpu"), affine=(gain, bias))
    site.rows_host[:3] = [1, 4, 5]
    site.n = 3
    site.upload()
    site.copy(x_hat * gain + bias, None)  # what the MLP sees: the norm's output
    torch.testing.assert_close(site.buf[:3], x_hat[[1, 4, 5]])


def test_gathered_site_keeps_every_ranks_columns_of_the_selected_rows():
    full = torch.arange(5 * 6, dtype=torch.float32).reshape(5, 6)
    rank0, rank1 = full[:, :3], full[:, 3:]  # two ranks' heads
    site = ActSite(6, 8, torch.device("cpu"),
                   gather=lambda rows: torch.cat([rows, rank1.index_select(0, site.rows[:site.n])],
                                                 dim=-1))
    site.rows_host[:2] = [0, 3]
    site.n = 2
    site.upload()
    site.copy(rank0, None)
    torch.testing.assert_close(site.buf[:2], full[[0, 3]])


# ---------------------------------------------------------------------------- before edits

# A server that hooks an SAE at blocks.2.hook_resid_pre (block 1's output), a transcoder
# writing blocks.0.hook_mlp_out and a cross-layer transcoder writing mlp_out of blocks 1, 2.
EDITS = edit_positions([
    SimpleNamespace(layer=2, site="resid_pre", clt_layers=()),
    SimpleNamespace(layer=0, site="mlp_out", clt_layers=()),
    SimpleNamespace(layer=1, site="mlp_out", clt_layers=(1, 2)),
])
TWINNED = DeclaredSites.of(["blocks.*.hook_resid_post", "blocks.*.hook_mlp_out",
                            "blocks.1.attn.hook_z"], 3, 8, 12, EDITS)


def test_positions_merge_resid_pre_with_the_previous_blocks_output():
    assert site_position(2, "resid_pre") == site_position(1, "resid_post") == SitePosition(1, "out")
    assert hook_position("blocks.2.hook_resid_pre") == hook_position("blocks.1.hook_resid_post")
    assert hook_position("blocks.1.attn.hook_z") == SitePosition(1, "z")
    assert hook_position("blocks.0.ln2.hook_normalized") == SitePosition(0, "ln2_normalized")
    assert site_position(0, "mlp_out") != site_position(0, "attn_out")
    with pytest.raises(ValueError):
        hook_position("blocks.0.hook_mlp_in")


def test_edit_positions_of_saes_transcoders_and_clts():
    # the SAE at resid_pre 2 edits block 1's output; the CLT (its own layer 1) every block
    # it writes, not its first block's output or resid_post
    assert EDITS == {SitePosition(1, "out"), SitePosition(0, "mlp_out"),
                     SitePosition(1, "mlp_out"), SitePosition(2, "mlp_out")}


def test_twins_sit_where_hooks_edit_and_get_the_ids_after_the_declared_sites():
    assert TWINNED.names == ("blocks.0.hook_mlp_out", "blocks.0.hook_resid_post",
                             "blocks.1.attn.hook_z", "blocks.1.hook_mlp_out",
                             "blocks.1.hook_resid_post", "blocks.2.hook_mlp_out",
                             "blocks.2.hook_resid_post")
    assert TWINNED.twins == (0, 3, 4, 5)  # mlp_out 0, 1, 2 and block 1's output
    assert TWINNED.twins == twin_sites(TWINNED.names, EDITS)
    assert TWINNED.twin_hooks == ("blocks.0.hook_mlp_out", "blocks.1.hook_mlp_out",
                                  "blocks.1.hook_resid_post", "blocks.2.hook_mlp_out")
    n = len(TWINNED.names)
    assert TWINNED.site_id("blocks.1.hook_resid_post") == 4
    assert TWINNED.site_id("blocks.1.hook_resid_post", before_edits=True) == n + 2
    assert TWINNED.site_id("blocks.0.hook_mlp_out", before_edits=True) == n
    # nothing edits z or block 0's output: a before-edits read is the site itself
    assert TWINNED.site_id("blocks.1.attn.hook_z", before_edits=True) == 2
    assert TWINNED.site_id("blocks.0.hook_resid_post", before_edits=True) == 1
    assert TWINNED.site_widths == (8, 8, 12, 8, 8, 8, 8, 8, 8, 8, 8)
    z_twin = DeclaredSites.of(["blocks.1.attn.hook_z"], 2, 8, 12, {SitePosition(1, "z")})
    assert z_twin.twins == (0,) and z_twin.site_widths == (12, 12)
    assert DeclaredSites.of(["blocks.*.hook_resid_post"], 3, 8, 12).twins == ()


def test_payload_maps_each_read_to_its_worker_site():
    reads = (ActivationRead("blocks.1.hook_resid_post", before_edits=True),
             ActivationRead("blocks.1.hook_resid_post"),
             ActivationRead("blocks.2.hook_mlp_out", PROMPT, before_edits=True),
             ActivationRead("blocks.1.attn.hook_z", before_edits=True))
    validate_reads(reads, TWINNED, max_reads=8)
    n = len(TWINNED.names)
    assert [(a.site, a.positions) for a in to_payload(reads, TWINNED)] == [
        (n + 2, Selector()), (4, Selector()), (n + 3, PROMPT), (2, Selector())]


@pytest.mark.parametrize("reads, field, words", [
    ((ActivationRead("blocks.1.hook_resid_post", before_edits=True),
      ActivationRead("blocks.1.hook_resid_post", before_edits=True)),
     "activation_reads[1].hook", "before edits is already read by activation_reads[0]"),
    ((ActivationRead("blocks.0.hook_resid_post"),
      ActivationRead("blocks.0.hook_resid_post", before_edits=True)),
     "activation_reads[1].before_edits", "nothing edits blocks.0.hook_resid_post"),
    ((ActivationRead("blocks.1.attn.hook_z", before_edits=True),
      ActivationRead("blocks.0.hook_mlp_out"), ActivationRead("blocks.1.attn.hook_z")),
     "activation_reads[0].before_edits", "activation_reads[2] reads it after edits"),
])
def test_before_edits_refusals_name_the_field(reads, field, words):
    with pytest.raises(InvalidRequestError) as e:
        validate_reads(reads, TWINNED, max_reads=8)
    assert e.value.field == field
    assert words in str(e.value)


def test_a_payload_reading_one_site_twice_loses_its_rows_not_the_engine(caplog):
    """Validation keeps one read per worker site per request; a payload that breaks it
    (drift) must not raise in the worker's step: the rows that do not fit are dropped, with
    an error logged, and the other request's rows still come back."""
    d, max_tokens = 4, 6
    sites = [ActSite(d, max_tokens, torch.device("cpu"))]
    names = DeclaredSites((), ("blocks.0.hook_resid_post",), (d,))
    twice = RequestPayload(rid="x", acts=to_payload([ActivationRead("blocks.0.hook_resid_post")] * 2,
                                                     names))
    plan_x = compile_request(twice, 4)
    plan_y = compile_request(RequestPayload(rid="y", acts=to_payload(
        [ActivationRead("blocks.0.hook_resid_post")], names)), 2)
    cols = StepColumns(["x", "y"], [plan_x, plan_y], np.array([0, 4]), np.array([4, 6]),
                       np.array([0, 0]))
    with caplog.at_level("ERROR"):
        segs = plan_acts(sites, cols)
    assert [(s.rid, s.index, s.n) for s in segs] == [("x", 0, 4), ("y", 0, 2)]
    assert "no room" in caplog.text
