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
- V1 runners (CPU, and CUDA with ``VLLM_USE_V2_MODEL_RUNNER=0``): ``_model_forward``
  describes the scheduled batch (``runner_v1.describe_step``) and lets the step planner
  (``sae_runtime.step.planner``, no vLLM) fill every hook's tables in place and upload them
  before each forward; after it, it publishes the reads and clears the tables.
- Model Runner V2 (the CUDA default): ``add_requests`` keeps each new request's payload,
  ``gather_batch_req_state`` drops the uniform decode count of a step with reads so V2
  runs it outside full graphs, ``prepare_inputs`` describes the step from V2's
  ``InputBatch`` (``runner_v2``) and fills the tables before any forward path runs (a FULL
  replay reads them as captured), ``execute_model`` publishes the reads and clears the
  tables.

The tables and the hook's computation are ``sae_runtime.step.tables.HookTables`` (no vLLM in
there): preallocated once (fixed addresses, sized by the engine's token and sequence
budgets); on CPU the kernels read the host-side row count to skip unsteered work, on CUDA
the fused splice reads only the fixed-shape device tables.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
from dataclasses import dataclass

import msgspec
import numpy as np
import torch

from sae_runtime.errors import SAEFormatError, UnsupportedModelError
from sae_runtime.hw import choose_sae_dtype
from sae_runtime.kernels import read_topk
from sae_runtime.loading import clt_hook_config, is_clt, load_clt, load_sae, load_sae_config
from sae_runtime.loading.vectors import Bank, bank_sae, build_banks
from sae_runtime.ops import fold_norm_weight
from sae_runtime.saes.clt import decoder_bytes
from sae_runtime.spec.activations import parse_hook
from sae_runtime.spec.budget import TableSizes
from sae_runtime.step import tables as tables_mod
from sae_runtime.step.act_reads import ActSegment, ActSite, collect_acts, plan_acts
from sae_runtime.step.clt_tables import CLTHookTables
from sae_runtime.step.config import ReadsKeys, check_placement, config_hash, worker_config
from sae_runtime.step.planner import ReadSegment, collect_reads, plan_step
from sae_runtime.step.tables import HookTables
from sae_runtime.step.tp_reads import ReadSplit, shardable
from sae_runtime.vllm import compat
from sae_runtime.vllm.cpu_rng import patch_cpu_seeded_rewind
from sae_runtime.vllm.families import LAYER_NAME, block_of, family_of, mlp_norm_affine, supported
from sae_runtime.vllm.runner_v1 import DeviceTokens, RequestPlans, describe_step
from sae_runtime.vllm.runner_v2 import RunnerV2, step_reads, unsupported
from sae_runtime.vllm.side_channel import ReadPublisher, pid_exit

log = logging.getLogger("sae_runtime.worker")

SKIP_PATCH_ENV = "SAE_STEERING_TEST_SKIP_RUNNER_PATCH"


# --------------------------------------------------------------------------- state


class SteeringState:
    """All hooks of this worker, the compiled payloads of its requests, and the step's reads."""

    def __init__(self, hooks: list[HookTables | None], publisher: ReadPublisher | None,
                 acts: list[ActSite | None] | None = None, act_gather: bool = False) -> None:
        self.hooks = hooks  # indexed like the server's SAE list: hook id == SAE index
        self.acts = acts or []  # declared activation sites (None: another stage's block)
        self.act_gather = act_gather  # a site gathers over TP: every rank plans the rows
        self.act_segments: list[ActSegment] = []
        self.publisher = publisher  # None: this rank does not publish reads
        # by vLLM request id, dropped when the request finishes (its latch states with it)
        self.plans = RequestPlans()
        self.tokens = DeviceTokens()  # a GPU step's input ids, for token-id selectors
        self.v2 = RunnerV2(self.plans, self.tokens)  # used only under Model Runner V2
        self.segments: list[ReadSegment] = []

    def prepare_step(self, runner) -> None:
        """Fill every hook's tables for the batch a V1 runner is about to run."""
        with compat.gpu_sync_allowed():  # only token-id selectors on a GPU wait
            step = describe_step(runner, self.plans, self.tokens)
        self._plan(step)

    def prepare_step_v2(self, runner, input_batch, batch_desc) -> None:
        """Fill every hook's tables for the batch V2's ``prepare_inputs`` just built."""
        with compat.gpu_sync_allowed():  # only token-id selectors at decode rows wait
            step = self.v2.describe(input_batch, runner.req_states.req_id_to_index.keys())
        if compat.is_full_graph(batch_desc) and step_reads(step):
            # The gather_batch_req_state wrapper routes every step with reads out of full
            # graphs, so this is drift (a V2 dispatch path it does not cover): the replay
            # would run the ops as captured and the reads would never happen.
            raise RuntimeError(
                "a step with SAE or activation reads was dispatched to a FULL CUDA graph; "
                "reads run only where the ops run eagerly (sae_runtime/vllm/runner_v2.py "
                "leaves_full_graph)")
        self._plan(step)

    def _plan(self, step) -> None:
        # A rank that publishes nothing computes no reads, except at sharded sites and
        # where the reads are split over the TP ranks (tp_reads): there every TP rank must
        # enter the all-gather alike (the decision reads the row counts).
        read_hooks = None if self.publisher is not None else set(_SHARDS) | _SPLIT_READS
        self.segments = plan_step(self.hooks, step, read_hooks)
        # raw activations: replicated sites, so only the publishing rank copies them, unless
        # a site gathers its rows over the TP group (z), which every TP rank enters alike
        if self.acts and (self.publisher is not None or self.act_gather) and step.requests:
            self.act_segments = plan_acts(self.acts, step.cols())

    def publish_reads(self) -> None:
        """Send this step's reads to the server, one record per segment."""
        if (not self.segments and not self.act_segments) or self.publisher is None:
            return
        with compat.gpu_sync_allowed():  # the reads' device-to-host copies
            records = collect_reads(self.hooks, self.segments) if self.segments else []
            if self.act_segments:
                records += collect_acts(self.acts, self.act_segments)
        if records:
            self.publisher.send(records)

    def end_step(self) -> None:
        self.segments = []
        self.act_segments = []
        for site in self.acts:
            if site is not None:
                site.clear()
        with compat.gpu_sync_allowed():  # waits for the step's table upload
            for hook in self.hooks:
                if hook is not None:
                    hook.clear()


