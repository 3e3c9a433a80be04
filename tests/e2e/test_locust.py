"""A short headless Locust run of loadtests/locustfile.py against the shared e2e server.

Every task kind must run and succeed (the locustfile checks each response: token counts,
finish reasons, read positions and shapes, Encode results), cancels must end CANCELLED,
and the TTFT/TPOT/tokens/s metric rows must be filled.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
LOCUSTFILE = ROOT / "loadtests" / "locustfile.py"
GENERATE_KINDS = ("plain", "steered", "reading", "long", "cancel")
RUN_S = 20


def _rows(path: Path) -> dict[tuple[str, str], dict[str, str]]:
    with open(path, newline="") as fh:
        return {(r["Type"], r["Name"]): r for r in csv.DictReader(fh)}


def test_locust_mix(server, tmp_path):
    locust = Path(sys.executable).with_name("locust")
    assert locust.exists(), f"{locust} missing: pip install -e '.[test]' (locust is a test extra)"
    prefix = tmp_path / "run"
    cmd = [str(locust), "-f", str(LOCUSTFILE), "--headless", "-u", "4", "-r", "4",
           "-t", f"{RUN_S}s", "--stop-timeout", "5", "--host", server.target,
           "--csv", str(prefix), "--only-summary", "--loglevel", "WARNING",
           # Short generations, so that a 20 s run covers the whole mix several times.
           "--gen-tokens-min", "4", "--gen-tokens-max", "12", "--prompt-tokens-max", "48",
           "--long-prompt-tokens-min", "200", "--cancel-after-max", "4",
           "--think-time", "0.05", "--mix-order", "deck", "--metrics-per-task",
           "--rpc-timeout", "60"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOCUST_")}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=RUN_S + 40)
    out = (proc.stdout + proc.stderr)[-6000:]
    assert proc.returncode == 0, f"locust exited with {proc.returncode}:\n{out}"

    stats = _rows(prefix.with_name("run_stats.csv"))
    with open(prefix.with_name("run_failures.csv"), newline="") as fh:
        failures = list(csv.DictReader(fh))
    with open(prefix.with_name("run_exceptions.csv"), newline="") as fh:
        exceptions = list(csv.DictReader(fh))
    assert not failures, f"request failures: {failures}\n{out}"
    assert not exceptions, f"exceptions in tasks: {exceptions}\n{out}"
    assert stats[("", "Aggregated")]["Failure Count"] == "0"

    def count(kind: str, name: str) -> int:
        row = stats.get((kind, name))
        return int(row["Request Count"]) if row else 0

    expected = [("grpc", f"Generate {k}") for k in GENERATE_KINDS]
    expected += [("grpc", n) for n in ("Encode", "ListSAEs", "GetModelInfo")]
    expected += [("METRIC", n) for n in ("TTFT", "TPOT", "tokens/s")]
    expected += [("METRIC", f"TTFT {k}") for k in ("plain", "steered", "reading", "long")]
    missing = [e for e in expected if count(*e) == 0]
    assert not missing, f"no requests for {missing}; rows: {sorted(stats)}\n{out}"
    assert count("grpc", "ListSAEs") == 4  # once per user, at start
    for name in ("TTFT", "TPOT", "tokens/s"):
        assert float(stats[("METRIC", name)]["Min Response Time"]) > 0

    with server.client(timeout=10) as c:  # the shared server is still fine for other tests
        assert c.health() == "SERVING"
