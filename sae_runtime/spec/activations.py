"""Raw activation reads: which hook sites a server declares, what a request asks, how the
values are packed.

A server declares its readable sites at startup (``steerd serve --activation-hooks`` with
globs over SAELens hook names, ``declared_sites``); each declared site costs one op in the
compiled graph (``sae_runtime.vllm.worker``), whether a step reads it or not. A request's
``ActivationRead`` names one declared site, a position selector, a pool and a dtype.

Convention: the values are taken **after** this request's own edits (interventions and
vectors) at that site and at every earlier site, i.e. what the rest of the model sees. A
read with ``before_edits`` takes them **before** this request's edits at that site (still
after its edits at earlier sites). The server decides which declared sites get a second
op for that, placed before the edit hooks (a *twin*, ``twin_sites``): those where an SAE,
vector bank, transcoder or cross-layer transcoder edits (``edit_positions``). Elsewhere the
two reads are the same values, and one request may not ask for both. The worker reads rows
in float32; the server pools (``pool_rows``) and packs them (``pack``: little-endian,
row-major; bfloat16 is float32's top half, rounded to nearest even).
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import IntEnum
from typing import NamedTuple

import numpy as np

from sae_runtime.errors import InvalidRequestError
from sae_runtime.spec.payloads import ActPayload
from sae_runtime.spec.selectors import Selector

SITES = ("resid_pre", "z", "attn_out", "ln2_normalized", "mlp_out", "resid_post")
"""The sites activation reads serve, in a block's forward order; ``resid_pre`` of block 0
(the embeddings) is not one. ``z`` is the attention's per-head output before the output
projection (heads concatenated, ``n_heads * head_dim`` wide); ``ln2_normalized`` the pre-MLP
norm's normalised input before its weight (TransformerLens' ``ln2.hook_normalized``)."""

HOOK_SUFFIX = {"resid_pre": "hook_resid_pre", "z": "attn.hook_z", "attn_out": "hook_attn_out",
               "ln2_normalized": "ln2.hook_normalized", "mlp_out": "hook_mlp_out",
               "resid_post": "hook_resid_post"}
"""Each site's SAELens / TransformerLens hook name after ``blocks.L.``."""

_HOOK = re.compile(r"^blocks\.(\d+)\.(" + "|".join(re.escape(v) for v in HOOK_SUFFIX.values())
                   + r")$")
_SITE_OF = {v: k for k, v in HOOK_SUFFIX.items()}


def hook_name(layer: int, site: str) -> str:
    return f"blocks.{layer}.{HOOK_SUFFIX[site]}"


class SitePosition(NamedTuple):
    """Where in a decoder block a site's value passes, as the worker wraps modules: ``out``
    (the block's output: ``resid_post`` of L and ``resid_pre`` of L+1 are one position),
    ``attn_out`` / ``mlp_out`` (those modules' outputs), ``z`` (the attention output
    projection's input), ``ln2_normalized`` (the MLP's input, which nothing edits)."""

    block: int
    wrap: str


def site_position(layer: int, site: str) -> SitePosition:
    """The position of SAELens site ``site`` of layer ``layer`` (a ``SITES`` name, or
    ``resid_pre``/``resid_post``): ``resid_pre`` of L is block L-1's output."""
    if site in ("resid_post", "resid_pre"):
        return SitePosition(layer - 1 if site == "resid_pre" else layer, "out")
    return SitePosition(layer, site)


def hook_position(name: str) -> SitePosition:
    """The position of a readable hook name (``parse_hook``); ``ValueError`` otherwise."""
    parsed = parse_hook(name)
    if parsed is None:
        raise ValueError(f"{name!r} is not a readable hook name")
    return site_position(*parsed)


def edit_positions(configs: Iterable) -> frozenset[SitePosition]:
    """Where hooks that edit sit, from their configs (``SAEConfig``: ``layer``, ``site``,
    ``clt_layers``): an SAE or vector bank at its own site (a transcoder at its output
    site), a cross-layer transcoder at ``mlp_out`` of every block it writes to."""
    out: set[SitePosition] = set()
    for c in configs:
        clt = tuple(getattr(c, "clt_layers", ()) or ())
        if clt:
            out.update(SitePosition(b, "mlp_out") for b in clt)
        else:
            out.add(site_position(c.layer, c.site))
    return frozenset(out)


