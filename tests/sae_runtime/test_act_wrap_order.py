"""Where the activation read ops sit among the edit ops at one module (``worker.wrap_sites``
with the real ``sae_steer`` ops, eager, on CPU): a before-edits twin before every edit
(SAE hooks, a cross-layer transcoder's slot), the declared site after all of them.

The hooks are stand-ins whose edits are known constants (+1 for the SAE hook, +10 for the
CLT slot), so each site's buffer says exactly which edits it saw; the reference is the
module's own output computed without any wrap.
"""

from __future__ import annotations

import types

import pytest
import torch

from sae_runtime.step.act_reads import ActSite

T, D = 5, 4


class AddHook:
    """An SAE hook (``HookTables.apply``) / CLT (``apply_slot``, ``stash_slot``) that adds a
    constant: its edit is visible in every value after it."""

    def __init__(self, delta: float) -> None:
        self.delta = delta
        self.stashed = []

    def apply(self, h, residual):
        return h + self.delta

    def apply_slot(self, h, slot):
        return h + self.delta

    def stash_slot(self, x, slot):
        self.stashed.append(slot)
        return x.clone()


class Block(torch.nn.Module):
    """A decoder block of a family whose block returns ``(hidden, residual)`` (Llama-style)
    and whose MLP is both ``mlp_in`` and ``mlp_out``."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.mlp = torch.nn.Linear(D, D)
        with torch.no_grad():
            self.mlp.weight.copy_(torch.randn(D, D, generator=g))

    def forward(self, x):
        return self.mlp(x), x


def _sites(n: int) -> list[ActSite]:
    sites = [ActSite(D, T, torch.device("cpu")) for _ in range(n)]
    for s in sites:
        s.rows_host[:T] = range(T)
        s.n = T
        s.upload()
    return sites


@pytest.fixture
def worker(monkeypatch):
    pytest.importorskip("vllm")
    from sae_runtime.vllm import worker

    return worker


def test_mlp_out_reads_sit_around_every_edit_including_a_clts(worker, monkeypatch):
    from sae_runtime.vllm.families import FAMILIES

    family = FAMILIES["LlamaForCausalLM"]
    sae, clt = AddHook(1.0), AddHook(10.0)
    acts = _sites(2)  # 0: blocks.0.hook_mlp_out (after edits), 1: its twin (before edits)
    monkeypatch.setattr(worker, "_STATE", types.SimpleNamespace(hooks=[sae, clt], acts=acts))
    block = Block()
    x = torch.randn(T, D, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        plain = block.mlp(x)
        worker.wrap_sites({0: block}, family, {(0, "mlp_out"): [0]},
                          act_targets={(0, "mlp_out"): [0]},
                          twin_targets={(0, "mlp_out"): [1]}, clts=[(1, (0,))])
        out, _ = block(x)
    torch.testing.assert_close(out, plain + 11.0)  # both edits reach the model
    torch.testing.assert_close(acts[1].buf, plain)  # the twin: before every edit
    torch.testing.assert_close(acts[0].buf, plain + 11.0)  # the site: after the CLT's too
    assert clt.stashed == [0]  # the CLT's input stash still runs


def test_block_output_twin_reads_the_stream_before_the_hooks(worker, monkeypatch):
    from sae_runtime.vllm.families import FAMILIES

    family = FAMILIES["LlamaForCausalLM"]
    acts = _sites(2)  # 0: blocks.0.hook_resid_post, 1: its twin
    hooks = [AddHook(1.0), AddHook(2.0)]  # two SAEs at the block's output, in server order
    monkeypatch.setattr(worker, "_STATE", types.SimpleNamespace(hooks=hooks, acts=acts))
    block = Block()
    x = torch.randn(T, D, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        stream = block.mlp(x) + x  # hidden + residual
        worker.wrap_sites({0: block}, family, {(0, "out"): [0, 1]},
                          act_targets={(0, "out"): [0]}, twin_targets={(0, "out"): [1]})
        block(x)
    torch.testing.assert_close(acts[1].buf, stream)
    torch.testing.assert_close(acts[0].buf, stream + 3.0)


def test_z_twin_reads_the_projection_input_before_its_hook(worker, monkeypatch):
    from sae_runtime.vllm.families import FAMILIES

    family = FAMILIES["LlamaForCausalLM"]
    acts = _sites(2)  # 0: blocks.0.attn.hook_z, 1: its twin
    monkeypatch.setattr(worker, "_STATE", types.SimpleNamespace(hooks=[AddHook(1.0)], acts=acts))
    block = torch.nn.Module()
    block.self_attn = torch.nn.Module()
    block.self_attn.o_proj = torch.nn.Linear(D, D)
    z = torch.randn(T, D, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = block.self_attn.o_proj(z + 1.0)
        worker.wrap_sites({0: block}, family, {(0, "z"): [0]}, act_targets={(0, "z"): [0]},
                          twin_targets={(0, "z"): [1]})
        got = block.self_attn.o_proj(z)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(acts[1].buf, z)
    torch.testing.assert_close(acts[0].buf, z + 1.0)
