"""python -m pipeline.data NAME [--model DIR] [--data-dir DIR] [--out DIR]"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

from packager.paths import REPO
from packager.spec import SpecError

from ..cli import check_local_inputs, spec_with, stage_parser
from ..hub import TOKENIZER_FILES, SourceError, dataset_files, model_folder
from packager.staging import staged_folder
from . import arc, humpback, lima, oasst1
from .manifest import DataLossError, check, file_sha256, source_entry, table
from .source import Loaded
from .template import loss_spans, render
from .tokenize import Example, tokenize

DATA = REPO / "build" / "data"
HUMPBACK = REPO / "build" / "humpback"  # make humpback-N's output: NAME/curated/
MANIFEST = "manifest.json"


def load_tokenizer(spec, local: Path | None):
    """The base model's tokenizer (Qwen v1's converted to the same ids); with a fingerprint of it."""
    from transformers import AutoTokenizer

    from ..convert import is_qwen1
    from ..convert.tokenizer import VOCAB_FILE, fast_tokenizer

    folder = model_folder(spec.base_model.repo_id, spec.base_model.revision, local, patterns=TOKENIZER_FILES)
    tokenizer = fast_tokenizer(folder / VOCAB_FILE) if is_qwen1(folder) else AutoTokenizer.from_pretrained(folder)
    fingerprint = hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode()).hexdigest()
    return tokenizer, fingerprint


def curated_folder(name: str, given: Path | None) -> Path | None:
    """make humpback-N's curated set: HUMPBACK=dir when given, else build/humpback/NAME/curated/ when there."""
    if given is not None:
        if not (given / "data").is_dir():
            raise SourceError(f"HUMPBACK={given}: no data/ folder there; point it at `make humpback-N`'s curated/ folder")
        return given
    default = HUMPBACK / name / "curated"
    return default if (default / "data").is_dir() else None


def source_files(cfg, data_dir: Path | None, curated: Path | None = None):
    """The Hub files a source reads (per split where it reads several), local or downloaded.

    The humpback source reads, in order: the Humpback stage's curated set, a local folder named as
    its repo_id, DATA_DIR/<repo_id>, the Hub.
    """
    files = lambda pattern: dataset_files(cfg.repo_id, cfg.revision, pattern, data_dir)  # noqa: E731
    if cfg.source == "oasst1":
        return {split: files(oasst1.pattern(split)) for split in cfg.splits}
    if cfg.source == "arc":
        return {split: files(arc.pattern(cfg.subset, split)) for split in cfg.splits}
    if cfg.source == "lima":
        return files(lima.pattern(cfg.split))
    local = curated or Path(cfg.repo_id)
    if local.is_dir():  # the Humpback stage's own output folder
        print(f"humpback: reading {local} (the Humpback stage's curated set)", flush=True)
        found = sorted(local.glob(humpback.pattern(cfg.split)))
        if not found:
            raise SourceError(f"humpback: no {humpback.pattern(cfg.split)} in {local}")
        return found
    return files(humpback.pattern(cfg.split))


LOADERS = {"oasst1": oasst1.load, "lima": lima.load, "arc": arc.load, "humpback": humpback.load}


def flat(files) -> list[Path]:
    return [f for fs in files.values() for f in fs] if isinstance(files, dict) else list(files)


def cache_key(training, hashes: dict[Path, str], tokenizer_fingerprint: str) -> str:
    inputs = {
        "data": [cfg.model_dump(mode="json") for cfg in training.data],
        "template": training.template.model_dump(mode="json"),
        "max_length": training.schedule.max_length,
        "files": sorted(hashes.values()),
        "tokenizer": tokenizer_fingerprint,
    }
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()


def collect(declared, loaded: dict[str, Loaded]):
    """Every conversation of every declared source, in the spec's order: (source, conversation)."""
    return [(cfg.source, conversation) for cfg in declared for conversation in loaded[cfg.source].conversations]


def build_examples(conversations, template, tokenizer, max_length: int):
    examples, rendered = [], []
    for source, conversation in conversations:
        pieces = render(conversation, template.for_source(source))
        ids, labels, truncated = tokenize(pieces, tokenizer, max_length)
        examples.append(Example(source, ids, labels, truncated, rounds=len(conversation)))
        rendered.append({"source": source, "text": "".join(t for t, _ in pieces), "loss_spans": loss_spans(pieces)})
    return examples, rendered


def write(out: Path, examples: list[Example], rendered: list[dict], manifest: dict) -> None:
    from datasets import Dataset

    with staged_folder(out) as tmp:
        columns = {"source": [e.source for e in examples], "input_ids": [e.input_ids for e in examples],
                   "labels": [e.labels for e in examples]}
        Dataset.from_dict(columns).to_parquet(str(tmp / "train.parquet"))
        with (tmp / "rendered.jsonl").open("w", encoding="utf-8") as f:
            for row in rendered:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")


def run(args: argparse.Namespace) -> int:
    spec, _, training = spec_with(args, "training", "build training data for")
    out = args.out or DATA / spec.name

    # 1. the tokenizer and every source's files (local copies or downloads)
    tokenizer, fingerprint = load_tokenizer(spec, args.model)
    curated = curated_folder(spec.name, args.humpback)
    files = {cfg.source: source_files(cfg, args.data_dir, curated) for cfg in training.data}
    hashes = {f: file_sha256(f) for fs in files.values() for f in flat(fs)}
    key = cache_key(training, hashes, fingerprint)
    previous = json.loads((out / MANIFEST).read_text()) if (out / MANIFEST).is_file() else {}
    if previous.get("inputs_sha256") == key:
        print(table(previous["sources"]))
        print(f"{out} is up to date (same data and template sections, files and tokenizer): reused")
        return 0

    # 2. load, render, tokenize
    loaded = {cfg.source: LOADERS[cfg.source](cfg, files[cfg.source]) for cfg in training.data}
    examples, rendered = build_examples(collect(training.data, loaded), training.template, tokenizer,
                                        training.schedule.max_length)

    # 3. account for every row and refuse silent loss
    entries = {}
    for cfg in training.data:
        mine = [i for i, e in enumerate(examples) if e.source == cfg.source]
        entries[cfg.source] = source_entry(loaded[cfg.source], [examples[i] for i in mine],
                                           [rendered[i]["text"] for i in mine], hashes)
    print(table(entries))
    check(training.data, loaded, examples)

    manifest = {"submission": spec.name, "inputs_sha256": key, "tokenizer_sha256": fingerprint,
                "max_length": training.schedule.max_length, "examples": len(examples), "sources": entries}
    write(out, examples, rendered, manifest)
    print(f"wrote {out}: {len(examples)} examples (train.parquet, rendered.jsonl, {MANIFEST})")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = stage_parser("python -m pipeline.data", __doc__, "local model folder for the tokenizer (default: the base model's)",
                     "output folder (default build/data/NAME)")
    p.add_argument("--humpback", type=Path, help="make humpback-N's curated/ folder (default build/humpback/NAME/curated "
                   "when it exists)")
    args = p.parse_args(argv)
    try:
        check_local_inputs(args)
        return run(args)
    except (SpecError, SourceError, DataLossError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
