"""``make gpu-check``'s script on CPU: its dry run works without vLLM and writes nothing
under docs/, and its report arithmetic (targets, nominal peaks) on hand-made rows."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

from loadtests import gpu_check

ROOT = Path(__file__).resolve().parents[2]


def test_dry_run_says_what_it_would_run_and_runs_the_cpu_parts():
    docs = [ROOT / "docs" / f"benchmarks_gpu.{ext}" for ext in ("json", "md")]
    before = {p: p.stat().st_mtime if p.exists() else None for p in docs}
    p = subprocess.run([sys.executable, "-m", "loadtests.gpu_check", "--dry-run"], cwd=ROOT,
                       capture_output=True, text=True, timeout=300,
                       env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    out = p.stdout
    for name, _ in gpu_check.PLAN:
        assert f"gpu-check:   {name}: " in out
    assert "the Triton kernel modules import" in out
    assert "replay jumprelu transcoder (eager, dry run)" in out and "ok True" in out
    assert "vLLM imported: no" in out and "nothing under docs/ was written" in out
    assert {p: p.stat().st_mtime if p.exists() else None for p in docs} == before


def test_without_pytest_the_tests_part_says_it_did_not_run(monkeypatch):
    find = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "pytest" else find(name, *a))
    got = gpu_check.run_tests(dry=False, timeout_s=1)
    assert got["status"].startswith("skipped: pytest is not installed")


def test_targets_are_marked_met_or_missed_against_the_nominal_peak():
    rows = [  # splice at 512 tokens: 3000 and 1500 GB/s; decode: 2600 GB/s
        {"kernel": "splice", "tokens": 512, "d_sae": 16384, "gbps": 3000.0, "peak_gbps": 4000.0,
         "dense_ms": 5.0, "triton_ms": 1.0},
        {"kernel": "splice", "tokens": 512, "d_sae": 65536, "gbps": 1500.0, "peak_gbps": 4000.0,
         "dense_ms": 30.0, "triton_ms": 2.0},
        {"kernel": "decode", "tokens": 512, "d_sae": 65536, "gbps": 2600.0, "peak_gbps": 4000.0,
         "dense_ms": 12.0, "triton_ms": 1.0},
    ]
    got = {t["target"]: (t["value"], t["met"]) for t in gpu_check.targets(rows, 4800.0)}
    assert got == {
        "splice >= 50% of peak HBM bandwidth at 512 tokens": (round(1500 / 4800, 3), False),
        "decode >= 50% of peak HBM bandwidth at 512 tokens": (round(2600 / 4800, 3), True),
        "splice >= 10x faster than dense at d_sae >= 65k": (15.0, True),
        "decode >= 10x faster than dense at d_sae >= 65k": (12.0, True),
    }
    measured = gpu_check.targets(rows[:1], None)[0]  # no nominal peak: the measured copy's
    assert measured["peak"] == "measured copy" and measured["value"] == 0.75


def test_nominal_peaks_match_the_specific_name_first():
    assert gpu_check.nominal_peak("NVIDIA H200") == 4800
    assert gpu_check.nominal_peak("NVIDIA H100 NVL") == 3900
    assert gpu_check.nominal_peak("NVIDIA H100 80GB HBM3") == 3350
    assert gpu_check.nominal_peak("NVIDIA A100-SXM4-80GB") == 2039
    assert gpu_check.nominal_peak("Some Future GPU") is None
