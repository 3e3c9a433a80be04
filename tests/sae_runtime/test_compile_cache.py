"""The compile-cache key of a steered engine (``payloads.AdditionalConfig``).

vLLM keys its compiled-graph cache on ``VllmConfig.compute_hash()``, which hashes
``additional_config``. The reads socket is a fresh path every start, so it must not be in
the key (every start would compile again); where each SAE hooks must be (a cached graph
would hook the old place).
"""

from __future__ import annotations

import pytest

from sae_runtime.errors import SAEFormatError
from sae_runtime.loading import load_sae_config
from sae_runtime.step.config import (
    AdditionalConfig,
    ReadsKeys,
    SAEEntry,
    WorkerConfig,
    check_placement,
    placement,
    worker_config,
)


def _cfg(reads_addr: str, place: str = "resid_post@1", **kw) -> WorkerConfig:
    return WorkerConfig(saes=(SAEEntry("s", "/x/s", placement=place),), max_interventions=8,
                        reads_addr=reads_addr, **kw)


def _vllm_hash(tiny_dir, cfg: WorkerConfig) -> str:
    from sae_runtime.vllm.compat import AsyncEngineArgs as EngineArgs

    args = EngineArgs(model=str(tiny_dir / "tiny-llama"), max_model_len=256,
                      additional_config=AdditionalConfig(cfg))
    return args.create_engine_config().compute_hash()


def test_vllm_config_hash_ignores_the_reads_socket_and_keys_on_placement(tiny_dir):
    a = _vllm_hash(tiny_dir, _cfg("ipc:///tmp/steerd-reads-1.sock"))
    assert a == _vllm_hash(tiny_dir, _cfg("ipc:///tmp/steerd-reads-2.sock"))
    # a tcp:// channel's fresh CURVE keys (secrets) and the message cap: no cache miss
    keys = ReadsKeys("S" * 40, "C" * 40, "secret" + "x" * 34)
    assert a == _vllm_hash(tiny_dir, _cfg("tcp://10.0.0.1:5557", reads_keys=keys,
                                          reads_max_message_bytes=1 << 20))
    assert a != _vllm_hash(tiny_dir, _cfg("ipc:///tmp/steerd-reads-1.sock", "resid_post@2"))
    assert a != _vllm_hash(tiny_dir, _cfg("ipc:///tmp/steerd-reads-1.sock", max_watch=4))


def test_the_worker_reads_back_every_field_including_the_reads_socket():
    cfg = _cfg("ipc:///tmp/r.sock", sae_dtype="float32")
    assert worker_config(AdditionalConfig(cfg)) == cfg
    keyed = _cfg("tcp://10.0.0.1:5557", reads_keys=ReadsKeys("a", "b", "c"))
    assert worker_config(AdditionalConfig(keyed)) == keyed


def test_placement_names_site_block_and_a_transcoders_input(tiny_dir):
    from sae_runtime.saes.base import SAEConfig

    c = load_sae_config(tiny_dir / "saes" / "resid_l1")
    assert placement(c) == "resid_post@1"
    tc = SAEConfig("standard", 128, 256, "blocks.0.hook_mlp_out", 0, "mlp_out", input_site="mlp_in")
    assert placement(tc) == "mlp_out@0<mlp_in"
    assert placement(tc) != placement(SAEConfig("standard", 128, 256, "blocks.0.hook_mlp_out", 0,
                                                "mlp_out"))


def test_a_worker_refuses_an_sae_that_moved_since_the_server_read_it(tiny_dir):
    path = tiny_dir / "saes" / "resid_l1"
    c = load_sae_config(path)
    check_placement(SAEEntry("r", str(path), placement="resid_post@1"), c)
    check_placement(SAEEntry("r", str(path)), c)  # unchecked (no placement given)
    with pytest.raises(SAEFormatError, match=r"hooks resid_post@1 in the worker but resid_post@3"):
        check_placement(SAEEntry("r", str(path), placement="resid_post@3"), c)
