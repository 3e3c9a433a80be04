"""Host cost of a served cross-layer transcoder's hooks per step, no engine.

``python -m loadtests.bench_clt_step``: the embedded ``topics_clt`` (4 layers x 512
features, d 256, float32) in ``CLTHookTables``, a decode step of ``B`` requests (one row
each) planned by the step planner, every slot's ``stash_slot`` + ``apply_slot`` timed as the
worker calls them; side by side, in the same run, the layer-0 slot served alone as a
transcoder (``HookTables.stash_input`` + ``apply``, one block). Prints microseconds per step
and the CPU.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from sae_runtime import ops
from sae_runtime.hw import cpu_info
from sae_runtime.loading import load_clt
from sae_runtime.saes.clt import slot_sae
from sae_runtime.spec.payloads import EditPayload, RequestPayload
from sae_runtime.step.clt_tables import CLTHookTables
from sae_runtime.step.planner import ScheduledRequest, StepDescription, compile_request, plan_step
from sae_runtime.step.tables import HookTables

FOLDER = Path(__file__).resolve().parents[1] / "server" / "embedded" / "saes" / "topics_clt"


def _time(fn, reps: int) -> float:
    for _ in range(3):
        fn()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) / reps * 1e6


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--reps", type=int, default=200)
    args = ap.parse_args()
    torch.set_num_threads(1)
    clt = load_clt(FOLDER)
    L, d, B = clt.cfg.n_layers, clt.cfg.d_in, args.batch
    g = torch.Generator().manual_seed(0)
    xs, hs = torch.randn(L, B, d, generator=g), torch.randn(L, B, d, generator=g)
    clt_t = CLTHookTables(clt, 64, 64, 16)
    tc = HookTables(slot_sae(clt, 0).to("cpu"), 64, 64, 16)

    def plans(feature: int | None):
        out = []
        for i in range(B):
            edits = () if feature is None else (EditPayload(0, feature + i, int(ops.Mode.CLAMP), 3.0),)
            out.append(ScheduledRequest(f"r{i}", i, i + 1, 10, compile_request(
                RequestPayload(rid=f"r{i}", edits=edits), 4)))
        return StepDescription(out)

    rows = {}
    for name, feature in (("plain", None), ("clamp@layer0", 0)):
        step = plans(feature)

        def clt_step(step=step):
            clt_t.clear()
            plan_step([clt_t], step)
            for s in range(L):
                clt_t.stash_slot(xs[s], s)
                clt_t.apply_slot(hs[s], s)

        def tc_step(step=step):
            tc.clear()
            plan_step([tc], step)
            tc.stash_input(xs[0])
            tc.apply(hs[0], None)

        rows[name] = (_time(clt_step, args.reps), _time(tc_step, args.reps))
    print(f"CPU: {cpu_info().describe()}; torch threads 1; B={B} decode rows, K=16")
    for name, (c, t) in rows.items():
        print(f"{name:14s} CLT {L} slots: {c:8.1f} us/step   transcoder (1 block): {t:8.1f} "
              f"us/step   ratio {c / t:.2f}")


if __name__ == "__main__":
    main()
