"""Every model family x hook site: steering and reads match the HF + sae-lens reference.

One real server (compiled mode) per family, with four SAEs: resid_post (standard),
attn_out (JumpReLU), mlp_out (TopK) and attn.hook_z (standard), and a transcoder on the
same MLP as the mlp_out SAE (``FAMILY_TRANSCODERS``: the SAELens transcoder classes and
a Gemma Scope 2 affine folder for Gemma 3).
"""

from __future__ import annotations

import atexit
import contextlib
import os
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest

from clients.client import clamp, read
from tests.e2e.conftest import start_server, stop_server
from tests.e2e.reference import CLAMP, Edit, HFReference, check_teacher_forced
from tests.fixtures.tiny import FAMILY_CONFIGS, FAMILY_SAES, FAMILY_TRANSCODERS, make_family_set

pytestmark = pytest.mark.e2e
PROMPT = [5, 100, 200, 300, 45, 67, 12, 400]
SITES = tuple(FAMILY_SAES)


# The next families' servers start while this one's tests run (engine starts are mostly
# single-threaded work: spawning, imports, tracing), so two of them overlap on two cores.
# FAMILY_PREFETCH=0 starts each one when its tests begin.
PREFETCH = int(os.environ.get("FAMILY_PREFETCH", "2"))
_POOL = ThreadPoolExecutor(max(PREFETCH, 1), thread_name_prefix="family-start")
_STARTS: dict[str, Future] = {}


def _start(family: str, root: Path) -> Future:
    """Make the family's files here (transformers' model building is not thread-safe) and
    start its server in the background."""
    model = make_family_set(root, family)
    sae_dirs = {name: root / "saes" / name for name in SITES}
    return _POOL.submit(lambda: (start_server(model, sae_dirs, root), model, sae_dirs))


def _stop_unused() -> None:
    """Servers started ahead for families whose tests never ran (a -x stop, a filter)."""
    for fut in _STARTS.values():
        with contextlib.suppress(Exception):
            srv, _, _ = fut.result()
            stop_server(srv)  # SIGTERM: steerd stops its engine processes too (not SIGKILL)


atexit.register(_stop_unused)


@pytest.fixture(scope="module", params=FAMILY_CONFIGS)
def family(request, tmp_path_factory):
    order = list(dict.fromkeys(  # the families this session runs, in test order
        it.callspec.params["family"] for it in request.session.items
        if "family" in getattr(getattr(it, "callspec", None), "params", {})))
    for fam in order[order.index(request.param):][: PREFETCH + 1]:
        if fam not in _STARTS:
            _STARTS[fam] = _start(fam, tmp_path_factory.mktemp(fam))
    srv, model, sae_dirs = _STARTS.pop(request.param).result()
    try:
        ref = HFReference(model, sae_dirs, SITES)
    except BaseException:
        stop_server(srv)
        raise
    yield srv, ref
    stop_server(srv)


@pytest.mark.parametrize("site", SITES)
def test_steering_at_site_matches_reference(family, site):
    srv, ref = family
    feature = int(ref.latents(PROMPT, site).sum(0).argmax())
    value = 10.0 * float(ref.activation(PROMPT, site).norm(dim=-1).mean())  # strong at any scale
    with srv.client() as c:
        plain = c.generate_text(PROMPT, max_tokens=10, temperature=0.0, ignore_eos=True)
        out = c.generate_text(PROMPT, max_tokens=10, temperature=0.0, ignore_eos=True,
                              interventions=[clamp(site, feature, value)])
    edits = [Edit(site, feature, CLAMP, value)]
    check_teacher_forced(ref.logits(PROMPT + plain.token_ids, [], len(PROMPT)), len(PROMPT), plain.token_ids)
    steered = ref.logits(PROMPT + out.token_ids, edits, len(PROMPT))
    check_teacher_forced(steered, len(PROMPT), out.token_ids)
    # Not vacuous: the edit moves the model. (Gemma's post-attention norm can bound an edit at
    # z so much that greedy tokens stay put, so the logits are checked, not only the tokens.)
    moved = float((steered - ref.logits(PROMPT + out.token_ids, [], len(PROMPT))).abs().max())
    assert out.token_ids != plain.token_ids or moved > 1.0, f"clamping at {site} had no effect ({moved})"


