"""The soak report's arithmetic on hand-made samples (loadtests/soak.py; no engine)."""

from __future__ import annotations

import os

import psutil
import pytest

from loadtests import soak


def sample(t, **rss):
    return {"t_s": t, "mem": {k: {"rss": v, "uss": v / 2, "pss": v} for k, v in rss.items()}}


def test_growth_is_measured_from_the_first_sample_at_5_minutes():
    samples = [sample(0, worker=100), sample(270, worker=180), sample(300, worker=200),
               sample(330, worker=210), sample(1800, worker=203)]
    assert soak.growth(samples, "worker") == (100, 200, 203, pytest.approx(1.5))
    assert soak.growth(samples, "worker", "uss") == (50, 100, 101.5, pytest.approx(1.5))
    # a run shorter than 5 minutes: the last sample stands in, growth 0
    assert soak.growth(samples[:2], "worker")[1:] == (180, 180, 0.0)
    assert soak.tree(sample(0, a=1.5, b=2.0)) == 3.5


def test_p99_and_tpot_per_interval(tmp_path):
    assert soak.p99([]) is None
    assert soak.p99(list(range(1, 101))) == 100  # nearest rank: the 99th of 100 is index 99
    assert soak.p99([5.0] * 99 + [50.0]) == 50.0
    log = tmp_path / "tpot.log"
    t0 = 1000.0
    log.write_text("1001.0 10\n1029.9 30\n1030.0 70\nnot a line\n1059.0 20\n")
    samples = [sample(0), sample(30), sample(60)]
    soak.tpot_intervals(log, samples, t0)
    assert (samples[1]["p99_tpot_ms"], samples[1]["streams"]) == (30.0, 2)
    assert (samples[2]["p99_tpot_ms"], samples[2]["streams"]) == (70.0, 2)


def test_this_process_is_named_server_and_measured():
    me = os.getpid()
    assert soak.process_name(psutil.Process(me), me) == "server"
    mem = soak.memory_sample(me)
    assert mem["server"]["rss"] == pytest.approx(psutil.Process(me).memory_info().rss / 2**20,
                                                 rel=0.2)
