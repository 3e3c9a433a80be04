"""What this machine computes fast, and the SAE compute dtype that follows from it.

No vLLM in here. The worker (``sae_runtime/vllm/worker.py``) calls ``choose_sae_dtype`` once
per hooked SAE; the benchmarks call ``cpu_info`` to size their runs and record the machine.

Why it matters: on an x86 CPU without AVX512-BF16 or AMX (every AVX2-only machine, many
cloud VMs and AMD EPYC generations before Zen 4), PyTorch has no bfloat16 matrix kernels and
emulates them: ``[32, 576] @ [576, 16384]`` took 20.6 ms in float32 and 2,067 ms in
bfloat16 on a 2-core AMD EPYC (AVX2). ``--sae-dtype auto`` therefore never picks a dtype the
CPU emulates: it computes the SAE math in float32 there and converts at the hook (the
activation is cast up on the way in, the edit cast back to the model's dtype on the way
out), which is also at least as exact.
"""

from __future__ import annotations

import functools
import os
import platform
from dataclasses import dataclass
from pathlib import Path

import torch

LOW_PRECISION = ("bfloat16", "float16")


@functools.cache
def _cpuinfo() -> tuple[str, frozenset[str]]:
    """``(model name, flags)`` from /proc/cpuinfo (empty on other systems)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine(), frozenset()
    name, flags = "", set()
    for line in text.splitlines():
        key, _, val = line.partition(":")
        key = key.strip().lower()
        if key in ("model name", "cpu model") and not name:
            name = val.strip()
        elif key in ("flags", "features"):  # x86 / aarch64
            flags.update(val.split())
    return name or platform.processor() or platform.machine(), frozenset(flags)


def _torch_cpu(name: str) -> bool:
    fn = getattr(torch.cpu, name, None)  # private helpers; absent on some builds
    try:
        return bool(fn()) if fn is not None else False
    except RuntimeError:
        return False


@dataclass(frozen=True)
class CPUInfo:
    """The CPU as far as the SAE math cares."""

    model: str  # e.g. "AMD EPYC"
    capability: str  # torch's CPU kernel level, e.g. "AVX2", "AVX512"
    native: tuple[str, ...]  # float dtypes with native matrix instructions, float32 first
    cores: int

    @property
    def native_bf16(self) -> bool:
        return "bfloat16" in self.native

    def describe(self) -> str:
        return (f"{self.model} ({self.cores} cores, torch CPU capability {self.capability}, "
                f"native matmul dtypes: {', '.join(self.native)})")

    def as_dict(self) -> dict:
        return {"model": self.model, "capability": self.capability, "native": list(self.native),
                "cores": self.cores}


@functools.cache
def cpu_info() -> CPUInfo:
    name, flags = _cpuinfo()
    native = ["float32"]
    # x86: AVX512-BF16 (Cooper Lake, Zen 4+) or AMX tiles (Sapphire Rapids+). aarch64: the
    # "bf16" feature (Armv8.6 BFMMLA). Anything else runs bfloat16 matmuls emulated.
    if _torch_cpu("_is_avx512_bf16_supported") or _torch_cpu("_is_amx_tile_supported") or \
            "avx512_bf16" in flags or "amx_bf16" in flags or \
            (platform.machine() in ("aarch64", "arm64") and "bf16" in flags):
        native.append("bfloat16")
    # x86: AVX512-FP16 or AMX-FP16. aarch64: half-precision arithmetic (asimdhp).
    if _torch_cpu("_is_amx_fp16_supported") or "avx512_fp16" in flags or "amx_fp16" in flags or \
            (platform.machine() in ("aarch64", "arm64") and "asimdhp" in flags):
        native.append("float16")
    return CPUInfo(model=name, capability=torch.backends.cpu.get_cpu_capability(),
                   native=tuple(native), cores=len(os.sched_getaffinity(0)))


def choose_sae_dtype(requested: str, model_dtype: str, device_type: str,
                     info: CPUInfo | None = None) -> tuple[str, str]:
    """``(dtype name, why)`` the SAE computes in.

    ``requested`` is ``--sae-dtype`` (``auto`` or a dtype name); ``model_dtype`` the model's
    dtype name (``torch.bfloat16`` or ``bfloat16``). ``auto`` is the model's dtype, except on
    a CPU without native matrix instructions for it, where it is float32.
    """
    model_dtype = str(model_dtype).removeprefix("torch.")
    if requested != "auto":
        why = "set by --sae-dtype"
        if device_type == "cpu" and requested in LOW_PRECISION:
            info = info or cpu_info()
            if requested not in info.native:
                why += (f"; this CPU has no native {requested} matmul ({info.capability}), "
                        "so SAE math is emulated and slow: consider --sae-dtype auto")
        return requested, why
    if device_type != "cpu" or model_dtype not in LOW_PRECISION:
        return model_dtype, "auto: the model's dtype"
    info = info or cpu_info()
    if model_dtype in info.native:
        return model_dtype, f"auto: the model's dtype ({info.capability} has native {model_dtype})"
    return "float32", (f"auto: the model runs {model_dtype}, but this CPU ({info.model}, "
                       f"{info.capability}) has no native {model_dtype} matmul, so SAE math "
                       "runs in float32 and converts at the hook")


# ------------------------------------------------------------------ vLLM CPU defaults

KV_ENV = "VLLM_CPU_KVCACHE_SPACE"
BIND_ENV = "VLLM_CPU_OMP_THREADS_BIND"


def mem_available_gib() -> float:
    """MemAvailable from /proc/meminfo, in GiB (0 where unknown)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return 0.0


