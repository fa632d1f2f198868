"""Zip -> image: unzip a built submission and `docker build` its own Dockerfile.

The image is built from the zip's contents, so the Dockerfile that is built
is byte for byte the one that would be submitted. Offline builds add the
wheelhouse to the unzipped context (never to the zip) and pass the local
base image and FETCH_MODELS=0 as build arguments.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from .base_images import base_image
from .build import Built
from .docker_cli import Docker, DockerError
from .offline import LOCAL_BASE_KEY, WHEELHOUSE
from .paths import REPO

CONTEXTS = REPO / "build" / "contexts"
SECRET_ID = "hf_token"


@dataclass
class BuildOptions:
    tag: str
    base_image: str | None = None  # overrides the Dockerfile's BASE_IMAGE default
    fetch_models: bool = True
    wheelhouse: Path | None = None
    token: str | None = field(default=None, repr=False)  # handed to the build as a BuildKit secret only
    no_cache: bool = False


@dataclass
class BuiltImage:
    tag: str
    context: Path
    seconds: float
    size_bytes: int
    log: str = ""


REPOSITORY = "llm-challenge"
LABEL = "org.llm-challenge.toolkit=packager"


def image_tag(name: str, spec_sha256: str, offline: bool) -> str:
    """One tag per spec and variant: an offline build (local base, no weights) never overwrites an online one."""
    return f"{REPOSITORY}/{name}:{spec_sha256[:12]}-{'offline' if offline else 'online'}"


def stale(images: list[dict]) -> list[str]:
    """Of the toolkit's submission images ({"ref", "created"}), every one but the newest per submission and variant.

    Base images (`llm-challenge/base-*`) are never stale; nothing outside `llm-challenge/` is looked at.
    """
    newest: dict[tuple[str, str], dict] = {}
    for image in images:
        repo, _, tag = image["ref"].partition(":")
        if not repo.startswith(f"{REPOSITORY}/") or repo.startswith(f"{REPOSITORY}/base-"):
            continue
        key = (repo, tag.rsplit("-", 1)[-1] if tag.endswith(("-offline", "-online")) else "")
        if key not in newest or image["created"] > newest[key]["created"]:
            newest[key] = image
    kept = {i["ref"] for i in newest.values()}
    return [i["ref"] for i in images if i["ref"].split(":")[0] in {k[0] for k in newest} and i["ref"] not in kept]


def prune(docker: Docker) -> list[str]:
    """Remove stale toolkit images and the toolkit's dangling layers; return what was removed."""
    rows = docker.out("images", "--filter", f"reference={REPOSITORY}/*", "--format", "{{.Repository}}:{{.Tag}}\t{{.CreatedAt}}")
    images = [dict(zip(("ref", "created"), line.split("\t", 1))) for line in rows.splitlines() if line.strip()]
    gone = stale(images)
    for ref in gone:
        docker.run("rmi", ref, check=False)
    docker.run("image", "prune", "-f", "--filter", f"label={LABEL}", check=False)
    return gone


def unzip_context(zip_path: Path, dest_root: Path = CONTEXTS) -> Path:
    """Unzip a submission into a fresh folder; return its single top-level folder."""
    with zipfile.ZipFile(zip_path) as zf:
        top = {Path(n).parts[0] for n in zf.namelist()}
        if len(top) != 1:
            raise ValueError(f"{zip_path}: expected one top-level folder, found {sorted(top)}")
        target = dest_root / top.pop()
        if target.exists():
            shutil.rmtree(target)
        zf.extractall(dest_root)
    return target


def prepare(docker: Docker, built: Built, offline: bool, fetch_models: bool) -> tuple[Path, BuildOptions]:
    """Unzip a built submission and choose its build options, online or offline.

    Offline: the local base image and the wheelhouse (both must exist). A Hub
    token in HF_TOKEN becomes a build secret, nothing else.
    """
    context = unzip_context(built.zip_path)
    opts = BuildOptions(
        tag=image_tag(built.spec.name, built.spec_sha256, offline),
        fetch_models=fetch_models,
        token=os.environ.get("HF_TOKEN") or None,
    )
    if offline:
        opts.base_image, opts.wheelhouse = base_image(LOCAL_BASE_KEY).image, WHEELHOUSE
        if not docker.image_exists(opts.base_image):
            raise DockerError(f"the local base image {opts.base_image} is missing: run `make base-image` first")
    return context, opts


def _add_wheelhouse(context: Path, wheelhouse: Path) -> None:
    wheels = sorted(wheelhouse.glob("*.whl"))
    if not wheels:
        raise FileNotFoundError(f"{wheelhouse} holds no wheels: run `make wheelhouse` first")
    dest = context / "wheelhouse"
    dest.mkdir(exist_ok=True)
    for wheel in wheels:
        try:
            os.link(wheel, dest / wheel.name)
        except OSError:
            shutil.copy2(wheel, dest / wheel.name)


def build_image(docker: Docker, context: Path, opts: BuildOptions, capture: bool = False) -> BuiltImage:
    """docker build the context; with `capture` the build's output is kept in BuiltImage.log."""
    if opts.wheelhouse is not None:
        _add_wheelhouse(context, opts.wheelhouse)
    args = ["build", "--progress", "plain", "-t", opts.tag, "--build-arg", f"FETCH_MODELS={int(opts.fetch_models)}"]
    if opts.base_image:
        args += ["--build-arg", f"BASE_IMAGE={opts.base_image}"]
    if opts.no_cache:
        args.append("--no-cache")
    with tempfile.TemporaryDirectory(prefix="secret-") as tmp:
        if opts.token:
            secret = Path(tmp) / SECRET_ID
            secret.touch(mode=0o600)
            secret.write_text(opts.token)
            args += ["--secret", f"id={SECRET_ID},src={secret}"]
        start = time.perf_counter()
        proc = docker.run(*args, str(context), capture=capture)
        seconds = time.perf_counter() - start
    size = int(docker.out("image", "inspect", "--format", "{{.Size}}", opts.tag))
    log = (proc.stdout or b"").decode(errors="replace") + (proc.stderr or b"").decode(errors="replace")
    return BuiltImage(opts.tag, context, seconds, size, log)
