"""Worker-side glue: runs inside vLLM's worker process.

vLLM imports this module in the worker (``worker_extension_cls``) before it builds the
model. Importing it registers the custom op ``sae_steer::sae_hook`` (with a fake impl, so
compiled graphs keep it as an opaque call that runs every step; Python forward hooks would
be frozen into the trace or ignored) and wraps the model runner's ``load_model`` and
``_model_forward``:

- after ``load_model`` (and before the first forward, where ``torch.compile`` traces),
  ``install`` loads the SAEs and replaces ``forward`` of each hooked module *instance* (the
  decoder layer for residual sites, its attention/MLP/output-projection submodule for the
  others; see ``families.py``) with one that passes the activation through the op once per
  SAE hooked there. The hook ids are closure constants, so unhooked modules trace no op.
- ``_model_forward`` fills the per-step tables (token row -> slot, slot ->
  features/modes/values, reading rows) in place before each forward and uploads them to
  the device, publishes reads after it, and clears the tables.

The tables and the hook's computation are ``sae_runtime.tables.HookTables`` (no vLLM in
there): preallocated once (fixed addresses, sized by the engine's token and sequence
budgets); on CPU the kernels read the host-side row count to skip unsteered work, on CUDA
the fused splice reads only the fixed-shape device tables.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

import numpy as np
import torch

from sae_runtime.errors import SAEFormatError, UnsupportedModelError
from sae_runtime.interventions import EXTRA_ARGS_KEY, Scope, from_wire
from sae_runtime.loading import load_sae
from sae_runtime.reads import ReadScope, WireRead, reads_from_wire
from sae_runtime.tables import HookTables
from sae_runtime.vllm import compat
from sae_runtime.vllm.families import LAYER_NAME, block_of, family_of, supported
from sae_runtime.vllm.side_channel import ReadPublisher

log = logging.getLogger("sae_runtime.worker")

CONFIG_KEY = "sae_steering"  # key in VllmConfig.additional_config


# --------------------------------------------------------------------------- state


@dataclass(frozen=True)
class _Plan:
    """One request's edits on one hook, scope-ALL edits first."""

    feat: np.ndarray
    mode: np.ndarray
    val: np.ndarray
    n_all: int  # edits [0, n_all) apply at prompt positions too


@dataclass(frozen=True)
class _Segment:
    """Consecutive read rows of one request at one hook in this step."""

    rid: str
    read: WireRead
    hook_id: int
    offset: int  # first row in the hook's read output
    n: int
    pos0: int  # position of the first row
    pooled: bool


