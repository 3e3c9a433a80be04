"""Shared fixtures: seeding, tiny artifacts, and (for e2e) one real server per session."""

from __future__ import annotations

import os
import random

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Every test engine gets vLLM's smallest CPU KV cache (1 GiB; the tiny models need MBs): up to
# six engines are alive at once (the shared ones, three family servers), and `make test`'s
# exported 2 GiB ran the 24 GiB machine out of memory there. TEST_KVCACHE_GIB overrides.
os.environ["VLLM_CPU_KVCACHE_SPACE"] = os.environ.get("TEST_KVCACHE_GIB", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(autouse=True)
def _seed_everything():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """A tiny Llama model plus one SAE per architecture (see tests.fixtures.tiny)."""
    from tests.fixtures.tiny import make_all

    out = tmp_path_factory.mktemp("tiny")
    make_all(out)
    return out


def pytest_collection_modifyitems(config, items):
    """Unit tests first, e2e after (stable otherwise): the shared e2e servers start in the
    background meanwhile (``_e2e_servers_early``)."""
    items.sort(key=lambda it: it.get_closest_marker("e2e") is not None)


@pytest.fixture(scope="session", autouse=True)
def _e2e_servers_early(request):
    """Start the shared e2e servers at the first test, in the background
    (``tests.e2e.conftest.start_early``); stop the ones no test took."""
    e2e = any(it.get_closest_marker("e2e") for it in request.session.items)
    if not e2e or os.environ.get("E2E_EARLY", "1") == "0":
        yield
        return
    from tests.e2e import conftest as e2e_conftest

    e2e_conftest.start_early(request)
    yield
    e2e_conftest.stop_early_unused()
