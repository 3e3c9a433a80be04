"""A served cross-layer transcoder's per-step tables and its per-slot computation. No vLLM.

A CLT (``sae_runtime.saes.clt``) is one hook id to the planner and the server: one
``HookTables`` whose edit rows and reads name *flat* features ``f = slot * F + j`` (``F``
features per slot), filled by the planner as for any SAE. The worker calls it once per slot
``s`` and block ``layers[s]``, in forward order:

- ``stash_slot(x, s)`` before the block's MLP: keeps the MLP input (the slot's encoder
  input) in ``stash[s]``;
- ``apply_slot(h, s)`` on the block's MLP output ``h``: adds this step's edits.

The edit of flat feature ``(s, j)`` at a row, from activation ``a = f_sj(x_s)`` to ``a' =
edited(mode, value, a)``, adds ``(a' - a) * W_dec[s][j, l - s]`` to the MLP output of every
slot ``l >= s`` (circuit-tracer's feature intervention, ``clt.edit_delta``). So:

- at slot ``s``, the row's entries whose feature is in slot ``s`` get their coefficient
  ``a' - a`` from the slot's SAE view (``clt.slot_sae``: its encoder, activation and
  conditions, windows, token matches and latches as any SAE edit, ``kernels.reference.
  row_edits``), encoded from ``stash[s]`` (the slot's input in the *steered* forward: the
  edits of earlier slots have flowed through the model, as in circuit-tracer);
- the **carry** ``carry [max_tokens, K]`` (float32, one column per edit entry of a row, a
  fixed address allocated at install from the table budgets, so nothing a request sends can
  outgrow it) holds each entry's coefficient once its slot has computed it: slot 0 writes
  it, every later slot adds its own entries (their columns are 0 until then);
- at slot ``l`` the delta is ``sum_k carry[r, k] * D_l[f_k]`` over the entries of slots
  ``<= l``, with ``D_l = clt.output_decoder(clt, l)`` (``[(l + 1) F, d]``, row = flat
  feature): one gather-matmul over the union of the step's features, as the compact SAE
  splice does.

Rows without an edit here do no work (the compacted ``rows`` list); a step without edit rows
returns copies of ``h`` at once; padding rows are never in ``rows``. Conditions read a feature
of the edit's own slot (the server refuses others: ``spec.interventions``), so each is
evaluated at the slot that edits. Reads of the CLT are computed at the last slot, from every
slot's stash: per slot the top-k (ids offset to flat) and its watched ids, merged into one
top-k over all ``L * F`` features; pooled reads (``Encode``) pool the dense flat latents.

CPU (compact) path only: the tables are host memory (``staged`` False) and the row counts
decide on the host. The server refuses a CLT on CUDA and under pipeline parallelism (the
carry does not cross stages: ``server.startup.check_clt_serving``); the worker refuses too
(``install``). Under tensor parallelism every rank holds these tables and computes the same
edits (replicated MLP input, all-reduced MLP output); only the publishing rank reads.
"""

from __future__ import annotations

import numpy as np
import torch

from sae_runtime import ops, registry
from sae_runtime.kernels import read_topk, row_edits
from sae_runtime.saes import clt as clt_math
from sae_runtime.saes.base import SAE
from sae_runtime.spec.budget import pool_chunk_rows
from sae_runtime.step.tables import HookTables


