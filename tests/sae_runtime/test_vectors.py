"""Steering-vector files and banks: every format loads to the same {layer: vector}, the
GGUF layer convention is llama.cpp's, and a bank's ADD edit adds exactly strength * v."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sae_runtime import ops
from sae_runtime.errors import SAEFormatError
from sae_runtime.kernels import splice_compact, splice_reference
from sae_runtime.loading.vectors import bank_sae, build_banks, load_vector_file
from sae_runtime.spec.vectors import VectorIndex
from sae_runtime.step.edits import POS_INF, edit_rows
from sae_runtime.step.tables import HookTables
from tests.vector_files import random_directions, write_gguf

D = 24


def test_gguf_control_vector_loads_with_llama_cpp_layer_numbers(tmp_path):
    dirs = random_directions([1, 2, 5], D)
    got = load_vector_file(write_gguf(tmp_path / "cv.gguf", dirs))
    assert sorted(got) == [1, 2, 5]  # direction.k is block k's output: no shift
    for k, v in dirs.items():
        np.testing.assert_array_equal(got[k], v)


def test_gguf_refuses_layer_zero_and_other_architectures(tmp_path):
    with pytest.raises(SAEFormatError, match="direction.0"):
        load_vector_file(write_gguf(tmp_path / "z.gguf", random_directions([0, 1], D)))
    import gguf

    w = gguf.GGUFWriter(str(tmp_path / "m.gguf"), "llama")
    w.add_tensor("direction.1", np.ones(D, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(SAEFormatError, match="not 'controlvector'"):
        load_vector_file(tmp_path / "m.gguf")


def test_every_format_gives_the_same_vectors(tmp_path):
    from safetensors.numpy import save_file

    dirs = random_directions([0, 3], D, seed=1)
    save_file({f"direction.{k}": v for k, v in dirs.items()}, str(tmp_path / "v.safetensors"))
    np.savez(tmp_path / "v.npz", **{f"layers.{k}": v for k, v in dirs.items()})
    torch.save({k: torch.from_numpy(v) for k, v in dirs.items()}, tmp_path / "v.pt")
    arr = np.zeros((4, D), dtype=np.float32)
    for k, v in dirs.items():
        arr[k] = v
    np.save(tmp_path / "v.npy", arr)
    for name in ("v.safetensors", "v.npz", "v.pt", "v.npy"):
        got = load_vector_file(tmp_path / name)
        assert sorted(got) == [0, 3], name
        for k, v in dirs.items():
            np.testing.assert_array_equal(got[k], v)


def test_bad_files_are_clear_errors(tmp_path):
    with pytest.raises(SAEFormatError, match="no such"):
        load_vector_file(tmp_path / "missing.gguf")
    (tmp_path / "v.txt").write_text("1 2 3")
    with pytest.raises(SAEFormatError, match="unknown steering vector format"):
        load_vector_file(tmp_path / "v.txt")
    np.save(tmp_path / "bad.npy", np.zeros(D, dtype=np.float32))
    with pytest.raises(SAEFormatError, match=r"\[n_layers, d_model\]"):
        load_vector_file(tmp_path / "bad.npy")
    np.save(tmp_path / "nan.npy", np.full((2, D), np.nan, dtype=np.float32))
    with pytest.raises(SAEFormatError, match="non-finite"):
        load_vector_file(tmp_path / "nan.npy")
    p = write_gguf(tmp_path / "cv.gguf", random_directions([1], D))
    with pytest.raises(SAEFormatError, match="hidden size is 32"):
        build_banks([("a", p)], d_model=32)
    with pytest.raises(SAEFormatError, match="blocks 0..0"):
        build_banks([("a", p)], n_layers=1)
    with pytest.raises(SAEFormatError, match="given twice"):
        build_banks([("a", p), ("a", p)])


def test_banks_group_vectors_by_layer(tmp_path):
    a = write_gguf(tmp_path / "a.gguf", random_directions([1, 2], D, seed=1))
    b = write_gguf(tmp_path / "b.gguf", random_directions([2, 3], D, seed=2))
    banks = build_banks([("happy", a), ("calm", b)])
    assert [(bk.layer, bk.names) for bk in banks] == [(1, ("happy",)), (2, ("happy", "calm")),
                                                      (3, ("calm",))]
    idx = VectorIndex.of(banks)
    assert idx.rows["calm"] == {2: ("vectors@L2", 1), 3: ("vectors@L3", 0)}


@pytest.mark.parametrize("path", ["reference", "compact"])
def test_a_bank_add_edit_is_exactly_strength_times_the_vector(tmp_path, path):
    dirs = random_directions([2], D, seed=3)
    dirs2 = random_directions([2], D, seed=4)
    (bank,) = build_banks([("a", write_gguf(tmp_path / "a.gguf", dirs)),
                           ("b", write_gguf(tmp_path / "b.gguf", dirs2))])
    sae = bank_sae(bank)
    assert torch.equal(ops.encode(sae, torch.randn(5, D)), torch.zeros(5, 2))
    tables = HookTables(sae, max_tokens=16, max_slots=2, max_feats=2, staged=False)
    rows = edit_rows(2)
    rows["feature"], rows["mode"], rows["value"] = [0, 1], ops.Mode.ADD, [1.5, -2.0]
    rows["pos_lo"], rows["pos_hi"] = [0, 3], [POS_INF, POS_INF]  # b only from position 3
    tables.add_edits(0, 6, 0, rows)
    h = torch.randn(16, D)
    x = h + torch.randn(16, D)
    out = (splice_reference(h, x, sae, tables.edits) if path == "reference" else
           splice_compact(h, x, sae, tables.rows[:6], tables.edits))
    want = h.clone()
    want[:6] += 1.5 * torch.from_numpy(dirs[2])
    want[3:6] += -2.0 * torch.from_numpy(dirs2[2])
    torch.testing.assert_close(out, want, rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------- inline vectors


def test_the_planner_gives_each_request_its_inline_vector_in_its_own_scratch_row():
    """An inline-only bank (no named vectors): two requests in one step, each with its own
    vector; the hook adds exactly strength * v of each request to its rows, in every
    step, and a token-id selector's rows (one slot, whatever its runs) carry the vector."""
    import numpy as np

    from sae_runtime import ops
    from sae_runtime.loading.vectors import Bank, bank_sae
    from sae_runtime.spec.payloads import EditPayload, RequestPayload
    from sae_runtime.spec.selectors import Selector
    from sae_runtime.step.planner import (
        ScheduledRequest,
        StepDescription,
        compile_request,
        plan_step,
    )
    from sae_runtime.step.tables import HookTables

    d = 8
    bank = Bank(3, (), np.zeros((0, d), np.float32), inline=True)
    assert bank.config().d_sae == 1 and bank.inline_row == 0
    hook = HookTables(bank_sae(bank, scratch=4), max_tokens=32, max_slots=4, max_feats=1,
                      staged=False, inline_row=bank.inline_row)
    g = np.random.default_rng(0)
    vecs = [g.standard_normal(d).astype(np.float32) for _ in range(3)]
    strengths = [2.0, -0.5, 3.0]
    every = Selector()
    odd_tokens = Selector(token_ids=(7,))  # a token-id selector: two runs, one slot

    def plan(i, sel):
        ed = EditPayload(0, bank.inline_row, int(ops.Mode.ADD), strengths[i], sel,
                         vector=vecs[i].astype("<f4").tobytes())
        return compile_request(RequestPayload(f"r{i}", (ed,)), 4)

    plans = [plan(0, every), plan(1, every), plan(2, odd_tokens)]
    tokens = np.array([1, 2, 3, 4, 5, 6, 7, 8, 7, 1, 7, 7], dtype=np.int64)
    step = StepDescription([ScheduledRequest("a", 0, 4, 0, plans[0]),
                            ScheduledRequest("b", 4, 8, 0, plans[1]),
                            ScheduledRequest("c", 8, 12, 0, plans[2])], token_ids=tokens)
    for _ in range(2):  # a second step writes the rows again (the planner copies the rows)
        plan_step([hook], step)
        h = torch.randn(12, d)
        out = hook.apply(h, None)
        want = h.clone()
        want[0:4] += strengths[0] * torch.from_numpy(vecs[0])
        want[4:8] += strengths[1] * torch.from_numpy(vecs[1])
        for r in (8, 10, 11):  # token 7 only
            want[r] += strengths[2] * torch.from_numpy(vecs[2])
        torch.testing.assert_close(out, want)
        assert hook.n_slots == 3  # one slot per request: c's two runs of token 7 take one
        assert all(int(p.edits[0]["feature"][0]) == bank.inline_row for p in plans)
        hook.clear()
        vecs.reverse(), strengths.reverse()
        plans[0], plans[1] = plan(0, every), plan(1, every)
        plans[2] = plan(2, odd_tokens)
        step = StepDescription([ScheduledRequest("a", 0, 4, 0, plans[0]),
                                ScheduledRequest("b", 4, 8, 0, plans[1]),
                                ScheduledRequest("c", 8, 12, 0, plans[2])], token_ids=tokens)


