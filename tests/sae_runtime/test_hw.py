"""SAE compute dtype by hardware, and vLLM CPU defaults (pure functions, no engine)."""

from __future__ import annotations

import pytest
import torch

from sae_runtime import hw
from sae_runtime.hw import CPUInfo, choose_sae_dtype, cpu_env_defaults

AVX2 = CPUInfo(model="AMD EPYC", capability="AVX2", native=("float32",), cores=2)
SPR = CPUInfo(model="Intel Xeon", capability="AVX512", native=("float32", "bfloat16", "float16"),
              cores=2)


@pytest.mark.parametrize("model_dtype", ["torch.bfloat16", "bfloat16", "float16"])
def test_auto_never_picks_an_emulated_dtype_on_cpu(model_dtype):
    dt, why = choose_sae_dtype("auto", model_dtype, "cpu", AVX2)
    assert dt == "float32"
    assert "no native" in why and "AVX2" in why


def test_auto_keeps_a_native_low_precision_dtype():
    assert choose_sae_dtype("auto", "torch.bfloat16", "cpu", SPR)[0] == "bfloat16"
    assert choose_sae_dtype("auto", "float16", "cpu", SPR)[0] == "float16"


def test_auto_is_the_model_dtype_off_cpu_and_for_float32():
    assert choose_sae_dtype("auto", "torch.bfloat16", "cuda", AVX2)[0] == "bfloat16"
    assert choose_sae_dtype("auto", "torch.float32", "cpu", AVX2)[0] == "float32"


def test_explicit_dtype_is_kept_but_an_emulated_one_is_flagged():
    dt, why = choose_sae_dtype("bfloat16", "float32", "cpu", AVX2)
    assert dt == "bfloat16" and "emulated" in why
    dt, why = choose_sae_dtype("bfloat16", "float32", "cpu", SPR)
    assert dt == "bfloat16" and "emulated" not in why


def test_this_machine_is_described_consistently():
    info = hw.cpu_info()
    assert info.native[0] == "float32" and info.cores >= 1
    # torch's own probe and ours agree on bf16 (the decision the dtype rests on)
    torch_bf16 = bool(getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()) or \
        bool(getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)())
    if torch_bf16:
        assert info.native_bf16


def test_kv_cache_default_is_bounded_and_shared_by_ranks():
    assert cpu_env_defaults({}, 1, cpus=[0], avail_gib=22.0)["VLLM_CPU_KVCACHE_SPACE"][0] == "4"
    assert cpu_env_defaults({}, 2, cpus=[0, 1], avail_gib=22.0)["VLLM_CPU_KVCACHE_SPACE"][0] == "2"
    assert cpu_env_defaults({}, 1, cpus=[0], avail_gib=1.0)["VLLM_CPU_KVCACHE_SPACE"][0] == "1"
    assert "VLLM_CPU_KVCACHE_SPACE" not in cpu_env_defaults({"VLLM_CPU_KVCACHE_SPACE": "7"}, 1)


def test_thread_binding_splits_the_cpus_per_rank():
    assert "VLLM_CPU_OMP_THREADS_BIND" not in cpu_env_defaults({}, 1, cpus=[0, 1], avail_gib=8)
    assert cpu_env_defaults({}, 2, cpus=[0, 1], avail_gib=8)["VLLM_CPU_OMP_THREADS_BIND"][0] == "0|1"
    got = cpu_env_defaults({}, 2, cpus=[4, 5, 6, 7, 9], avail_gib=8)["VLLM_CPU_OMP_THREADS_BIND"][0]
    assert got == "4-5|6-7"
    assert "VLLM_CPU_OMP_THREADS_BIND" not in cpu_env_defaults(
        {"VLLM_CPU_OMP_THREADS_BIND": "auto"}, 2, cpus=[0, 1], avail_gib=8)
    with pytest.raises(ValueError, match="need at least 4 CPUs"):
        cpu_env_defaults({}, 4, cpus=[0, 1], avail_gib=8)
