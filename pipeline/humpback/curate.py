"""Self-curation's outcome: the pairs rated at or above the threshold, as a Hub-layout dataset.

The dataset is what the `humpback` data source reads (`data/train-*.parquet` with `instruction`
and `output`), and what `make publish-humpback-N` uploads, with a card saying how it was made.
"""

from __future__ import annotations

from pathlib import Path

from packager.staging import staged_folder
from .rate import SCORES

DATA_FILE = "data/train-00000-of-00001.parquet"


def histogram(scored: list[dict]) -> dict[str, int]:
    counts = {str(s): 0 for s in SCORES} | {"unparseable": 0}
    for row in scored:
        counts[str(row["score"]) if row["score"] is not None else "unparseable"] += 1
    return counts


def examples_by_score(pairs: list[dict], per_score: int = 2) -> dict[str, list[dict]]:
    """A few pairs at each score (and unparseable ratings), for a person to judge the rubric by."""
    found: dict[str, list[dict]] = {}
    for row in pairs:
        key = str(row["score"]) if row["score"] is not None else "unparseable"
        if len(found.setdefault(key, [])) < per_score:
            found[key].append({"instruction": row["instruction"], "passage": row["output"][:300],
                               "rating": row["rating"][-300:]})
    return found


def select(pairs: list[dict], threshold: int) -> list[dict]:
    """Kept: a parsed score at or above the threshold, and a non-empty instruction."""
    return [p for p in pairs if p["score"] is not None and p["score"] >= threshold and p["instruction"].strip()]


CARD = """---
configs:
- config_name: default
  data_files:
  - split: train
    path: data/train-*.parquet
---
# {submission}: Humpback self-augmented C4

Instruction backtranslation (Li et al. 2023): a backward model trained on {seed} oasst1 seed pairs
wrote an instruction for each of {passages} C4 passages; the seed model rated each pair on a
5-point scale; the {kept} pairs rated {threshold} or higher are here (`instruction`, `output` =
the passage, `score`, `url`). Made by `make humpback-N`; its manifest.json has the whole account.
"""


def write_dataset(folder: Path, kept: list[dict], card: dict) -> None:
    from datasets import Dataset

    columns = ["instruction", "output", "score", "url", "id"]
    with staged_folder(folder) as tmp:
        (tmp / "data").mkdir()
        Dataset.from_dict({c: [row[c] for row in kept] for c in columns}).to_parquet(str(tmp / DATA_FILE))
        (tmp / "README.md").write_text(CARD.format(kept=len(kept), **card), encoding="utf-8")