def twin_sites(names: Sequence[str], edits: Iterable[SitePosition]) -> tuple[int, ...]:
    """Indices of the declared sites ``names`` that get a before-edits twin: those at a
    position where an edit hook sits (``edit_positions``)."""
    edits = frozenset(edits)
    return tuple(i for i, n in enumerate(names) if hook_position(n) in edits)


class ActPool(IntEnum):
    """Numbers match ``steering.v1.ActivationPool``."""

    NONE = 1
    MEAN = 2
    MAX = 3
    LAST = 4


class ActDtype(IntEnum):
    """Numbers match ``steering.v1.ActivationDtype``."""

    FLOAT32 = 1
    FLOAT16 = 2
    BFLOAT16 = 3

    @property
    def itemsize(self) -> int:
        return 4 if self is ActDtype.FLOAT32 else 2


def parse_hook(name: str) -> tuple[int, str] | None:
    """``(layer, site)`` of a hook name (``blocks.L.hook_resid_post`` -> ``(L, "resid_post")``,
    ``blocks.L.attn.hook_z`` -> ``(L, "z")``; a site of ``SITES``), else None."""
    m = _HOOK.match(name)
    return (int(m.group(1)), _SITE_OF[m.group(2)]) if m else None


def declared_sites(globs: Sequence[str], n_layers: int) -> tuple[str, ...]:
    """The hook names ``globs`` (``fnmatch`` patterns) select among the model's sites, in
    layer then ``SITES`` order. Raises ``ValueError`` for a glob that selects nothing."""
    names = [hook_name(layer, site) for layer in range(n_layers) for site in SITES
             if not (site == "resid_pre" and layer == 0)]
    out: dict[str, None] = {}
    for g in globs:
        hit = [n for n in names if fnmatch.fnmatchcase(n, g)]
        if not hit:
            raise ValueError(
                f"--activation-hooks {g!r} selects no site; sites are blocks.L.<hook> "
                f"with L in 0..{n_layers - 1} and hook one of "
                f"{', '.join(HOOK_SUFFIX.values())} (hook_resid_pre from block 1)")
        out.update(dict.fromkeys(hit))
    return tuple(n for n in names if n in out)


@dataclass(frozen=True)
class DeclaredSites:
    """A server's readable sites: the ``--activation-hooks`` globs, the hook names they
    select (index == ``ActPayload.site``), the width of each (``widths[i]``: the hidden
    size, or ``n_heads * head_dim`` at ``attn.hook_z``) and the sites with a before-edits
    twin (``twins``: declared-site indices, ``twin_sites``). Twin ``k`` (of site
    ``twins[k]``) is worker site ``len(names) + k``, as wide as its site."""

    globs: tuple[str, ...] = ()
    names: tuple[str, ...] = ()
    widths: tuple[int, ...] = ()
    twins: tuple[int, ...] = ()

    @property
    def index(self) -> dict[str, int]:
        return {n: i for i, n in enumerate(self.names)}

    def width(self, hook: str) -> int:
        return self.widths[self.names.index(hook)]

    @property
    def twin_hooks(self) -> tuple[str, ...]:
        """The declared hooks whose before-edits read differs from the after one."""
        return tuple(self.names[i] for i in self.twins)

    @property
    def site_widths(self) -> tuple[int, ...]:
        """The width of every worker site: the declared ones, then the twins."""
        return self.widths + tuple(self.widths[i] for i in self.twins)

    def site_id(self, hook: str, before_edits: bool = False) -> int:
        """The worker site a read of ``hook`` copies from: its twin before edits where it
        has one, else the site itself (nothing edits there: the same values)."""
        i = self.names.index(hook)
        if before_edits and i in self.twins:
            return len(self.names) + self.twins.index(i)
        return i

    @classmethod
    def of(cls, globs: Sequence[str], n_layers: int, d_model: int, d_z: int,
           edits: Iterable[SitePosition] = ()) -> DeclaredSites:
        """The sites ``globs`` select in a model of ``n_layers`` blocks, hidden size
        ``d_model`` and ``d_z`` = heads x head size (``declared_sites``), with a twin at
        each one where a hook of ``edits`` (``edit_positions``) sits."""
        names = declared_sites(globs, n_layers)
        return cls(tuple(globs), names,
                   tuple(d_z if parse_hook(n)[1] == "z" else d_model for n in names),
                   twin_sites(names, edits))


