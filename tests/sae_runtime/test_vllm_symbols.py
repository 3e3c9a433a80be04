"""The list of vLLM symbols (``sae_runtime/vllm/symbols.py``) is complete and resolves.

``make check-cuda-wheel`` checks the list against the CUDA wheel; it proves nothing about a
symbol the list forgot. So the walk here reads the glue's sources (AST, no import) and
collects every vLLM symbol they touch, following types as ``symbols`` describes (imports,
``ROOTS`` names, listed attribute types, assignments, calls); any symbol missing from the
list fails the test, naming the file and line. The same checker ``make check-cuda-wheel``
runs then resolves the whole list in the installed vLLM tree (the CPU build: its
``vllm/v1/worker/gpu/`` is the CUDA wheel's, byte for byte).
"""

from __future__ import annotations

import ast
import importlib.util
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from sae_runtime.vllm import symbols, wheel_check
from sae_runtime.vllm.symbols import CLASS_ROOTS, ROOTS, SELF_ROOTS, SYMBOLS, Sym

REPO = Path(__file__).resolve().parents[2]
# the glue: everything in sae_runtime/vllm but the list and its checker (they read vLLM's
# sources, they do not run against vLLM)
GLUE = sorted(p for p in (REPO / "sae_runtime" / "vllm").glob("*.py")
              if p.name not in ("symbols.py", "wheel_check.py"))
ENGINE_USERS = sorted([*(REPO / "server").rglob("*.py"), *(REPO / "sae_runtime" / "labels").rglob("*.py")])

CLASS, FUNC, MODULE, INSTANCE = "class", "function", "module", "instance"


@dataclass(frozen=True)
class T:
    """A value's type in the walk: a vLLM module, class (the class object), function, or
    instance of one of ``keys`` ("module:Class")."""

    what: str
    keys: tuple[str, ...]


@dataclass
class Walk:
    """Uses found (``"module:path"`` -> first place) and unknown ones (place, symbol)."""

    engine_only: bool = False  # outside sae_runtime/vllm: follow the engine object only
    used: dict[str, str] = field(default_factory=dict)
    missing: list[tuple[str, str]] = field(default_factory=list)


LISTED = symbols.by_key()
REEXPORTS: dict[str, T] = {}  # compat.X -> what compat imported from vLLM as X


def _sym_type(sym: Sym) -> T | None:
    if sym.kind == "module":
        return T(MODULE, (sym.module,))
    if sym.kind == "class":
        return T(CLASS, sym.type or (f"{sym.module}:{sym.path}",))
    if sym.kind == "function":
        return T(FUNC, (f"{sym.module}:{sym.path}",))
    return T(INSTANCE, sym.type) if sym.type else None


def _use(walk: Walk, where: str, key: str) -> Sym | None:
    walk.used.setdefault(key, where)
    found = LISTED.get(key)
    if not found:
        walk.missing.append((where, key))
        return None
    return found[0]


def _import(walk: Walk, where: str, module: str, name: str) -> T | None:
    """``from module import name``: a submodule if the list says so, else a name."""
    if f"{module}.{name}" in LISTED and LISTED[f"{module}.{name}"][0].kind == "module":
        _use(walk, where, f"{module}:{name}")
        return T(MODULE, (f"{module}.{name}",))
    sym = _use(walk, where, f"{module}:{name}")
    return _sym_type(sym) if sym else None


