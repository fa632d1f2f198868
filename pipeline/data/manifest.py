"""What went in and what came out, per source, and the guard that refuses silent data loss.

Refused (every problem listed, then exit 2): a declared source that yields no
conversation or none of whose conversations reaches the output; rows read that
are neither used nor dropped by a named filter (ARC's last question, say); an
example whose labels hold fewer answers than its conversation has rounds,
unless truncation cut them (and says so); a count different from the spec's
`expect`.
"""

from __future__ import annotations

import hashlib
from collections import Counter

from .source import Loaded
from .tokenize import IGNORE, Example, loss_runs


class DataLossError(Exception):
    """The training set would silently differ from what the spec declares."""


def file_sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def source_entry(loaded: Loaded, examples: list[Example], texts: list[str], hashes: dict) -> dict:
    answer_tokens = sum(sum(1 for label in e.labels if label != IGNORE) for e in examples)
    content = hashlib.sha256("\x00".join(texts).encode()).hexdigest()
    return {
        "files": [{"name": f.name, "sha256": hashes[f]} for f in loaded.files],
        "rows_read": loaded.rows_read,
        "rows_used": loaded.rows_used,
        "dropped": dict(sorted(loaded.dropped.items())),
        "notes": dict(sorted(loaded.notes.items())),
        "conversations": len(loaded.conversations),
        "turns": sum(len(c) for c in loaded.conversations),
        "examples": len(examples),
        "tokens": sum(len(e.input_ids) for e in examples),
        "answer_tokens": answer_tokens,
        "truncated": sum(e.truncated for e in examples),
        "rendered_sha256": content,
    }


def problems(declared: list, loaded: dict[str, Loaded], examples: list[Example]) -> list[str]:
    found: list[str] = []
    per_source = Counter(e.source for e in examples)
    for cfg in declared:
        name = cfg.source
        got = loaded.get(name)
        if got is None or not got.conversations:
            where = got.files[0].parent if got and got.files else cfg.repo_id
            found.append(f"{name}: declared, but it yielded no conversation (read {got.rows_read if got else 0} rows "
                         f"from {where}); check the files, the split and the filters")
            continue
        if per_source[name] != len(got.conversations):
            found.append(f"{name}: {len(got.conversations)} conversations loaded but {per_source[name]} reached the "
                         "training set; every declared source must be consumed whole")
        unaccounted = got.rows_read - got.rows_used - sum(got.dropped.values())
        if unaccounted:
            found.append(f"{name}: {unaccounted} of {got.rows_read} rows were neither used nor dropped by a named "
                         "filter (e.g. the last ARC question left out of every group)")
        if cfg.expect is not None and len(got.conversations) != cfg.expect:
            found.append(f"{name}: {len(got.conversations)} conversations, the spec expects {cfg.expect}")
    lost = Counter()
    example_of = {}
    for i, e in enumerate(examples):
        answers = loss_runs(e.labels)
        if answers < e.rounds and not e.truncated:
            lost[e.source] += 1
            example_of.setdefault(e.source, (i, answers, e.rounds))
    for name, n in sorted(lost.items()):
        i, answers, rounds = example_of[name]
        found.append(f"{name}: {n} examples lost rounds without truncation (example {i}: {answers} of {rounds} "
                     "answers carry loss)")
    return found


def check(declared: list, loaded: dict[str, Loaded], examples: list[Example]) -> None:
    found = problems(declared, loaded, examples)
    if found:
        raise DataLossError("the training set would lose data:\n  - " + "\n  - ".join(found))


def table(entries: dict[str, dict]) -> str:
    head = f"{'source':10} {'read':>7} {'kept':>7} {'dropped':>8} {'convs':>7} {'turns':>7} {'tokens':>10} {'answer tok':>10} {'truncated':>9}"
    lines = [head]
    for name, e in entries.items():
        lines.append(f"{name:10} {e['rows_read']:>7} {e['rows_used']:>7} {sum(e['dropped'].values()):>8} "
                     f"{e['conversations']:>7} {e['turns']:>7} {e['tokens']:>10} {e['answer_tokens']:>10} {e['truncated']:>9}")
        for reason, n in e["dropped"].items():
            lines.append(f"{'':10}   dropped {n}: {reason}")
        for note, n in e["notes"].items():
            lines.append(f"{'':10}   note {n}: {note}")
    return "\n".join(lines)
