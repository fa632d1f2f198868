"""mkdocs hook: the benchmark scripts become files of the site, so the measurements page links each one.

A hook, not a plugin: nothing is installed or fetched; `mkdocs build --strict` then checks those links too.
"""

from __future__ import annotations

from pathlib import Path

from mkdocs.config.defaults import MkDocsConfig
from mkdocs.structure.files import File, Files

REPO = Path(__file__).resolve().parent.parent


def on_files(files: Files, config: MkDocsConfig) -> Files:
    """Add benchmarks/*.py as static files at benchmarks/<name>.py in the site."""
    for script in sorted((REPO / "benchmarks").glob("*.py")):
        files.append(File.generated(config, f"benchmarks/{script.name}", abs_src_path=str(script)))
    return files
