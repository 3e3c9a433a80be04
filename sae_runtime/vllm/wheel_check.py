"""Check that every vLLM symbol the glue touches (``symbols.SYMBOLS``) exists in a vLLM
build's Python sources, without importing vLLM (``make check-cuda-wheel``).

The CUDA wheel cannot be installed next to the CPU build, and importing it needs a GPU
stack; its Python sources are plain text inside the ``.whl`` (a zip), so the check is
static (``ast``): a module is its file (``a/b.py`` or ``a/b/__init__.py``); a top-level name
is a ``def``, ``class``, assignment or import in that file (also under ``if
TYPE_CHECKING:``; imports are followed to the defining module); a class attribute is a
statement of the class body (method, property, field, enum member), an assignment to
``self.<name>`` in one of its methods, or one of its vLLM base classes'; a parameter is in
the function's signature. What this cannot see: a signature's positional order, a
return type, behaviour. Those are for the runtime checks (the startup hook check, and the
GPU runs ``docs/gpu.md`` lists).

Run: ``python -m sae_runtime.vllm.wheel_check path/to/vllm-0.32.0-...whl`` (or a directory
that holds a ``vllm/`` package); exit status 1 when a symbol is missing.
"""

from __future__ import annotations

import argparse
import ast
import functools
import re
import sys
import zipfile
from pathlib import Path

from sae_runtime.vllm.symbols import SYMBOLS, Sym


class Sources:
    """Python sources of a ``vllm`` package tree, by module name (parsed once each)."""

    def text(self, rel: str) -> str | None:
        raise NotImplementedError

    @functools.cache  # noqa: B019 - one instance per run
    def module(self, name: str) -> tuple[str, ast.Module] | None:
        """``(module name, AST)`` of module ``name`` (a package: its ``__init__``), or None."""
        base = name.replace(".", "/")
        for rel, is_pkg in ((f"{base}.py", False), (f"{base}/__init__.py", True)):
            src = self.text(rel)
            if src is not None:
                tree = ast.parse(src, rel)
                tree.is_package = is_pkg  # type: ignore[attr-defined]
                return name, tree
        return None


class WheelSources(Sources):
    def __init__(self, path: Path) -> None:
        self.zip = zipfile.ZipFile(path)
        self.names = set(self.zip.namelist())

    def text(self, rel: str) -> str | None:
        return self.zip.read(rel).decode() if rel in self.names else None

    def version(self) -> str:
        src = self.text("vllm/_version.py") or ""
        m = re.search(r"^__version__\b.*=\s*['\"]([^'\"]+)['\"]", src, re.M)
        return m.group(1) if m else "?"


