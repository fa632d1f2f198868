"""Shards and the manifest that vouches for them.

A shard is a JSON-lines file written whole (a temporary sibling renamed into place). The manifest
holds, per stage and shard, the hash of the shard's inputs, the file's sha256, its row count and
the seconds it took; it is rewritten (atomically) after every shard. A shard counts as done only
when its entry names the same inputs and the file on disk still has the recorded hash.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from packager.staging import StageRecord


def digest(*parts: object) -> str:
    """sha256 of JSON-serialised parts: the inputs of a shard or a stage."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def folder_sha256(folder: Path) -> str:
    """An adapter's identity: its files' names and hashes."""
    return digest(sorted((p.name, file_sha256(p)) for p in folder.iterdir() if p.is_file()))


def shard_path(folder: Path, index: int) -> Path:
    return folder / f"shard-{index:05d}.jsonl"


def write_rows(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial")
    with tmp.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def split(rows: list, size: int) -> list[list]:
    return [rows[i : i + size] for i in range(0, len(rows), size)]


class Manifest(StageRecord):
    """OUT/manifest.json: what each stage read and wrote."""

    fresh = {"shards": {}}

    def done(self, stage: str, index: int, inputs: str, path: Path) -> bool:
        entry = self.stage(stage)["shards"].get(str(index))
        return bool(entry and entry["inputs"] == inputs and path.is_file() and file_sha256(path) == entry["sha256"])

    def record(self, stage: str, index: int, inputs: str, path: Path, rows: int, seconds: float, **counts) -> None:
        self.stage(stage)["shards"][str(index)] = {"inputs": inputs, "sha256": file_sha256(path), "rows": rows,
                                                   "seconds": round(seconds, 2), **counts}
        self.save()

    def set(self, stage: str, **fields) -> None:
        self.stage(stage).update(fields)
        self.save()

    def forget_beyond(self, stage: str, folder: Path, count: int) -> None:
        """Shards past the current count (a run with more passages before): their files and entries go."""
        shards = self.stage(stage)["shards"]
        for key in [k for k in shards if int(k) >= count]:
            del shards[key]
        for path in folder.glob("shard-*.jsonl"):
            if int(path.stem.split("-")[1]) >= count:
                path.unlink()
        self.save()