def cpu_env_defaults(env: dict[str, str], ranks: int, cpus: list[int] | None = None,
                     avail_gib: float | None = None) -> dict[str, tuple[str, str]]:
    """``{variable: (value, why)}`` for vLLM's CPU settings the user left unset.

    - ``VLLM_CPU_KVCACHE_SPACE`` (GiB of KV cache per rank): unset, vLLM's CPU worker
      reserves ``gpu_memory_utilization`` (92%) of the NUMA node and refuses to start when
      that much is not free. Default: a quarter of the available memory shared by the
      ``ranks`` workers, between 1 and 4 GiB each.
    - ``VLLM_CPU_OMP_THREADS_BIND`` (one OpenMP CPU set per rank, ``|``-separated): unset,
      vLLM binds rank N to NUMA node N, so a second rank on a one-node machine gets no
      cores. Default for ``ranks > 1``: this process's CPUs split into ``ranks`` contiguous
      groups (``"0|1"`` for two ranks on two cores). Fewer CPUs than ranks is an error.

    A variable already set (even to vLLM's own ``auto``) is left alone.
    """
    out: dict[str, tuple[str, str]] = {}
    if not env.get(KV_ENV):
        avail = mem_available_gib() if avail_gib is None else avail_gib
        gib = max(1, min(4, int(avail * 0.25 / max(ranks, 1))))
        out[KV_ENV] = (str(gib), f"{gib} GiB KV cache per rank ({avail:.1f} GiB available, "
                                 f"{ranks} rank(s))")
    if ranks > 1 and not env.get(BIND_ENV):
        cpus = sorted(os.sched_getaffinity(0)) if cpus is None else sorted(cpus)
        if len(cpus) < ranks:
            raise ValueError(
                f"{ranks} ranks (tensor x pipeline x data parallel) need at least {ranks} CPUs, "
                f"this process may use {len(cpus)}; lower the parallel sizes or set "
                f"{BIND_ENV} yourself")
        per = len(cpus) // ranks
        groups = [cpus[r * per:(r + 1) * per] for r in range(ranks)]
        value = "|".join(_ranges(g) for g in groups)
        out[BIND_ENV] = (value, f"{per} CPU(s) per rank")
    return out


def _ranges(ids: list[int]) -> str:
    """``[0, 1, 2, 5]`` -> ``"0-2,5"`` (vLLM's CPU list syntax)."""
    parts, start = [], None
    for i, c in enumerate(ids):
        if start is None:
            start = c
        if i + 1 == len(ids) or ids[i + 1] != c + 1:
            parts.append(str(start) if start == c else f"{start}-{c}")
            start = None
    return ",".join(parts)
