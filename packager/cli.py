"""`python -m packager check|build|image|serve|prune|list`: the commands the Makefile runs.

(`python -m packager.validate` is the container validation, `make validate-N`.)
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

from .build import build, validate
from .checks import PackagingError
from .docker_cli import DockerError, find_docker
from .image import CONTEXTS
from .paths import DIST, SUBMISSIONS
from .spec import SPEC_FILE, SpecError, spec_path


def _names(args: argparse.Namespace) -> list[str]:
    if args.names:
        return args.names
    return sorted(p.parent.name for p in Path(args.submissions).glob(f"*/{SPEC_FILE}"))


_UNPINNED: list[tuple[str, list[str]]] = []  # (submission, its references on branches), summarised once


def _warn(name: str, unpinned: list[str]) -> None:
    if unpinned:
        _UNPINNED.append((name, unpinned))


def summarize_warnings() -> None:
    """One line for every unpinned reference of every submission this command touched."""
    if _UNPINNED:
        refs = sum(len(u) for _, u in _UNPINNED)
        each_one = "; ".join(f"{name}: {', '.join(u)}" for name, u in _UNPINNED)
        print(f"warning: {refs} model reference{'s are' if refs > 1 else ' is'} a branch or tag, not a commit, so the "
              f"weights can change under the submission ({each_one}); pin them (STRICT=1 refuses)", file=sys.stderr)
        _UNPINNED.clear()


def each(names: list[str], work) -> None:
    """Run `work` on every name; report every refusal (not just the first), then fail once."""
    failed = []
    for name in names:
        try:
            work(name)
        except (SpecError, PackagingError) as e:
            print(f"error: {e}", file=sys.stderr)
            failed.append(name)
    summarize_warnings()
    if failed:
        raise SpecError(f"{len(failed)} of {len(names)} submission{'s' if len(names) > 1 else ''} refused: {', '.join(failed)}")


def cmd_check(args: argparse.Namespace) -> None:
    def one(name: str) -> None:
        spec, sha, _ = validate(spec_path(Path(args.submissions), name), args.strict)
        _warn(name, spec.unpinned())
        print(f"ok  {name}  spec sha256 {sha[:12]}")
        if spec.training is not None:
            lora = spec.training.lora
            print(f"    LoRA r={lora.r} alpha={lora.alpha} on {lora.resolved()}")

    each(_names(args), one)


def cmd_build(args: argparse.Namespace) -> None:
    def one(name: str) -> None:
        built = build(spec_path(Path(args.submissions), name), Path(args.dist), args.strict)
        _warn(name, built.spec.unpinned())
        print(f"built {built.zip_path}  (build context: {built.context_dir})")

    each(_names(args), one)


def _built(args: argparse.Namespace, name: str):
    built = build(spec_path(Path(args.submissions), name), Path(args.dist), args.strict)
    _warn(name, built.spec.unpinned())
    summarize_warnings()
    return built


def cmd_image(args: argparse.Namespace) -> None:
    from .image import build_image, prepare

    docker = find_docker()
    for name in _names(args):
        context, opts = prepare(docker, _built(args, name), args.offline, fetch_models=not args.offline,
                                contexts=Path(args.contexts), tag=args.tag)
        image = build_image(docker, context, opts)
        print(f"built image {image.tag} ({image.size_bytes / 1e9:.2f} GB) in {image.seconds:.1f} s from {context}/Dockerfile")


def serve_mounts(offline: bool, model: str | None, adapter: str | None, stand_in_dir: Path | None = None):
    """What `serve` mounts: as `validate`, an offline image without MODEL serves the tiny stand-in."""
    from .container import Mounts
    from .tiny_model import stand_in

    if offline and model is None:
        folder = stand_in(stand_in_dir)
        print(f"OFFLINE=1 without MODEL: serving the tiny stand-in model ({folder})", file=sys.stderr)
        return Mounts(model=folder, adapter=Path(adapter) if adapter else None)
    return Mounts(model=Path(model) if model else None, adapter=Path(adapter) if adapter else None)


def cmd_serve(args: argparse.Namespace) -> None:
    """Run the image in the foreground on a host port, as the organizers run it."""
    from .container import gpu_available, mount_args
    from .image import build_image, prepare

    if len(args.names) != 1:
        raise SpecError("serve takes exactly one submission name")
    for flag, value in (("--model", args.model), ("--adapter", args.adapter)):
        if value is not None and not Path(value).is_dir():
            raise SpecError(f"{flag} {value} is not a directory")
    if args.adapter is not None and args.model is None:
        raise SpecError("--adapter needs --model: a local adapter mounts beside a local model (MODEL=dir ADAPTER=dir)")
    built = _built(args, args.names[0])  # spec refusals before any Docker work
    mounts = serve_mounts(args.offline, args.model, args.adapter)
    docker = find_docker()
    context, opts = prepare(docker, built, args.offline, fetch_models=not args.offline,
                            contexts=Path(args.contexts), tag=args.tag)
    image = build_image(docker, context, opts)
    name = f"llm-challenge-serve-{built.spec.name}-{os.getpid()}"
    run = ["run", "-d", "--name", name, "-p", f"127.0.0.1:{args.port}:80"]
    if gpu_available():
        run += ["--gpus", "all"]
    docker.run(*run, *mount_args(mounts), image.tag)
    print(f"serving {image.tag} on http://127.0.0.1:{args.port} as {name} (Ctrl-C stops and removes it)", flush=True)
    follow_until_stopped(docker, name)


def follow_until_stopped(docker, name: str) -> None:
    """Stream the container's log until it exits or this process is stopped (INT, TERM, HUP); remove it either way."""

    def stop(signum, frame):
        raise KeyboardInterrupt

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, stop)
    why = "exited"
    try:
        docker.run("logs", "-f", name, check=False, capture=False)
    except KeyboardInterrupt:
        why = "stopped"
    finally:
        for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
            signal.signal(sig, signal.SIG_IGN)  # a second Ctrl-C must not interrupt the removal
        docker.run("rm", "-f", name, check=False)
        print(f"{why}: container {name} removed", file=sys.stderr, flush=True)


