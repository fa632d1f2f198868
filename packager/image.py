"""Zip -> image: unzip a built submission and `docker build` its own Dockerfile.

The image is built from the zip's contents, so the Dockerfile that is built
is byte for byte the one that would be submitted. Offline builds add the
wheelhouse to the unzipped context (never to the zip) and pass the local
base image and FETCH_MODELS=0 as build arguments.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
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


def prepare(docker: Docker, built: Built, offline: bool, fetch_models: bool, contexts: Path = CONTEXTS,
            tag: str | None = None) -> tuple[Path, BuildOptions]:
    """Unzip a built submission (under `contexts`) and choose its build options, online or offline.

    Offline: the local base image and the wheelhouse (both must exist). A Hub
    token in HF_TOKEN becomes a build secret, nothing else. `tag` replaces the
    toolkit's own (tests use theirs, so a user's images are never re-tagged).
    """
    context = unzip_context(built.zip_path, contexts)
    opts = BuildOptions(
        tag=tag or image_tag(built.spec.name, built.spec_sha256, offline),
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
        log = run_build(docker, [*args, str(context)], context, quiet=capture)
        seconds = time.perf_counter() - start
    size = int(docker.out("image", "inspect", "--format", "{{.Size}}", opts.tag))
    return BuiltImage(opts.tag, context, seconds, size, log)


# BuildKit's plain progress: a step's header ("#7 [3/8] RUN ...") and its outcome ("#7 CACHED", "#7 DONE 1.2s").
_STEP = re.compile(r"^#\d+ \[[^\]]*\d+/\d+\] ")
_OUTCOME = re.compile(r"^#\d+ (CACHED|DONE \d|ERROR)")
# What a build says when it cannot reach a registry (the base image's, or PyPI's).
_UNREACHABLE = re.compile(r"failed to resolve source metadata|pull access denied|no such host|dial tcp|"
                          r"TLS handshake timeout|i/o timeout|failed to do request|Temporary failure in name resolution|"
                          r"Could not find a version that satisfies", re.I)
TAIL_LINES = 40


def run_build(docker: Docker, args: list[str], context: Path, quiet: bool = False) -> str:
    """Run `docker build`, printing one line per step and outcome (not the steps' own output); the whole
    log goes to <context>.build.log. On failure: the last lines, and OFFLINE=1 when a registry was out of reach."""
    proc = subprocess.Popen([docker.executable, *args], env=docker.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    lines = []
    for raw in proc.stdout:
        line = raw.decode(errors="replace").rstrip()
        lines.append(line)
        if not quiet and (_STEP.match(line) or _OUTCOME.match(line)):
            print(f"  {line[:140]}", flush=True)
    code = proc.wait()
    log = "\n".join(lines) + "\n"
    saved = context.parent / f"{context.name}.build.log"
    saved.write_text(log, encoding="utf-8")
    if code != 0:
        hint = ""
        if _UNREACHABLE.search(log):
            hint = ("\na registry (the base image's or PyPI) could not be reached: build offline with OFFLINE=1 "
                    "(after `make base-image wheelhouse`), or check the network and proxy settings")
        tail = "\n".join(f"    {line}" for line in lines[-TAIL_LINES:])
        raise DockerError(f"docker build of {context} failed ({code}); its last lines (whole log: {saved}):\n{tail}{hint}")
    return log
