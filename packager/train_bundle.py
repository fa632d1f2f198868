"""`make train-bundle-N`: the training reproduction bundle, dist/submission-N-train.zip.

The challenge asked finalists for their training code as a Dockerfile. The
bundle is rendered from the same spec as the submission: a Dockerfile on the
pinned CUDA base image with the training lock, the toolkit's data and training
code (and what they import: the spec parser, the server's settings models), the
spec itself and a README with the two commands. It is checked by the rules
every zip of the toolkit passes (no weights, no secrets, pinned requirements,
one Dockerfile, a tagged base) and written byte-reproducibly. It never enters
the evaluation zip.

    python -m packager.train_bundle NAME [--dist DIR]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import checks
from .archive import zip_bytes_to
from .base_images import base_image
from .paths import DIST, INFERENCE, REPO, SUBMISSIONS
from .spec import Spec, SpecError, load_spec, spec_path

TRAIN_DIR = REPO / "docker" / "train"
# What the stages import, as folders of the repository (sources only).
CODE = {
    "pipeline": REPO / "pipeline",
    "helm_server": INFERENCE / "helm_server",
}
PACKAGER_FILES = ["__init__.py", "paths.py", "spec.py", "budget.py", "lora_targets.py", "qwen.py", "staging.py", "data/models.toml", "data/gpus.toml"]


def _sources(name: str, folder: Path) -> dict[str, bytes]:
    return {
        f"{name}/{p.relative_to(folder).as_posix()}": p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.suffix in (".py", ".toml") and "__pycache__" not in p.parts
    }


def render(spec: Spec, spec_sha256: str, spec_files: dict[str, bytes]) -> dict[str, bytes]:
    """`spec_files`: the spec folder's files by name (spec.toml, and a text file it names, e.g. a rating prompt)."""
    if spec.training is None:
        raise SpecError(f"{spec.name}: the spec has no [training] section; there is no training to bundle")
    base = base_image(spec.image.base)
    t = spec.training
    fields = dict(
        name=spec.name, spec_sha256=spec_sha256, base_image=base.image, torch=base.torch, cuda=base.cuda,
        artifact=f"{spec.artifact.repo_id}@{spec.artifact.revision}", r=t.lora.r, alpha=t.lora.alpha,
        dropout=t.lora.dropout, targets=t.lora.resolved(), optimizer=t.optimizer.name, lr=t.optimizer.lr,
        weight_decay=t.optimizer.weight_decay, **t.schedule.model_dump(include={"scheduler", "warmup_ratio", "epochs",
                                                                              "batch_size", "gradient_accumulation", "max_length"}),
    )
    files = {
        "Dockerfile": (TRAIN_DIR / "Dockerfile.template").read_text().format(**fields).encode(),
        "README.md": (TRAIN_DIR / "README.template.md").read_text().format(**fields).encode(),
        "requirements.txt": (TRAIN_DIR / "requirements.lock").read_bytes(),
        **{f"submissions/{spec.name}/{name}": data for name, data in sorted(spec_files.items())},
    }
    for name, folder in CODE.items():
        files.update(_sources(name, folder))
    for rel in PACKAGER_FILES:
        files[f"packager/{rel}"] = (REPO / "packager" / rel).read_bytes()
    return files


def build(spec_file: Path, dist: Path) -> Path:
    spec, sha = load_spec(spec_file)
    named = [spec.training.humpback.rating.prompt_file] if spec.training and spec.training.humpback else []
    files = render(spec, sha, {spec_file.name: spec_file.read_bytes(),
                               **{n: (spec_file.parent / n).read_bytes() for n in named}})
    top = f"{spec.name}-train"
    entries = {f"{top}/{path}": data for path, data in files.items()}
    checks.check(entries, checks.COMMON_RULES, what="the training bundle")
    out = dist / f"{top}.zip"
    zip_bytes_to(out, entries)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m packager.train_bundle", description=__doc__.splitlines()[0])
    p.add_argument("name")
    p.add_argument("--submissions", default=str(SUBMISSIONS))
    p.add_argument("--dist", default=str(DIST))
    args = p.parse_args(argv)
    try:
        out = build(spec_path(Path(args.submissions), args.name), Path(args.dist))
    except (SpecError, checks.PackagingError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"built {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
