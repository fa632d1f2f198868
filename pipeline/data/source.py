"""What a source module returns: its conversations and an account of every row it read."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

Round = dict[str, object]  # the fields a template may use: prompt/answer, or ARC's question/choices/answerKey


@dataclass
class Loaded:
    source: str
    files: list[Path]
    rows_read: int = 0
    rows_used: int = 0  # rows that ended up in a conversation (ARC: questions; oasst1: replies)
    dropped: Counter = field(default_factory=Counter)  # named filter -> rows it dropped
    notes: Counter = field(default_factory=Counter)  # counts that are not rows (e.g. turns left out)
    conversations: list[list[Round]] = field(default_factory=list)

    def drop(self, reason: str) -> None:
        self.dropped[reason] += 1


def _empty(path: Path) -> bool:
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_metadata(path).num_rows == 0
    return path.stat().st_size == 0


def read_rows(files: list[Path]):
    """Rows of parquet or JSON-lines files, through `datasets` (as the Hub's own loaders read them).

    Files with no rows give an empty table (the guard then names the source), not a crash.
    """
    from datasets import Dataset, load_dataset

    files = [f for f in files if not _empty(f)]
    if not files:
        return Dataset.from_list([])
    kind = "json" if files[0].suffix in (".jsonl", ".json") else "parquet"
    return load_dataset(kind, data_files=[str(f) for f in files], split="train")
