"""Imports run one way: the server package at the bottom, the packager on it, the pipeline and evaluation on top.

The zip and its image carry `helm_server` alone; `make specs`, `make zip-N` and
offline validation need the packager and the server's settings, never a model
stage. So each top-level package may import only the packages below it.
"""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import REPO

# package -> the first-party packages it may import (besides itself)
ALLOWED = {
    "helm_server": set(),
    "packager": {"helm_server"},
    "pipeline": {"helm_server", "packager"},
    "evaluation": {"helm_server", "packager"},
}
FOLDERS = {"helm_server": REPO / "docker" / "inference" / "helm_server", "packager": REPO / "packager",
           "pipeline": REPO / "pipeline", "evaluation": REPO / "evaluation"}
FIRST_PARTY = set(ALLOWED) | {"benchmarks", "tests"}


def imported(path: Path) -> set[str]:
    """Top-level first-party packages a module imports, at module level or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found & FIRST_PARTY


def test_each_package_imports_only_the_packages_below_it():
    wrong = []
    for package, folder in FOLDERS.items():
        for path in sorted(folder.rglob("*.py")):
            for other in imported(path) - ALLOWED[package] - {package}:
                wrong.append(f"{path.relative_to(REPO)} imports {other}")
    assert not wrong, "imports against the layout:\n" + "\n".join(wrong)


def test_the_check_sees_an_upward_import(tmp_path):
    bad = tmp_path / "m.py"
    bad.write_text("def f():\n    from pipeline.train import plan\n")
    assert imported(bad) == {"pipeline"}
