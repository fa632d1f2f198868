"""Spec -> build context: the files of one submission, as {relative path: bytes}.

The server code is copied as is (the same for every submission); what differs
per submission is data rendered from the spec: `serve_config.json`,
`models.json` (what the image downloads), the Dockerfile and `MANIFEST.json`.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from helm_server.settings import SERVE_CONFIG_FILE, ModelSource, ServeConfig, Weights

from . import __version__
from .base_images import BaseImage, base_image
from .dockerfile import render_dockerfile
from .paths import INFERENCE, LOCK, REPO
from .spec import Spec

SERVER_PACKAGE = "helm_server"
WEIGHTS_FILE = "models.json"
# The Dockerfile's requirements step mounts ./wheelhouse/, so the folder is always there; offline
# builds add the lock's wheels to it (in the unzipped context, never in the zip).
WHEELHOUSE_NOTE = "wheelhouse/README.txt"
WHEELHOUSE_TEXT = (b"Offline builds put the lock's wheels here (make wheelhouse; added to the unzipped build\n"
                   b"context, never to the zip). Empty, the image installs requirements.txt from PyPI.\n")
# Python sources shipped in every zip, by their path there: the server, and the Qwen (v1)
# converter, which the image runs at build time on a Qwen (v1) artifact.
SHIPPED = {
    SERVER_PACKAGE: INFERENCE / SERVER_PACKAGE,
    "pipeline": REPO / "pipeline",
    "pipeline/convert": REPO / "pipeline" / "convert",
    "packager": REPO / "packager",
}
# Of the packages the image converts weights with, only these files: the converter and what it imports.
ONLY = {"pipeline": ["__init__.py"], "packager": ["__init__.py", "qwen.py", "staging.py"]}


def weights(spec: Spec) -> Weights:
    """The references the image downloads; nothing else, so the weights layer caches by them alone."""
    source = lambda ref: ModelSource(repo_id=ref.repo_id, revision=ref.revision)  # noqa: E731
    return Weights(model=source(spec.artifact), adapter=source(spec.adapter) if spec.adapter else None)


def serve_config(spec: Spec) -> ServeConfig:
    return ServeConfig(
        submission=spec.name,
        model=spec.artifact,
        adapter=spec.adapter,
        generation=spec.generation,
        server=spec.server,
    )


def _json(data: object) -> bytes:
    return (json.dumps(data, indent=2, sort_keys=True) + "\n").encode("utf-8")


def server_sources(inference_dir: Path = INFERENCE) -> dict[str, bytes]:
    """main.py and the shipped packages; never bytecode or editor droppings."""
    files = {"main.py": (inference_dir / "main.py").read_bytes()}
    for target, folder in SHIPPED.items():
        names = ONLY.get(target) or sorted(p.name for p in folder.glob("*.py"))
        for name in names:
            files[f"{target}/{name}"] = (folder / name).read_bytes()
    return files


def manifest(spec: Spec, spec_sha256: str, base: BaseImage, files: dict[str, bytes]) -> bytes:
    return _json(
        {
            "submission": spec.name,
            "packager_version": __version__,
            "spec": {"path": f"submissions/{spec.name}/spec.toml", "sha256": spec_sha256},
            "models": {
                role: {"repo_id": ref.repo_id, "revision": ref.revision, "pinned": ref.is_pinned}
                for role, ref in spec.model_refs().items()
            },
            "base_image": {"key": base.key, "image": base.image, "torch": base.torch, "cuda": base.cuda,
                           "driver": base.driver},
            "files": {path: hashlib.sha256(data).hexdigest() for path, data in sorted(files.items())},
        }
    )


def render(spec: Spec, spec_sha256: str, lock: Path = LOCK) -> dict[str, bytes]:
    """Every file of the build context, MANIFEST.json last (it hashes the others)."""
    base = base_image(spec.image.base)
    files = server_sources()
    files[SERVE_CONFIG_FILE] = _json(serve_config(spec).model_dump(mode="json"))
    files[WEIGHTS_FILE] = _json(weights(spec).model_dump(mode="json"))
    files["requirements.txt"] = lock.read_bytes()
    files[WHEELHOUSE_NOTE] = WHEELHOUSE_TEXT
    files["Dockerfile"] = render_dockerfile(spec, base, spec_sha256, __version__).encode("utf-8")
    files["MANIFEST.json"] = manifest(spec, spec_sha256, base, files)
    return files
