"""The documentation is kept true: README and docs/ against the Makefile, the code and the commands themselves.

- `mkdocs build --strict` passes (broken links or anchors, missing pages and pages outside the nav fail);
- every `make` target named in README or docs/ is in `make help`, and every target in `make help` is on
  docs/make.md; every `make` command shown passes `make -n` (an unknown target or a refused switch fails);
- the `python -m` modules and scripts the pages name exist; README is short and links every page; the spec
  page names every field of the spec model;
- the command blocks titled "checked offline by tests/test_docs.py" run word for word, in page order, in a
  copy of the working tree (so the suite leaves this one untouched), and an output block titled
  "what ... prints (checked)" after one must match what it printed (`...` stands for anything).
"""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import REPO

DOCS = REPO / "docs"
README = REPO / "README.md"
CHECKED = 'title="checked offline by tests/test_docs.py"'
PRINTS = re.compile(r'title="what .* prints \(checked\)"')
FENCE = re.compile(r"^```([^\n]*)\n(.*?)^```\s*$", re.M | re.S)
README_MAX_LINES = 250
SHELL = {"bash", "sh", "shell", "console"}
# Variables a parent make or the user's shell could pass to the blocks' own make runs.
MAKE_ENV = ("MAKEFLAGS", "MFLAGS", "MAKELEVEL", "MAKEOVERRIDES", "SUBMISSIONS", "DIST", "OUT", "MODEL", "ADAPTER",
            "DATA_DIR", "STRICT", "OFFLINE", "STEPS", "DEADLINE", "BUDGET", "DRY_RUN", "PASSAGES", "HUMPBACK", "SRC",
            "PORT", "CONF", "SUITE", "URL", "MAX_EVAL_INSTANCES", "BASE", "EVAL", "VALIDATE", "JSON", "HF_TOKEN")


def nav_pages() -> list[Path]:
    """The pages in mkdocs.yml's navigation, in its order."""
    config = yaml.safe_load((REPO / "mkdocs.yml").read_text())

    def walk(node) -> list[str]:
        if isinstance(node, str):
            return [node]
        if isinstance(node, list):
            return [p for item in node for p in walk(item)]
        return [p for value in node.values() for p in walk(value)]

    return [DOCS / p for p in walk(config["nav"])]


def pages() -> list[Path]:
    """README, then every page of the site in navigation order."""
    return [README, *nav_pages()]


def fences(path: Path) -> list[tuple[str, str]]:
    """(info string, body) of each fenced block of a page."""
    return [(m.group(1), m.group(2)) for m in FENCE.finditer(path.read_text())]


def code_text(path: Path) -> list[str]:
    """The page's commands: each line of its shell blocks and each inline code span (not diagrams or output)."""
    text = path.read_text()
    lines = [line for info, body in fences(path) if info.split(" ")[0] in SHELL for line in body.splitlines()]
    prose = FENCE.sub("", text)
    indented = re.findall(r"^    ((?:make|\.venv/bin/python|python) .*)$", prose, re.M)  # indented code blocks
    return lines + indented + re.findall(r"`([^`\n]+)`", prose)


def make_commands(path: Path) -> list[list[str]]:
    """Each `make ...` command shown on a page, as argv after `make` (comments and `&&` chains split)."""
    found = []
    for code in code_text(path):
        code = re.sub(r"<[^>]*>", "x", code)  # placeholders such as <the GPTQ artifact>
        for part in re.split(r"&&|;|\|\|", code):
            part = part.split(" #")[0].strip()
            if not part.startswith("make ") and part != "make":
                continue
            try:
                words = shlex.split(part)[1:]
            except ValueError:
                words = part.split()[1:]
            found.append(words)
    return found


def help_targets() -> list[str]:
    env = {k: v for k, v in os.environ.items() if k not in MAKE_ENV}
    done = subprocess.run(["make", "--no-print-directory", "help"], cwd=REPO, capture_output=True, text=True, check=True,
                          env=env)
    return [line.split()[0] for line in done.stdout.splitlines()[1:] if line.startswith("  ")]


def known(target: str, targets: list[str]) -> bool:
    """A named target is in `make help`: exactly, or as PREFIX-N with any spec name (the longest prefix)."""
    if target in targets:
        return True
    prefixes = sorted((t[:-2] for t in targets if t.endswith("-N")), key=len, reverse=True)
    return any(target.startswith(p + "-") and len(target) > len(p) + 1 for p in prefixes)


# --- the site builds, strictly --------------------------------------------------------------------


def mkdocs_build(config: Path, site: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    return subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(config), "-d", str(site)],
                          cwd=config.parent, capture_output=True, text=True, env=env)


