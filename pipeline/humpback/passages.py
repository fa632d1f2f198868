"""Web passages from C4's JSON-lines shards: deduplicated, length-filtered, in file order.

C4 (`allenai/c4`, config `en`) ships `en/c4-train.NNNNN-of-01024.json.gz`, gzipped JSON lines
with `text`, `timestamp` and `url`. The shards are streamed through `datasets` and read only as
far as the spec's passage count needs. A document is one passage; one shorter than `min_chars` or
longer than `max_chars` (a truncated passage would be a truncated answer) is dropped, and so is
any document whose case- and whitespace-folded text was seen before.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from pathlib import Path

from ..hub import dataset_files


class PassageError(Exception):
    """Too few passages for the spec; the message says how many were found and what to change."""


def c4_files(cfg, data_dir: Path | None) -> list[Path]:
    """The spec's first `files` train shards, local (DATA_DIR/<repo_id>/en/...) or downloaded one by one."""
    return [f for i in range(cfg.files) for f in dataset_files(cfg.repo_id, cfg.revision, cfg.pattern(i), data_dir)]


def folded(text: str) -> str:
    return " ".join(text.lower().split())


def select(files: list[Path], count: int, min_chars: int, max_chars: int) -> tuple[list[dict], int, Counter]:
    """The first `count` passages that pass the filters: (passages, documents read, drops by reason)."""
    from datasets import load_dataset

    documents = load_dataset("json", data_files=[str(f) for f in files], split="train", streaming=True)
    seen: set[str] = set()
    kept: list[dict] = []
    dropped: Counter = Counter()
    read = 0
    for row in documents:
        read += 1
        text = (row.get("text") or "").strip()
        key = hashlib.sha1(folded(text).encode()).hexdigest()
        if len(text) < min_chars:
            dropped[f"shorter than {min_chars} characters"] += 1
        elif len(text) > max_chars:
            dropped[f"longer than {max_chars} characters"] += 1
        elif key in seen:
            dropped["duplicate"] += 1
        else:
            seen.add(key)
            kept.append({"id": f"p{len(kept):07d}", "url": row.get("url"), "text": text})
            if len(kept) == count:
                break
    if len(kept) < count:
        raise PassageError(f"{len(files)} C4 file(s) gave {len(kept)} passages of the {count} asked for "
                           f"({read} documents read, dropped: {dict(dropped)}); raise [training.humpback.unlabelled] "
                           "files, widen min_chars/max_chars, or lower passages")
    return kept, read, dropped