_STATE: SteeringState | None = None


# --------------------------------------------------------------------------- custom op


@dataclass(frozen=True)
class _Shard:
    """This TP rank's columns ``[lo, hi)`` of a hook site sharded by heads (``z``)."""

    lo: int
    hi: int


_SHARDS: dict[int, _Shard] = {}  # hook id -> this rank's slice, for sharded sites under TP
_SPLIT_READS: set[int] = set()  # hook ids whose reads every TP rank computes a slice of
_SPLIT_COUNT = {"gathers": 0}  # split reads this rank took part in (sae_hook_report)


def _split_gather(t: torch.Tensor) -> torch.Tensor:
    """A split read's all-gather of the ranks' candidates (``tp_reads.ReadSplit.gather``)."""
    _SPLIT_COUNT["gathers"] += 1
    if _SPLIT_COUNT["gathers"] == 1:
        log.info("first feature read split over the TP ranks (this rank computed its slice)")
    return compat.tp_all_gather(t.contiguous(), dim=-1)


def _read_split(sae, ranks: dict[str, int], gemm: str) -> ReadSplit | None:
    """This TP rank's share of ``sae``'s reads (``sae_runtime.step.tp_reads``), or None where
    the reads stay whole on rank 0 (one rank, a TopK-family SAE)."""
    if not shardable(sae, ranks["tp_size"]):
        return None
    with_gemm = (lambda part: _with_cpu_gemm(part)[0]) if gemm == "onednn" else None
    return ReadSplit.build(sae, ranks["tp_size"], ranks["tp_rank"], _split_gather, read_topk,
                           with_gemm)


def _sae_hook(hidden_states: torch.Tensor, residual: torch.Tensor | None, hook_id: int) -> torch.Tensor:
    assert _STATE is not None, "sae_hook ran before SAEs were installed"
    hook = _STATE.hooks[hook_id]
    shard = _SHARDS.get(hook_id)
    if shard is None:
        return hook.apply(hidden_states, residual)
    # Sharded site: every TP rank sees the same batch, so the host counts (and with them
    # this branch) agree on all ranks and the gather is entered by all or none. Never in a
    # capture: a full graph would freeze the skip (and leave out the collective) for
    # every replay.
    if hook.n_rows == 0 and hook.n_read == 0 and not tables_mod._capturing(hidden_states):
        return hidden_states.clone()
    full = compat.tp_all_gather(hidden_states.contiguous(), dim=-1)  # [T, n_heads * head_dim]
    return hook.apply(full, None)[:, shard.lo:shard.hi].contiguous()


def _sae_hook_fake(hidden_states: torch.Tensor, residual: torch.Tensor | None, hook_id: int) -> torch.Tensor:
    return torch.empty_like(hidden_states)


def _sae_stash(x: torch.Tensor, hook_id: int) -> torch.Tensor:
    """A transcoder's MLP input, kept for its ``sae_hook`` on the MLP output (a copy of ``x``
    flows on, so the compiled graph orders this op before the MLP, and so before the hook)."""
    assert _STATE is not None, "sae_stash ran before SAEs were installed"
    return _STATE.hooks[hook_id].stash_input(x)


def _sae_stash_fake(x: torch.Tensor, hook_id: int) -> torch.Tensor:
    return torch.empty_like(x)


def _act_read(x: torch.Tensor, residual: torch.Tensor | None, site_id: int) -> torch.Tensor:
    """A declared activation site: keep the step's planned rows of ``x`` (+ ``residual``:
    the stream of a Llama-style layer) in the site's buffer (``act_reads.ActSite``); a copy
    of ``x`` flows on (an op may not return its input), so the graph keeps the op in place."""
    assert _STATE is not None, "act_read ran before the sites were installed"
    _STATE.acts[site_id].copy(x, residual)
    return x.clone()


def _act_read_fake(x: torch.Tensor, residual: torch.Tensor | None, site_id: int) -> torch.Tensor:
    return torch.empty_like(x)


def _sae_clt_stash(x: torch.Tensor, hook_id: int, slot: int) -> torch.Tensor:
    """Slot ``slot`` of cross-layer transcoder ``hook_id``: its MLP input, kept for the
    slot's ``sae_clt_hook`` (``CLTHookTables.stash_slot``)."""
    assert _STATE is not None, "sae_clt_stash ran before SAEs were installed"
    return _STATE.hooks[hook_id].stash_slot(x, slot)


def _sae_clt_hook(h: torch.Tensor, hook_id: int, slot: int) -> torch.Tensor:
    """Slot ``slot``'s MLP output plus the CLT's edits reaching it (``apply_slot``)."""
    assert _STATE is not None, "sae_clt_hook ran before SAEs were installed"
    return _STATE.hooks[hook_id].apply_slot(h, slot)