class SteeringState:
    """All hooks of this worker, and the per-step table filling."""

    def __init__(self, hooks: list[HookTables], publisher: ReadPublisher | None) -> None:
        self.hooks = hooks  # indexed like the server's SAE list: hook id == SAE index
        self.publisher = publisher
        self.segments: list[_Segment] = []

    def _reads(self, req) -> tuple[str, list[WireRead], bool]:
        cached = getattr(req, "_sae_reads", None)
        if cached is not None:
            return cached
        extra = (req.sampling_params.extra_args if req.sampling_params else None) or {}
        payload = extra.get(EXTRA_ARGS_KEY) or {}
        reads, pooled = reads_from_wire(payload)
        plan = (str(payload.get("rid", "")), reads, pooled)
        req._sae_reads = plan
        return plan

    def _plans(self, req) -> dict[int, _Plan]:
        cached = getattr(req, "_sae_plans", None)
        if cached is not None:
            return cached
        extra = req.sampling_params.extra_args if req.sampling_params else None
        ivs = from_wire((extra or {}).get(EXTRA_ARGS_KEY))
        by_hook: dict[int, list] = {}
        for iv in ivs:
            by_hook.setdefault(iv.sae_index, []).append(iv)
        plans = {}
        for hook_id, items in by_hook.items():
            items.sort(key=lambda iv: iv.scope != Scope.ALL)
            plans[hook_id] = _Plan(
                feat=np.array([iv.feature for iv in items], dtype=np.int64),
                mode=np.array([iv.mode for iv in items], dtype=np.int32),
                val=np.array([iv.value for iv in items], dtype=np.float32),
                n_all=sum(iv.scope == Scope.ALL for iv in items),
            )
        req._sae_plans = plans
        return plans

    def prepare_step(self, runner) -> None:
        """Fill every hook's tables for the batch the runner is about to run."""
        batch = runner.input_batch
        num_reqs = batch.num_reqs
        qsl = runner.query_start_loc.np
        computed = batch.num_computed_tokens_cpu
        for i, req_id in enumerate(batch.req_ids[:num_reqs]):
            req = runner.requests.get(req_id)
            if req is None:
                continue
            plans = self._plans(req)
            rid, reads, pooled = self._reads(req)
            if not plans and not reads:
                continue
            start, end = int(qsl[i]), int(qsl[i + 1])
            if end <= start:
                continue
            # Positions of rows start..end-1 are computed..computed+(end-start)-1; rows at
            # positions < prompt_len are prompt tokens.
            pos0 = int(computed[i])
            split = start + min(max(req.num_prompt_tokens - pos0, 0), end - start)
            for rp in reads:
                a, b = {ReadScope.PROMPT: (start, split),
                        ReadScope.GENERATION: (split, end)}.get(rp.scope, (start, end))
                if b > a:
                    hook_id = rp.sae_index
                    off = self.hooks[hook_id].add_read_rows(a, b, rp.top_k, rp.watch, pooled)
                    self.segments.append(_Segment(rid, rp, hook_id, off, b - a, pos0 + a - start, pooled))
            for hook_id, plan in plans.items():
                hook = self.hooks[hook_id]
                if split > start and plan.n_all:
                    k = plan.n_all
                    hook.add_rows(start, split, plan.feat[:k], plan.mode[:k], plan.val[:k])
                if end > split:
                    hook.add_rows(split, end, plan.feat, plan.mode, plan.val)
        for hook in self.hooks:
            hook.upload()

    def publish_reads(self) -> None:
        """Send this step's reads to the server, one record per segment."""
        if not self.segments:
            return
        records = []
        host_reads = {i: self.hooks[i].read_out_host() for i in {s.hook_id for s in self.segments}}
        for seg in self.segments:
            out = host_reads.get(seg.hook_id)
            if out is None:  # the hooked layer did not run (cannot happen in a full forward)
                continue
            vals, idx, watch, dense = out
            sl = slice(seg.offset, seg.offset + seg.n)
            k, w = seg.read.top_k, len(seg.read.watch)
            rec = {
                "rid": seg.rid, "sae": seg.read.sae_index, "pos0": seg.pos0, "n": seg.n,
                "k": k, "idx": idx[sl, :k].to(torch.int32).numpy().tobytes(),
                "val": vals[sl, :k].to(torch.float32).numpy().tobytes(),
                "w": w, "wv": watch[sl, :w].to(torch.float32).numpy().tobytes(),
            }
            if seg.pooled and dense is not None:
                d = dense[sl].to(torch.float32)
                rec["psum"] = d.sum(0).numpy().tobytes()
                rec["pmax"] = d.max(0).values.numpy().tobytes()
            records.append(rec)
        if records and self.publisher is not None:
            self.publisher.send(records)

    def end_step(self) -> None:
        self.segments.clear()
        for hook in self.hooks:
            hook.clear()


_STATE: SteeringState | None = None


# --------------------------------------------------------------------------- custom op


def _sae_hook(hidden_states: torch.Tensor, residual: torch.Tensor | None, hook_id: int) -> torch.Tensor:
    assert _STATE is not None, "sae_hook ran before SAEs were installed"
    return _STATE.hooks[hook_id].apply(hidden_states, residual)


def _sae_hook_fake(hidden_states: torch.Tensor, residual: torch.Tensor | None, hook_id: int) -> torch.Tensor:
    return torch.empty_like(hidden_states)