class Visitor(ast.NodeVisitor):
    def __init__(self, walk: Walk, path: Path) -> None:
        self.walk, self.path = walk, path
        # outside sae_runtime/vllm only the engine object is followed (``req`` there is a
        # protobuf request, not vLLM's)
        self.roots = {"engine": ROOTS["engine"]} if walk.engine_only else ROOTS
        self.scopes: list[dict[str, T]] = [{}]
        self.self_type: list[T | None] = [None]

    def where(self, node: ast.AST) -> str:
        return f"{self.path.relative_to(REPO)}:{node.lineno}"

    # ------------------------------------------------------------------ bindings

    def visit_Import(self, node: ast.Import) -> None:
        for a in node.names:
            if a.name == "vllm" or a.name.startswith("vllm."):
                _use(self.walk, self.where(node), a.name)
                self.scopes[-1][a.asname or a.name.split(".")[0]] = T(MODULE, (a.name,))

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        mod = node.module or ""
        if mod == "vllm" or mod.startswith("vllm."):
            for a in node.names:
                t = _import(self.walk, self.where(node), mod, a.name)
                if t is not None:
                    self.scopes[-1][a.asname or a.name] = t
                    if self.path.name == "compat.py" and len(self.scopes) == 1:
                        REEXPORTS[a.asname or a.name] = t
        elif mod == "sae_runtime.vllm":
            for a in node.names:
                if a.name == "compat":
                    self.scopes[-1][a.asname or a.name] = T("compat", ())

    def _function(self, node) -> None:
        scope: dict[str, T] = {}
        args = node.args
        for a in [*args.posonlyargs, *args.args, *args.kwonlyargs]:
            if a.arg in self.roots:
                scope[a.arg] = T(INSTANCE, self.roots[a.arg])
            elif a.arg in CLASS_ROOTS and not self.walk.engine_only:
                scope[a.arg] = T(CLASS, CLASS_ROOTS[a.arg])
            elif a.arg == "self" and self.self_type[-1] is not None:
                scope["self"] = self.self_type[-1]
        self.scopes.append(scope)
        self.generic_visit(node)
        self.scopes.pop()

    visit_FunctionDef = visit_AsyncFunctionDef = _function

    def visit_Lambda(self, node: ast.Lambda) -> None:
        self._function(node)

    def visit_ClassDef(self, node: ast.ClassDef) -> None:
        keys = SELF_ROOTS.get(node.name)
        self.self_type.append(T(INSTANCE, keys) if keys else None)
        self.generic_visit(node)
        self.self_type.pop()

    def visit_Assign(self, node: ast.Assign) -> None:
        t = self.type_of(node.value)
        for target in node.targets:
            if isinstance(target, ast.Name) and t is not None and target.id not in self.roots:
                self.scopes[-1][target.id] = t
            self.visit(target)

    def visit_NamedExpr(self, node: ast.NamedExpr) -> None:
        t = self.type_of(node.value)
        if t is not None:
            self.scopes[-1][node.target.id] = t

    def visit_Expr(self, node: ast.Expr) -> None:
        self.type_of(node.value)

    def generic_visit(self, node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.expr):
                self.type_of(child)
            else:
                self.visit(child)

    # ------------------------------------------------------------------ expressions

    def lookup(self, name: str) -> T | None:
        for scope in reversed(self.scopes):
            if name in scope:
                return scope[name]
        if name in self.roots:
            return T(INSTANCE, self.roots[name])
        if name in CLASS_ROOTS and not self.walk.engine_only:
            return T(CLASS, CLASS_ROOTS[name])
        return None

    def attr(self, base: T, name: str, node: ast.AST) -> T | None:
        """``base.name``: a use; the attribute's type where the list gives one."""
        where = self.where(node)
        if base.what == "compat":
            return REEXPORTS.get(name)
        if base.what == MODULE:
            (mod,) = base.keys
            return _import(self.walk, where, mod, name)
        if name.startswith(("_sae_", "__")):  # the glue's own marks; Python's dunders
            return None
        hits = [s for k in base.keys for s in LISTED.get(f"{k}.{name}", ())]
        for s in hits or [None]:
            self.walk.used.setdefault(str(s) if s else f"{base.keys[0]}.{name}", where)
        if not hits:
            self.walk.missing.append((where, f"{'|'.join(base.keys)} .{name}"))
            return None
        if base.what == CLASS and hits[0].kind == "attr" and not hits[0].type:
            return T(INSTANCE, base.keys)  # an enum member, or a classmethod's result
        types = tuple(t for s in hits for t in s.type)
        return T(INSTANCE, types) if types else None

    def keywords(self, t: T, call: ast.Call) -> None:
        """Keywords passed to a vLLM class (its fields) or function (its parameters)."""
        for kw in call.keywords:
            if kw.arg is None:
                continue
            (key,) = t.keys[:1]
            mod, name = key.split(":")
            full = f"{mod}:{name}.{kw.arg}"
            self.walk.used.setdefault(full, self.where(call))
            if full not in LISTED:
                self.walk.missing.append((self.where(call), full))

    def type_of(self, node: ast.expr) -> T | None:
        if isinstance(node, ast.Name):
            return self.lookup(node.id)
        if isinstance(node, ast.Attribute):
            if node.attr == "engine" and isinstance(node.value, ast.Name) and \
                    node.value.id == "self":
                return T(INSTANCE, ROOTS["engine"])
            base = self.type_of(node.value)
            return self.attr(base, node.attr, node) if base is not None else None
        if isinstance(node, ast.Call):
            for a in node.args:
                self.type_of(a)
            for kw in node.keywords:
                self.type_of(kw.value)
            f = node.func
            if isinstance(f, ast.Name) and f.id == "getattr" and len(node.args) >= 2 and \
                    isinstance(node.args[1], ast.Constant) and isinstance(node.args[1].value, str):
                base = self.type_of(node.args[0])
                return self.attr(base, node.args[1].value, node) if base is not None else None
            ft = self.type_of(f)
            if ft is None:
                return None
            if ft.what == CLASS:
                self.keywords(ft, node)
                return T(INSTANCE, ft.keys)
            if ft.what == FUNC:
                self.keywords(ft, node)
                sym = LISTED.get(ft.keys[0])
                return T(INSTANCE, sym[0].type) if sym and sym[0].type else None
            return ft if ft.what == INSTANCE and ft.keys else None  # a method's result
        if isinstance(node, ast.Subscript):
            base = self.type_of(node.value)
            self.type_of(node.slice)
            return T(INSTANCE, base.keys) if base is not None and base.what == CLASS else None
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.expr):
                self.type_of(child)
            elif isinstance(child, ast.comprehension):
                self.type_of(child.iter)
                for cond in child.ifs:
                    self.type_of(cond)
        return None



