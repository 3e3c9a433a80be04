"""What the steering-vector e2e files share (test_vectors, test_runtime_vectors,
test_train_vectors, test_capacity, test_parallel): the prompt and strength they steer,
greedy generation on a server, the startup vectors' directions, and the HF reference that
adds a vector after a block with a plain forward hook (llama.cpp's ``build_cvec(cur, il)``
after block ``il``, the ``--vector`` convention). The HF model itself is the session
fixture ``hf`` (tests/e2e/conftest.py)."""

from __future__ import annotations

from contextlib import ExitStack

import torch

from tests.e2e.conftest import VECTORS
from tests.fixtures.tiny import HIDDEN
from tests.vector_files import random_directions

PROMPT = [5, 100, 200, 300, 45, 67, 12, 400, 100, 77]
P = len(PROMPT)
N = 10  # tokens generated
S = 4.0  # strength


def greedy(server, vectors=(), prompt=PROMPT, n=N, **kw):
    """``n`` greedy tokens of ``prompt`` on ``server`` with the named ``vectors``."""
    with server.client() as c:
        return c.generate_text(prompt, max_tokens=n, temperature=0.0, ignore_eos=True,
                               vectors=list(vectors), **kw)


def directions(name: str) -> dict[int, torch.Tensor]:
    """A startup vector's directions by block (``VECTORS``)."""
    layers, seed = VECTORS[name]
    return {k: torch.from_numpy(v) for k, v in random_directions(layers, HIDDEN, seed).items()}


def hf_inline(hf, ids, adds: list[tuple[torch.Tensor, int, float, set[int] | None]]):
    """Logits with ``strength * v`` added to block ``layer``'s output (at: None = all): a
    plain forward hook on ``model.model.layers[layer]``."""
    T = len(ids)
    with ExitStack() as stack:
        for v, layer, strength, at in adds:
            mask = torch.tensor([at is None or p in at for p in range(T)], dtype=torch.float32)

            def hook(mod, args, out, v=v, mask=mask, strength=strength):
                h = out[0] if isinstance(out, tuple) else out
                h = h + strength * mask[None, :, None] * v
                return (h, *out[1:]) if isinstance(out, tuple) else h

            stack.enter_context(hf.model.layers[layer].register_forward_hook(hook))
        with torch.no_grad():
            return hf(torch.tensor([ids])).logits[0]