def _sae_clt_fake(x: torch.Tensor, hook_id: int, slot: int) -> torch.Tensor:
    return torch.empty_like(x)


_LIB = torch.library.Library("sae_steer", "FRAGMENT")  # kept alive for the op's lifetime


def _register_op() -> None:
    if hasattr(torch.ops.sae_steer, "sae_hook"):
        return  # idempotent: the module may be imported twice (e.g. reloads)
    compat.direct_register_custom_op(
        "sae_hook", _sae_hook, mutates_args=[], fake_impl=_sae_hook_fake, target_lib=_LIB
    )
    compat.direct_register_custom_op(
        "sae_stash", _sae_stash, mutates_args=[], fake_impl=_sae_stash_fake, target_lib=_LIB
    )
    compat.direct_register_custom_op(
        "act_read", _act_read, mutates_args=[], fake_impl=_act_read_fake, target_lib=_LIB
    )
    for name, fn in (("sae_clt_stash", _sae_clt_stash), ("sae_clt_hook", _sae_clt_hook)):
        compat.direct_register_custom_op(name, fn, mutates_args=[], fake_impl=_sae_clt_fake,
                                         target_lib=_LIB)


# --------------------------------------------------------------------------- patches


def _wrap_output(mod: torch.nn.Module, hook_ids: list[int], residual_tuple: bool,
                 act_ids: list[int] = (), twin_ids: list[int] = (),
                 clt_slots: list[tuple[int, int]] = ()) -> None:
    """Pass ``mod``'s output through the activation read op of each before-edits twin
    there (``twin_ids``: before any edit), then the SAE hook op once per hook id, in order,
    then each cross-layer transcoder slot writing there (``clt_slots``: (hook id, slot)),
    then the read op of each declared site there (``act_ids``: after every edit)."""
    orig = mod.forward
    ids, acts, twins, clt = tuple(hook_ids), tuple(act_ids), tuple(twin_ids), tuple(clt_slots)

    if residual_tuple:
        assert not clt, "a cross-layer transcoder writes an MLP output, not a block's"

        def forward(*args, **kwargs):
            hidden_states, residual = orig(*args, **kwargs)
            for site_id in twins:
                hidden_states = torch.ops.sae_steer.act_read(hidden_states, residual, site_id)
            for hook_id in ids:
                hidden_states = torch.ops.sae_steer.sae_hook(hidden_states, residual, hook_id)
            for site_id in acts:
                hidden_states = torch.ops.sae_steer.act_read(hidden_states, residual, site_id)
            return hidden_states, residual
    else:
        def forward(*args, **kwargs):
            x = orig(*args, **kwargs)
            for site_id in twins:
                x = torch.ops.sae_steer.act_read(x, None, site_id)
            for hook_id in ids:
                x = torch.ops.sae_steer.sae_hook(x, None, hook_id)
            for hook_id, slot in clt:
                x = torch.ops.sae_steer.sae_clt_hook(x, hook_id, slot)
            for site_id in acts:
                x = torch.ops.sae_steer.act_read(x, None, site_id)
            return x

    mod.forward = forward


def _wrap_input(mod: torch.nn.Module, hook_ids: list[int], op=None,
                act_ids: list[int] = (), twin_ids: list[int] = ()) -> None:
    """Pass ``mod``'s first argument, before ``mod`` runs, through the activation read op of
    each before-edits twin there (``twin_ids``), then ``op`` (the hook by default: hook_z)
    once per hook id, in order, then the read op of each declared site there (``act_ids``:
    after the edits)."""
    orig = mod.forward
    ids, acts, twins = tuple(hook_ids), tuple(act_ids), tuple(twin_ids)
    if op is None:
        def op(x, hook_id):
            return torch.ops.sae_steer.sae_hook(x, None, hook_id)

    def forward(x, *args, **kwargs):
        for site_id in twins:
            x = torch.ops.sae_steer.act_read(x, None, site_id)
        for hook_id in ids:
            x = op(x, hook_id)
        for site_id in acts:
            x = torch.ops.sae_steer.act_read(x, None, site_id)
        return orig(x, *args, **kwargs)

    mod.forward = forward


def wrap_sites(layers: dict, family, targets: dict[tuple[int, str], list[int]],
               act_targets: dict[tuple[int, str], list[int]] | None = None,
               twin_targets: dict[tuple[int, str], list[int]] | None = None,
               stashes: dict[int, list[int]] | None = None,
               clts: list[tuple[int, tuple[int, ...]]] = ()) -> None:
    """Wrap the decoder blocks ``layers`` (block -> module) of ``family``: at each
    (block, site kind) its before-edits twins' reads, its SAE hooks (``targets``), at
    ``mlp_out`` the cross-layer transcoder slots writing there (``clts``: (hook id, blocks)),
    then its declared sites' reads (``act_targets``: after every edit at the module); then
    the transcoders' and CLTs' input stashes at the MLP input."""
    act_targets, twin_targets, stashes = act_targets or {}, twin_targets or {}, stashes or {}
    clt_at: dict[int, list[tuple[int, int]]] = {}  # block -> (CLT hook id, slot) writing there
    for hook_id, blocks in clts:
        for slot, block in enumerate(blocks):
            clt_at.setdefault(block, []).append((hook_id, slot))
    keys = [*targets, *act_targets, *twin_targets, *((b, "mlp_out") for b in clt_at)]
    for block, site in dict.fromkeys(keys):
        ids = targets.get((block, site), [])
        act_ids = act_targets.get((block, site), [])
        twin_ids = twin_targets.get((block, site), [])
        layer = layers[block]
        if site == "out":
            _wrap_output(layer, ids, family.residual_tuple, act_ids, twin_ids)
        elif site == "z":
            _wrap_input(layer.get_submodule(family.z), ids, act_ids=act_ids, twin_ids=twin_ids)
        elif site == "ln2_normalized":
            _wrap_input(layer.get_submodule(family.mlp_in), [], act_ids=act_ids,
                        twin_ids=twin_ids)
        else:
            _wrap_output(layer.get_submodule(getattr(family, site)), ids, residual_tuple=False,
                         act_ids=act_ids, twin_ids=twin_ids,
                         clt_slots=clt_at.get(block, []) if site == "mlp_out" else [])
    # After the output wraps: where the MLP is also the mlp_out module (Llama), the stash
    # wraps the hook's wrapper, so the input is kept before the MLP and its hook run.
    for block, ids in stashes.items():
        _wrap_input(layers[block].get_submodule(family.mlp_in), ids, op=_stash)
    for hook_id, blocks in clts:
        _wrap_clt_stash(layers, family, hook_id, blocks)


