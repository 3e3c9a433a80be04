"""Raw activation reads in the worker's step: one ``ActSite`` per declared site. No vLLM here.

Each declared site (``WorkerConfig.act_sites``) has one op in the compiled graph
(``sae_steer::act_read``, after the edit hooks at the same module, so after this request's
edits there); a declared site where the server's hooks edit also has a before-edits twin
(``WorkerConfig.act_twins``: site ``len(act_sites) + k``, the same width and read), one more
op placed before those hooks. Before a forward, ``plan_acts`` writes the token rows each reading request
wants at each site into the site's preallocated row list; the op copies those rows of the
activation (the residual stream ``hidden + residual`` for a Llama-style layer's output) into
the site's preallocated ``[max_tokens, d]`` float32 buffer; after the forward,
``collect_acts`` slices the buffer into one ``ActRecord`` per request and site.

Two sites are not the op's input as it is: ``ln2.hook_normalized`` is read at the MLP's
input, which is the pre-MLP norm's output ``x_hat * gain + bias``, and the site gives
``x_hat`` back (``affine``: the norm's weight, Gemma's ``1 + weight`` included, and bias;
``families.mlp_norm_affine``); ``attn.hook_z`` under tensor parallelism holds
``n_heads / tp`` heads on each rank, so the op gathers the selected rows' columns over the
TP group (``gather``), which every TP rank enters alike: all of them plan the rows.

Sizes: a request reads a site at most once (``spec.activations.validate_reads``: one read
per hook and ``before_edits``, and both ways only where the hook has a twin) and reads
only its own token rows, so one step's rows at a site are at most ``max_num_batched_tokens``:
the buffers are allocated once, at install, and nothing a request sends can overflow them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from sae_runtime.step.records import ActRecord

log = logging.getLogger(__name__)


class ActSite:
    """One declared site's per-step rows and buffer (fixed addresses)."""

    def __init__(self, d: int, max_tokens: int, device: torch.device,
                 affine: tuple[torch.Tensor, torch.Tensor | None] | None = None,
                 gather: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        self.d = d  # the site's full width (``gather``: every rank's columns)
        self.affine = None
        if affine is not None:  # (1 / gain, bias), on the device in float32
            gain, bias = affine
            self.affine = (1.0 / gain.to(device, torch.float32),
                           None if bias is None else bias.to(device, torch.float32))
        self.gather = gather
        self.max_tokens = max_tokens
        self.rows_host = np.zeros(max_tokens, dtype=np.int64)
        self.rows = torch.zeros(max_tokens, dtype=torch.long, device=device)
        self.buf = torch.zeros(max_tokens, d, dtype=torch.float32, device=device)
        self.n = 0  # rows to copy this step (host side: the op skips the copy at 0)
        self.ran = False  # the op ran this step (a full forward always runs it)

    def upload(self) -> None:
        if self.n:
            self.rows[: self.n].copy_(torch.from_numpy(self.rows_host[: self.n]),
                                      non_blocking=self.rows.device.type != "cpu")

    def copy(self, x: torch.Tensor, residual: torch.Tensor | None) -> None:
        """Keep this step's planned rows of ``x`` (+ ``residual``) in ``buf``."""
        n = self.n
        if n:
            rows = self.rows[:n]
            v = x.index_select(0, rows)
            if residual is not None:
                v = v + residual.index_select(0, rows)
            if self.gather is not None:
                v = self.gather(v.contiguous())
            v = v.float()
            if self.affine is not None:
                inv_gain, bias = self.affine
                v = (v - bias if bias is not None else v) * inv_gain
            self.buf[:n].copy_(v)
        self.ran = True

    def clear(self) -> None:
        self.n = 0
        self.ran = False


@dataclass(frozen=True)
class ActPlan:
    """One activation read of a request (``RequestPlan.acts``)."""

    index: int  # its index in the request's ``RequestPayload.acts``
    site: int
    pos_lo: int  # the hull of its windows
    pos_hi: int


@dataclass(frozen=True)
class ActSegment:
    rid: str
    index: int
    site: int
    offset: int  # first row in the site's buffer
    n: int
    pos0: int


def plan_acts(sites: Sequence[ActSite | None], cols) -> list[ActSegment]:
    """Write the step's rows (``planner.StepColumns`` ``cols``) into each site's row list;
    returns one segment per (request, read) with rows in this step. Sites that are None are
    held by another pipeline stage."""
    out: list[ActSegment] = []
    for i, plan in enumerate(cols.plans):
        if not plan.acts:
            continue
        start, end, pos0 = int(cols.start[i]), int(cols.end[i]), int(cols.pos0[i])
        for ap in plan.acts:
            site = sites[ap.site]
            if site is None:
                continue
            n_rows = max(end - start, 0)
            a = start + min(max(ap.pos_lo - pos0, 0), n_rows)
            b = start + min(max(ap.pos_hi - pos0, 0), n_rows)
            if b <= a:
                continue
            m = site.n
            # at most max_tokens rows in all: one read per site per request (module doc).
            # Should a payload ever break that (server validation drift), its rows are
            # dropped here with an error logged: an engine must not die for one request.
            if m + (b - a) > site.max_tokens:
                log.error("activation read %d of request %s: site %d has no room for %d more "
                          "rows this step (%d of %d used); its rows are dropped (one read per "
                          "site per request was not kept)", ap.index, plan.rid, ap.site,
                          b - a, m, site.max_tokens)
                continue
            site.rows_host[m: m + (b - a)] = np.arange(a, b)
            site.n = m + (b - a)
            out.append(ActSegment(plan.rid, ap.index, ap.site, m, b - a, pos0 + a - start))
    for site in sites:
        if site is not None:
            site.upload()
    return out


def collect_acts(sites: Sequence[ActSite | None], segments: Sequence[ActSegment]) -> list[ActRecord]:
    """This step's activation rows (after the forward) as records, one per segment."""
    host: dict[int, np.ndarray] = {}
    out: list[ActRecord] = []
    for seg in segments:
        site = sites[seg.site]
        if site is None or not site.ran:  # the hooked module did not run (not in a full forward)
            continue
        if seg.site not in host:
            host[seg.site] = site.buf[: site.n].cpu().numpy()
        rows = host[seg.site][seg.offset: seg.offset + seg.n]
        out.append(ActRecord(seg.rid, seg.index, seg.site, seg.pos0, seg.n, site.d,
                             np.ascontiguousarray(rows, dtype="<f4").tobytes()))
    return out
