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
    exe = str(Path(sys.executable).with_name("steerd"))
    return subprocess.run([exe, "serve", "--port", "0", *args], capture_output=True, text=True,
                          timeout=timeout, env=None if env is None else {**os.environ, **env})


def test_sae_layer_out_of_range(tiny_dir):
    sae = tiny_dir / "saes" / "resid_l1"
    r = serve("--model", str(tiny_dir / "tiny-llama"), "--sae", f"{sae}@blocks.9.hook_resid_post")
    assert r.returncode == 2 and "the model has blocks 0..2" in r.stderr and str(sae) in r.stderr


def test_sae_width_mismatch(tiny_dir, tmp_path):
    import torch
    from safetensors.torch import save_file

    bad = tmp_path / "narrow"
    bad.mkdir()
    save_file({"W_enc": torch.zeros(64, 32), "W_dec": torch.zeros(32, 64), "b_enc": torch.zeros(32),
               "b_dec": torch.zeros(64)}, str(bad / "sae_weights.safetensors"))
    (bad / "cfg.json").write_text(json.dumps({"architecture": "standard", "d_in": 64, "d_sae": 32,
                                              "metadata": {"hook_name": "blocks.1.hook_resid_post"}}))
    r = serve("--model", str(tiny_dir / "tiny-llama"), "--sae", str(bad))
    assert r.returncode == 2
    assert "d_in=64" in r.stderr and "hidden size at blocks.1.hook_resid_post is 128" in r.stderr


def test_unsupported_architecture(tiny_dir, tmp_path):
    model = tmp_path / "bert"
    shutil.copytree(tiny_dir / "tiny-llama", model)
    cfg = json.loads((model / "config.json").read_text())
    cfg["architectures"] = ["MysteryForCausalLM"]
    (model / "config.json").write_text(json.dumps(cfg))
    r = serve("--model", str(model), "--sae", str(tiny_dir / "saes" / "resid_l1"))
    assert r.returncode == 2
    assert "MysteryForCausalLM" in r.stderr and "supported: GPT2LMHeadModel" in r.stderr


def test_malformed_sae_directory(tiny_dir, tmp_path):
    bad = tmp_path / "broken"
    shutil.copytree(tiny_dir / "saes" / "resid_l1", bad)
    (bad / "sae_weights.safetensors").unlink()
    r = serve("--model", str(tiny_dir / "tiny-llama"), "--sae", str(bad))
    assert r.returncode == 2 and "sae_weights.safetensors" in r.stderr and "missing" in r.stderr


def test_duplicate_sae_ids(tiny_dir):
    p = str(tiny_dir / "saes" / "resid_l1")
    r = serve("--model", str(tiny_dir / "tiny-llama"), "--sae", f"a={p}", "--sae", f"a={p}")
    assert r.returncode == 2 and "duplicate SAE ids" in r.stderr


def test_unpatched_model_runner_refuses_to_serve_unsteered(tiny_dir):
    """A runner whose step wrapper is not ours (Model Runner V2 on GPU is the known case)
    must fail startup, never serve: simulated by leaving the CPU runner unpatched."""
    from sae_runtime.vllm.worker import SKIP_PATCH_ENV

    r = serve("--model", str(tiny_dir / "tiny-llama"), "--dtype", "float32",
              "--max-model-len", "128", "--sae", str(tiny_dir / "saes" / "resid_l1"),
              env={SKIP_PATCH_ENV: "1"}, timeout=300)
    assert r.returncode == 1, r.stdout[-2000:] + r.stderr[-2000:]
    assert "CPUModelRunner is not one sae_runtime patches" in r.stderr
    assert "refusing to serve unsteered" in r.stderr
    assert "listening on" not in r.stdout


def test_ray_executor_on_a_platform_without_ray_is_refused_before_the_engine(tiny_dir):
    from sae_runtime.vllm.engine import ray_supported

    if ray_supported():
        pytest.skip("this platform runs vLLM's Ray executor (tests/e2e/test_parallel.py ray_tp2)")
    r = serve("--model", str(tiny_dir / "tiny-llama"), "--sae", str(tiny_dir / "saes" / "resid_l1"),
              "--tensor-parallel-size", "2", "--distributed-executor-backend", "ray")
    assert r.returncode == 2, r.stderr[-2000:]
    assert "--distributed-executor-backend ray" in r.stderr and "use mp" in r.stderr
