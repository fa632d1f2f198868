"""ARC: every question of the spec's splits (in order), `questions_per_example` to a conversation.

Files: `{subset}/{split}-*.parquet`, fields question, choices {text, label},
answerKey. The last conversation holds whatever is left: every question is
used, the last one included (the reference's grouping dropped it).
"""

from __future__ import annotations

from pathlib import Path

from .source import Loaded, read_rows


def pattern(subset: str, split: str) -> str:
    return f"{subset}/{split}-*.parquet"


def group(n_rows: int, size: int) -> list[range]:
    """Consecutive row ranges of `size`, the last one shorter if need be."""
    return [range(start, min(start + size, n_rows)) for start in range(0, n_rows, size)]


def load(cfg, files_by_split: dict[str, list[Path]]) -> Loaded:
    files = [f for split in cfg.splits for f in files_by_split[split]]
    rows = read_rows(files)
    loaded = Loaded("arc", files, rows_read=len(rows))
    for rows_of_example in group(len(rows), cfg.questions_per_example):
        conversation = []
        for i in rows_of_example:
            row = rows[i]
            choices = list(zip(row["choices"]["label"], row["choices"]["text"]))
            conversation.append({"question": row["question"], "choices": choices, "answerKey": row["answerKey"]})
        loaded.conversations.append(conversation)
        loaded.rows_used += len(conversation)
    return loaded
