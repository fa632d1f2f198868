"""LIMA: the first `limit` rows of a split, every turn of multi-turn rows kept.

The Hub repo's loading script is refused by current `datasets`, so its JSON
lines (`{split}.jsonl`, field `conversations`: alternating prompt and answer)
are read directly. A trailing prompt with no answer is counted, not guessed.
"""

from __future__ import annotations

from pathlib import Path

from .source import Loaded, read_rows


def pattern(split: str) -> str:
    return f"{split}.jsonl"


def load(cfg, files: list[Path]) -> Loaded:
    rows = read_rows(files)
    loaded = Loaded("lima", files, rows_read=len(rows))
    for i, row in enumerate(rows):
        if cfg.limit is not None and i >= cfg.limit:
            loaded.drop(f"past limit {cfg.limit}")
            continue
        turns = list(row["conversations"])
        if len(turns) % 2:
            loaded.notes["trailing prompts without an answer"] += 1
        rounds = [{"prompt": turns[j], "answer": turns[j + 1]} for j in range(0, len(turns) - 1, 2)]
        if not rounds:
            loaded.drop("no complete prompt and answer")
            continue
        loaded.conversations.append(rounds)
        loaded.rows_used += 1
    return loaded