def _stash(x: torch.Tensor, hook_id: int) -> torch.Tensor:
    return torch.ops.sae_steer.sae_stash(x, hook_id)


def _patch_runner_class(cls: type) -> None:
    if "_sae_patched" in cls.__dict__:
        return
    if "load_model" in cls.__dict__:
        orig_load = cls.load_model

        @functools.wraps(orig_load)
        def load_model(runner, *args, **kwargs):
            orig_load(runner, *args, **kwargs)
            install(runner)

        cls.load_model = load_model
    if "_model_forward" in cls.__dict__:
        orig_fwd = cls._model_forward

        @functools.wraps(orig_fwd)
        def _model_forward(runner, *args, **kwargs):
            if _STATE is None:
                return orig_fwd(runner, *args, **kwargs)
            _STATE.prepare_step(runner)
            try:
                out = orig_fwd(runner, *args, **kwargs)
                _STATE.publish_reads()
                return out
            finally:
                _STATE.end_step()

        _model_forward._sae_wrapper = True  # the startup check looks for this mark
        cls._model_forward = _model_forward
    if "sample_tokens" in cls.__dict__ and "_bookkeeping_sync" in cls.__dict__:
        patch_cpu_seeded_rewind(cls)
    cls._sae_patched = True


V2_WRAPPED = ("add_requests", "gather_batch_req_state", "prepare_inputs", "execute_model")
"""Model Runner V2 methods the worker wraps (each carries the ``_sae_wrapper`` mark)."""


def _patch_runner_class_v2(cls: type) -> None:
    """Wrap Model Runner V2 (``runner_v2``): ``load_model`` installs the hooks,
    ``add_requests`` keeps the new requests' payloads, ``gather_batch_req_state`` drops
    the uniform decode count of a step with reads (so V2 dispatches it out of full graphs),
    ``prepare_inputs`` fills the tables (before every forward path: FULL replay, piecewise,
    eager), ``execute_model`` publishes the reads and clears the tables."""
    if "_sae_patched" in cls.__dict__:
        return
    orig_load, orig_add = cls.load_model, cls.add_requests
    orig_gather = cls.gather_batch_req_state
    orig_prepare, orig_execute = cls.prepare_inputs, cls.execute_model

    @functools.wraps(orig_load)
    def load_model(runner, *args, **kwargs):
        orig_load(runner, *args, **kwargs)
        install(runner)

    @functools.wraps(orig_add)
    def add_requests(runner, scheduler_output, *args, **kwargs):
        out = orig_add(runner, scheduler_output, *args, **kwargs)
        if _STATE is not None:
            _STATE.v2.add(scheduler_output)
        return out

    @functools.wraps(orig_gather)
    def gather_batch_req_state(runner, *args, **kwargs):
        batch_req_state, uniform = orig_gather(runner, *args, **kwargs)
        if (_STATE is not None and batch_req_state is not None and uniform is not None
                and _STATE.v2.leaves_full_graph(batch_req_state, runner.req_states)):
            return batch_req_state, None
        return batch_req_state, uniform

    @functools.wraps(orig_prepare)
    def prepare_inputs(runner, scheduler_output, batch_req_state, batch_desc, *args, **kwargs):
        input_batch = orig_prepare(runner, scheduler_output, batch_req_state, batch_desc,
                                   *args, **kwargs)
        if _STATE is not None:
            _STATE.prepare_step_v2(runner, input_batch, batch_desc)
        return input_batch

    @functools.wraps(orig_execute)
    def execute_model(runner, *args, **kwargs):
        if _STATE is None:
            return orig_execute(runner, *args, **kwargs)
        try:
            out = orig_execute(runner, *args, **kwargs)
            _STATE.publish_reads()
            return out
        finally:
            _STATE.end_step()

    for fn in (add_requests, gather_batch_req_state, prepare_inputs, execute_model):
        fn._sae_wrapper = True  # the startup check looks for these marks
    cls.load_model, cls.add_requests = load_model, add_requests
    cls.gather_batch_req_state = gather_batch_req_state
    cls.prepare_inputs, cls.execute_model = prepare_inputs, execute_model
    cls._sae_patched = True


