"""Read assembly: one request's buffered reads (``server.core.reads.RequestReads``) handed
out as ``FeatureActivations`` in position order, each position once, and guardrails checked
against the hidden guard reads."""

from __future__ import annotations

import logging
import math

import numpy as np

from sae_runtime.spec.activations import ActivationRead, ActPool, pool_rows
from sae_runtime.spec.guardrails import GuardSpec
from sae_runtime.spec.reads import Read
from server.core.reads import RequestReads, act_key
from server.core.types import ActivationRows, FeatureActivations, PooledActivations, PooledFeature

log = logging.getLogger("steerd")

READ_WAIT_S = 30.0
"""How long a request waits for reads the worker has not delivered (a finished request for
its last ones): they are pushed before the step's outputs leave the worker, so in practice
they are already there."""


class ReadFeed:
    """Turns one request's buffered reads into FeatureActivations, each position once.

    Position p's activation exists once token p has been fed to the model: prompt positions
    right away, generated position p one step after token p was sampled. The newest token
    has not been fed yet, so at any time positions < prompt_len + generated - 1 are fed.
    Reads are keyed by their index in the request's read list; those from ``shown`` on are
    hidden (guardrails' reads): waited for, checked, never sent.

    A guarded position whose hidden read never arrives (``wait_s`` passed) has no value: it
    passes the guardrails, or, with ``trip_missing`` (``--guardrail-missing-read trip``),
    trips the first guardrail watching it, with value NaN.

    Raw activation reads (``acts``) ride along: ``take`` moves their rows of the positions
    it hands out into ``activations`` (per position) or keeps them for pooling
    (``activations(final=True)`` pools them).
    """

    def __init__(self, buf: RequestReads, reads: tuple[Read, ...], prompt: list[int],
                 shown: int | None = None, *, wait_s: float = READ_WAIT_S,
                 trip_missing: bool = False, acts: tuple[ActivationRead, ...] = ()) -> None:
        self.buf = buf
        self.reads = list(enumerate(reads))  # (read index, read)
        self.acts = list(enumerate(acts))
        # per activation read: the positions and rows taken and not yet handed out
        self._act_pos: list[list[int]] = [[] for _ in acts]
        self._act_rows: list[list[np.ndarray]] = [[] for _ in acts]
        self.shown = len(reads) if shown is None else shown
        self.prompt = prompt
        self.generated: list[int] = []
        self.next_pos = 0  # positions below this have been sent
        self.next_guard = 0  # positions below this have been checked against the guardrails
        self.wait_s = wait_s
        self.trip_missing = trip_missing

    def fed(self) -> int:
        return len(self.prompt) + max(len(self.generated) - 1, 0)

    def _token(self, p: int) -> int:
        """The token position ``p`` consumes (known for every fed position)."""
        n = len(self.prompt)
        return self.prompt[p] if p < n else self.generated[p - n]

    def _wanted(self, p: int) -> list[tuple[int, Read]]:
        """The reads (with their indices) whose selectors pick position ``p``."""
        n, tok = len(self.prompt), self._token(p)
        return [(j, r) for j, r in self.reads if r.covers(p, n, tok)]

    def _wanted_acts(self, p: int) -> list[int]:
        """The activation reads whose selectors pick position ``p``."""
        n, tok = len(self.prompt), self._token(p)
        return [j for j, a in self.acts if a.selector.covers(p, n, tok)]

    def _expected(self, upto: int) -> dict[int, set[int]]:
        out = {}
        for p in range(self.next_pos, upto):
            want = {j for j, _ in self._wanted(p)}
            want.update(act_key(j) for j in self._wanted_acts(p))
            if want:
                out[p] = want
        return out

    async def wait_complete(self, rid: str, fed: int | None = None) -> bool:
        """Wait until every read of the fed positions (below ``fed``) has arrived, at most
        ``wait_s``; False (logged) if some never did."""
        upto = fed if fed is not None else self.fed()
        if await self.buf.wait_for(self._expected(upto), self.wait_s):
            return True
        log.error("request %s: feature reads incomplete after %.0fs", rid, self.wait_s,
                  extra={"request_id": rid})
        return False

    def first_trip(self, guards: GuardSpec, upto: int) -> tuple[int, int, float] | None:
        """``(guardrail, position, value)`` of the first trip at the unchecked positions
        below ``upto``, in position order (their reads have arrived: ``wait_complete``)."""
        n = len(self.prompt)
        hidden = [(j, r) for j, r in self.reads if j >= self.shown]
        while self.next_guard < upto:
            p = self.next_guard
            have = self.buf.by_pos.get(p, {})

            def value_of(sae: str, feature: int, p=p, have=have) -> float:
                for j, r in hidden:
                    if r.sae == sae and j in have and r.covers(p, n):
                        return float(have[j].watch[r.watch.index(feature)])
                return math.nan  # not read here (a lost read)

            hit = guards.first_trip(p, n, value_of, trip_missing=self.trip_missing)
            if hit is not None:
                return hit[0], p, hit[1]
            self.next_guard += 1
        return None

    def take(self, final: bool = False, fed: int | None = None,
             budget: int | None = None) -> list[FeatureActivations]:
        """Reads of consecutive positions that are complete, from the first unsent one.

        ``budget``: stop once this many bytes (``FeatureActivations.nbytes``) are taken, at
        a position boundary; the rest stays for the next call (``pending``)."""
        upto = fed if fed is not None else self.fed()
        out: list[FeatureActivations] = []
        size = 0
        while self.next_pos < upto:
            if budget is not None and size >= budget:
                break
            p = self.next_pos
            have = self.buf.by_pos.get(p, {})
            wanted = self._wanted(p)
            acts = self._wanted_acts(p) if self.acts else ()
            if not final and (any(j not in have for j, _ in wanted)
                              or any(act_key(j) not in have for j in acts)):
                break  # keep order: wait for this position
            tok = self._token(p)
            for j, r in wanted:
                if j in have and j < self.shown:
                    pr = have[j]
                    f = FeatureActivations(p, tok, r.sae, pr.indices, pr.values, pr.watch)
                    size += f.nbytes()
                    out.append(f)
            for j in acts:
                row = have.get(act_key(j))
                if row is not None:  # (a lost row is logged by wait_complete)
                    self._act_pos[j].append(p)
                    self._act_rows[j].append(row)
                    size += 4 * row.size
            self.next_pos += 1
        # sent (and checked): a long stream keeps only what is unsent
        self.buf.forget_below(min(self.next_pos, self.next_guard) if self.shown < len(self.reads)
                              else self.next_pos)
        return out

    def activations(self, final: bool = False) -> list[ActivationRows]:
        """The rows ``take`` has handed out since the last call, one entry per per-position
        read with rows; with ``final``, also one pooled row per pooled read (an empty
        ``[0, d]`` entry when none of its positions arrived)."""
        out = []
        for j, a in self.acts:
            pos, rows = self._act_pos[j], self._act_rows[j]
            if a.pool is ActPool.NONE:
                if pos:
                    out.append(ActivationRows(a.hook, pos, np.stack(rows), a.pool, a.dtype,
                                              a.before_edits))
                    self._act_pos[j], self._act_rows[j] = [], []
            elif final:
                values = pool_rows(np.stack(rows), a.pool) if rows else np.zeros((0, 0), np.float32)
                out.append(ActivationRows(a.hook, pos, values, a.pool, a.dtype, a.before_edits))
                self._act_pos[j], self._act_rows[j] = [], []
        return out

    def pending(self, fed: int | None = None) -> bool:
        """Whether fed positions are left unsent (a ``take`` stopped at its budget)."""
        return self.next_pos < (fed if fed is not None else self.fed())


def pooled(buf: RequestReads, read: Read, read_i: int, n_pos: int) -> PooledActivations:
    """An Encode read's pooled features: the watch list first, then the top_k features by
    max activation."""
    out = PooledActivations(read.sae, [])
    p = buf.pooled.get(read_i)
    if p is None:
        return out
    mean = p.total / max(n_pos, 1)
    order = list(read.watch)
    if read.top_k:
        order += np.argsort(-p.maximum, kind="stable")[: read.top_k].tolist()
    out.features = [PooledFeature(int(f), float(p.maximum[f]), float(mean[f])) for f in order]
    return out
