"""Local copies of Hub datasets, in the Hub's own file layout (DATA_DIR/<repo_id>/...)."""

from __future__ import annotations

import random
from pathlib import Path

WIKITEXT = "Salesforce/wikitext"
WIKITEXT_CONFIG = "wikitext-2-raw-v1"
_WORDS = (
    "the of and in to a was is for on as by with he at from his that it an were which are this also be had first "
    "one their its new after but who not they have her she two been other when there all during into school time "
    "may years more most only over city some world would where later up such used many can state about national "
    "out known university united then made album game season film river church football war team"
).split()


def wikitext_lines(n_articles: int, seed: int) -> list[str]:
    """Lines shaped like WikiText raw: headings, paragraphs ending in a newline, empty lines between."""
    rng = random.Random(seed)
    lines: list[str] = []
    for a in range(n_articles):
        lines += ["", f" = Article {a} = \n", ""]
        for _ in range(rng.randint(2, 4)):
            words = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(20, 60)))
            lines.append(f" {words.capitalize()} , {rng.randint(1800, 2020)} . \n")
            lines.append("")
    return lines


def save_wikitext(data_dir: Path, articles: int = 12) -> Path:
    """DATA_DIR/Salesforce/wikitext/wikitext-2-raw-v1/{train,validation,test}-00000-of-00001.parquet"""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = data_dir / WIKITEXT / WIKITEXT_CONFIG
    folder.mkdir(parents=True, exist_ok=True)
    for seed, split in enumerate(("train", "validation", "test")):
        pq.write_table(pa.table({"text": wikitext_lines(articles, seed)}), folder / f"{split}-00000-of-00001.parquet")
    return data_dir
