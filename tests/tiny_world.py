"""A tiny offline world for the data and training stages: Hub-layout datasets and shortened specs.

    python tests/tiny_world.py DIR [--rater]   # DIR/hub (DATA_DIR), DIR/submissions (SUBMISSIONS),
                                               # with --rater DIR/rater-gptq (MODEL for make humpback-3)

The specs are the real submissions 2 and 3 without their `expect` counts (the
fixtures are small) and with a shorter schedule, so a CPU trains them in
seconds: `make train-2 SUBMISSIONS=DIR/submissions DATA_DIR=DIR/hub MODEL=build/tiny-gptq`.
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path[:0] = [str(HERE)]

from hub_fixtures import RATED_SEED_REPO, save_c4, save_chat_datasets, save_rated_seed  # noqa: E402

SHORTER = {
    "epochs = 5": "epochs = 3",
    "gradient_accumulation = 32": "gradient_accumulation = 2",
    "max_length = 2048": "max_length = 128",
    "every = 50": "every = 4",  # stops between checkpoints are the interesting ones
    "lr = 1e-4": "lr = 2e-3",  # the loss visibly moves within a few steps
    "passages = 23000": "passages = 24",  # the Humpback stage on a CPU: a few small shards
    "shard_size = 256": "shard_size = 8",
    "batch_size = 8": "batch_size = 4",  # shards of 8 in two turns of the engine's rows
    "max_new_tokens = 128": "max_new_tokens = 12",
    "max_new_tokens = 256": "max_new_tokens = 16",
    "min_chars = 400": "min_chars = 200",
    "max_chars = 4000": "max_chars = 1000",
    "limit = 3200": f'limit = 3200\nrepo_id = "{RATED_SEED_REPO}"',  # a seed model that rates
}
HUMPBACK_ONLY = {"passages = 23000", "batch_size = 8", "shard_size = 256", "max_new_tokens = 128", "max_new_tokens = 256",
                 "min_chars = 400", "max_chars = 4000", "limit = 3200"}  # submission 3's [training.humpback]


def write_specs(submissions: Path, shorten: bool = True) -> Path:
    """Submissions 2 and 3's specs, without `expect` (and shortened), under `submissions`."""
    for n in (2, 3):
        folder = submissions / f"submission-{n}"
        folder.mkdir(parents=True, exist_ok=True)
        text = (REPO / "submissions" / f"submission-{n}" / "spec.toml").read_text()
        text = "\n".join(line for line in text.splitlines() if not line.startswith("expect = "))
        for old, new in (SHORTER.items() if shorten else ()):
            if n == 3 or old not in HUMPBACK_ONLY:
                assert old in text, f"submission-{n}'s spec no longer says {old!r}"
            text = text.replace(old, new)
        (folder / "spec.toml").write_text(text + "\n")
        for extra in (REPO / "submissions" / f"submission-{n}").iterdir():  # files a spec points to (rating prompt)
            if extra.name != "spec.toml":
                (folder / extra.name).write_bytes(extra.read_bytes())
    return submissions


def train_rater(steps: int = 80, seed: int = 0):
    """The tiny model taught to answer `Score: 5` after a round marker (`\nANSWER: `, `\nQUESTION: `).

    A random tiny model never writes an exact `Score: N` line, so nothing would survive curation; this
    one stands in for a seed model that has learned the rubric's format, and lets the Humpback stage
    run end to end on a CPU. Its embeddings stay frozen (the 151,936-row table is most of the cost).
    """
    import random

    import torch

    from hub_fixtures import c4_documents
    from packager.tiny_model import build_model, build_tokenizer

    tokenizer, model, rng = build_tokenizer(), build_model(seed).train(), random.Random(seed)
    texts = [d["text"] for d in c4_documents(40) if 200 < len(d["text"]) < 3000]
    answer = tokenizer("Score: 5\n", add_special_tokens=False)["input_ids"]

    def example() -> tuple[list[int], list[int]]:
        text = rng.choice(texts)
        at = rng.randint(0, len(text) - 80)
        prompt = text[at : at + rng.randint(10, 80)] + rng.choice(["\nANSWER: ", "\nQUESTION: "])
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        return ids + answer, [-100] * len(ids) + answer

    for name, p in model.named_parameters():
        p.requires_grad_("embed" not in name)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-2)
    for _ in range(steps):
        rows = [example() for _ in range(8)]
        width = max(len(ids) for ids, _ in rows)
        ids = torch.tensor([i + [0] * (width - len(i)) for i, _ in rows])
        labels = torch.tensor([l + [-100] * (width - len(l)) for _, l in rows])
        model(input_ids=ids, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval()


def save_rater_gptq(directory: Path) -> Path:
    """`train_rater`'s model quantized like the tiny stand-in: the Humpback stage's base in tests and CI."""
    from pipeline.quantize.tiny import save_tiny_gptq

    return save_tiny_gptq(directory, model=train_rater())


def write_world(root: Path, rater: bool = False) -> Path:
    save_chat_datasets(root / "hub")
    save_c4(root / "hub")
    save_rated_seed(root / "hub")
    write_specs(root / "submissions")
    if rater:
        save_rater_gptq(root / "rater-gptq")
    return root


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if a != "--rater"]
    if len(args) != 1:
        raise SystemExit("usage: python tests/tiny_world.py DIR [--rater]")
    print(write_world(Path(args[0]), rater="--rater" in sys.argv))
