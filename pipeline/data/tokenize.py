"""Pieces -> input ids and labels, tokenized piece by piece as the reference did.

Each piece is tokenized on its own (no special tokens added) and the ids are
concatenated, so token boundaries fall where the reference's fell; labels are
the ids on answer pieces and -100 elsewhere. Examples longer than `max_length`
are cut at the end, and say so.
"""

from __future__ import annotations

from dataclasses import dataclass

IGNORE = -100


@dataclass
class Example:
    source: str
    input_ids: list[int]
    labels: list[int]
    truncated: bool
    rounds: int  # rounds of the source's conversation: each must reach the labels as one answer


def tokenize(pieces, tokenizer, max_length: int) -> tuple[list[int], list[int], bool]:
    """(input_ids, labels, truncated) of one rendered conversation."""
    ids: list[int] = []
    labels: list[int] = []
    for text, loss in pieces:
        piece = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids += piece
        labels += piece if loss else [IGNORE] * len(piece)
    return ids[:max_length], labels[:max_length], len(ids) > max_length


def loss_runs(labels: list[int]) -> int:
    """Contiguous runs of loss-carrying labels: one per answer that reached the tokenized output."""
    runs, inside = 0, False
    for label in labels:
        if label != IGNORE and not inside:
            runs += 1
        inside = label != IGNORE
    return runs