class CLTHookTables(HookTables):
    """``HookTables`` of a cross-layer transcoder (module docstring); ``self.sae`` is slot 0's
    view (the base class sizes tables by it), the math is per slot (``views``)."""

    def __init__(self, clt: clt_math.CLT, max_tokens: int, max_slots: int, max_feats: int,
                 max_watch: int = 0, *, act_dtype: torch.dtype | None = None) -> None:
        L = clt.cfg.n_layers
        self.views: list[SAE] = [clt_math.slot_sae(clt, s) for s in range(L)]
        super().__init__(self.views[0], max_tokens, max_slots, max_feats, max_watch,
                         staged=False, act_dtype=act_dtype)
        dev = clt.W_enc.device
        z = self.sizes
        self.n_slots_clt = L
        self.F = clt.cfg.d_sae
        self.decoders = [clt_math.output_decoder(clt, s) for s in range(L)]
        act = act_dtype or clt.W_enc.dtype
        self.stash = torch.zeros(L, z.max_tokens, clt.cfg.d_in, dtype=act, device=dev)
        self.carry = torch.zeros(z.max_tokens, z.edit_width, dtype=torch.float32, device=dev)
        n_feat = L * self.F
        self.pool_sum = torch.zeros(z.pool_slots + 1, n_feat, dtype=torch.float32, device=dev)
        self.pool_max = torch.full_like(self.pool_sum, -float("inf"))
        self.pool_chunk = pool_chunk_rows(n_feat)
        self._step: tuple | None = None  # this step's host plan (``_step_plan``)

    def _busy(self) -> bool:
        return self.n_rows > 0 or self.n_read > 0

    def stash_slot(self, x: torch.Tensor, slot: int) -> torch.Tensor:
        """Slot ``slot``'s MLP input ``x [T, d]``, kept when this step edits or reads; returns a
        copy of ``x`` (an op may not alias its input)."""
        if self._busy():
            self.stash[slot, : x.shape[0]].copy_(x)
        return x.clone()

    def _slot_edits(self, slot: int, rows: torch.Tensor, x: torch.Tensor, width: int,
                    placed) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(local feature, mode, value) [R, K]`` of ``rows``' entries in slot ``slot`` (mode
        NONE elsewhere), conditions evaluated on ``x`` (the rows' slot input)."""
        view, F = self.views[slot], self.F
        e, live, p = placed
        flat = self.edits.feature[e]
        live = live & (flat // F == slot)

        def cond(cols: torch.Tensor) -> torch.Tensor:
            return ops.feature_activations(view, x, (cols - slot * F).clamp(0, F - 1))

        feat, mode, val = row_edits(self.edits, rows, cond if self.n_cond else None, width,
                                    (e, live, p))
        return (feat - slot * F).clamp(0, F - 1), mode, val

    def clear(self) -> None:
        super().clear()
        self._step = None

    def _step_plan(self) -> tuple:
        """``(placed, slots)`` of this step, computed once on the host: ``placed_edits`` of
        the compacted rows and the slots the step's edit rows name (sorted)."""
        if self._step is None:
            k = max(self.edit_k, 1)
            feats = self._np["edit_feature"][: self.n_edits]
            self._step = (self.placed(k), np.unique(feats // self.F).tolist())
        return self._step

    def apply_slot(self, h: torch.Tensor, slot: int) -> torch.Tensor:
        """``h`` (slot ``slot``'s MLP output) plus this step's edits of slots ``<= slot``.

        Host decisions (the step's edit rows are known before the forward): a slot before
        the first edited one adds nothing; a slot no edit row names computes no
        coefficients (the first edited slot writes the carry, later ones add to it)."""
        if slot == self.n_slots_clt - 1 and self.n_read:
            self._read_all()
        n = self.n_rows
        if n == 0:
            return h.clone()
        placed, slots = self._step_plan()
        if not slots or slots[0] > slot:
            return h.clone()
        rows = self.rows[:n]
        k = max(self.edit_k, 1)
        carry = self.carry[:n, :k]
        if slot in slots:
            view = self.views[slot]
            x = self.stash[slot][rows].to(view.W_enc.dtype)
            feat, mode, val = self._slot_edits(slot, rows, x, k, placed)
            arch = registry.get(view.cfg.architecture)
            union, inv = torch.unique(feat, return_inverse=True)
            pre = (x @ view.W_enc[:, union] + view.b_enc[union]).gather(1, inv)  # [R, K]
            act = arch.activate_columns(view, pre, feat, None, x)
            coef = (ops.edited_values(mode, val.to(act.dtype), act) - act).to(torch.float32)
            if slot == slots[0]:
                carry.copy_(coef)
            else:
                carry.add_(coef)
        flat = self.edits.feature[placed[0]]  # [R, K]
        reach = flat < (slot + 1) * self.F  # entries of slots <= slot
        c = torch.where(reach, carry, torch.zeros_like(carry))
        idx = torch.where(reach, flat, torch.zeros_like(flat))
        union, inv = torch.unique(idx, return_inverse=True)
        dec = self.decoders[slot]
        coef_u = torch.zeros(n, len(union), dtype=dec.dtype, device=h.device)
        coef_u.scatter_add_(1, inv, c.to(dec.dtype))
        out = h.clone()
        out.index_add_(0, rows, (coef_u @ dec[union]).to(h.dtype))
        return out

    def _read_all(self) -> None:
        """This step's reads of the CLT, from every slot's stash (module docstring)."""
        n, F, L = self.n_read, self.F, self.n_slots_clt
        rows = self.read_rows[:n]
        k_e = max(self.edit_k, 1)
        placed = self.placed(k_e, self._np["read_rows"][:n])
        watch_flat = self.rslot_watch[self.read_slot[:n], : self.read_w]
        k = self.read_k
        xs = [self.stash[s][rows].to(self.views[s].W_enc.dtype) for s in range(L)]
        edits = [self._slot_edits(s, rows, xs[s], k_e, placed) for s in range(L)]
        if not self.read_pooled:
            k_s = min(k, F)
            vals, idx = [], []
            watch = torch.zeros(n, watch_flat.shape[1], dtype=xs[0].dtype, device=rows.device)
            for s in range(L):
                in_s = watch_flat // F == s
                w_local = torch.where(in_s, watch_flat - s * F, torch.zeros_like(watch_flat))
                v, i, w = read_topk(self.views[s], xs[s], *edits[s], k_s, w_local)
                vals.append(v)
                idx.append(i + s * F)
                watch = torch.where(in_s, w.to(watch.dtype), watch)
            top_v, at = torch.cat(vals, 1).topk(k, dim=1)
            self.read_out = (top_v, torch.cat(idx, 1).gather(1, at), watch, None)
            return
        self._pooled_read(n, k, watch_flat, xs[0].dtype, lambda c: torch.cat(
            [ops.read_latents(self.views[s], xs[s][c], *(t[c] for t in edits[s]))
             for s in range(L)], 1))  # [chunk, L * F]
