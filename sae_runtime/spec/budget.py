"""One capacity budget: what a request needs of a worker's per-step tables, what the tables
hold, and the check the converters run before a request is admitted.

vLLM decides which requests share a step, so no step may ever be "too full" for the
tables: a step holds at most ``max_num_seqs`` requests and ``max_num_batched_tokens``
token rows, and every table is sized so that *any* step of admitted requests fits. Two
halves, defined here once:

- **per request** (``needs`` / ``check_request``, run by the converters of both doors):
  a request may ask, at each hooked SAE, for at most ``edit_width`` edit rows (each window
  of each edit's position selector is one row; interventions, named vectors and the inline
  vector on one layer's bank all count together), ``READS_PER_SAE`` read slots (its own
  read and its guardrails' hidden watch read), a watch list of at most ``watch_width``
  features per read slot, and, when pooled (``Encode``), ``POOLED_READS_PER_SAE`` pooled
  read. A request that asks for more is refused with ``InvalidRequestError`` naming the
  field and the limit;
- **per step** (``TableSizes``, which ``sae_runtime.step.tables.HookTables`` is built
  from): one edit slot per scheduled request and hook (``EDIT_SLOTS_PER_REQUEST``;
  token-id selectors do not split a request: the planner writes a per-row token match
  table instead), so ``edit_slots = max_num_seqs`` and ``edit_rows = edit_slots *
  edit_width``; one latch state per edit row (the planner loads each request's latches
  into its rows before a step and reads them back after, so no pool can run out);
  ``read_slots = READS_PER_SAE * max_num_seqs`` and ``read_rows = READS_PER_SAE *
  max_num_batched_tokens`` (a read covers rows of its own request only); ``pool_slots =
  POOLED_READS_PER_SAE * max_num_seqs`` pooled sums and maxima of ``d_sae`` floats each,
  preallocated at install, and the dense latents a pooled read needs computed in chunks
  of ``pool_chunk_rows`` rows (about ``POOL_CHUNK_BYTES``), never ``[rows, d_sae]`` at
  once.

Raw activation reads (``sae_runtime.spec.activations``) take one row per selected token row
at each site they read, a site at most once per request, so a step's rows at a site are at
most ``max_num_batched_tokens`` (``step.act_reads``); per request they are capped in
positions and bytes (``check_activations``, run once the prompt length is known) and in
number (``DEFAULT_MAX_ACTIVATION_READS``), which bounds what the side channel carries and
the server buffers.

So the sum over any step of what admitted requests need is at most what the tables hold,
by construction; the worker asserts it (``HookTables``) and ``tests/sae_runtime/
test_step_fuzz.py`` drives random steps at the limits to show the asserts cannot fire.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from sae_runtime.errors import InvalidRequestError
from sae_runtime.saes.base import SAEConfig
from sae_runtime.spec.guardrails import MAX_GUARDRAILS, GuardSpec
from sae_runtime.spec.interventions import SteeringSpec
from sae_runtime.spec.reads import ReadSpec
from sae_runtime.spec.selectors import Selector
from sae_runtime.spec.vectors import is_bank

EDIT_SLOTS_PER_REQUEST = 1
"""Edit slots one scheduled request takes at one hook in one step, whatever its selectors."""
READS_PER_SAE = 2
"""Read slots one request may take at one SAE: its own read and its guardrails' hidden read
(``GuardSpec.reads``: one per guarded SAE). ``ReadSpec.validate`` allows one own read per SAE."""
POOLED_READS_PER_SAE = 1
"""Pooled reads (``Encode``) one request may have at one SAE (Encode has no guardrails)."""
POOL_CHUNK_BYTES = 32 * 2**20
"""About this many bytes of dense ``[rows, d_sae]`` float32 latents per chunk of a pooled
read (``pool_chunk_rows``); the same budget as the tiled read (``kernels.topk_read``)."""
FLOAT_BYTES = 4  # pooled sums and maxima are float32
DEFAULT_MAX_ACTIVATION_READS = 8
"""Raw activation reads one request may have (``--max-activation-reads``; one per site)."""
DEFAULT_MAX_ACTIVATION_POSITIONS = 4096
"""Positions one request's raw activation reads may copy, summed over its reads
(``--max-activation-positions``)."""
DEFAULT_MAX_ACTIVATION_BYTES = 16 * 2**20
"""Bytes of float32 rows one request's raw activation reads may copy, summed over its reads,
before pooling (``--max-activation-bytes``): what the side channel carries and the server
buffers for it."""


def watch_width(max_watch: int) -> int:
    """Features one read slot's watch list holds: the longest watch list a read may ask
    (``--max-watch``), or a guard read's (one feature per guardrail), whichever is longer."""
    return max(max_watch, MAX_GUARDRAILS, 1)