class DirSources(Sources):
    """A directory that contains the ``vllm`` package (e.g. site-packages)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def text(self, rel: str) -> str | None:
        p = self.root / rel
        return p.read_text() if p.is_file() else None


def _top_level(body: list[ast.stmt]):
    """Module statements, including those under ``if`` / ``try`` (TYPE_CHECKING, fallbacks)."""
    for st in body:
        yield st
        if isinstance(st, ast.If):
            yield from _top_level(st.body)
            yield from _top_level(st.orelse)
        elif isinstance(st, ast.Try):
            yield from _top_level(st.body)
            for h in st.handlers:
                yield from _top_level(h.body)
            yield from _top_level(st.orelse)


def _targets(st: ast.stmt) -> list[str]:
    if isinstance(st, ast.Assign):
        return [n.id for t in st.targets for n in ast.walk(t) if isinstance(n, ast.Name)]
    if isinstance(st, ast.AnnAssign) and isinstance(st.target, ast.Name):
        return [st.target.id]
    return []


def _absolute(module: str, is_pkg: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    parts = module.split(".")
    if not is_pkg:
        parts = parts[:-1]
    parts = parts[: len(parts) - (node.level - 1)]
    return ".".join(parts + ([node.module] if node.module else []))


Found = tuple[str, str, ast.AST | None]  # (kind, module, node): module|class|function|attr


def resolve(src: Sources, module: str, name: str, depth: int = 0) -> Found | None:
    """Where top-level ``name`` of ``module`` is defined (imports followed)."""
    got = src.module(module)
    if got is None or depth > 8:
        return None
    mod, tree = got
    for st in _top_level(tree.body):
        if isinstance(st, ast.ClassDef) and st.name == name:
            return "class", mod, st
        if isinstance(st, ast.FunctionDef | ast.AsyncFunctionDef) and st.name == name:
            return "function", mod, st
        if name in _targets(st):
            return "attr", mod, st
        if isinstance(st, ast.ImportFrom):
            for a in st.names:
                if (a.asname or a.name) == name:
                    target = _absolute(mod, tree.is_package, st)
                    if src.module(f"{target}.{a.name}") is not None:
                        return "module", f"{target}.{a.name}", None
                    return resolve(src, target, a.name, depth + 1)
        if isinstance(st, ast.Import):
            for a in st.names:
                if a.asname == name:
                    return "module", a.name, None
    if src.module(f"{module}.{name}") is not None:
        return "module", f"{module}.{name}", None
    return None


def _class_attr(src: Sources, module: str, cls: ast.ClassDef, name: str,
                depth: int = 0) -> Found | None:
    """``name`` on class ``cls`` of ``module``: its body, ``self.name = ...``, its bases."""
    for st in cls.body:
        if isinstance(st, ast.FunctionDef | ast.AsyncFunctionDef) and st.name == name:
            return "function", module, st
        if isinstance(st, ast.ClassDef) and st.name == name:
            return "class", module, st
        if name in _targets(st):
            return "attr", module, st
    for st in cls.body:
        if isinstance(st, ast.FunctionDef | ast.AsyncFunctionDef):
            for n in ast.walk(st):
                if isinstance(n, ast.Attribute) and n.attr == name and \
                        isinstance(n.ctx, ast.Store) and isinstance(n.value, ast.Name) and \
                        n.value.id == "self":
                    return "attr", module, n
    if depth > 8:
        return None
    for base in cls.bases:
        found = None
        if isinstance(base, ast.Name):
            found = resolve(src, module, base.id)
        elif isinstance(base, ast.Attribute) and isinstance(base.value, ast.Name):
            owner = resolve(src, module, base.value.id)
            if owner is not None and owner[0] == "module":
                found = resolve(src, owner[1], base.attr)
        if found is not None and found[0] == "class":
            hit = _class_attr(src, found[1], found[2], name, depth + 1)  # type: ignore[arg-type]
            if hit is not None:
                return hit
    return None


def _params(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> set[str]:
    a = fn.args
    return {x.arg for x in [*a.posonlyargs, *a.args, *a.kwonlyargs]}


def find(src: Sources, sym: Sym) -> str | None:
    """None when ``sym`` is in the tree, else why not."""
    if src.module(sym.module) is None:
        return f"no module {sym.module}"
    if not sym.path:
        return None if sym.kind == "module" else f"{sym.module} is a module, not a {sym.kind}"
    parts = sym.path.split(".")
    param = parts.pop() if sym.kind == "param" else None
    found = resolve(src, sym.module, parts[0])
    if found is None:
        return f"{sym.module} has no {parts[0]}"
    for i, part in enumerate(parts[1:], 1):
        kind, mod, node = found
        if kind == "module":
            found = resolve(src, mod, part)
        elif kind == "class":
            found = _class_attr(src, mod, node, part)  # type: ignore[arg-type]
        else:
            return f"{'.'.join(parts[:i])} is a {kind}, it has no attribute {part}"
        if found is None:
            return f"{sym.module}:{'.'.join(parts[:i])} has no {part}"
    kind, mod, node = found
    if param is not None and kind == "class":  # a keyword of the class's constructor
        init = _class_attr(src, mod, node, "__init__")  # type: ignore[arg-type]
        if init is None:
            return f"{sym.module}:{'.'.join(parts)} has no __init__"
        kind, _, node = init
    if param is not None:
        if kind != "function":
            return f"{sym.module}:{'.'.join(parts)} is a {kind}, not a function"
        if param not in _params(node):  # type: ignore[arg-type]
            return f"{sym.module}:{'.'.join(parts)} has no parameter {param}"
        return None
    if sym.kind in ("class", "function", "module") and kind != sym.kind:
        return f"{sym} is a {kind}, not a {sym.kind}"
    return None


def check(syms, src: Sources) -> list[tuple[Sym, str]]:
    """``(symbol, why)`` of every symbol not in the tree."""
    out = []
    for sym in syms:
        why = find(src, sym)
        if why is not None:
            out.append((sym, why))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("tree", type=Path, help="a vLLM wheel (.whl) or a directory holding vllm/")
    args = ap.parse_args(argv)
    if args.tree.is_dir():
        src: Sources = DirSources(args.tree)
        what = str(args.tree)
    else:
        src = WheelSources(args.tree)
        what = f"{args.tree.name} (version {src.version()})"
    missing = check(SYMBOLS, src)
    counts = {k: sum(s.runner == k for s in SYMBOLS) for k in ("v1", "v2", "")}
    print(f"check-cuda-wheel: {len(SYMBOLS)} vLLM symbols the glue touches (V1 runner "
          f"{counts['v1']}, Model Runner V2 {counts['v2']}, shared/engine side {counts['']}), "
          f"checked in {what}")
    for sym, why in missing:
        print(f"  MISSING {sym} [{sym.runner or 'shared'}]: {why}")
    if missing:
        print(f"check-cuda-wheel: {len(missing)} missing", file=sys.stderr)
        return 1
    print("check-cuda-wheel: all present")
    return 0


if __name__ == "__main__":
    sys.exit(main())
