"""``make bench``'s end-to-end rows, without an engine: each mix's requests carry what its
row is named for (read back from the payload the worker decodes), the declared-sites rows run
beside plain in one block, the CLT row addresses real features of the embedded CLT (its
shape read from its files), and the report marks which run each row comes from. Speed is
measured by the benchmark itself, not asserted here."""

from __future__ import annotations

import json
from argparse import Namespace
from pathlib import Path

import pytest
from safetensors import safe_open

from loadtests import bench_e2e as b
from loadtests.report import e2e_rows, run_line, targets_line
from sae_runtime.spec.payloads import EXTRA_ARGS_KEY, decode_request

ARGS = Namespace(gen=16, prompt=8, requests=32)
CLT_DIR = Path(__file__).resolve().parents[2] / "server" / "embedded" / "saes" / "topics_clt"


def _payloads(mix: str, eng: b.Engine, vocab: int = b.MODEL_CFG["vocab_size"]):
    out = []
    for i in range(ARGS.requests):
        sp, prompt = b.request_params(mix, i, eng, ARGS, vocab)
        extra = sp.extra_args or {}
        out.append(decode_request(extra) if EXTRA_ARGS_KEY in extra else None)
    return out


def _main(mixes):
    return b.Engine(mixes, b.bench_saes([Path(f"/sae{i}") for i in range(4)]), (b.ACT_SITE,))


def test_acts1_reads_block_15_for_16_of_the_32_requests():
    for eng in (_main(["acts1"]), b.Engine(["acts1"], {}, b.all_sites())):
        pays = _payloads("acts1", eng)
        reading = [p for p in pays if p is not None and p.acts]
        assert len(reading) == 16
        for p in reading:
            (act,) = p.acts
            assert eng.act_sites[act.site] == "blocks.15.hook_resid_post"
            assert not p.edits and not p.reads
        assert sum(p is None for p in pays) == 16  # the others are plain


@pytest.mark.parametrize("mix", ["idle", "sites0", "sites30"])
def test_plain_traffic_rows_send_no_edit_and_no_read(mix):
    assert _payloads(mix, _main([mix])) == [None] * ARGS.requests


def test_the_clt_row_clamps_16_distinct_features_of_every_source_layer():
    n_layers = len(list(CLT_DIR.glob("W_enc_*.safetensors")))
    with safe_open(CLT_DIR / "W_enc_0.safetensors", "pt") as f:
        F = f.get_slice("W_enc_0").get_shape()[0]
    vocab = json.loads((CLT_DIR.parents[1] / "model" / "config.json").read_text())["vocab_size"]
    eng = b.Engine(["clt_clamp16"], {b.CLT: CLT_DIR})
    pays = _payloads("clt_clamp16", eng, vocab)
    feats = set()
    for p in pays:
        (e,) = p.edits
        assert (e.sae, e.value) == (0, 4.0) and 0 <= e.feature < n_layers * F
        feats.add(e.feature)
    assert len(feats) == 16
    assert {f // F for f in feats} == set(range(n_layers))
    for i in range(ARGS.requests):
        _, prompt = b.request_params("clt_clamp16", i, eng, ARGS, vocab)
        assert max(prompt["prompt_token_ids"]) < vocab


def test_declared_sites_engines_run_beside_plain_with_the_main_engines_saes():
    engs = b.tp1_engines(["idle", "acts1", "sites0", "sites30", "clt_clamp16"],
                         [Path(f"/sae{i}") for i in range(4)])
    by_mix = {m: e for e in engs for m in e.mixes}
    assert engs[0].saes is None and engs[0].mixes == ["plain"]
    assert by_mix["idle"] is by_mix["acts1"] and by_mix["idle"].act_sites == (b.ACT_SITE,)
    assert by_mix["sites0"].act_sites == ()
    assert by_mix["sites30"].act_sites == tuple(f"blocks.{L}.hook_resid_post" for L in range(30))
    assert by_mix["sites0"].saes == by_mix["sites30"].saes == by_mix["idle"].saes
    assert "clt_clamp16" not in by_mix  # its own block, on the embedded model


def test_declared_sites_cost_is_the_drop_from_sites0_in_plains_units():
    assert b.act_sites_cost({"idle": 0.97, "sites0": 1.0, "sites30": 0.985}) == {
        "all": 0.015, "one": 0.03}
    assert b.act_sites_cost({"idle": 1.0}) == {}


def _run(tok: dict[str, float], **extra) -> dict:
    return {"device": "cpu: test", "workload": "w", "sae": "s", "command": "python -m x",
            "raw": {k: {"tok_s": v, "tpot_ms_p50": 1.0, "tpot_ms_p99": 2.0} for k, v in tok.items()},
            "e2e": {k: round(v / tok["clt_plain" if k.startswith("clt_") else "plain"], 3)
                    for k, v in tok.items() if "plain" not in k}, **extra}


def test_the_report_marks_each_rows_run_and_the_sites_cost(tmp_path):
    full = _run({"plain": 100.0, "clamp16": 96.0})
    sub = _run({"plain": 50.0, "acts1": 44.0, "sites0": 50.0, "sites30": 49.5,
                "clt_plain": 500.0, "clt_clamp16": 470.0},
               act_sites_cost={"all": 0.01}, load_avg={"start": [2.5, 2, 1], "end": [3.0, 2, 1]})
    path = tmp_path / "benchmarks.json"
    path.write_text(json.dumps(full))
    b.add_run(path, sub)
    doc = json.loads(path.read_text())
    assert doc["raw"] == full["raw"] and doc["extra_runs"] == [sub]
    rows = e2e_rows(doc["extra_runs"][0], "B")
    assert all(r.startswith("| B | ") for r in rows) and len(rows) == 6
    assert any("16 distinct CLT feature clamps" in r and "| 0.940 |" in r for r in rows)
    line = run_line(sub, "B")
    assert "load average 2.50 at the start, 3.00 at the end" in line
    assert "every layer (sites0 - sites30) 0.010" in line
    t = targets_line(sub)
    assert "acts1 0.880" in t.split("missed by")[1] and "clt_clamp16 0.940" in t.split("missed")[0]
    assert "sites0" not in t and "declared-sites cost (all) 0.010" in t.split("missed")[0]