def walk_sources() -> Walk:
    REEXPORTS.clear()
    walk = Walk()
    for path in sorted(GLUE, key=lambda p: p.name != "compat.py"):  # compat's re-exports first
        Visitor(walk, path).visit(ast.parse(path.read_text(), str(path)))
    engine_walk = Walk(engine_only=True)
    for path in ENGINE_USERS:
        Visitor(engine_walk, path).visit(ast.parse(path.read_text(), str(path)))
    walk.used.update(engine_walk.used)
    walk.missing += engine_walk.missing
    return walk


def test_every_vllm_symbol_the_glue_touches_is_listed():
    walk = walk_sources()
    assert not walk.missing, "vLLM symbols used but not in sae_runtime/vllm/symbols.py:\n" + \
        "\n".join(f"  {where}: {key}" for where, key in walk.missing)
    # the walk sees both runners' step methods and V2's batch (not a vacuous pass)
    for key in ("vllm.v1.worker.gpu.input_batch:InputBatch.query_start_loc_np",
                "vllm.v1.worker.gpu_model_runner:GPUModelRunner.input_batch",
                "vllm.v1.engine.async_llm:AsyncLLM.collective_rpc",
                "vllm.engine.arg_utils:AsyncEngineArgs.worker_extension_cls"):
        assert key in walk.used, key


def test_every_listed_symbol_resolves_in_the_installed_vllm_tree():
    """The checker of ``make check-cuda-wheel``, on the installed vLLM's sources."""
    spec = importlib.util.find_spec("vllm")
    if spec is None or spec.origin is None:
        pytest.skip("vLLM is not installed")
    sources = wheel_check.DirSources(Path(spec.origin).parent.parent)
    missing = wheel_check.check(SYMBOLS, sources)
    assert missing == []


def test_the_checker_reports_what_a_tree_lacks(tmp_path):
    """A wheel whose runner lost a method, a module, a dataclass field: each is named."""
    whl = tmp_path / "vllm-0.0.0-py3-none-any.whl"
    with zipfile.ZipFile(whl, "w") as z:
        z.writestr("vllm/__init__.py", "from .a import A as B\n")
        z.writestr("vllm/a.py", "class Base:\n    def m(self):\n        self.x = 1\n"
                                "class A(Base):\n    y: int = 0\n    def f(self, p, q=1):\n"
                                "        pass\n    def __init__(self, k=0):\n        pass\n")
    syms = [Sym("vllm.a", "A.m"), Sym("vllm.a", "A.x"), Sym("vllm.a", "A.y"),
            Sym("vllm", "B.x"), Sym("vllm.a", "A.f.q", "param"), Sym("vllm.a", "A", "class"),
            Sym("vllm.a", "A.k", "param"),  # a keyword of A's constructor
            Sym("vllm.a", "A.z"), Sym("vllm.b", "", "module"), Sym("vllm.a", "A.f.r", "param"),
            Sym("vllm.a", "A.j", "param")]
    missing = wheel_check.check(syms, wheel_check.WheelSources(whl))
    assert [str(s) for s, _ in missing] == ["vllm.a:A.z", "vllm.b", "vllm.a:A.f.r", "vllm.a:A.j"]
