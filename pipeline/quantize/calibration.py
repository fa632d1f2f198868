"""GPTQ calibration windows, drawn exactly as the reference solution drew them.

WikiText-2's raw lines already end in a newline; empty lines become " \\n".
All lines are joined and tokenized once, then each window starts at
`random.randint(0, n_tokens - seq_len - 1)` after `random.seed(seed)`.
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

EMPTY_LINE = " \n"


def split_text(files: list[Path], text_field: str) -> str:
    """The split's lines joined into one text, empty lines as " \\n" (through `datasets`)."""
    from datasets import load_dataset

    rows = load_dataset("parquet", data_files=[str(f) for f in files], split="train")
    if text_field not in rows.column_names:
        raise ValueError(f"column {text_field!r} not in {files[0].name} (columns: {', '.join(rows.column_names)})")
    return "".join(EMPTY_LINE if line == "" else line for line in rows[text_field])


def calibration_windows(ids: list[int], count: int, seq_len: int, seed: int) -> tuple[list[int], list[list[int]]]:
    """`count` windows of `seq_len` tokens at seeded random offsets; returns (offsets, windows)."""
    if len(ids) < seq_len + 2:
        raise ValueError(f"the calibration text has {len(ids)} tokens, fewer than seq_len + 2 = {seq_len + 2}")
    rng = random.Random(seed)  # the same sequence as random.seed(seed); random.randint(...)
    offsets = [rng.randint(0, len(ids) - seq_len - 1) for _ in range(count)]
    return offsets, [ids[i : i + seq_len] for i in offsets]


def heldout_windows(ids: list[int], count: int, seq_len: int) -> list[list[int]]:
    """Consecutive windows from the start of a held-out split, for perplexity."""
    windows = [ids[i : i + seq_len] for i in range(0, len(ids) - seq_len + 1, seq_len)][:count]
    if not windows:
        raise ValueError(f"the held-out text has {len(ids)} tokens, fewer than one window of {seq_len}")
    return windows


def windows_sha256(windows: list[list[int]]) -> str:
    return hashlib.sha256(json.dumps(windows, separators=(",", ":")).encode()).hexdigest()
