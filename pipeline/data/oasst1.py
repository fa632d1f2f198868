"""OpenAssistant oasst1: rank-0 English replies to root prompts, one [prompt, reply] conversation each.

Files: `data/{split}-*.parquet`; the splits are read in the spec's order and
concatenated. A root prompt is a message without `parent_id`. A pair is dropped
when the reply or its root prompt mentions (case-insensitive) any of
`drop_if_mentions`. With `limit`, the first N kept pairs in file order.
"""

from __future__ import annotations

from pathlib import Path

from .source import Loaded, read_rows


def pattern(split: str) -> str:
    return f"data/{split}-*.parquet"


def load(cfg, files_by_split: dict[str, list[Path]]) -> Loaded:
    files = [f for split in cfg.splits for f in files_by_split[split]]
    rows = read_rows(files)
    loaded = Loaded("oasst1", files, rows_read=len(rows))
    roots = {r["message_id"]: r for r in rows if r["parent_id"] is None}
    blocked = [w.lower() for w in cfg.drop_if_mentions]
    for row in rows:
        if row["parent_id"] is None:
            loaded.drop("root prompt (used as a prompt)")
        elif row["parent_id"] not in roots:
            loaded.drop("not a reply to a root prompt")
        elif row["lang"] != cfg.language:
            loaded.drop(f"language is not {cfg.language}")
        elif row["rank"] != cfg.reply_rank:
            loaded.drop(f"rank is not {cfg.reply_rank}")
        elif any(w in row["text"].lower() for w in blocked):
            loaded.drop("reply mentions a blocked word")
        elif any(w in roots[row["parent_id"]]["text"].lower() for w in blocked):
            loaded.drop("root prompt mentions a blocked word")
        elif cfg.limit is not None and len(loaded.conversations) >= cfg.limit:
            loaded.drop(f"past limit {cfg.limit}")
        else:
            loaded.conversations.append([{"prompt": roots[row["parent_id"]]["text"], "answer": row["text"]}])
            loaded.rows_used += 1
    return loaded