NO_SITES = DeclaredSites()


@dataclass(frozen=True)
class ActivationRead:
    hook: str
    positions: Selector | None = None  # None: every position (Encode: every prompt position)
    pool: ActPool = ActPool.NONE
    dtype: ActDtype = ActDtype.FLOAT32
    before_edits: bool = False  # before this request's edits at the site (module doc)

    @property
    def selector(self) -> Selector:
        return self.positions if self.positions is not None else Selector()


def validate_reads(reads: Sequence[ActivationRead], sites: DeclaredSites, *, max_reads: int,
                   vocab_size: int = 2**31, prefix: str = "activation_reads") -> None:
    """Check ``reads`` against the ``sites`` a server declared; errors name the field
    (``activation_reads[1].hook``)."""
    globs = sites.globs
    if len(reads) > max_reads:
        raise InvalidRequestError(prefix, f"{len(reads)} activation reads given; the server "
                                  f"allows at most {max_reads} per request "
                                  "(steerd serve --max-activation-reads)")
    seen: dict[tuple[str, bool], int] = {}
    twins = set(sites.twin_hooks)
    for j, r in enumerate(reads):
        field = f"{prefix}[{j}]"
        if r.hook not in sites.names:
            declared = ", ".join(globs) if globs else "none (steerd serve --activation-hooks)"
            raise InvalidRequestError(f"{field}.hook", f"hook {r.hook!r} is not readable on this "
                                      f"server; declared: {declared}")
        key = (r.hook, bool(r.before_edits))
        if key in seen:
            when = "before" if r.before_edits else "after"
            raise InvalidRequestError(f"{field}.hook", f"hook {r.hook!r} {when} edits is already "
                                      f"read by {prefix}[{seen[key]}]; give one read per hook "
                                      "and before_edits")
        other = seen.get((r.hook, not r.before_edits))
        if other is not None and r.hook not in twins:
            before, after = (j, other) if r.before_edits else (other, j)
            raise InvalidRequestError(
                f"{prefix}[{before}].before_edits",
                f"nothing edits {r.hook} on this server, so its values before and after "
                f"edits are the same ({prefix}[{after}] reads it after edits); read it once")
        seen[key] = j
        if r.positions is not None:
            r.positions.validate(f"{field}.positions", vocab_size)
        if r.pool not in ActPool.__members__.values() or r.dtype not in ActDtype.__members__.values():
            raise InvalidRequestError(field, "unknown pool or dtype")


def to_payload(reads: Sequence[ActivationRead], sites: DeclaredSites) -> tuple[ActPayload, ...]:
    """The reads as ``RequestPayload.acts``: each one's worker site (a before-edits read
    at its site's twin, ``DeclaredSites.site_id``); pooling and dtype stay with the server."""
    return tuple(ActPayload(sites.site_id(r.hook, r.before_edits), r.selector) for r in reads)


def pool_rows(rows: np.ndarray, pool: ActPool) -> np.ndarray:
    """``rows [n, d]`` pooled to ``[1, d]`` (MEAN, MAX, LAST), or as they are (NONE)."""
    if pool is ActPool.NONE:
        return rows
    if not len(rows):
        return rows[:0]
    if pool is ActPool.MEAN:
        return rows.astype(np.float64).mean(axis=0, keepdims=True).astype(np.float32)
    if pool is ActPool.MAX:
        return rows.max(axis=0, keepdims=True)
    return rows[-1:]


def to_bfloat16_bits(values: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint16), rounded to nearest even; NaN stays NaN."""
    u = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    rounded = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    nan = np.isnan(values)
    return np.where(nan, (u >> 16) | 0x40, rounded).astype(np.uint16)


def pack(values: np.ndarray, dtype: ActDtype) -> bytes:
    """float32 ``values`` as little-endian bytes of ``dtype``, row-major."""
    v = np.ascontiguousarray(values, dtype=np.float32)
    if dtype is ActDtype.FLOAT16:
        return v.astype("<f2").tobytes()
    if dtype is ActDtype.BFLOAT16:
        return to_bfloat16_bits(v).astype("<u2").tobytes()
    return v.astype("<f4").tobytes()
