"""The hook-placement check on hand-built worker reports (the e2e startup test drives the
real one): steerd must refuse to serve whenever an SAE would silently not run."""

from __future__ import annotations

import copy

import pytest

from server.startup import ExpectedHook, HookPlacementError, apply_cpu_env_defaults, check_hooks

# Three SAEs on a 4-block model: blocks 0 and 1 on pipeline stage 0, 2 and 3 on stage 1.
EXPECTED = [ExpectedHook(0, "a", "blocks.0.hook_resid_post", 0),
            ExpectedHook(1, "b", "blocks.1.hook_mlp_out", 1),
            ExpectedHook(2, "c", "blocks.3.attn.hook_z", 3)]


def _report(tp_rank, tp, pp_rank, pp, layers, hooks, dp_rank=0, dp=1):
    return {"installed": True, "runner": "CPUModelRunner", "runner_patched": True,
            "ranks": {"tp_rank": tp_rank, "tp_size": tp, "pp_rank": pp_rank, "pp_size": pp,
                      "dp_rank": dp_rank, "dp_size": dp},
            "layers": layers, "publishes": tp_rank == 0,
            "hooks": [{"sae": i, "id": sid, "block": b, "site": "x", "dtype": "float32",
                       "dtype_why": "test", "sharded": False} for i, sid, b in hooks]}


def tp2_pp2() -> list[dict]:
    stage0 = [(0, "a", 0), (1, "b", 1)]
    stage1 = [(2, "c", 3)]
    return [_report(t, 2, 0, 2, [0, 1], stage0) for t in range(2)] + \
           [_report(t, 2, 1, 2, [2, 3], stage1) for t in range(2)]


def test_correct_tp_pp_layout_passes_and_returns_dtypes():
    assert check_hooks(tp2_pp2(), EXPECTED, world_size=4, reads=True) == {
        0: "float32", 1: "float32", 2: "float32"}


def test_data_parallel_replicas_each_checked():
    reps = tp2_pp2() + [dict(r, ranks=dict(r["ranks"], dp_rank=1)) for r in copy.deepcopy(tp2_pp2())]
    check_hooks(reps, EXPECTED, world_size=4, reads=True)
    del reps[5]["hooks"][0]
    with pytest.raises(HookPlacementError, match=r"SAE 'a' .* not installed on worker tp 1/2, pp 0/2, dp 1"):
        check_hooks(reps, EXPECTED, world_size=4, reads=True)


def test_missing_on_one_tp_rank_is_refused_naming_the_hook():
    reps = tp2_pp2()
    reps[1]["hooks"] = reps[1]["hooks"][:1]
    with pytest.raises(HookPlacementError) as e:
        check_hooks(reps, EXPECTED, world_size=4, reads=True)
    assert "'b'" in str(e.value) and "blocks.1.hook_mlp_out" in str(e.value)
    assert "tp 1/2, pp 0/2" in str(e.value) and "unsteered" in str(e.value)


def test_unpatched_runner_is_refused():
    reps = tp2_pp2()
    reps[2].update(runner_patched=False, runner="GPUModelRunnerV2")
    with pytest.raises(HookPlacementError, match="GPUModelRunnerV2 .* is not one sae_runtime patches"):
        check_hooks(reps, EXPECTED, world_size=4, reads=True)


def test_v2_runner_passes_when_patched_and_is_refused_when_not():
    """Model Runner V2 (the CUDA default) serves like V1 when its step methods are ours,
    and is refused, naming it, when they are not."""
    v2 = "vllm.v1.worker.gpu.model_runner.GPUModelRunner"
    reps = [dict(r, runner=v2, runner_kind="v2", device="cuda", cudagraph_mode="PIECEWISE",
                 refusals=[]) for r in tp2_pp2()]
    check_hooks(reps, EXPECTED, world_size=4, reads=True)
    reps[3]["runner_patched"] = False
    with pytest.raises(HookPlacementError, match=r"gpu.model_runner.GPUModelRunner \(v2\) is not"):
        check_hooks(reps, EXPECTED, world_size=4, reads=True)


def test_a_worker_refusal_is_refused_with_its_reason():
    """What the worker found unsafe (full CUDA graphs, speculative decoding under V2)
    stops the server, with the worker's reason in the message."""
    reps = tp2_pp2()
    reps[1]["refusals"] = ["CUDA graph mode FULL replays full graphs"]
    with pytest.raises(HookPlacementError,
                       match="tp 1/2, pp 0/2.*FULL replays full graphs"):
        check_hooks(reps, EXPECTED, world_size=4, reads=True)


def test_install_never_ran_is_refused():
    reps = tp2_pp2()
    reps[0]["installed"] = False
    with pytest.raises(HookPlacementError, match="no SAE was installed"):
        check_hooks(reps, EXPECTED, world_size=4, reads=True)


def test_installed_on_the_wrong_stage_is_refused():
    reps = tp2_pp2()
    reps[3]["hooks"].append({"sae": 0, "id": "a", "block": 0, "site": "x", "dtype": "float32",
                             "dtype_why": "", "sharded": False})
    with pytest.raises(HookPlacementError, match="which does not hold block 0"):
        check_hooks(reps, EXPECTED, world_size=4, reads=True)