@pytest.mark.parametrize("site", SITES)
def test_reads_at_site_match_reference(family, site):
    srv, ref = family
    with srv.client() as c:
        out = c.generate_text(PROMPT, max_tokens=4, temperature=0.0, ignore_eos=True,
                              reads=[read(site, top_k=5, watch=[3])])
    full = PROMPT + out.token_ids
    dense = ref.latents(full, site)
    assert [f.position for f in out.features] == list(range(len(full) - 1))
    for f in out.features:
        want = dense[f.position].topk(5).values
        assert list(f.values) == pytest.approx(want.tolist(), abs=1e-4)
        assert list(f.watch_values) == pytest.approx([float(dense[f.position, 3])], abs=1e-4)


def test_list_saes_reports_sites(family, request):
    srv, _ = family
    with srv.client() as c:
        saes = {s.id: s for s in c.list_saes()}
    assert {k: (v.layer, v.site, v.input_site) for k, v in saes.items()} == {
        "resid": (1, 1, 0), "attn": (1, 3, 0), "mlp": (0, 4, 0), "z": (2, 5, 0),
        "tc": (0, 4, 6)}  # the transcoder reads the MLP input side (6) and writes mlp_out (4)
    # SAELens transcoders read ln2.hook_normalized, Gemma Scope 2's the MLP input itself
    gs2 = FAMILY_TRANSCODERS[request.node.callspec.params["family"]][1] == "gemma_scope_2"
    assert saes["tc"].hook_name == ("blocks.0.hook_mlp_in" if gs2 else "blocks.0.ln2.hook_normalized")
    assert saes["tc"].hook_name_out == "blocks.0.hook_mlp_out"


def test_transcoder_edits_in_a_mixed_batch(family):
    """Concurrent: plain, a transcoder clamp, the transcoder and the mlp_out SAE (same MLP)
    edited together, and a transcoder read; plain equals plain alone, every steered one
    matches the reference, and the transcoder's latents are those of the MLP *input*."""
    srv, ref = family
    f_tc = int(ref.latents(PROMPT, "tc").sum(0).argmax())
    f_mlp = int(ref.latents(PROMPT, "mlp").sum(0).argmax())
    v_tc = 10.0 * float(ref.activation(PROMPT, "tc").norm(dim=-1).mean())
    kw = dict(max_tokens=10, temperature=0.0, ignore_eos=True)
    jobs = {"plain": {}, "tc": {"interventions": [clamp("tc", f_tc, v_tc)]},
            "both": {"interventions": [clamp("mlp", f_mlp, 0.0), clamp("tc", f_tc, v_tc)]},
            "read": {"reads": [read("tc", top_k=4)]}}
    with srv.client() as c:
        alone = c.generate_text(PROMPT, **kw)
        with ThreadPoolExecutor(len(jobs)) as pool:
            futs = {k: pool.submit(c.generate_text, PROMPT, **kw, **v) for k, v in jobs.items()}
            outs = {k: f.result() for k, f in futs.items()}
    assert outs["plain"].token_ids == alone.token_ids == outs["read"].token_ids
    for name, edits in (("tc", [Edit("tc", f_tc, CLAMP, v_tc)]),
                        ("both", [Edit("mlp", f_mlp, CLAMP, 0.0), Edit("tc", f_tc, CLAMP, v_tc)])):
        ids = outs[name].token_ids
        check_teacher_forced(ref.logits(PROMPT + ids, edits, len(PROMPT)), len(PROMPT), ids)
    dense = ref.latents(PROMPT + outs["read"].token_ids, "tc")
    for f in outs["read"].features:
        assert list(f.values) == pytest.approx(dense[f.position].topk(4).values.tolist(), abs=1e-4)
