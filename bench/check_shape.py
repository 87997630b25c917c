"""The code's shape, checked: `python -m bench.check_shape [ROOT]` lists every violation and exits 1.

Rules (docs/architecture.md, "Shape"):

- no import circles among the project's modules: every import counts, at module level or inside a
  function (a lazy import is still an arrow), except those under `if TYPE_CHECKING:`;
- arrows run one way: `engines` never imports `streaming`, and no runtime package (`streaming`,
  `engines`, `web`) imports the tools (`bench`);
- runtime modules stay under 500 lines, and their functions under 80.

Reads the source with `ast`; imports nothing it checks.
"""

from __future__ import annotations

import argparse
import ast
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

PACKAGES = ("bench", "engines", "streaming", "web")
RUNTIME = ("engines", "streaming", "web")
FORBIDDEN = (("engines", "streaming"), ("engines", "bench"), ("streaming", "bench"), ("web", "bench"))
MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 80


@dataclass(frozen=True)
class Module:
    name: str  # dotted: engines.whisper.model; a package is its __init__: engines.whisper
    path: Path
    tree: ast.Module


def modules(root: Path, packages: tuple[str, ...] = PACKAGES) -> dict[str, Module]:
    """Every module of `packages` under `root`, by dotted name."""
    found = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            found[name] = Module(name, path, ast.parse(path.read_text(encoding="utf-8"), str(path)))
    return found


def _type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _import_nodes(node: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
    """The imports under `node`, skipping the bodies of `if TYPE_CHECKING:`."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.Import | ast.ImportFrom):
            yield child
        elif isinstance(child, ast.If) and _type_checking(child):
            yield from _import_nodes(ast.Module(body=child.orelse, type_ignores=[]))
        else:
            yield from _import_nodes(child)


def imports(module: Module, known: dict[str, Module]) -> set[str]:
    """The project's modules that `module` imports (`from pkg import name` names pkg.name where
    that is a module, else pkg)."""
    package = module.name if module.path.name == "__init__.py" else module.name.rpartition(".")[0]
    targets = set()
    for node in _import_nodes(module.tree):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
            continue
        base = node.module or ""
        if node.level:
            anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
            base = ".".join(anchor + ([base] if base else []))
        for alias in node.names:
            full = f"{base}.{alias.name}"
            targets.add(full if full in known else base)
    return {t for t in targets if t in known and t != module.name}


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import circles: each strongly connected group of two or more modules (Tarjan), sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(groups)


def _top(name: str) -> str:
    return name.partition(".")[0]


def check(
    root: Path,
    packages: tuple[str, ...] = PACKAGES,
    runtime: tuple[str, ...] = RUNTIME,
    forbidden: tuple[tuple[str, str], ...] = FORBIDDEN,
) -> list[str]:
    """Every violation of the rules in the tree at `root`, one line each."""
    found = modules(root, packages)
    graph = {name: imports(module, found) for name, module in found.items()}
    problems = [f"import circle: {' <-> '.join(group)}" for group in circles(graph)]
    for name in sorted(graph):
        for target in sorted(graph[name]):
            if (_top(name), _top(target)) in forbidden:
                problems.append(
                    f"forbidden import: {name} imports {target} ({_top(name)} must not import {_top(target)})"
                )
    for name, module in sorted(found.items()):
        if _top(name) not in runtime:
            continue
        where = module.path.relative_to(root)
        lines = len(module.path.read_text(encoding="utf-8").splitlines())
        if lines > MAX_MODULE_LINES:
            problems.append(f"long module: {where} has {lines} lines (at most {MAX_MODULE_LINES})")
        for node in ast.walk(module.tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                length = (node.end_lineno or node.lineno) - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    problems.append(
                        f"long function: {where}:{node.lineno} {node.name} has {length} lines (at most {MAX_FUNCTION_LINES})"
                    )
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.check_shape", description=__doc__.split("\n\n")[0])
    parser.add_argument("root", nargs="?", type=Path, default=Path(__file__).resolve().parents[1])
    args = parser.parse_args(argv)
    problems = check(args.root)
    for problem in problems:
        print(problem)
    print(f"{len(problems)} violation(s)" if problems else "shape ok", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
