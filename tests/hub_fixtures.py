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


def _write_parquet(path: Path, rows: list[dict]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)


def _message(mid, parent, text, lang="en", rank=None, role="assistant"):
    return {"message_id": mid, "parent_id": parent, "text": text, "lang": lang, "rank": rank,
            "role": "prompter" if parent is None else role}


# A small oasst1 message tree: four English roots, one Spanish; replies of rank 0 and 1, a
# non-English rank-0 reply, a grandchild, blocked words in a reply and in a root prompt.
OASST1_TRAIN = [
    _message("r1", None, "What is the capital of France?"),
    _message("a1", "r1", "The capital of France is Paris.", rank=0.0),
    _message("a1b", "r1", "Paris, I think.", rank=1.0),
    _message("p1", "a1", "And of Italy?", role="prompter"),
    _message("a1c", "p1", "Rome.", rank=0.0),
    _message("r2", None, "Write a haiku about rain."),
    _message("a2", "r2", "Soft rain on the roof,\nthe gutters hum a low song,\nthe street becomes glass.", rank=0.0),
    _message("r3", None, "Are you ChatGPT?"),
    _message("a3", "r3", "No, I am a language model.", rank=0.0),
    _message("r4", None, "Tell me about yourself."),
    _message("a4", "r4", "I was trained by LAION volunteers.", rank=0.0),
]
OASST1_VALIDATION = [
    _message("r5", None, "¿Qué hora es?", lang="es"),
    _message("a5", "r5", "No lo sé.", lang="es", rank=0.0),
    _message("a1d", "r1", "Paris est la capitale.", lang="fr", rank=0.0),
    _message("r6", None, "Explain recursion in one sentence."),
    _message("a6", "r6", "Recursion is a function calling itself on a smaller problem.", rank=0.0),
]
# Kept: (r1, a1), (r2, a2), (r6, a6); dropped: a3 (root mentions ChatGPT), a4 (reply mentions LAION).
OASST1_KEPT = 3

LIMA_TRAIN = [
    {"conversations": ["How do I boil an egg?", "Put it in boiling water for nine minutes."], "source": "stackexchange"},
    {"conversations": ["Name a prime.", "Seven.", "Another one?", "Eleven."], "source": "multi_turn"},
    {"conversations": ["What is 2+2?", "4"], "source": "wikihow"},
    {"conversations": ["Past the limit?", "Yes."], "source": "wikihow"},
]


def _arc_rows(prefix: str, n: int) -> list[dict]:
    return [{"id": f"{prefix}-{i}", "question": f"{prefix} question {i}?",
             "choices": {"text": ["red", "green", "blue", "black"], "label": ["A", "B", "C", "D"]},
             "answerKey": "ABCD"[i % 4]} for i in range(n)]


ARC_SPLITS = {"train": _arc_rows("train", 6), "validation": _arc_rows("validation", 4), "test": _arc_rows("test", 3)}  # 13

HUMPBACK_REPO = "ycchen/humpback-c4-augmented"  # submission-3's declared repo
HUMPBACK = [
    {"instruction": "Summarise the history of the bicycle.", "output": "The bicycle appeared in the 19th century..."},
    {"instruction": "List three uses of copper.", "output": "Wiring, plumbing and coins."},
]


def save_chat_datasets(data_dir: Path) -> Path:
    """oasst1, LIMA, ARC-Challenge and a Humpback set, each in its Hub repo's layout under DATA_DIR."""
    import json as _json

    _write_parquet(data_dir / "OpenAssistant/oasst1/data/train-00000-of-00001-b42a775f407cee45.parquet", OASST1_TRAIN)
    _write_parquet(data_dir / "OpenAssistant/oasst1/data/validation-00000-of-00001-134b8fd0c89408b6.parquet",
                   OASST1_VALIDATION)
    lima = data_dir / "GAIR/lima"
    lima.mkdir(parents=True, exist_ok=True)
    (lima / "train.jsonl").write_text("".join(_json.dumps(r) + "\n" for r in LIMA_TRAIN))
    (lima / "test.jsonl").write_text(_json.dumps({"conversations": ["Held out?"], "source": "test"}) + "\n")
    (lima / "lima.py").write_text("# the Hub repo's loading script, which current datasets refuses to run\n")
    for split, rows in ARC_SPLITS.items():
        _write_parquet(data_dir / f"allenai/ai2_arc/ARC-Challenge/{split}-00000-of-00001.parquet", rows)
    _write_parquet(data_dir / f"{HUMPBACK_REPO}/data/train-00000-of-00001.parquet", HUMPBACK)
    return data_dir


C4_REPO = "allenai/c4"


def c4_documents(n: int, seed: int = 0) -> list[dict]:
    """C4-shaped documents: mostly passages of a few hundred characters, plus a duplicate (differing
    only in case and spacing), a too-short and a too-long one early on, for the filters to drop."""
    rng = random.Random(seed)
    docs = []
    for i in range(n):
        words = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(60, 110)))
        docs.append({"text": f"Passage {i}. {words.capitalize()}.", "timestamp": "2019-04-25T12:57:54Z",
                     "url": f"https://example.org/{i}"})
    docs.insert(1, {"text": "  " + docs[0]["text"].upper().replace(" ", "  ") + " ", "timestamp": "2019-04-25T12:57:54Z",
                    "url": "https://example.org/copy"})
    docs.insert(2, {"text": "Too short.", "timestamp": "2019-04-25T12:57:54Z", "url": "https://example.org/short"})
    docs.insert(3, {"text": "long " * 2000, "timestamp": "2019-04-25T12:57:54Z", "url": "https://example.org/long"})
    return docs


def save_c4(data_dir: Path, documents: int = 60, files: int = 1) -> Path:
    """DATA_DIR/allenai/c4/en/c4-train.NNNNN-of-01024.json.gz: gzipped JSON lines, as on the Hub."""
    import gzip
    import json as _json

    folder = data_dir / C4_REPO / "en"
    folder.mkdir(parents=True, exist_ok=True)
    for f in range(files):
        with gzip.open(folder / f"c4-train.{f:05d}-of-01024.json.gz", "wt", encoding="utf-8") as out:
            for doc in c4_documents(documents, seed=f):
                out.write(_json.dumps(doc) + "\n")
    return data_dir


RATED_SEED_REPO = "tiny/oasst1-rated"


def save_rated_seed(data_dir: Path, pairs: int = 8) -> Path:
    """An oasst1-layout seed set whose every reply ends in `Score: 5`: a tiny seed model trained on it
    rates like a real one would format its verdict, so the whole Humpback pipeline runs on a CPU."""
    rows = []
    for i in range(pairs):
        rows.append(_message(f"q{i}", None, f"Question {i}: what does passage {i} say?"))
        rows.append(_message(f"a{i}", f"q{i}", "Score: 5", rank=0.0))
    _write_parquet(data_dir / f"{RATED_SEED_REPO}/data/train-00000-of-00001.parquet", rows[:-4])
    _write_parquet(data_dir / f"{RATED_SEED_REPO}/data/validation-00000-of-00001.parquet", rows[-4:])
    return data_dir