# --------------------------------------------------------------------------- self-describing files


def test_a_written_gguf_is_a_plain_control_vector_that_describes_itself(tmp_path):
    from gguf import GGUFReader

    from sae_runtime.loading.vectors import META_KEYS, read_vector_metadata, write_vector_gguf

    dirs = random_directions([1, 3], D, seed=5)
    p = write_vector_gguf(tmp_path / "v.gguf", dirs, model_id="/models/tiny-llama",
                          hidden_size=D, method="mean_diff", created="2026-12-03T00:00:00+00:00")
    r = GGUFReader(str(p))  # what llama.cpp reads: the architecture and direction.{k}
    arch = r.fields["general.architecture"]
    assert bytes(arch.parts[arch.data[0]]).decode() == "controlvector"
    assert sorted(t.name for t in r.tensors) == ["direction.1", "direction.3"]
    got = load_vector_file(p)
    assert sorted(got) == [1, 3] and all(np.array_equal(got[k], dirs[k]) for k in dirs)
    meta = read_vector_metadata(p)
    assert set(meta) == set(META_KEYS)
    assert meta["hook_names"] == "blocks.1.hook_resid_post,blocks.3.hook_resid_post"
    assert (meta["model_id"], meta["hidden_size"], meta["method"], meta["created"]) == (
        "/models/tiny-llama", str(D), "mean_diff", "2026-12-03T00:00:00+00:00")
    assert "block k" in meta["layer_convention"]
    with pytest.raises(SAEFormatError, match="start at block 1"):
        write_vector_gguf(tmp_path / "z.gguf", {0: dirs[1]}, model_id="m", hidden_size=D)
    with pytest.raises(SAEFormatError, match="the hidden size is 7"):
        write_vector_gguf(tmp_path / "w.gguf", dirs, model_id="m", hidden_size=7)