def test_the_site_builds_with_strict(tmp_path):
    done = mkdocs_build(REPO / "mkdocs.yml", tmp_path / "site")
    assert done.returncode == 0, done.stdout + done.stderr
    assert (tmp_path / "site" / "index.html").is_file()
    assert (tmp_path / "site" / "benchmarks" / "helm_mix.py").is_file()  # the measurements page links the scripts
    for page in (tmp_path / "site").rglob("*.html"):
        assert "fonts.googleapis" not in page.read_text(), f"{page.name} fetches fonts: the site must render offline"


def test_strict_fails_on_a_broken_link_or_anchor(tmp_path):
    """The guard itself: a copy of the site with one broken link, then one broken anchor, does not build."""
    for broken in ("[x](no-such-page.md)", "[x](spec.md#no-such-section)"):
        root = tmp_path / str(len(broken))
        shutil.copytree(DOCS, root / "docs")
        shutil.copytree(REPO / "benchmarks", root / "benchmarks")
        shutil.copy(REPO / "mkdocs.yml", root / "mkdocs.yml")
        page = root / "docs" / "known-gaps.md"
        page.write_text(page.read_text() + f"\n{broken}\n")
        done = mkdocs_build(root / "mkdocs.yml", root / "site")
        assert done.returncode != 0 and "no-such" in done.stdout + done.stderr, broken


def test_every_page_is_in_the_nav_and_linked_from_readme():
    nav = set(nav_pages())
    on_disk = set(DOCS.rglob("*.md"))
    assert on_disk == nav, f"pages outside the nav: {sorted(map(str, on_disk - nav))}; missing: {sorted(map(str, nav - on_disk))}"
    readme = README.read_text()
    unlinked = [p.relative_to(REPO).as_posix() for p in sorted(nav) if f"]({p.relative_to(REPO).as_posix()})" not in readme]
    assert not unlinked, f"README does not link {unlinked}"


def test_readme_is_short():
    lines = README.read_text().count("\n")
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines; move detail into docs/ (at most {README_MAX_LINES})"


# --- the pages against the Makefile and the code ----------------------------------------------------


def test_every_make_target_named_exists_and_every_target_is_documented():
    targets = help_targets()
    unknown = sorted({f"{p.relative_to(REPO)}: make {w}" for p in pages() for argv in make_commands(p)
                      for w in argv if "=" not in w and not w.startswith("-") and not known(w, targets)})
    assert not unknown, "targets that `make help` does not list:\n" + "\n".join(unknown)
    reference = (DOCS / "make.md").read_text()
    missing = [t for t in targets if not re.search(
        rf"make {re.escape(t[:-2])}-(\d+|N|mine)\b" if t.endswith("-N") else rf"make {re.escape(t)}(?![\w-])", reference)]
    assert not missing, f"targets in `make help` that docs/make.md does not document: {missing}"


def test_every_make_command_shown_passes_a_dry_run():
    failed = []
    seen = set()
    env = {k: v for k, v in os.environ.items() if k not in MAKE_ENV}
    for page in pages():
        for argv in make_commands(page):
            if not argv or tuple(argv) in seen:
                continue
            seen.add(tuple(argv))
            done = subprocess.run(["make", "-n", "--no-print-directory", *argv], cwd=REPO, capture_output=True,
                                  text=True, env=env)
            if done.returncode != 0:
                failed.append(f"{page.relative_to(REPO)}: make {' '.join(argv)}: {done.stderr.strip()[-300:]}")
    assert not failed, "\n".join(failed)


def test_every_module_and_script_named_exists():
    missing = []
    for page in pages():
        for code in code_text(page):
            for module in (m.rstrip(".") for m in re.findall(r"python -m ([A-Za-z_][\w.]*)", code)):
                if module not in {"pytest", "mkdocs", "venv", "pip"} and importlib.util.find_spec(module) is None:
                    missing.append(f"{page.relative_to(REPO)}: python -m {module}")
            for script in re.findall(r"python (?!-)(\S+\.py)", code):
                if not (REPO / script).is_file():
                    missing.append(f"{page.relative_to(REPO)}: {script}")
    assert not missing, "\n".join(missing)


def spec_fields() -> set[str]:
    """Every field name of the spec model and the models it nests."""
    import typing

    from pydantic import BaseModel

    from packager.spec import Spec

    names: set[str] = set()
    todo, seen = [Spec], set()
    while todo:
        model = todo.pop()
        if model in seen:
            continue
        seen.add(model)
        for name, field in model.model_fields.items():
            names.add(field.alias or name)
            stack = [field.annotation]
            while stack:
                a = stack.pop()
                if isinstance(a, type) and issubclass(a, BaseModel):
                    todo.append(a)
                stack.extend(typing.get_args(a))
    return names


def test_the_spec_page_names_every_field():
    page = (DOCS / "spec.md").read_text()
    missing = sorted(f for f in spec_fields() if not re.search(rf"`{f}`|[\[.]{f}[\].]", page))
    assert not missing, f"docs/spec.md does not document {missing}"


