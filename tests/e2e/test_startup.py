"""Startup failures are fast and name the file and the problem (no engine is started)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e


def serve(*args, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return finish(launch(*args, env=env), timeout)


def launch(*args, env: dict | None = None) -> subprocess.Popen:
    exe = str(Path(sys.executable).with_name("steerd"))
    return subprocess.Popen([exe, "serve", "--port", "0", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            env=None if env is None else {**os.environ, **env})


def finish(p: subprocess.Popen, timeout: float = 120) -> subprocess.CompletedProcess:
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        raise
    return subprocess.CompletedProcess(p.args, p.returncode, out, err)


def _narrow_sae(d: Path) -> Path:
    import torch
    from safetensors.torch import save_file

    d.mkdir()
    save_file({"W_enc": torch.zeros(64, 32), "W_dec": torch.zeros(32, 64), "b_enc": torch.zeros(32),
               "b_dec": torch.zeros(64)}, str(d / "sae_weights.safetensors"))
    (d / "cfg.json").write_text(json.dumps({"architecture": "standard", "d_in": 64, "d_sae": 32,
                                            "metadata": {"hook_name": "blocks.1.hook_resid_post"}}))
    return d


def _mystery_model(tiny_dir: Path, d: Path) -> Path:
    shutil.copytree(tiny_dir / "tiny-llama", d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["architectures"] = ["MysteryForCausalLM"]
    (d / "config.json").write_text(json.dumps(cfg))
    return d


def _broken_sae(tiny_dir: Path, d: Path) -> Path:
    shutil.copytree(tiny_dir / "saes" / "resid_l1", d)
    (d / "sae_weights.safetensors").unlink()
    return d


@pytest.fixture(scope="module")
def refused(tiny_dir, tmp_path_factory):
    """Every start below is refused before the engine; they run at once (each is mostly
    imports, on one core), and each test reads its own result."""
    tmp = tmp_path_factory.mktemp("refused")
    model, sae = str(tiny_dir / "tiny-llama"), tiny_dir / "saes" / "resid_l1"
    cases = {
        "layer": ("--model", model, "--sae", f"{sae}@blocks.9.hook_resid_post"),
        "width": ("--model", model, "--sae", str(_narrow_sae(tmp / "narrow"))),
        "arch": ("--model", str(_mystery_model(tiny_dir, tmp / "bert")), "--sae", str(sae)),
        "malformed": ("--model", model, "--sae", str(_broken_sae(tiny_dir, tmp / "broken"))),
        "duplicate": ("--model", model, "--sae", f"a={sae}", "--sae", f"a={sae}"),
        "ray": ("--model", model, "--sae", str(sae), "--tensor-parallel-size", "2",
                "--distributed-executor-backend", "ray"),
    }
    procs = {k: launch(*a) for k, a in cases.items()}
    return {k: finish(p) for k, p in procs.items()} | {"sae": sae}


def test_sae_layer_out_of_range(refused):
    r = refused["layer"]
    assert r.returncode == 2 and "the model has blocks 0..2" in r.stderr
    assert str(refused["sae"]) in r.stderr


def test_sae_width_mismatch(refused):
    r = refused["width"]
    assert r.returncode == 2
    assert "d_in=64" in r.stderr and "hidden size at blocks.1.hook_resid_post is 128" in r.stderr


def test_unsupported_architecture(refused):
    r = refused["arch"]
    assert r.returncode == 2
    assert "MysteryForCausalLM" in r.stderr and "supported: GPT2LMHeadModel" in r.stderr


def test_malformed_sae_directory(refused):
    r = refused["malformed"]
    assert r.returncode == 2 and "sae_weights.safetensors" in r.stderr and "missing" in r.stderr


def test_duplicate_sae_ids(refused):
    r = refused["duplicate"]
    assert r.returncode == 2 and "duplicate SAE ids" in r.stderr


def test_unpatched_model_runner_refuses_to_serve_unsteered(tiny_dir):
    """A runner whose step wrapper is not ours (a vLLM upgrade that renames a wrapped
    method, a runner class compat does not list) must fail startup, never serve: simulated
    by leaving the CPU runner unpatched."""
    from sae_runtime.vllm.worker import SKIP_PATCH_ENV

    # eager: the check is on the runner's step wrapper, not on compilation (saves ~40 s)
    r = serve("--model", str(tiny_dir / "tiny-llama"), "--dtype", "float32", "--enforce-eager",
              "--max-model-len", "128", "--sae", str(tiny_dir / "saes" / "resid_l1"),
              env={SKIP_PATCH_ENV: "1"}, timeout=300)
    assert r.returncode == 1, r.stdout[-2000:] + r.stderr[-2000:]
    assert "cpu_model_runner.CPUModelRunner (v1) is not one sae_runtime patches" in r.stderr
    assert "refusing to serve unsteered" in r.stderr
    assert "listening on" not in r.stdout


def test_ray_executor_on_a_platform_without_ray_is_refused_before_the_engine(refused):
    from sae_runtime.vllm.engine import ray_supported

    if ray_supported():
        pytest.skip("this platform runs vLLM's Ray executor (tests/e2e/test_parallel.py ray_tp2)")
    r = refused["ray"]
    assert r.returncode == 2, r.stderr[-2000:]
    assert "--distributed-executor-backend ray" in r.stderr and "use mp" in r.stderr
