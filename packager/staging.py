"""Folders that appear under their final name only once complete.

Every stage writes its output through `staged_folder`: a temporary sibling is
filled, then renamed into place; on any failure (Ctrl-C included) it is removed
and a previous output is left as it was.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def readable(root: Path) -> Path:
    """Folders a+rx, files a+r: mkdtemp's 0700 and safetensors' 0600 would hide them from other users
    (docker builds, and the inference container's unprivileged server)."""
    for path in [root, *root.rglob("*")]:
        if path.is_dir():
            os.chmod(path, 0o755)
        elif path.is_file():
            os.chmod(path, path.stat().st_mode | 0o444)
    return root


@contextmanager
def staged_folder(dst: Path) -> Iterator[Path]:
    """Yield an empty temporary sibling of `dst`; on success it replaces `dst`.

    A previous `dst` is renamed aside before the new one moves in and removed only after, so an interrupt
    at any point leaves either the old folder or the new one under the name, never neither."""
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{dst.name}.partial-", dir=dst.parent))
    old = None
    try:
        yield staging
        readable(staging)
        if dst.exists():
            old = staging.with_name(staging.name.replace(".partial-", ".old-"))
            os.replace(dst, old)
        os.replace(staging, dst)
    except BaseException:
        if old is not None and old.exists() and not dst.exists():
            os.replace(old, dst)
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_json(path: Path, data: object) -> None:
    """Write JSON whole or not at all: a temporary sibling renamed over the target."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


class StageRecord:
    """A JSON file of one submission's stages, `{"submission": NAME, "stages": {stage: entry}}`, written whole
    after each change (a Humpback manifest, a day's state); a file of another submission is refused."""

    fresh: dict = {}  # a new stage's entry

    def __init__(self, path: Path, submission: str):
        self.path = path
        self.data = json.loads(path.read_text()) if path.is_file() else {}
        if self.data.get("submission") not in (None, submission):
            raise ValueError(f"{path} belongs to {self.data['submission']!r}, not {submission!r}: pick another OUT")
        self.data.setdefault("submission", submission)
        self.data.setdefault("stages", {})

    def stage(self, name: str) -> dict:
        return self.data["stages"].setdefault(name, json.loads(json.dumps(self.fresh)))

    def save(self) -> None:
        write_json(self.path, self.data)
