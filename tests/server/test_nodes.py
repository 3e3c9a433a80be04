"""Multi-node decisions made before any engine starts (``server.nodes``), and the startup
check's cross-node refusals (``server.startup``), on hand-built worker reports.

``local_ranks`` is checked against vLLM's own parallel config (``local_world_size *
data_parallel_size_local`` from ``create_engine_config``), the reference for how many
workers vLLM starts on a node.
"""

from __future__ import annotations

import copy

import pytest

from server.config import ServerConfig
from server.nodes import check_layout, check_pp_eager, local_ranks, network_env_defaults
from server.startup import ExpectedHook, HookPlacementError, check_hooks, node_lines

MASTER = "10.1.2.3"
TCP = "tcp://10.1.2.3:5557"


def cfg(**kw) -> ServerConfig:
    return ServerConfig(model="m", **kw)


LAYOUTS = [
    {},
    {"tensor_parallel_size": 2},
    {"tensor_parallel_size": 2, "nnodes": 2, "node_rank": 0},
    {"tensor_parallel_size": 2, "nnodes": 2, "node_rank": 1},
    {"tensor_parallel_size": 2, "pipeline_parallel_size": 2, "nnodes": 4, "node_rank": 2},
    {"pipeline_parallel_size": 2, "tensor_parallel_size": 2, "nnodes": 2, "node_rank": 1},
    {"data_parallel_size": 2, "nnodes": 2, "node_rank": 1},
    {"data_parallel_size": 4, "tensor_parallel_size": 2, "nnodes": 2, "node_rank": 0},
    {"data_parallel_size": 2, "data_parallel_size_local": 1},
    {"data_parallel_size": 3, "data_parallel_size_local": 2, "data_parallel_start_rank": 1},
    {"data_parallel_size": 2, "tensor_parallel_size": 2, "nnodes": 4, "node_rank": 3},
]


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda d: ",".join(f"{k}={v}" for k, v in d.items()) or "one")
def test_local_ranks_match_vllms_own_count(layout, tiny_dir):
    from sae_runtime.vllm.compat import AsyncEngineArgs

    args = AsyncEngineArgs(model=str(tiny_dir / "tiny-llama"), max_model_len=256,
                           distributed_executor_backend="mp", master_addr=MASTER,
                           data_parallel_address=MASTER, **layout)
    pc = args.create_engine_config(headless=bool(layout.get("node_rank") or
                                                 layout.get("data_parallel_start_rank"))).parallel_config
    want = pc.local_world_size * pc.data_parallel_size_local
    assert local_ranks(cfg(**layout)) == want


def test_serve_and_node_roles_are_refused_when_they_cannot_work():
    node1 = dict(tensor_parallel_size=2, nnodes=2, node_rank=1, master_addr=MASTER, reads_address=TCP)
    check_layout(cfg(**node1), "node", has_saes=True)
    with pytest.raises(ValueError, match="steerd serve runs node 0"):
        check_layout(cfg(**node1), "serve", has_saes=True)
    with pytest.raises(ValueError, match="steerd node runs another node's share"):
        check_layout(cfg(tensor_parallel_size=2, nnodes=2, master_addr=MASTER), "node", has_saes=False)
    with pytest.raises(ValueError, match="--master-addr 127.0.0.1: the other nodes cannot reach"):
        check_layout(cfg(tensor_parallel_size=2, nnodes=2), "serve", has_saes=False)
    with pytest.raises(ValueError, match="--data-parallel-address 0.0.0.0"):
        check_layout(cfg(data_parallel_size=2, data_parallel_size_local=1,
                         data_parallel_address="0.0.0.0"), "serve", has_saes=False)
    with pytest.raises(ValueError, match="give --data-parallel-size-local"):
        check_layout(cfg(data_parallel_size=2, data_parallel_start_rank=1,
                         data_parallel_address=MASTER), "node", has_saes=False)
    with pytest.raises(ValueError, match="ray spans nodes its own way"):
        check_layout(cfg(tensor_parallel_size=2, nnodes=2, master_addr=MASTER,
                         distributed_executor_backend="ray"), "serve", has_saes=False)
    for reads in (None, "ipc:///x/r.sock", "tcp://10.1.2.3:0", "tcp://127.0.0.1:5557"):
        with pytest.raises(ValueError, match="--reads-address .*workers on other nodes push"):
            check_layout(cfg(tensor_parallel_size=2, nnodes=2, master_addr=MASTER,
                             reads_address=reads), "serve", has_saes=True)
    check_layout(cfg(tensor_parallel_size=2), "serve", has_saes=True)  # one node: ipc is fine