def test_readme_quick_start_is_the_site_s():
    blocks = [body for info, body in fences(DOCS / "index.md") if CHECKED in info]
    for info, body in fences(README):
        if CHECKED in info:
            assert body in blocks, f"README's checked block is not on docs/index.md:\n{body}"


# --- the checked command blocks run, word for word ---------------------------------------------------


def checked_blocks() -> list[tuple[Path, str, str | None]]:
    """(page, block, the output block after it or None) for every checked block, in page order, once each."""
    found, seen = [], set()
    for page in pages():
        blocks = fences(page)
        for i, (info, body) in enumerate(blocks):
            if CHECKED not in info or body in seen:
                continue
            seen.add(body)
            after = blocks[i + 1] if i + 1 < len(blocks) and PRINTS.search(blocks[i + 1][0]) else None
            found.append((page, body, after[1] if after else None))
    return found


def working_tree_copy(root: Path) -> Path:
    """The files git tracks or would track, with their times (so `.venv/.installed` stays up to date), and .venv."""
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, capture_output=True,
                            check=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        source = REPO / name
        if source.is_file() and not source.is_symlink():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, root / name)
    (root / ".venv").symlink_to(REPO / ".venv")
    return root


def matches(expected: str, printed: str) -> list[str]:
    """The expected lines (`...` = anything; runs of spaces compare equal) that no printed line matches, in order."""
    squeeze = lambda line: " ".join(line.split())  # noqa: E731
    lines, at, unmatched = [squeeze(line) for line in printed.splitlines()], 0, []
    for want in filter(str.strip, expected.splitlines()):
        pattern = re.compile(".*".join(re.escape(p) for p in squeeze(want).split("...")))
        for j in range(at, len(lines)):
            if pattern.fullmatch(lines[j]):
                at = j + 1
                break
        else:
            unmatched.append(want)
    return unmatched


def test_the_checked_command_blocks_run_as_written(tmp_path):
    blocks = checked_blocks()
    assert len(blocks) >= 6, "the quick start and the stage pages lost their checked blocks"
    root = working_tree_copy(tmp_path / "tree")
    env = {k: v for k, v in os.environ.items() if k not in MAKE_ENV}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    stale = subprocess.run(["make", "-q", ".venv/.installed"], cwd=root, env=env)
    assert stale.returncode == 0, "the venv is older than its requirements: run `make venv` first (the test never installs)"
    timings = []
    for page, body, expected in blocks:
        started = time.monotonic()
        done = subprocess.run(["bash", "-euo", "pipefail", "-c", body], cwd=root, env=env, capture_output=True, text=True)
        timings.append(f"{time.monotonic() - started:6.1f} s  {page.relative_to(REPO)}: {body.splitlines()[0]}")
        said = done.stdout + done.stderr
        assert done.returncode == 0, f"{page.relative_to(REPO)}: this block failed:\n{body}\n--- output ---\n{said[-3000:]}"
        if expected is not None:
            unmatched = matches(expected, done.stdout + "\n" + done.stderr)
            assert not unmatched, f"{page.relative_to(REPO)}: the page shows output the command did not print: {unmatched}"
    print("\n".join(timings))
    # README's "where things are written", for what the blocks made
    for made in ("dist/submission-1.zip", "dist/submission-1/Dockerfile", "dist/submission-3-train.zip",
                 "build/tiny-gptq/config.json", "build/data/submission-2/train.parquet",
                 "build/data/submission-2/rendered.jsonl", "build/data/submission-2/manifest.json",
                 "build/train/submission-2/adapter", "build/train/submission-2/run.json",
                 "build/train/submission-2/log.jsonl", "build/train/submission-2/plan.json",
                 "build/train/submission-2/checkpoints", "build/docs/index.html", "build/docs/stages/train.html"):
        assert (root / made).exists(), f"README says the blocks write {made}; they did not"
    readme = README.read_text()
    for folder in ("dist/NAME.zip", "build/data/NAME/", "build/train/NAME/", "build/tiny-model/", "build/docs/"):
        assert folder in readme


def test_readme_says_which_torch_ran_where():
    """README's table against the base-image table and the pinned dev torch, so neither drifts from the other."""
    from packager.base_images import base_image

    text = README.read_text()
    cuda, cpu = base_image("cuda-4090"), base_image("local-cpu")
    dev = re.search(r"^torch==(\S+)$", (REPO / "requirements" / "dev.txt").read_text(), re.M).group(1)
    assert f"| the submission image (`cuda-4090` base) | {cuda.torch}, CUDA {cuda.cuda} (host driver >= {cuda.driver})" in text
    assert f"| the GPU machines (H100, H200) | {cuda.torch}+cu{cuda.cuda.replace('.', '')} |" in text
    assert f"(`local-cpu` base) | {cpu.torch}, CPU |" in text and cpu.torch == dev
