"""bench/check_shape.py on small trees made here: each rule it enforces is reported when broken,
and a tree that keeps them passes; then the project's own tree: shape, ruff and mypy clean."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from bench.check_shape import check

REPO = Path(__file__).resolve().parents[1]


def tree(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    for package in {Path(name).parts[0] for name in files}:
        (root / package / "__init__.py").touch()
    return root


def function(name: str, lines: int) -> str:
    return f"def {name}():\n" + "    x = 1\n" * (lines - 1)


def test_a_tree_that_keeps_the_rules_passes(tmp_path):
    root = tree(
        tmp_path,
        {
            "engines/model.py": "import math\n",
            "engines/engine.py": "from engines.model import math\nfrom . import model\n" + function("run", 80),
            "streaming/server.py": "from engines.engine import run\n",
            "bench/load.py": "from streaming import server\nfrom engines import engine\n",
        },
    )
    assert check(root) == []


def test_an_import_circle_is_reported_even_through_a_lazy_import(tmp_path):
    root = tree(
        tmp_path,
        {
            "engines/a.py": "from engines import b\n",
            "engines/b.py": "def f():\n    from engines.c import g\n",
            "engines/c.py": "from .a import x\n",
            "engines/d.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from engines import a\n",
        },
    )
    assert check(root) == ["import circle: engines.a <-> engines.b <-> engines.c"]  # d's arrow is for types only


def test_forbidden_arrows_are_reported(tmp_path):
    root = tree(
        tmp_path,
        {
            "engines/model.py": "import streaming.server\n",
            "streaming/server.py": "from bench.load import main\n",
            "bench/load.py": "def main():\n    pass\n",
            "web/app.py": "def serve():\n    import bench\n",
        },
    )
    assert check(root) == [
        "forbidden import: engines.model imports streaming.server (engines must not import streaming)",
        "forbidden import: streaming.server imports bench.load (streaming must not import bench)",
        "forbidden import: web.app imports bench (web must not import bench)",
    ]


def test_long_functions_and_modules_of_the_runtime_are_reported(tmp_path):
    root = tree(
        tmp_path,
        {
            "engines/engine.py": "class Engine:\n"
            + "\n".join("    " + line for line in function("step", 81).splitlines()),
            "streaming/server.py": "x = 1\n" * 501,
            "bench/load.py": function("main", 200) + "y = 1\n" * 400,  # tools are exempt
        },
    )
    assert check(root) == [
        "long function: engines/engine.py:2 step has 81 lines (at most 80)",
        "long module: streaming/server.py has 501 lines (at most 500)",
    ]


def test_the_command_lists_violations_and_fails(tmp_path):
    root = tree(tmp_path, {"engines/a.py": "import engines.b\n", "engines/b.py": "import engines.a\n"})
    result = subprocess.run(
        [sys.executable, "-m", "bench.check_shape", str(root)], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 1
    assert result.stdout == "import circle: engines.a <-> engines.b\n"
    assert "1 violation(s)" in result.stderr


def run(*command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *command], cwd=REPO, capture_output=True, text=True, timeout=600)


def test_the_tree_is_ruff_clean_and_formatted():
    lint = run("ruff", "check", ".")
    assert lint.returncode == 0, lint.stdout
    formatted = run("ruff", "format", "--check", ".")
    assert formatted.returncode == 0, formatted.stdout


def test_the_tree_keeps_the_shape():
    result = run("bench.check_shape")
    assert result.returncode == 0, result.stdout


def test_the_runtime_type_checks():
    """mypy as pyproject.toml sets it: streaming and engines, strict on streaming and engines.whisper."""
    result = run("mypy")
    assert result.returncode == 0, result.stdout