def install(runner) -> None:
    """Load the SAEs this rank hooks onto the runner's model and wrap the hooked modules.

    Rank-aware: a pipeline stage hooks only the blocks it holds (the others are vLLM's
    ``PPMissingLayer`` placeholders) and loads only those SAEs; every tensor-parallel rank of
    a stage hooks the same SAEs. Replicated sites (residual stream, attention and MLP outputs
    after their all-reduce) compute the same edit on every rank; at ``z`` each rank holds
    ``n_heads / tp`` heads, so the op gathers the full ``z`` over the TP group, encodes and
    edits it whole, and keeps this rank's columns (``_Shard``). Only TP rank 0 publishes
    reads, so each position arrives once. What was installed is recorded in ``_REPORT`` for
    the server's startup check (``SteeringWorkerExtension.sae_hook_report``).
    """
    global _STATE
    cfg = worker_config(runner.vllm_config.additional_config)
    if not cfg:
        return
    model = runner.model
    if getattr(model, "_sae_installed", False):
        return  # a runner whose load_model calls its parent's: install once
    model._sae_installed = True
    ranks = compat.parallel_ranks(runner.vllm_config)
    archs = getattr(runner.model_config.hf_config, "architectures", None)
    family = family_of(archs)
    if family is None:
        raise UnsupportedModelError(
            f"model architecture {archs} has no SAE hook support; supported: {supported()}"
        )
    all_layers = {int(m.group(1)): mod for name, mod in model.named_modules()
                  if (m := LAYER_NAME.search(name))}
    layers = {i: mod for i, mod in all_layers.items() if not compat.is_pp_missing_layer(mod)}
    hidden = runner.model_config.get_hidden_size()
    sched = runner.scheduler_config
    # every table's size follows from these (``sae_runtime.spec.budget.TableSizes``), the
    # numbers the server's admission check is written against
    max_tokens = int(sched.max_num_batched_tokens)
    max_slots = int(sched.max_num_seqs)
    max_feats = cfg.max_interventions
    max_watch = cfg.max_watch
    sizes = TableSizes.of(max_num_seqs=max_slots, max_num_batched_tokens=max_tokens,
                          max_interventions=max_feats, max_watch=max_watch)
    device = next(model.parameters()).device
    model_dtype = str(runner.model_config.dtype).removeprefix("torch.")
    tp = ranks["tp_size"]
    hooks: list[HookTables | None] = []
    shards: dict[int, _Shard] = {}
    report: list[dict] = []
    targets: dict[tuple[int, str], list[int]] = {}  # (block, site kind) -> hook ids, in order
    stashes: dict[int, list[int]] = {}  # block -> transcoder hook ids reading its MLP input
    clts: list[tuple[int, tuple[int, ...]]] = []  # (hook id, blocks) of cross-layer transcoders
    for entry in cfg.saes:
        hook_id = len(hooks)
        if entry.path and not entry.vectors and not entry.inline and is_clt(entry.path):
            tables, rec = _install_clt(entry, runner, ranks, layers, device, model_dtype, cfg)
            hooks.append(tables)
            clts.append((hook_id, rec["clt_layers"]))
            report.append({"sae": hook_id, **rec})
            continue
        bank = _bank(entry, hidden) if entry.vectors or entry.inline or entry.runtime else None
        c = bank.config() if bank is not None else load_sae_config(entry.path, entry.hook_name)
        check_placement(entry, c)
        block = block_of(c.layer, c.site)
        if block not in all_layers:
            raise SAEFormatError(
                f"{entry.path}: SAE {entry.id!r} hooks {c.hook_name} but the model has "
                f"blocks 0..{max(all_layers)}"
            )
        if block not in layers:  # another pipeline stage holds this block
            hooks.append(None)
            continue
        site = "out" if c.site in ("resid_post", "resid_pre") else c.site
        if site == "z":
            o_proj = layers[block].get_submodule(family.z)
            local = int(getattr(o_proj, "input_size_per_partition", c.d_in // tp))
            if local * tp != c.d_in:
                raise SAEFormatError(
                    f"{entry.path}: SAE {entry.id!r} has d_in={c.d_in}, but {c.hook_name} "
                    f"is {local} wide on each of {tp} tensor-parallel ranks ({local * tp} in all)")
            if tp > 1:
                r = ranks["tp_rank"]
                shards[hook_id] = _Shard(r * local, (r + 1) * local)
        elif c.d_in != hidden:
            raise SAEFormatError(
                f"{entry.path}: SAE {entry.id!r} has d_in={c.d_in} but the model's "
                f"hidden size is {hidden}"
            )
        dtype_name, why = choose_sae_dtype(cfg.sae_dtype, model_dtype, device.type)
        # an inline bank: one scratch decoder row per edit slot after its named vectors
        scratch = sizes.edit_slots if bank is not None and bank.inline else 0
        if bank is not None:
            sae = bank_sae(bank, scratch)
        else:
            sae = load_sae(entry.path, hook_name=entry.hook_name)
            if c.input_site == "ln2_normalized":  # served from the MLP input: fold the weight in
                sae = fold_norm_weight(sae, *mlp_norm_affine(layers[block], family))
        sae = sae.to(device, getattr(torch, dtype_name))
        gemm = "torch"
        if device.type == "cpu" and bank is None:  # a bank never encodes (its encoder is 0)
            sae, gemm = _with_cpu_gemm(sae)
        hooks.append(HookTables(sae, max_tokens, max_slots, max_feats, max_watch,
                                act_dtype=runner.model_config.dtype,
                                inline_row=bank.inline_row if scratch else None))
        if bank is not None and bank.runtime:
            _RUNTIME_ROWS[hook_id] = bank.runtime_rows
        if tp > 1 and cfg.reads_addr and bank is None:  # reads split by feature columns
            hooks[-1].read_split = _read_split(sae, ranks, gemm)
        split = hooks[-1].read_split
        targets.setdefault((block, site), []).append(hook_id)
        if c.transcoder:
            stashes.setdefault(block, []).append(hook_id)
        report.append({"sae": hook_id, "id": entry.id, "block": block, "site": c.site,
                       "input_site": c.input_site,
                       "dtype": dtype_name, "dtype_why": why, "gemm": gemm, "sharded": hook_id in shards,
                       "read_slice": None if split is None else [split.lo, split.hi]})
        log.info("SAE %s (%s, d_sae=%d, %s: %s) at block %d %s, tp rank %d/%d, pp rank %d/%d",
                 entry.id, c.architecture, c.d_sae, dtype_name, why, block, c.site,
                 ranks["tp_rank"], tp, ranks["pp_rank"], ranks["pp_size"])
        if split is not None:
            log.info("SAE %s: tp rank %d/%d reads features [%d, %d) of %d (tp_reads)",
                     entry.id, ranks["tp_rank"], tp, split.lo, split.hi, c.d_sae)
    # declared raw activation sites: one op each, after the edit hooks of the same module;
    # a twin (cfg.act_twins, the server's choice) one more, before them
    acts: list[ActSite | None] = []
    act_report: list[dict] = []
    act_targets: dict[tuple[int, str], list[int]] = {}
    twin_targets: dict[tuple[int, str], list[int]] = {}
    made: dict[int, tuple] = {}  # declared site -> (block, wrap, width, affine, gather)
    act_gather = False  # a site whose rows every TP rank gathers (z under TP)
    for name in cfg.act_sites:
        parsed = parse_hook(name)
        if parsed is None:
            raise SAEFormatError(f"activation site {name!r} is not a readable hook name")
        layer_no, kind = parsed
        block = block_of(layer_no, kind)
        if block not in all_layers:
            raise SAEFormatError(f"activation site {name!r}: the model has blocks "
                                 f"0..{max(all_layers)}")
        if block not in layers:  # another pipeline stage holds this block
            acts.append(None)
            continue
        site = "out" if kind in ("resid_post", "resid_pre") else kind
        width, affine, gather = hidden, None, None
        if kind == "z":  # heads concatenated; under TP each rank holds n_heads / tp of them
            o_proj = layers[block].get_submodule(family.z)
            # the startup check compares this width with the model config's heads x head size
            local = int(getattr(o_proj, "input_size_per_partition", hidden // tp))
            width = local * tp
            if tp > 1:
                gather = functools.partial(compat.tp_all_gather, dim=-1)
                act_gather = True
        elif kind == "ln2_normalized":  # read at the MLP input: undo the norm's affine
            affine = mlp_norm_affine(layers[block], family)
        made[len(acts)] = (block, site, width, affine, gather)
        act_targets.setdefault((block, site), []).append(len(acts))
        acts.append(ActSite(width, max_tokens, device, affine=affine, gather=gather))
        act_report.append({"site": len(acts) - 1, "hook": name, "block": block, "width": width,
                           "before_edits": False})
    for k, i in enumerate(cfg.act_twins):
        if not 0 <= i < len(cfg.act_sites):
            raise SAEFormatError(f"activation twin {k} names site {i}; "
                                 f"{len(cfg.act_sites)} sites are declared")
        if i not in made:  # another pipeline stage holds its block
            acts.append(None)
            continue
        block, site, width, affine, gather = made[i]
        twin_targets.setdefault((block, site), []).append(len(acts))
        acts.append(ActSite(width, max_tokens, device, affine=affine, gather=gather))
        act_report.append({"site": len(acts) - 1, "hook": cfg.act_sites[i], "block": block,
                           "width": width, "before_edits": True})
    wrap_sites(layers, family, targets, act_targets, twin_targets, stashes, clts)
    addr = cfg.reads_addr
    publish = bool(addr) and ranks["tp_rank"] == 0
    # Across nodes every worker (publishing or not) holds a connection to the server's read
    # socket and exits when the API node has been unreachable for reads_lost_after_s: vLLM's
    # engine nodes never notice node 0 is gone otherwise (they wait on it forever).
    watch = bool(addr) and addr.startswith("tcp://") and cfg.reads_lost_after_s is not None
    global _CHANNEL
    if publish or watch:
        _CHANNEL = ReadPublisher(addr, cfg.reads_keys, cfg.reads_max_message_bytes,
                                 on_lost=pid_exit(1) if watch else None,
                                 lost_after_s=cfg.reads_lost_after_s or 0.0)
    _SHARDS.update(shards)
    _SPLIT_READS.update(i for i, h in enumerate(hooks) if h is not None and h.read_split is not None)
    _STATE = SteeringState(hooks, _CHANNEL if publish else None, acts, act_gather)
    vc = runner.vllm_config
    _REPORT.update(ranks=ranks, layers=sorted(layers), hooks=report, act_sites=act_report,
                   installed=True,
                   publishes=publish, node=compat.node_of(vc),
                   config_hash=config_hash(cfg), reads_addr=addr,
                   engine={"model": runner.model_config.model, "dtype": model_dtype,
                           "max_model_len": int(runner.model_config.max_model_len),
                           "max_num_seqs": max_slots, "max_num_batched_tokens": max_tokens,
                           "enforce_eager": bool(runner.model_config.enforce_eager),
                           "seed": runner.model_config.seed})


def _install_clt(entry, runner, ranks: dict, layers: dict, device: torch.device,
                 model_dtype: str, cfg) -> tuple[CLTHookTables, dict]:
    """Load the cross-layer transcoder of ``entry`` and build its tables
    (``sae_runtime.step.clt_tables``); returns them and its hook report entry.

    Served on the CPU (compact) path and one pipeline stage: the carry between slots lives
    in this process's memory and is computed by the compact kernels. Under tensor
    parallelism every rank holds the whole CLT and computes the same edits: the MLP input is
    replicated and the hook sees the MLP output after its all-reduce (as a transcoder's);
    only the publishing rank (TP rank 0) plans and computes reads (``SteeringState._plan``).
    The server refuses the other cases at startup (``server.startup.check_clt_serving``);
    this repeats it so an engine started another way never serves a CLT unsteered."""
    c = clt_hook_config(entry.path)
    check_placement(entry, c)
    why = None
    if device.type != "cpu":
        why = f"the model runs on {device.type}; CLT serving runs on the CPU path only so far"
    elif ranks["pp_size"] > 1:
        why = "pipeline parallelism (the carry into later layers does not cross stages)"
    missing = [b for b in c.clt_layers if b not in layers]
    if why is None and missing:
        why = f"the model has no block {missing[0]} on this worker"
    if why is not None:
        raise SAEFormatError(f"{entry.path}: cross-layer transcoder {entry.id!r} cannot be "
                             f"served: {why}")
    dtype_name, reason = choose_sae_dtype(cfg.sae_dtype, model_dtype, device.type)
    dtype = getattr(torch, dtype_name)
    clt = load_clt(entry.path, dtype).to(device)
    sched = runner.scheduler_config
    tables = CLTHookTables(clt, int(sched.max_num_batched_tokens), int(sched.max_num_seqs),
                           cfg.max_interventions, cfg.max_watch,
                           act_dtype=runner.model_config.dtype)
    dec = decoder_bytes(clt.cfg, dtype)
    log.info("SAE %s: cross-layer transcoder, %d layers x %d features (flat ids 0..%d), blocks "
             "%s, %s (%s), decoder %.1f MiB; CPU compact path", entry.id, clt.cfg.n_layers,
             clt.cfg.d_sae, c.d_sae - 1, list(c.clt_layers), dtype_name, reason, dec / 2**20)
    return tables, {"id": entry.id, "block": c.layer, "site": c.site, "input_site": c.input_site,
                    "dtype": dtype_name, "dtype_why": reason, "gemm": "torch", "sharded": False,
                    "read_slice": None, "clt_layers": tuple(c.clt_layers),
                    "decoder_bytes": dec}


def _wrap_clt_stash(layers: dict, family, hook_id: int, blocks: tuple[int, ...]) -> None:
    """Per slot ``s``: ``sae_clt_stash`` on block ``blocks[s]``'s MLP input (outside the
    output wraps, so the input is kept before the MLP and its hooks run). The slot's
    ``sae_clt_hook`` on the MLP output is one of ``_wrap_output``'s ops (``wrap_sites``), so
    the reads at ``hook_mlp_out`` run after it (and the twins before it)."""
    for slot, block in enumerate(blocks):
        _wrap_input(layers[block].get_submodule(family.mlp_in), [hook_id],
                    op=lambda x, h, _slot=slot: torch.ops.sae_steer.sae_clt_stash(x, h, _slot))


_REPORT: dict = {"installed": False}
_RUNTIME_ROWS: dict[int, range] = {}  # bank hook id -> its rows for runtime-loaded vectors


def write_vector_rows(writes: list[tuple[int, int, bytes]]) -> list[int]:
    """Write runtime-loaded vectors into their banks' decoder rows: each ``(hook id, row,
    float32 little-endian [d_model])``; returns the hook ids this rank holds and wrote.

    Every write is checked before any is made (a hook id that is not a bank with runtime
    rows, a row outside them, a wrong length raise ``ValueError``, which ``collective_rpc``
    hands to the server; nothing is written then). The rows are free when the server asks:
    no request names them (``server.core.vectors``), so no step reads them while they
    change. vLLM runs the call between steps, so no forward runs meanwhile either."""
    assert _STATE is not None, "vector rows written before SAEs were installed"
    checked = []
    for hook_id, row, data in writes:
        hook_id, row = int(hook_id), int(row)
        if hook_id not in _RUNTIME_ROWS and not (0 <= hook_id < len(_STATE.hooks)
                                                 and _STATE.hooks[hook_id] is None):
            raise ValueError(f"hook {hook_id} is not a vector bank with runtime rows")
        if hook_id not in _RUNTIME_ROWS:
            continue  # another pipeline stage holds this bank
        if row not in _RUNTIME_ROWS[hook_id]:
            raise ValueError(f"hook {hook_id}: row {row} is not one of its runtime rows "
                             f"{_RUNTIME_ROWS[hook_id]}")
        hook = _STATE.hooks[hook_id]
        v = np.frombuffer(data, dtype="<f4")
        if v.shape != (hook.sae.cfg.d_in,):
            raise ValueError(f"hook {hook_id}: a vector of {v.shape[0]} values, the bank is "
                             f"{hook.sae.cfg.d_in} wide")
        checked.append((hook, row, v))
    for hook, row, v in checked:
        hook.sae.W_dec[row].copy_(torch.from_numpy(v.copy()))
    return sorted({int(h) for h, _, _ in writes if int(h) in _RUNTIME_ROWS})
_CHANNEL: ReadPublisher | None = None  # this worker's connection to the server's read socket


def _bank(entry, d_model: int) -> Bank:
    """The steering-vector bank of ``entry``: its layer's vectors, from every --vector file,
    whether it takes inline vectors (``--inline-vectors``) and how many rows it keeps for
    vectors loaded at run time (``--runtime-vectors``; with either it may have no named
    vector)."""
    bank = _banks(tuple(map(tuple, entry.vectors))).get(entry.layer)
    if bank is None and not (entry.inline or entry.runtime):
        raise SAEFormatError(f"no steering vector for layer {entry.layer} in {entry.vectors}")
    if bank is None:
        bank = Bank(entry.layer, (), np.zeros((0, d_model), np.float32))
    return dataclasses.replace(bank, inline=entry.inline, runtime=entry.runtime)


@functools.cache
def _banks(files: tuple[tuple[str, str], ...]) -> dict[int, Bank]:
    """Every bank of the --vector files, read once per worker (one entry per layer asks)."""
    return {b.layer: b for b in build_banks(files)}


def _with_cpu_gemm(sae):
    """``(sae with enc_gemm, "onednn")`` using vLLM's prepacked CPU GEMM for the dense
    encode, or ``(sae, "torch")`` where it is unavailable or disagrees with torch's matmul on
    a probe (then it is not used: correctness first)."""
    try:
        mm = compat.cpu_dense_gemm(sae.W_enc)
    except RuntimeError as e:  # oneDNN refused these weights
        log.warning("SAE %s: oneDNN GEMM unavailable (%s); using torch's matmul", sae.cfg.hook_name, e)
        return sae, "torch"
    if mm is None:
        return sae, "torch"
    g = torch.Generator().manual_seed(0)
    probe = torch.randn(5, sae.cfg.d_in, generator=g).to(sae.W_enc.dtype)
    want, got = probe @ sae.W_enc, mm(probe)
    tol = 1e-3 if sae.W_enc.dtype == torch.float32 else 3e-2
    scale = float(want.abs().max()) or 1.0
    if got.shape != want.shape or float((got - want).abs().max()) > tol * scale:
        log.warning("SAE %s: oneDNN GEMM disagrees with torch's matmul on a probe; using torch",
                    sae.cfg.hook_name)
        return sae, "torch"
    return dataclasses.replace(sae, enc_gemm=mm), "onednn"


class SteeringWorkerExtension:
    """Named in ``worker_extension_cls`` so vLLM imports this module in the worker before it
    builds the model; the import registers the op and wraps the model runner."""

    def sae_hook_report(self) -> dict:
        """What this worker installed (``collective_rpc``): its ranks, the decoder blocks it
        holds, each hooked SAE (index, id, block, site, dtype), and its runtime
        (``runtime_report``: device, model runner, CUDA graph mode, whether the runner's
        step methods are wrapped, and anything that makes steering unsafe). The server
        refuses to serve unless every configured SAE sits on every rank that must hold it."""
        return {**_REPORT, **runtime_report(getattr(self, "model_runner", None)),
                "split_reads": _SPLIT_COUNT["gathers"],
                "reads_keys": _CHANNEL is not None and _CHANNEL.keys is not None}

    def sae_write_vectors(self, writes: list) -> dict:
        """Write runtime-loaded vectors into bank rows (``write_vector_rows``); the server's
        ``LoadVector`` returns only when every rank answered. Returns this rank's ranks and
        the hook ids it wrote."""
        return {"ranks": _REPORT.get("ranks", {}), "written": write_vector_rows(writes)}

    def sae_reads_keys(self, keys: dict) -> bool:
        """Take the ``tcp://`` reads channel's CURVE keys from the API node (an engine node
        builds its config without them: the server makes fresh ones at every start and hands
        them over through vLLM's own control channel before it serves). True when this
        worker holds a channel that now has them."""
        if _CHANNEL is None:
            return False
        _CHANNEL.set_keys(msgspec.convert(keys, ReadsKeys))
        return True


def runtime_report(runner) -> dict:
    """``device`` (cpu / cuda), ``device_name``, ``runner`` (module.class), ``runner_kind``
    (v1 / v2), ``runner_patched`` (the step methods of that kind carry our wrapper's mark),
    ``cudagraph_mode`` (vLLM's, as resolved when the KV cache was set up) and ``refusals``
    (reasons the hooks cannot run correctly here; the server refuses to serve on any)."""
    cls = type(runner)
    kind = "v2" if compat.is_v2_runner(runner) else "v1"
    wrapped = V2_WRAPPED if kind == "v2" else ("_model_forward",)
    device = getattr(runner, "device", None)
    dev_type = getattr(device, "type", "?")
    mode = compat.cudagraph_mode(runner) if runner is not None else "NONE"
    refusals = []
    if runner is not None and kind == "v2":
        refusals += unsupported(runner.vllm_config)
    if runner is not None:
        cc = runner.vllm_config.compilation_config
        refusals += compat.graph_refusals(mode, kind, getattr(cc, "splitting_ops", None))
    return {
        "device": dev_type,
        "device_name": torch.cuda.get_device_name(device) if dev_type == "cuda" else "cpu",
        "runner": f"{cls.__module__}.{cls.__qualname__}",
        "runner_kind": kind,
        "runner_patched": all(getattr(getattr(cls, m, None), "_sae_wrapper", False)
                              for m in wrapped),
        "cudagraph_mode": mode,
        "refusals": refusals,
    }



_register_op()
# SKIP_PATCH_ENV leaves the runners unpatched: tests use it to prove that startup then
# refuses to serve (a runner this module does not patch must never serve unsteered).
if os.environ.get(SKIP_PATCH_ENV) != "1":
    for _cls in compat.model_runner_classes():
        _patch_runner_class(_cls)
    _patch_runner_class_v2(compat.v2_runner_class())
