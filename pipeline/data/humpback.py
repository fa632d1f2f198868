"""Humpback: (instruction, output) pairs, from a Hub dataset repo or the Humpback stage's local folder.

Files: `data/{split}-*.parquet` with columns `instruction` and `output` (the
layout the Humpback stage writes and publishes). Declared and empty is an
error, never a skip (the reference declared its Humpback data and never loaded it).
"""

from __future__ import annotations

from pathlib import Path

from .source import Loaded, read_rows


def pattern(split: str) -> str:
    return f"data/{split}-*.parquet"


def load(cfg, files: list[Path]) -> Loaded:
    rows = read_rows(files)
    loaded = Loaded("humpback", files, rows_read=len(rows))
    missing = {"instruction", "output"} - set(rows.column_names)
    if len(rows) and missing:
        raise ValueError(f"humpback: {files[0]} lacks the columns {sorted(missing)} (has {rows.column_names})")
    for i, row in enumerate(rows):
        if cfg.limit is not None and i >= cfg.limit:
            loaded.drop(f"past limit {cfg.limit}")
        elif not row["instruction"].strip() or not row["output"].strip():
            loaded.drop("empty instruction or output")
        else:
            loaded.conversations.append([{"prompt": row["instruction"], "answer": row["output"]}])
            loaded.rows_used += 1
    return loaded