def test_a_described_file_for_another_model_or_width_is_refused_naming_both(tmp_path):
    from sae_runtime.loading.vectors import (
        check_vector_metadata,
        read_vector_metadata,
        write_vector_gguf,
    )

    p = write_vector_gguf(tmp_path / "v.gguf", random_directions([1], D, seed=6),
                          model_id="org/tiny-llama", hidden_size=D)
    meta = read_vector_metadata(p)
    # the same model under another path or hub id passes
    check_vector_metadata(meta, model_id="/srv/models/tiny-llama/", hidden_size=D, where="f")
    with pytest.raises(SAEFormatError, match="f: the vector was made for model 'org/tiny-llama'; "
                       "this server serves 'org/other'"):
        check_vector_metadata(meta, model_id="org/other", hidden_size=D, where="f")
    with pytest.raises(SAEFormatError, match=f"f: the vector was made for hidden size {D} .*"
                       f"'org/tiny-llama' has {2 * D}"):
        check_vector_metadata(meta, model_id="org/tiny-llama", hidden_size=2 * D, where="f")
    foreign = write_gguf(tmp_path / "repeng.gguf", random_directions([1], D, seed=6))
    assert read_vector_metadata(foreign) == {}  # llama.cpp's / repeng's: nothing to check
    check_vector_metadata({}, model_id="anything", hidden_size=1, where="f")


def test_runtime_rows_are_zero_rows_between_the_named_and_the_scratch_rows(tmp_path):
    dirs = random_directions([2], D, seed=7)
    (bank,) = build_banks([("a", write_gguf(tmp_path / "a.gguf", dirs))], d_model=D,
                          inline_layers=[2], runtime_layers=[2], runtime_rows=3)
    assert list(bank.runtime_rows) == [1, 2, 3] and bank.inline_row == 4
    sae = bank_sae(bank, scratch=2)
    assert sae.W_dec.shape == (6, D) and torch.equal(sae.W_dec[0], torch.from_numpy(dirs[2]))
    assert not sae.W_dec[1:].any()
    idx = VectorIndex.of([bank])
    assert idx.runtime == {2: ("vectors@L2", range(1, 4))} and idx.inline == {2: ("vectors@L2", 4)}
