"""Shared fixtures: seeding, tiny artifacts, and (for e2e) one real server per session."""

from __future__ import annotations

import os
import random

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(autouse=True)
def _seed_everything():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """A tiny Llama model plus one SAE per architecture (see sae_runtime.testing.tiny)."""
    from sae_runtime.testing.tiny import make_all

    out = tmp_path_factory.mktemp("tiny")
    make_all(out)
    return out
