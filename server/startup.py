"""Startup decisions that need no engine: vLLM CPU defaults, TLS files, and the
hook-placement check.

``check_hooks`` is the "never serve silently unsteered" rule: after the engine starts, every
worker reports (``collective_rpc("sae_hook_report")``) its ranks, the decoder blocks it
holds and the hooks it installed; steerd serves only when every configured SAE sits on
exactly the ranks that hold its block (every TP rank of the owning pipeline stage, in every
data-parallel replica), on a model runner whose step wrappers are ours (V1's
``_model_forward``, or V2's ``add_requests`` / ``prepare_inputs`` / ``execute_model``), with
no reason the worker found for the hooks to misbehave (``refusals``: full CUDA graphs, an
engine feature the adapter cannot place rows for), and when exactly one rank per stage
publishes reads. Across nodes the reports come from every node; each names its node
(``node_label``), and a node started with other SAEs, budgets or engine settings than this
server, or pushing reads elsewhere, is refused by name.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from sae_runtime.errors import SteeringError
from sae_runtime.hw import cpu_env_defaults
from sae_runtime.spec.activations import parse_hook
from sae_runtime.vllm.families import block_of


class StartupError(SteeringError):
    """The server cannot start as configured (a busy port, an unusable TLS or tokens file);
    raised before the engine starts, told as one line."""


def load_tls(cert: Path | None, key: Path | None,
             client_ca: Path | None) -> tuple[bytes, bytes, bytes | None] | None:
    """``(key, cert, client CA)`` PEM bytes, checked as a TLS server would load them (a
    certificate that does not match its key, a file that is not PEM); None without TLS."""
    if cert is None or key is None:
        return None
    import ssl

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        ctx.load_cert_chain(str(cert), str(key))
    except (OSError, ssl.SSLError) as e:
        raise StartupError(f"--tls-cert {cert} / --tls-key {key}: cannot use them: "
                           f"{e.strerror or e.reason or e}") from None
    try:
        if client_ca is not None:
            ctx.load_verify_locations(str(client_ca))
        return key.read_bytes(), cert.read_bytes(), client_ca.read_bytes() if client_ca else None
    except (OSError, ssl.SSLError) as e:
        raise StartupError(f"--tls-client-ca {client_ca}: cannot use it: "
                           f"{getattr(e, 'strerror', None) or getattr(e, 'reason', None) or e}") from None


def check_clt_serving(saes: Mapping, *, cpu: bool, pp: int) -> None:
    """Refuse, before the engine starts, a cross-layer transcoder (``SAEConfig.clt_layers``)
    where its serving path does not exist yet: on CUDA (the Triton / fixed-shape splice has
    no cross-layer carry) and under pipeline parallelism (the carry of a source slot's edit
    coefficients is a buffer of one worker: it would have to cross to the stage holding the
    later slots). Tensor parallelism is served: the MLP input and the all-reduced MLP output
    are replicated, so every TP rank computes the same carry and edits. ``saes``: id ->
    ``SAEConfig``."""
    for sid, c in saes.items():
        if not getattr(c, "clt_layers", ()):
            continue
        what = f"--sae {sid}: a cross-layer transcoder ({len(c.clt_layers)} layers)"
        if not cpu:
            raise StartupError(f"{what}: CLT serving runs on the CPU path only so far (the CUDA "
                               "kernels have no cross-layer carry); serve it with the CPU build "
                               "of steerd, or drop this --sae")
        if pp > 1:
            raise StartupError(f"{what}: not served with --pipeline-parallel-size {pp} (the "
                               "carry of a layer's feature edits into every later layer's MLP "
                               "output is one worker's buffer and does not cross pipeline "
                               "stages); use --pipeline-parallel-size 1 (tensor parallelism "
                               "is served)")


class HookPlacementError(SteeringError):
    """A configured SAE is not installed where it must be; steerd refuses to serve."""


@dataclass(frozen=True)
class ExpectedHook:
    index: int  # position in the server's SAE list (the hook id)
    sae_id: str
    hook_name: str
    block: int  # decoder layer whose module hosts the hook


def apply_cpu_env_defaults(ranks: int, env: dict[str, str] | None = None) -> list[str]:
    """Set vLLM's CPU variables the user left unset (``hw.cpu_env_defaults``) in ``env``
    (default ``os.environ``, inherited by the engine's processes); returns one line each.
    ``ranks``: the ranks on *this* node (``server.nodes.local_ranks``), which is what vLLM
    binds one CPU set each to."""
    env = os.environ if env is None else env
    lines = []
    for var, (value, why) in cpu_env_defaults(dict(env), ranks).items():
        env[var] = value
        lines.append(f"{var}={value} ({why}; set it to override)")
    return lines


def node_label(r: Mapping) -> str:
    """The node a worker report comes from: its address (vLLM's ``VLLM_HOST_IP``), host
    name and node rank; "" for a report without one."""
    n = r.get("node")
    if not n:
        return ""
    return f"node {n.get('host', '?')} ({n.get('hostname', '?')}, node rank {n.get('node_rank', '?')})"


def _where(r: Mapping) -> str:
    rk = r.get("ranks") or {}
    node = node_label(r)
    return (f"worker tp {rk.get('tp_rank', '?')}/{rk.get('tp_size', '?')}, "
            f"pp {rk.get('pp_rank', '?')}/{rk.get('pp_size', '?')}, "
            f"dp {rk.get('dp_rank', '?')}" + (f" on {node}" if node else ""))


def node_lines(reports: Sequence[Mapping]) -> list[str]:
    """One line per node: which ranks (dp/pp/tp) it holds, in rank order."""
    by_node: dict[str, list[tuple]] = {}
    for r in reports:
        rk = r.get("ranks") or {}
        by_node.setdefault(node_label(r) or "this node", []).append(
            (rk.get("dp_rank", 0), rk.get("pp_rank", 0), rk.get("tp_rank", 0)))
    return [f"{node} holds rank(s) dp/pp/tp {', '.join('/'.join(map(str, o)) for o in sorted(rs))}"
            for node, rs in sorted(by_node.items(), key=lambda kv: min(kv[1]))]


def check_same_config(reports: Sequence[Mapping], config_hash: str | None,
                      reads_addr: str | None) -> None:
    """Every worker, on every node, was built from this server's worker config (same SAEs,
    vectors, budgets: ``config_hash``), pushes reads to this server's socket, holds the
    reads keys when it publishes over ``tcp://``, and runs the same engine settings as the
    others. vLLM does not compare an engine node's config with node 0's; a mismatch here
    would hook other SAEs or size the tables differently on that node."""
    for r in reports:
        if config_hash is not None and r.get("config_hash") not in (None, config_hash):
            raise HookPlacementError(
                f"{_where(r)} was started with other SAEs, vectors or table budgets than this "
                "server (its worker config differs); give every node the same --sae, "
                "--vector, --inline-vectors and --max-* flags")
        if reads_addr is not None and r.get("reads_addr") not in (None, reads_addr):
            raise HookPlacementError(
                f"{_where(r)} pushes feature reads to {r.get('reads_addr')}, but this server "
                f"listens on {reads_addr}; give every node the same --reads-address")
        if (r.get("publishes") and str(r.get("reads_addr") or "").startswith("tcp://")
                and r.get("reads_keys") is False):
            raise HookPlacementError(f"{_where(r)} publishes reads but has no reads-channel keys")
    engines = [(r, r["engine"]) for r in reports if r.get("engine")]
    for r, e in engines[1:]:
        first, e0 = engines[0]
        diff = sorted(k for k in e0.keys() | e.keys() if e0.get(k) != e.get(k))
        if diff:
            raise HookPlacementError(
                f"{_where(r)} runs {', '.join(f'{k}={e.get(k)!r}' for k in diff)} but "
                f"{_where(first)} runs {', '.join(f'{k}={e0.get(k)!r}' for k in diff)}; give "
                "every node the same engine flags")


def check_hooks(reports: Sequence[Mapping], expected: Sequence[ExpectedHook], *,
                world_size: int, reads: bool, config_hash: str | None = None,
                reads_addr: str | None = None, act_sites: Sequence[str] = (),
                act_widths: Sequence[int] = (), act_twins: Sequence[int] = ()) -> dict[int, str]:
    """Raise ``HookPlacementError`` unless every SAE, and every declared activation site
    (``act_sites``, hook names; ``act_widths``, when given, the width the server sized its
    caps and record checks for) and before-edits twin (``act_twins``: indices of
    ``act_sites``; twin k is site ``len(act_sites) + k``), is installed where it must be.

    ``world_size`` is tensor x pipeline parallel (the workers of one engine); with data
    parallelism more reports arrive, in whole multiples. ``config_hash`` / ``reads_addr``:
    what every worker must report (``check_same_config``). Returns each SAE index's
    compute dtype as the workers chose it (they agree, or this raises).
    """
    if not expected and not act_sites:
        return {}
    if len(reports) < world_size or len(reports) % world_size:
        raise HookPlacementError(
            f"{len(reports)} worker(s) answered the hook check; expected a multiple of "
            f"{world_size} (tensor x pipeline parallel)")
    check_same_config(reports, config_hash, reads_addr)
    for r in reports:
        if not r.get("runner_patched"):
            kind = r.get("runner_kind", "?")
            raise HookPlacementError(
                f"{_where(r)}: model runner {r.get('runner')} ({kind}) is not one "
                "sae_runtime patches, so its hooks would never run; refusing to serve "
                "unsteered (see sae_runtime/vllm/compat.py model_runner_classes, "
                "v2_runner_class)")
        if r.get("refusals"):
            raise HookPlacementError(
                f"{_where(r)}: SAE hooks cannot run correctly on this engine: "
                f"{'; '.join(r['refusals'])}; refusing to serve")
        if not r.get("installed"):
            raise HookPlacementError(
                f"{_where(r)}: no SAE was installed (the runner's load_model never reached "
                "sae_runtime's install); refusing to serve unsteered")
    dtypes: dict[int, str] = {}
    for e in expected:
        owners = [r for r in reports if e.block in r.get("layers", ())]
        if not owners:
            raise HookPlacementError(
                f"SAE {e.sae_id!r} ({e.hook_name}): no worker holds block {e.block}")
        for r in reports:
            got = [h for h in r.get("hooks", ()) if h["sae"] == e.index]
            must = r in owners
            if must and len(got) != 1:
                raise HookPlacementError(
                    f"SAE {e.sae_id!r} ({e.hook_name}) is not installed on {_where(r)}, which "
                    f"holds block {e.block}; refusing to serve unsteered")
            if not must and got:
                raise HookPlacementError(
                    f"SAE {e.sae_id!r} ({e.hook_name}) is installed on {_where(r)}, which does "
                    f"not hold block {e.block}")
            if got:
                h = got[0]
                if (h["block"], h["id"]) != (e.block, e.sae_id):
                    raise HookPlacementError(
                        f"{_where(r)}: hook {e.index} is SAE {h['id']!r} at block {h['block']}, "
                        f"expected {e.sae_id!r} at block {e.block}")
                if dtypes.setdefault(e.index, h["dtype"]) != h["dtype"]:
                    raise HookPlacementError(
                        f"SAE {e.sae_id!r}: workers chose different compute dtypes "
                        f"({dtypes[e.index]} and {h['dtype']})")
    wanted = [(j, j, False) for j in range(len(act_sites))]
    wanted += [(len(act_sites) + k, j, True) for k, j in enumerate(act_twins)]
    for sid, j, before in wanted:
        name = act_sites[j]
        what = f"activation site {name}" + (" (its before-edits twin)" if before else "")
        layer, site = parse_hook(name) or (0, "")
        block = block_of(layer, site)
        for r in reports:
            got = [a for a in r.get("act_sites", ()) if a["hook"] == name
                   and bool(a.get("before_edits", False)) == before]
            must = block in r.get("layers", ())
            if must != bool(got):
                raise HookPlacementError(
                    f"{what} is {'not ' if must else ''}installed on "
                    f"{_where(r)}, which {'holds' if must else 'does not hold'} block {block}; "
                    "refusing to serve")
            if got and got[0].get("site", sid) != sid:
                raise HookPlacementError(
                    f"{what} is worker site {got[0]['site']} on {_where(r)}, expected {sid}; "
                    "refusing to serve")
            if got and act_widths and got[0].get("width", act_widths[j]) != act_widths[j]:
                raise HookPlacementError(
                    f"{what} is {got[0]['width']} wide on {_where(r)}; the "
                    f"model config says {act_widths[j]}; refusing to serve")
    for r in reports:
        extra = [a for a in r.get("act_sites", ()) if a.get("site", 0) >= len(wanted)]
        if extra:
            raise HookPlacementError(
                f"{_where(r)} installed activation site {extra[0]['site']} "
                f"({extra[0]['hook']}), which this server does not declare; refusing to serve")
    if reads:
        stages: dict[tuple, list] = {}
        for r in reports:
            if r.get("hooks") or r.get("act_sites"):
                rk = r.get("ranks") or {}
                stages.setdefault((rk.get("dp_rank", 0), rk.get("pp_rank", 0)), []).append(r)
        for (dp, pp), rs in stages.items():
            n = sum(bool(r.get("publishes")) for r in rs)
            if n != 1:
                raise HookPlacementError(
                    f"pipeline stage {pp} (dp {dp}): {n} workers publish feature reads, "
                    "expected exactly 1 (each read would arrive that many times)")
    return dtypes
