"""The import rules that keep the architecture what docs/architecture.md says it is.

Walks every project module's imports (module level and inside functions; not those under
``if TYPE_CHECKING:``, which never run) and checks:

- no import circles between modules;
- no private name or module imported across modules (``from m import _x`` from outside
  ``m``; ``pkg._mod`` from outside ``pkg``): tests use public names too;
- only ``sae_runtime/vllm/`` imports vLLM (plus the plain-vLLM baselines of the benchmarks
  and tests, which drive vLLM itself);
- ``sae_runtime`` imports neither the server, nor gRPC, nor the proto;
- ``sae_runtime/spec`` (what a request asks) never imports ``sae_runtime/step`` (what a
  worker step does);
- the doors (``server/grpc``, ``server/http``) never import each other, and the core never
  imports a door.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("sae_runtime", "server", "clients", "loadtests", "tests")
VLLM_IMPORTERS = ("sae_runtime.vllm", "loadtests.bench_e2e", "loadtests.bench_serve",
                  "tests.e2e.plain_vllm", "tests.sae_runtime.test_runner_v2")
"""Modules that may import vllm: the glue, the baselines that run plain vLLM, and the test
that drives the Model Runner V2 adapter through vLLM's own V2 classes."""
PRIVATE_OK = {
    # the GPU check is the test suite's step tests run without pytest on a bare GPU machine
    ("loadtests.gpu_check", "tests.sae_runtime._factories.random_sae"),
    ("loadtests.gpu_check", "tests.sae_runtime._steps.fill"),
    ("loadtests.gpu_check", "tests.sae_runtime._steps.make_requests"),
    ("loadtests.gpu_check", "tests.sae_runtime._steps.schedule"),
    ("loadtests.gpu_check", "tests.sae_runtime._steps.transcoder"),
    # kernels and their tests are being reworked on another branch (issue 25, part 1): their
    # helpers get public names there
    ("sae_runtime.kernels.triton_splice", "sae_runtime.kernels.triton_topk_read._act_rule"),
    ("tests.sae_runtime.test_kernels_triton", "tests.sae_runtime.test_kernels_fused._edits"),
    ("tests.sae_runtime.test_kernels_triton", "tests.sae_runtime.test_kernels_fused._untied_rows"),
    ("tests.sae_runtime.test_kernels_cuda", "tests.sae_runtime.test_kernels_fused._edits"),
    ("tests.sae_runtime.test_kernels_cuda", "tests.sae_runtime.test_kernels_fused._untied_rows"),
    ("tests.sae_runtime.test_selectors", "tests.sae_runtime.test_planner._dense_oracle"),
    ("tests.sae_runtime.test_tp_reads", "tests.sae_runtime.test_tables._fill"),
}


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            if "embedded" in path.parts or "__pycache__" in path.parts:
                continue
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            out[name] = path
    return out


MODULES = _modules()


def _type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or \
        (isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


def _imports(name: str, path: Path) -> list[tuple[str, str | None]]:
    """``(module, imported name or None)`` for every import that runs."""
    tree = ast.parse(path.read_text(), str(path))
    is_pkg = path.name == "__init__.py"
    out: list[tuple[str, str | None]] = []

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _type_checking(child):
                for sub in child.orelse:
                    visit(sub)
                continue
            if isinstance(child, ast.Import):
                out.extend((a.name, None) for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = name.split(".") if is_pkg else name.split(".")[:-1]
                    base = base[: len(base) - (child.level - 1)]
                    mod = ".".join(base + ([child.module] if child.module else []))
                else:
                    mod = child.module or ""
                out.extend((mod, a.name) for a in child.names)
            visit(child)

    visit(tree)
    return out


def _resolve(mod: str, name: str | None) -> str | None:
    """The project module an import loads (``from pkg import mod`` loads ``pkg.mod``)."""
    if name is not None and f"{mod}.{name}" in MODULES:
        return f"{mod}.{name}"
    return mod if mod in MODULES else None


GRAPH = {m: {r for mod, n in _imports(m, p) if (r := _resolve(mod, n)) and r != m}
         for m, p in MODULES.items()}


def _within(module: str, pkg: str) -> bool:
    return module == pkg or module.startswith(pkg + ".")


def test_no_import_circles():
    color: dict[str, int] = {}
    cycles: list[list[str]] = []

    def dfs(m: str, stack: list[str]) -> None:
        color[m] = 1
        stack.append(m)
        for n in sorted(GRAPH[m]):
            # a package imports its own submodules when they load it: not a circle
            if _within(n, m) or _within(m, n):
                continue
            if color.get(n) == 1:
                cycles.append(stack[stack.index(n):] + [n])
            elif n not in color:
                dfs(n, stack)
        stack.pop()
        color[m] = 2

    for m in sorted(GRAPH):
        if m not in color:
            dfs(m, [])
    assert not cycles, "import circles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def _private(part: str) -> bool:
    return part.startswith("_") and not part.startswith("__")


def test_no_private_imports_across_modules():
    bad = []
    for m, p in MODULES.items():
        pkg = m if p.name == "__init__.py" else m.rpartition(".")[0]
        for mod, name in _imports(m, p):
            if not any(_within(mod, top) for top in PACKAGES):
                continue
            full = f"{mod}.{name}" if name else mod
            parts = full.split(".")
            for i, part in enumerate(parts):
                if not _private(part):
                    continue
                owner = ".".join(parts[:i])  # what the private thing belongs to
                target = ".".join(parts[: i + 1])
                inside = m == owner or _within(m, target) or \
                    (target in MODULES and _within(pkg, owner))
                if not inside and (m, full) not in PRIVATE_OK:
                    bad.append(f"{m} imports {full}")
                break
    assert not bad, "private imports across modules:\n" + "\n".join(bad)


def _importers(pred) -> list[str]:
    return sorted(f"{m} imports {n}" for m, p in MODULES.items()
                  for mod, _ in _imports(m, p) if pred(m, mod) for n in [mod])


def test_only_sae_runtime_vllm_imports_vllm():
    bad = _importers(lambda m, mod: _within(mod, "vllm")
                     and not any(_within(m, ok) for ok in VLLM_IMPORTERS))
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("importer, banned", [
    ("sae_runtime", ("server", "clients", "grpc", "steering")),
    ("sae_runtime.spec", ("sae_runtime.step", "sae_runtime.vllm", "sae_runtime.kernels")),
    ("server.core", ("server.grpc", "server.http", "grpc", "starlette", "uvicorn", "steering")),
    ("server.grpc", ("server.http", "starlette", "uvicorn", "pydantic")),
    ("server.http", ("server.grpc", "grpc", "steering")),
    ("clients", ("server", "sae_runtime")),
])
def test_layer_boundaries(importer, banned):
    bad = _importers(lambda m, mod: _within(m, importer)
                     and any(_within(mod, b) for b in banned))
    assert not bad, f"{importer} must not import {banned}:\n" + "\n".join(bad)