def test_pp_with_enforce_eager_is_refused_on_cpu_naming_vllms_bug():
    with pytest.raises(ValueError, match="--enforce-eager with --pipeline-parallel-size > 1 on CPU"
                                         ".*sync_and_gather_intermediate_tensors"):
        check_pp_eager(cfg(pipeline_parallel_size=2, enforce_eager=True), on_cpu=True)
    check_pp_eager(cfg(pipeline_parallel_size=2, enforce_eager=True), on_cpu=False)
    check_pp_eager(cfg(pipeline_parallel_size=2), on_cpu=True)


def test_host_ip_and_gloo_interface_are_derived_from_the_route_to_node0():
    env: dict[str, str] = {}
    lines = network_env_defaults(cfg(tensor_parallel_size=2, nnodes=2, master_addr="127.0.0.1"), env)
    assert env["VLLM_HOST_IP"] == "127.0.0.1" and env["GLOO_SOCKET_IFNAME"] == "lo"
    assert "route to node 0 at 127.0.0.1" in lines[0] and "set it to override" in lines[1]
    kept = {"VLLM_HOST_IP": "10.9.9.9", "GLOO_SOCKET_IFNAME": "eth7"}
    assert network_env_defaults(cfg(tensor_parallel_size=2, nnodes=2), kept) == []
    assert kept == {"VLLM_HOST_IP": "10.9.9.9", "GLOO_SOCKET_IFNAME": "eth7"}
    assert network_env_defaults(cfg(tensor_parallel_size=2), env := {}) == [] and env == {}


# --------------------------------------------------------------- the startup check across nodes

EXPECTED = [ExpectedHook(0, "a", "blocks.0.hook_resid_post", 0)]
ENGINE = {"model": "m", "dtype": "float32", "max_model_len": 256, "max_num_seqs": 32,
          "max_num_batched_tokens": 64, "enforce_eager": False, "seed": 0}


def tp2_over_two_nodes() -> list[dict]:
    return [{"installed": True, "runner": "CPUModelRunner", "runner_patched": True,
             "ranks": {"tp_rank": t, "tp_size": 2, "pp_rank": 0, "pp_size": 1, "dp_rank": 0},
             "layers": [0, 1], "publishes": t == 0, "reads_addr": TCP, "reads_keys": True,
             "config_hash": "h", "engine": dict(ENGINE),
             "node": {"host": f"10.1.2.{3 + t}", "hostname": f"n{t}", "node_rank": t},
             "hooks": [{"sae": 0, "id": "a", "block": 0, "site": "resid_post",
                        "dtype": "float32", "dtype_why": "test"}]} for t in range(2)]


def check(reps):
    return check_hooks(reps, EXPECTED, world_size=2, reads=True, config_hash="h", reads_addr=TCP)


def test_every_rank_on_every_node_is_checked_and_a_missing_hook_names_its_node():
    assert check(tp2_over_two_nodes()) == {0: "float32"}
    reps = tp2_over_two_nodes()
    reps[1]["hooks"] = []
    with pytest.raises(HookPlacementError, match=r"SAE 'a' .* not installed on worker tp 1/2, pp 0/1, "
                                                 r"dp 0 on node 10.1.2.4 \(n1, node rank 1\)"):
        check(reps)
    assert node_lines(tp2_over_two_nodes()) == [
        "node 10.1.2.3 (n0, node rank 0) holds rank(s) dp/pp/tp 0/0/0",
        "node 10.1.2.4 (n1, node rank 1) holds rank(s) dp/pp/tp 0/0/1"]


@pytest.mark.parametrize("field,value,message", [
    ("config_hash", "other", r"on node 10.1.2.4 .* was started with other SAEs, vectors or table budgets"),
    ("reads_addr", "ipc:///tmp/x.sock", r"on node 10.1.2.4 .* pushes feature reads to ipc:///tmp/x.sock, "
                                        r"but this server listens on tcp://"),
    ("engine", dict(ENGINE, max_num_seqs=8), r"on node 10.1.2.4 .* runs max_num_seqs=8 but .* runs "
                                             r"max_num_seqs=32; give every node the same engine flags"),
])
def test_a_node_started_with_other_flags_is_refused_by_name(field, value, message):
    reps = tp2_over_two_nodes()
    reps[1][field] = value
    with pytest.raises(HookPlacementError, match=message):
        check(reps)


def test_a_publisher_without_the_reads_keys_is_refused():
    reps = copy.deepcopy(tp2_over_two_nodes())
    reps[0]["reads_keys"] = False
    with pytest.raises(HookPlacementError, match="publishes reads but has no reads-channel keys"):
        check(reps)