def test_no_worker_holds_the_block():
    reps = tp2_pp2()
    for r in reps[2:]:
        r["layers"], r["hooks"] = [2], []
    with pytest.raises(HookPlacementError, match="no worker holds block 3"):
        check_hooks(reps, EXPECTED, world_size=4, reads=True)


def test_wrong_worker_count_is_refused():
    with pytest.raises(HookPlacementError, match="multiple of 4"):
        check_hooks(tp2_pp2()[:3], EXPECTED, world_size=4, reads=True)


def test_reads_published_twice_or_never_are_refused():
    reps = tp2_pp2()
    reps[1]["publishes"] = True
    with pytest.raises(HookPlacementError, match="2 workers publish feature reads"):
        check_hooks(reps, EXPECTED, world_size=4, reads=True)
    reps[1]["publishes"] = reps[0]["publishes"] = False
    with pytest.raises(HookPlacementError, match="0 workers publish"):
        check_hooks(reps, EXPECTED, world_size=4, reads=True)


def test_dtype_disagreement_is_refused():
    reps = tp2_pp2()
    reps[1]["hooks"][0]["dtype"] = "bfloat16"
    with pytest.raises(HookPlacementError, match="different compute dtypes"):
        check_hooks(reps, EXPECTED, world_size=4, reads=True)


def test_no_saes_needs_no_hooks():
    assert check_hooks([], [], world_size=1, reads=False) == {}


def test_cpu_env_defaults_are_applied_only_where_unset():
    env = {"VLLM_CPU_KVCACHE_SPACE": "3"}
    lines = apply_cpu_env_defaults(1, env)
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "3" and lines == []
    env = {}
    lines = apply_cpu_env_defaults(1, env)
    assert env["VLLM_CPU_KVCACHE_SPACE"].isdigit() and "set it to override" in lines[0]


def test_activation_sites_must_be_on_every_rank_holding_their_block():
    sites = ["blocks.1.hook_resid_post", "blocks.3.hook_resid_pre"]  # blocks 1 and 2

    def with_sites(reps):
        for r in reps:
            r["act_sites"] = [{"site": i, "hook": h, "block": b}
                              for i, (h, b) in enumerate(zip(sites, (1, 2), strict=True))
                              if b in r["layers"]]
        return reps

    check_hooks(with_sites(tp2_pp2()), EXPECTED, world_size=4, reads=True, act_sites=sites)
    reps = with_sites(tp2_pp2())
    reps[3]["act_sites"] = []
    with pytest.raises(HookPlacementError, match=r"blocks.3.hook_resid_pre is not installed on "
                                                 r"worker tp 1/2, pp 1/2"):
        check_hooks(reps, EXPECTED, world_size=4, reads=True, act_sites=sites)
    # without SAEs the runner checks still run when sites are declared
    reps = with_sites(tp2_pp2())
    reps[0]["runner_patched"] = False
    with pytest.raises(HookPlacementError, match="is not one sae_runtime patches"):
        check_hooks(reps, [], world_size=4, reads=True, act_sites=sites)


def test_before_edits_twins_must_be_installed_as_their_own_sites():
    sites = ["blocks.1.hook_resid_post", "blocks.3.hook_resid_pre"]  # blocks 1 and 2
    blocks = (1, 2)

    def with_sites(reps, twins=(1,)):
        for r in reps:
            r["act_sites"] = [{"site": i, "hook": h, "block": b, "width": 8,
                               "before_edits": False}
                              for i, (h, b) in enumerate(zip(sites, blocks, strict=True))
                              if b in r["layers"]]
            r["act_sites"] += [{"site": len(sites) + k, "hook": sites[j], "block": blocks[j],
                                "width": 8, "before_edits": True}
                               for k, j in enumerate(twins) if blocks[j] in r["layers"]]
        return reps

    kw = dict(world_size=4, reads=True, act_sites=sites, act_widths=(8, 8), act_twins=(1,))
    check_hooks(with_sites(tp2_pp2()), EXPECTED, **kw)
    # a worker built without the twin (an older config) refuses to serve
    with pytest.raises(HookPlacementError, match=r"blocks.3.hook_resid_pre \(its before-edits "
                                                 r"twin\) is not installed on worker tp 0/2"):
        check_hooks(with_sites(tp2_pp2(), twins=()), EXPECTED, **kw)
    # twins at other site ids than the server maps the reads to
    with pytest.raises(HookPlacementError, match="is worker site 3 on .*, expected 2"):
        check_hooks(with_sites(tp2_pp2(), twins=(0, 1)), EXPECTED, **{**kw, "act_twins": (1, 0)})
    # a twin the server did not ask for
    with pytest.raises(HookPlacementError, match="installed activation site 3 "
                                                 r"\(blocks.3.hook_resid_pre\), which"):
        check_hooks(with_sites(tp2_pp2(), twins=(0, 1)), EXPECTED, **{**kw, "act_twins": (0,)})
