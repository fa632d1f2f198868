"""A tiny offline world for the data and training stages: Hub-layout datasets and shortened specs.

    python tests/tiny_world.py DIR     # DIR/hub (DATA_DIR) and DIR/submissions (SUBMISSIONS)

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

from hub_fixtures import save_chat_datasets  # noqa: E402

SHORTER = {
    "epochs = 5": "epochs = 3",
    "gradient_accumulation = 32": "gradient_accumulation = 2",
    "max_length = 2048": "max_length = 128",
    "every = 50": "every = 1",
    "lr = 1e-4": "lr = 2e-3",  # the loss visibly moves within a few steps
}


def write_specs(submissions: Path, shorten: bool = True) -> Path:
    """Submissions 2 and 3's specs, without `expect` (and shortened), under `submissions`."""
    for n in (2, 3):
        folder = submissions / f"submission-{n}"
        folder.mkdir(parents=True, exist_ok=True)
        text = (REPO / "submissions" / f"submission-{n}" / "spec.toml").read_text()
        text = "\n".join(line for line in text.splitlines() if not line.startswith("expect = "))
        for old, new in (SHORTER.items() if shorten else ()):
            assert old in text, f"submission-{n}'s spec no longer says {old!r}"
            text = text.replace(old, new)
        (folder / "spec.toml").write_text(text + "\n")
    return submissions


def write_world(root: Path) -> Path:
    save_chat_datasets(root / "hub")
    write_specs(root / "submissions")
    return root


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: python tests/tiny_world.py DIR")
    print(write_world(Path(sys.argv[1])))
