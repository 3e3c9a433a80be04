"""``make bench-step`` in its smallest grid: the JSON has the shape the report renders, and
the steps it times really carry the work they are named for (so a planner that planned
nothing could not look fast). Speed itself is measured, not asserted."""

from __future__ import annotations

import json

import pytest

from loadtests.bench_step import PARTS, PREFILL_CHUNK, main
from loadtests.report import step_section

B, K = 9, 3  # mixed: requests 0 and 8 prefill a chunk, the other 7 decode
ROWS = {"decode": B, "mixed": 2 * PREFILL_CHUNK + B - 2}


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "benchmarks_step.json"
    main(["--saes", "embedded", "--b", str(B), "--k", str(K), "--reps", "2", "--warmup", "1",
          "--out", str(out)])
    return json.loads(out.read_text())


def _row(result, phase: str, workload: str) -> dict:
    (row,) = [r for r in result["rows"] if r["phase"] == phase and r["workload"] == workload]
    return row


def test_the_json_records_the_machine_and_one_row_per_cell(result):
    assert {"command", "wall_s", "device", "cpu", "torch", "threads", "load_avg", "saes",
            "tables", "rows"} <= result.keys()
    assert result["threads"] == 1
    assert result["saes"]["embedded"]["d_sae"] == 1024
    cells = {(r["phase"], r["workload"], r["K"]) for r in result["rows"]}
    assert cells == {(p, w, k) for p in ("decode", "mixed")
                     for w, k in (("clamp", K), ("cond_window", K), ("token_ids", K),
                                  ("reads", 1), ("unsteered", 0))}
    for r in result["rows"]:
        assert r["B"] == B and r["rows"] == ROWS[r["phase"]] and r["reps"] == 2
        for p in PARTS:
            assert r[f"{p}_us"] >= 0
        assert r["host_us"] > 0 and r["step_us"] >= r["host_us"]
        assert r["host_us_per_req"] == pytest.approx(r["host_us"] / B)


@pytest.mark.parametrize("phase", ["decode", "mixed"])
def test_each_request_plans_its_edit_on_every_row_it_computes(result, phase):
    for w in ("clamp", "cond_window", "token_ids"):
        r = _row(result, phase, w)
        assert r["scheduled"] == B and r["edit_slots"] == B and r["edit_rows"] == B, w
        assert r["edited_token_rows"] == ROWS[phase], w
        assert r["read_rows"] == 0 and r["compile_us_per_req"] > 0, w


@pytest.mark.parametrize("phase", ["decode", "mixed"])
def test_reads_read_every_row_and_unsteered_steps_plan_nothing(result, phase):
    reads = _row(result, phase, "reads")
    assert reads["read_rows"] == ROWS[phase] and reads["segments"] == B
    assert reads["edit_rows"] == 0 and reads["collect_us"] > 0
    idle = _row(result, phase, "unsteered")
    assert idle["scheduled"] == 0 and idle["edit_rows"] == idle["read_rows"] == 0


def test_the_report_renders_every_row(result, tmp_path):
    (tmp_path / "benchmarks_step.json").write_text(json.dumps(result))
    text = "\n".join(step_section(tmp_path))
    assert "Per-step host cost (make bench-step)" in text
    assert text.count("\n| decode |") + text.count("\n| mixed |") == len(result["rows"])