_LIB = torch.library.Library("sae_steer", "FRAGMENT")  # kept alive for the op's lifetime


def _register_op() -> None:
    if hasattr(torch.ops.sae_steer, "sae_hook"):
        return  # idempotent: the module may be imported twice (e.g. reloads)
    compat.direct_register_custom_op(
        "sae_hook", _sae_hook, mutates_args=[], fake_impl=_sae_hook_fake, target_lib=_LIB
    )


# --------------------------------------------------------------------------- patches


def _wrap_output(mod: torch.nn.Module, hook_ids: list[int], residual_tuple: bool) -> None:
    """Pass ``mod``'s output through the op, once per hook id, in order."""
    orig = mod.forward
    ids = tuple(hook_ids)

    if residual_tuple:
        def forward(*args, **kwargs):
            hidden_states, residual = orig(*args, **kwargs)
            for hook_id in ids:
                hidden_states = torch.ops.sae_steer.sae_hook(hidden_states, residual, hook_id)
            return hidden_states, residual
    else:
        def forward(*args, **kwargs):
            x = orig(*args, **kwargs)
            for hook_id in ids:
                x = torch.ops.sae_steer.sae_hook(x, None, hook_id)
            return x

    mod.forward = forward


def _wrap_input(mod: torch.nn.Module, hook_ids: list[int]) -> None:
    """Pass ``mod``'s first argument through the op before ``mod`` runs (hook_z)."""
    orig = mod.forward
    ids = tuple(hook_ids)

    def forward(x, *args, **kwargs):
        for hook_id in ids:
            x = torch.ops.sae_steer.sae_hook(x, None, hook_id)
        return orig(x, *args, **kwargs)

    mod.forward = forward


def _patch_runner_class(cls: type) -> None:
    if "_sae_patched" in cls.__dict__:
        return
    if "load_model" in cls.__dict__:
        orig_load = cls.load_model

        @functools.wraps(orig_load)
        def load_model(self, *args, **kwargs):
            orig_load(self, *args, **kwargs)
            install(self)

        cls.load_model = load_model
    if "_model_forward" in cls.__dict__:
        orig_fwd = cls._model_forward

        @functools.wraps(orig_fwd)
        def _model_forward(self, *args, **kwargs):
            if _STATE is None:
                return orig_fwd(self, *args, **kwargs)
            _STATE.prepare_step(self)
            try:
                out = orig_fwd(self, *args, **kwargs)
                _STATE.publish_reads()
                return out
            finally:
                _STATE.end_step()

        cls._model_forward = _model_forward
    if "sample_tokens" in cls.__dict__ and "_bookkeeping_sync" in cls.__dict__:
        _patch_cpu_seeded_rewind(cls)
    cls._sae_patched = True


def _patch_cpu_seeded_rewind(cls: type) -> None:
    """Keep seeded requests from killing the engine on CPU (a vLLM 0.32 CPU bug).

    When a step's sample is discarded (a chunked prompt's partial prefill), vLLM rewinds a
    seeded request's generator with ``gen.set_offset(gen.get_offset() - 4)``, which only
    CUDA's Philox generator supports: a CPU generator raises "CPU Generator does not use
    offset", the worker dies and the engine with it. On CPU we do the rewind vLLM means: save
    those generators' states before sampling and restore them afterwards, keeping them out of
    vLLM's own rewind. CUDA runs are untouched.
    """
    orig_sample, orig_book = cls.sample_tokens, cls._bookkeeping_sync

    @functools.wraps(orig_sample)
    def sample_tokens(self, *args, **kwargs):
        self._sae_rng_saved = _discarded_generator_states(self)
        try:
            return orig_sample(self, *args, **kwargs)
        finally:
            self._sae_rng_saved = None

    @functools.wraps(orig_book)
    def _bookkeeping_sync(self, *args, **kwargs):
        saved = getattr(self, "_sae_rng_saved", None)
        if not saved:
            return orig_book(self, *args, **kwargs)
        gens = self.input_batch.generators
        held = {i: gens.pop(i) for i in saved if i in gens}
        try:
            return orig_book(self, *args, **kwargs)
        finally:
            for i, g in held.items():
                g.set_state(saved[i])
                gens[i] = g

    cls.sample_tokens = sample_tokens
    cls._bookkeeping_sync = _bookkeeping_sync