def pool_chunk_rows(d_sae: int) -> int:
    """Rows of dense latents a pooled read computes at once (at least one)."""
    return max(1, POOL_CHUNK_BYTES // (FLOAT_BYTES * d_sae))


@dataclass(frozen=True)
class TableSizes:
    """What one hooked SAE's per-step tables hold, from the engine's budgets (module doc)."""

    max_tokens: int  # token rows per step: vLLM's max_num_batched_tokens
    max_seqs: int  # requests per step: vLLM's max_num_seqs
    edit_width: int  # edit rows one request may have at one SAE: --max-interventions
    watch_width: int  # features one read slot watches: ``watch_width(--max-watch)``

    @classmethod
    def of(cls, *, max_num_seqs: int, max_num_batched_tokens: int, max_interventions: int,
           max_watch: int) -> TableSizes:
        return cls(int(max_num_batched_tokens), int(max_num_seqs), int(max_interventions),
                   watch_width(int(max_watch)))

    @property
    def edit_slots(self) -> int:
        return EDIT_SLOTS_PER_REQUEST * self.max_seqs

    @property
    def edit_rows(self) -> int:
        """Also the latch states (one per edit row) and, on an inline bank, the scratch
        decoder rows (one per edit slot: ``edit_slots``)."""
        return self.edit_slots * self.edit_width

    @property
    def read_slots(self) -> int:
        return READS_PER_SAE * self.max_seqs

    @property
    def read_rows(self) -> int:
        return READS_PER_SAE * self.max_tokens

    @property
    def pool_slots(self) -> int:
        return POOLED_READS_PER_SAE * self.max_seqs

    def pool_bytes(self, d_sae: int) -> int:
        """Preallocated pooled-read buffers of one SAE: a sum and a max per pool slot, plus
        a sink row each for the step's rows that do not pool."""
        return 2 * (self.pool_slots + 1) * d_sae * FLOAT_BYTES


def activation_rows(sel: Selector, prompt_len: int, total: int) -> int:
    """Rows the worker copies for one activation read over positions ``[0, total)``: the
    hull of its windows (``sae_runtime.step.act_reads``), token-id conditions ignored."""
    wins = sel.windows(prompt_len)
    if not wins:
        return 0
    lo, hi = wins[0][0], min(wins[-1][1], total)
    return max(hi - lo, 0)


class ActivationCaps(Protocol):
    max_activation_reads: int
    max_activation_positions: int
    max_activation_bytes: int


def check_activations(selectors: Sequence[Selector], widths: Sequence[int], prompt_len: int,
                      total: int, caps: ActivationCaps, prefix: str = "activation_reads") -> int:
    """Refuse activation reads (read ``j``: positions ``selectors[j]`` of a site
    ``widths[j]`` values wide) whose rows (over positions ``[0, total)``: the prompt and the
    most tokens the request may generate) go past the positions or bytes caps; names the
    read that takes the sum past a cap. Returns the rows in all."""
    rows = size = 0
    for j, (sel, width) in enumerate(zip(selectors, widths, strict=True)):
        n = activation_rows(sel, prompt_len, total)
        rows += n
        size += n * width * FLOAT_BYTES
        if rows > caps.max_activation_positions:
            raise InvalidRequestError(
                f"{prefix}[{j}].positions", f"the activation reads select up to {rows} "
                f"positions; the server allows at most {caps.max_activation_positions} per "
                "request (steerd serve --max-activation-positions); select fewer positions")
        if size > caps.max_activation_bytes:
            raise InvalidRequestError(
                f"{prefix}[{j}]", f"the activation reads need up to {size} bytes "
                f"({rows} positions of {FLOAT_BYTES}-byte values; this read's site is {width} "
                f"values wide); the server allows at most {caps.max_activation_bytes} per "
                "request (steerd serve --max-activation-bytes); select fewer positions")
    return rows


class RequestCaps(Protocol):
    """The server caps a request is checked against (``server.core.validate.Limits`` has them)."""

    max_interventions: int
    max_watch: int
    max_guardrails: int


@dataclass(frozen=True)
class Needs:
    """What one request needs of the per-step tables, per SAE id (a bank's id for vectors)."""

    edit_rows: dict[str, int] = field(default_factory=dict)  # every window of every edit
    read_slots: dict[str, int] = field(default_factory=dict)  # own read + guard read
    watch: dict[str, int] = field(default_factory=dict)  # the longest watch list there
    pooled_reads: dict[str, int] = field(default_factory=dict)
    pooled_bytes: int = 0  # the step records' pooled sums and maxima (2 x d_sae floats each)

    @property
    def edit_slots(self) -> dict[str, int]:
        return {sae: EDIT_SLOTS_PER_REQUEST for sae in self.edit_rows}


def _edit_sources(spec: SteeringSpec) -> dict[str, list[tuple[str, int]]]:
    """Per SAE id, the request fields its edit rows come from, in request order: the
    interventions, the named vectors (on a bank), each inline vector (on a bank)."""
    out: dict[str, list[tuple[str, int]]] = {}
    n_inline = 0
    for iv in spec.interventions:
        if iv.vector is not None:
            src = f"inline_vectors[{n_inline}]"
            n_inline += 1
        else:
            src = "vectors" if is_bank(iv.sae) else "interventions"
        out.setdefault(iv.sae, []).append((src, iv.selector.max_windows))
    return out


def needs(spec: SteeringSpec, reads: ReadSpec, guards: GuardSpec,
          saes: Mapping[str, SAEConfig]) -> Needs:
    """What the request needs at each SAE (it need not fit: ``check_request`` says)."""
    rows = {sae: sum(n for _, n in src) for sae, src in _edit_sources(spec).items()}
    slots: dict[str, int] = {}
    watch: dict[str, int] = {}
    pooled: dict[str, int] = {}
    for r in reads.reads + guards.reads():
        slots[r.sae] = slots.get(r.sae, 0) + 1
        watch[r.sae] = max(watch.get(r.sae, 0), len(r.watch))
        if reads.pooled:
            pooled[r.sae] = pooled.get(r.sae, 0) + 1
    nbytes = sum(2 * n * saes[s].d_sae * FLOAT_BYTES for s, n in pooled.items() if s in saes)
    return Needs(rows, slots, watch, pooled, nbytes)


def check_request(spec: SteeringSpec, reads: ReadSpec, guards: GuardSpec,
                  saes: Mapping[str, SAEConfig], caps: RequestCaps) -> Needs:
    """Refuse a request the tables can never hold; returns its ``Needs``.

    Raises ``InvalidRequestError`` naming the field that goes past a limit, the limit, and
    the option that sets it. Run after the request's own validation (SAE ids known).
    """
    width = caps.max_interventions
    for sae, src in _edit_sources(spec).items():
        total = sum(n for _, n in src)
        if total <= width:
            continue
        by_field: dict[str, int] = {}
        for f, n in src:
            by_field[f] = by_field.get(f, 0) + n
        if by_field.get("interventions", 0) > width:
            raise InvalidRequestError(
                "interventions",
                f"the interventions on SAE {sae!r} need {by_field['interventions']} edit rows "
                f"(one per position range, plus one for an excluded range set); the server "
                f"allows at most {width} per SAE per request (steerd serve --max-interventions)")
        if by_field.get("vectors", 0) > width:
            raise InvalidRequestError(
                "vectors", f"the vectors at {sae} need {by_field['vectors']} edit rows; the "
                f"server allows at most {width} (steerd serve --max-interventions)")
        seen = 0
        for f, n in src:  # the field that takes the layer past the limit
            seen += n
            if seen > width:
                raise InvalidRequestError(
                    f, f"{sae} would need {total} edit rows "
                    f"({', '.join(f'{k}: {v}' for k, v in by_field.items())}); the server "
                    f"allows at most {width} per layer per request, named and inline "
                    f"vectors together (steerd serve --max-interventions)")
    if guards.guards and reads.pooled:
        raise InvalidRequestError("abort_when", "guardrails are not taken with pooled reads")
    n = needs(spec, reads, guards, saes)
    guard_reads = {r.sae for r in guards.reads()}
    ww = watch_width(caps.max_watch)
    for j, r in enumerate(reads.reads):
        field_ = f"reads[{j}].sae"
        if n.read_slots[r.sae] > READS_PER_SAE:
            raise InvalidRequestError(field_, f"SAE {r.sae!r} is read {n.read_slots[r.sae]} "
                                      f"times (its guardrails' read included); at most "
                                      f"{READS_PER_SAE}")
        if n.pooled_reads.get(r.sae, 0) > POOLED_READS_PER_SAE:
            raise InvalidRequestError(field_, f"SAE {r.sae!r} is read {n.pooled_reads[r.sae]} "
                                      f"times with pooling; at most {POOLED_READS_PER_SAE}")
        if len(r.watch) > ww:
            raise InvalidRequestError(f"reads[{j}].watch", f"{len(r.watch)} features watched; "
                                      f"the server allows at most {caps.max_watch}")
    for sae in guard_reads:
        if n.watch[sae] > ww:
            raise InvalidRequestError("abort_when", f"the guardrails on {sae!r} watch "
                                      f"{n.watch[sae]} features; at most {ww}")
    return n


MAX_TRAIN_PROMPTS = 256
"""Prompts on each side (positive, negative) of one ``TrainVector`` call; each is one input
of the call's Encode passes (``max_encode_inputs`` at a time)."""
MAX_TRAIN_LAYERS = 8
"""Layers one ``TrainVector`` call fits; each is one activation read of its Encode passes,
so at most ``--max-activation-reads`` too."""


def check_train(n_pos: int, n_neg: int, layers: Sequence[int], *, paired: bool,
                max_reads: int) -> None:
    """Refuse a ``TrainVector`` call past the caps (module doc), naming the field: at least
    one and at most ``MAX_TRAIN_PROMPTS`` prompts a side, as many on each side when
    ``paired`` (PCA), at least one and at most ``min(MAX_TRAIN_LAYERS, max_reads)`` layers,
    none twice."""
    for name, n in (("positive", n_pos), ("negative", n_neg)):
        if not n:
            raise InvalidRequestError(name, "give at least one prompt")
        if n > MAX_TRAIN_PROMPTS:
            raise InvalidRequestError(name, f"{n} prompts given; the server allows at most "
                                      f"{MAX_TRAIN_PROMPTS} per side")
    if paired and n_pos != n_neg:
        raise InvalidRequestError("negative", f"PCA takes pairs (positive[i] with negative[i]): "
                                  f"{n_pos} positives, {n_neg} negatives")
    cap = min(MAX_TRAIN_LAYERS, max_reads)
    if not layers:
        raise InvalidRequestError("layers", "give at least one layer")
    if len(layers) > cap:
        raise InvalidRequestError("layers", f"{len(layers)} layers given; the server allows at "
                                  f"most {cap} per call (one activation read each; steerd "
                                  "serve --max-activation-reads)")
    seen: set[int] = set()
    for j, layer in enumerate(layers):
        if layer in seen:
            raise InvalidRequestError(f"layers[{j}]", f"layer {layer} is given twice")
        seen.add(layer)
