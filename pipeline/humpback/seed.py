"""The seed data and the three training sets made from it.

Seed pairs: first-turn, rank-0, English oasst1 (instruction, output), the data stage's own loader.
- forward (M0): rendered with the spec's oasst1 template (the paper's AI-Assistant tag);
- backward (M_yx): the output, then the instruction it answers, with `backward_template`;
- M1 (second iteration): forward plus the curated pairs with the humpback template (web-search tag).
Rows are tokenized piece by piece, like the data stage's, into what the trainer reads.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from ..data import oasst1
from ..data.__main__ import source_files
from ..data.template import render
from ..data.tokenize import tokenize


def pairs(cfg, data_dir: Path | None) -> tuple[list[dict], dict]:
    """[{instruction, output}] and an account of the rows read and dropped."""
    source = cfg.as_source()
    loaded = oasst1.load(source, source_files(source, data_dir))
    found = [{"instruction": c[0]["prompt"], "output": c[0]["answer"]} for c in loaded.conversations]
    if not found:
        raise ValueError(f"[training.humpback.seed]: no oasst1 pair passed the filters ({dict(loaded.dropped)})")
    return found, {"rows_read": loaded.rows_read, "pairs": len(found), "dropped": dict(loaded.dropped)}


def forward_rows(seed: list[dict], template, tokenizer, max_length: int) -> list[dict]:
    conversations = [[{"prompt": p["instruction"], "answer": p["output"]}] for p in seed]
    return [_row(render(c, template), tokenizer, max_length) for c in conversations]


def backward_rows(seed: list[dict], template, tokenizer, max_length: int) -> list[dict]:
    return [_row(backward_pieces(template, p["output"], p["instruction"]), tokenizer, max_length) for p in seed]


def backward_pieces(template, output: str, instruction: str | None = None) -> list[tuple[str, bool]]:
    """The backward model's text; without an instruction, the prompt it completes."""
    pieces = [(template.system, False), (template.prompt.format(output=output), False)]
    return pieces + ([(template.answer.format(instruction=instruction), True)] if instruction is not None else [])


def _row(pieces, tokenizer, max_length: int) -> dict:
    ids, labels, _ = tokenize(pieces, tokenizer, max_length)
    return {"input_ids": ids, "labels": labels}


def rows_sha256(rows: list[dict]) -> str:
    return hashlib.sha256(json.dumps(rows).encode()).hexdigest()