def _discarded_generator_states(runner) -> dict[int, torch.Tensor] | None:
    batch = getattr(runner, "input_batch", None)
    if batch is None or not batch.generators or runner.device.type != "cpu":
        return None
    discard = runner.discard_request_mask.np[:batch.num_reqs]
    return {int(i): g.get_state() for i in np.nonzero(discard)[0]
            if (g := batch.generators.get(int(i))) is not None}


def install(runner) -> None:
    """Load the configured SAEs onto the runner's model and wrap the hooked modules."""
    global _STATE
    cfg = (runner.vllm_config.additional_config or {}).get(CONFIG_KEY)
    if not cfg:
        return
    model = runner.model
    if getattr(model, "_sae_installed", False):
        return  # a runner whose load_model calls its parent's: install once
    model._sae_installed = True
    archs = getattr(runner.model_config.hf_config, "architectures", None)
    family = family_of(archs)
    if family is None:
        raise UnsupportedModelError(
            f"model architecture {archs} has no SAE hook support; supported: {supported()}"
        )
    layers = {int(m.group(1)): mod for name, mod in model.named_modules()
              if (m := LAYER_NAME.search(name))}
    hidden = runner.model_config.get_hidden_size()
    sched = runner.scheduler_config
    max_tokens = int(sched.max_num_batched_tokens)
    max_slots = 2 * int(sched.max_num_seqs)
    max_feats = int(cfg["max_interventions"])
    max_watch = int(cfg.get("max_watch", 0))
    device = next(model.parameters()).device
    from sae_runtime.vllm.engine import resolve_sae_dtype

    sae_dtype = getattr(torch, resolve_sae_dtype(cfg.get("sae_dtype", "auto"), runner.model_config.dtype))
    hooks: list[HookTables] = []
    targets: dict[tuple[int, str], list[int]] = {}  # (block, site kind) -> hook ids, in order
    for entry in cfg["saes"]:
        sae = load_sae(entry["path"], hook_name=entry.get("hook_name")).to(device, sae_dtype)
        c = sae.cfg
        block = block_of(c.layer, c.site)
        if block not in layers:
            raise SAEFormatError(
                f"{entry['path']}: SAE {entry['id']!r} hooks {c.hook_name} but the model has "
                f"blocks 0..{max(layers)}"
            )
        site = "out" if c.site in ("resid_post", "resid_pre") else c.site
        if site != "z" and c.d_in != hidden:
            raise SAEFormatError(
                f"{entry['path']}: SAE {entry['id']!r} has d_in={c.d_in} but the model's "
                f"hidden size is {hidden}"
            )
        hook_id = len(hooks)
        hooks.append(HookTables(sae, max_tokens, max_slots, max_feats, max_watch))
        targets.setdefault((block, site), []).append(hook_id)
        log.info("SAE %s (%s, d_sae=%d, %s) at block %d %s", entry["id"], c.architecture,
                 c.d_sae, sae_dtype, block, c.site)
    for (block, site), ids in targets.items():
        layer = layers[block]
        if site == "out":
            _wrap_output(layer, ids, family.residual_tuple)
        elif site == "z":
            _wrap_input(layer.get_submodule(family.z), ids)
        else:
            _wrap_output(layer.get_submodule(getattr(family, site)), ids, residual_tuple=False)
    addr = cfg.get("reads_addr")
    _STATE = SteeringState(hooks, ReadPublisher(addr) if addr else None)


class SteeringWorkerExtension:
    """Named in ``worker_extension_cls`` so vLLM imports this module in the worker before it
    builds the model; the import registers the op and wraps the model runner."""


_register_op()
for _cls in compat.model_runner_classes():
    _patch_runner_class(_cls)
