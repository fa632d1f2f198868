"""Byte-reproducible zips and build-context folders, written atomically.

Same input, same bytes: entries sorted, timestamps fixed, permissions fixed.
Output appears under its final name only once complete, so a failed build
never leaves a partial zip or folder behind.
"""

from __future__ import annotations

import os
import tempfile
import zipfile
from pathlib import Path

from .staging import staged_folder

FIXED_TIME = (1980, 1, 1, 0, 0, 0)  # the earliest time a zip can record


def zip_bytes_to(path: Path, files: dict[str, bytes]) -> None:
    """Write `files` ({path in zip: bytes}) as a deterministic zip at `path`, atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as raw, zipfile.ZipFile(raw, "w") as zf:
            for name in sorted(files):
                info = zipfile.ZipInfo(name, date_time=FIXED_TIME)
                info.compress_type = zipfile.ZIP_DEFLATED
                info.create_system = 3  # unix, so the permission bits below are honoured
                info.external_attr = 0o644 << 16
                zf.writestr(info, files[name], compresslevel=9)
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide the zip from other users
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_tree(root: Path, files: dict[str, bytes]) -> None:
    """Write `files` under `root`, replacing any previous tree only once the new one is complete."""
    with staged_folder(root) as staging:
        for name, data in files.items():
            target = staging / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
