"""Keep seeded requests from killing the engine on CPU (a vLLM 0.32 CPU bug).

When a step's sample is discarded (a chunked prompt's partial prefill), vLLM rewinds a
seeded request's generator with ``gen.set_offset(gen.get_offset() - 4)``, which only CUDA's
Philox generator supports: a CPU generator raises "CPU Generator does not use offset", the
worker dies and the engine with it. On CPU we do the rewind vLLM means: save those
generators' states before sampling and restore them afterwards, keeping them out of vLLM's
own rewind. CUDA runs are untouched.
"""

from __future__ import annotations

import functools

import numpy as np
import torch


def patch_cpu_seeded_rewind(cls: type) -> None:
    """Wrap ``cls.sample_tokens`` and ``cls._bookkeeping_sync`` (a V1 model runner class)."""
    orig_sample, orig_book = cls.sample_tokens, cls._bookkeeping_sync

    @functools.wraps(orig_sample)
    def sample_tokens(runner, *args, **kwargs):
        runner._sae_rng_saved = discarded_generator_states(runner)
        try:
            return orig_sample(runner, *args, **kwargs)
        finally:
            runner._sae_rng_saved = None

    @functools.wraps(orig_book)
    def _bookkeeping_sync(runner, *args, **kwargs):
        saved = getattr(runner, "_sae_rng_saved", None)
        if not saved:
            return orig_book(runner, *args, **kwargs)
        gens = runner.input_batch.generators
        held = {i: gens.pop(i) for i in saved if i in gens}
        try:
            return orig_book(runner, *args, **kwargs)
        finally:
            for i, g in held.items():
                g.set_state(saved[i])
                gens[i] = g

    cls.sample_tokens = sample_tokens
    cls._bookkeeping_sync = _bookkeeping_sync


def discarded_generator_states(runner) -> dict[int, torch.Tensor] | None:
    """States of the CPU generators of requests whose sample this step discards."""
    batch = getattr(runner, "input_batch", None)
    if batch is None or not batch.generators or runner.device.type != "cpu":
        return None
    discard = runner.discard_request_mask.np[:batch.num_reqs]
    return {int(i): g.get_state() for i in np.nonzero(discard)[0]
            if (g := batch.generators.get(int(i))) is not None}