def cmd_prune(args: argparse.Namespace) -> None:
    from .image import prune

    gone = prune(find_docker())
    print("\n".join(f"removed {ref}" for ref in gone) or "no stale images", flush=True)


def cmd_list(args: argparse.Namespace) -> None:
    for name in _names(args):
        print(name)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m packager", description="submission specs -> challenge zips")
    p.add_argument("--submissions", default=str(SUBMISSIONS), help="folder of <name>/spec.toml (default: %(default)s)")
    sub = p.add_subparsers(dest="command", required=True)
    for name, func, text in [
        ("check", cmd_check, "check specs (every one, every problem); warn on unpinned revisions"),
        ("build", cmd_build, "render, check and zip specs into dist/"),
        ("image", cmd_image, "build the Docker image of each zip, from the zip's own Dockerfile"),
        ("serve", cmd_serve, "build and run one submission's container in the foreground"),
        ("list", cmd_list, "list the submissions"),
        ("prune", cmd_prune, "remove the toolkit's stale images: all but the newest per submission and variant"),
    ]:
        c = sub.add_parser(name, help=text)
        c.add_argument("names", nargs="*", help="submission names (default: all)")
        c.add_argument("--strict", action="store_true", help="refuse revisions that are not commit hashes")
        c.add_argument("--dist", default=str(DIST), help="output folder (default: %(default)s)")
        if name in ("image", "serve"):
            c.add_argument("--offline", action="store_true", help="local base image and wheelhouse; no weights")
            c.add_argument("--tag", help="image tag (default llm-challenge/NAME:SPECSHA-online|offline)")
            c.add_argument("--contexts", default=str(CONTEXTS), help="where zips are unzipped to build (default %(default)s)")
        if name == "serve":
            c.add_argument("--model", help="local model directory to mount read-only")
            c.add_argument("--adapter", help="local adapter directory to mount read-only (with --model)")
            c.add_argument("--port", type=int, default=8080, help="host port on 127.0.0.1 (default %(default)s)")
        c.set_defaults(func=func)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        args.func(args)
    except (SpecError, PackagingError, DockerError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0
