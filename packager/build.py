"""Spec -> checked build context -> zip: the packager's one pipeline."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from . import checks
from .archive import write_tree, zip_bytes_to
from .base_images import UnknownBaseImage, base_image
from .budget import known_shape
from .render import render
from .spec import Spec, SpecError, load_spec


@dataclass
class Built:
    spec: Spec
    spec_sha256: str
    zip_path: Path
    context_dir: Path
    warnings: list[str]


def validate(spec_file: Path, strict: bool = False) -> tuple[Spec, str, list[str]]:
    """Load a spec and apply the pinning policy: warn on branches, refuse them with `strict`."""
    spec, sha = load_spec(spec_file)
    try:
        base_image(spec.image.base)
    except UnknownBaseImage as e:
        raise SpecError(f"{spec_file}: {e.args[0]}") from None
    limit = getattr(known_shape(spec.base_model.repo_id), "exact_context", None)
    if limit is not None and spec.generation.context_length > limit:
        raise SpecError(
            f"{spec_file}: generation.context_length = {spec.generation.context_length}, but {spec.base_model.repo_id} "
            f"is served through the Qwen2 conversion, exact only up to {limit} tokens (packager/data/models.toml); "
            f"set context_length <= {limit} (HELM's window is 2048)"
        )
    warnings = [
        f"{spec_file}: {ref} is a branch or tag, not a commit: the weights can change under this submission"
        for ref in spec.unpinned()
    ]
    if strict and warnings:
        raise SpecError("\n".join(warnings) + "\n(--strict) pin each revision to its 40-character commit hash")
    return spec, sha, warnings


def build(spec_file: Path, dist: Path, strict: bool = False) -> Built:
    spec, sha, warnings = validate(spec_file, strict)
    context = render(spec, sha)
    entries = {f"{spec.name}/{path}": data for path, data in context.items()}
    checks.check(entries)
    zip_path = dist / f"{spec.name}.zip"
    context_dir = dist / spec.name
    write_tree(context_dir, context)
    zip_bytes_to(zip_path, entries)
    return Built(spec, sha, zip_path, context_dir, warnings)
