"""`make validate-N`: build the submission's image, run it sealed off, drive it with HELM, report.

    python -m packager.validate submission-1 [--offline] [--model DIR] [--adapter DIR]

Steps: budget check -> zip -> unzip -> docker build (its own Dockerfile) ->
run with --network none -> wait for /health -> HELM conformance requests ->
report. The container is removed whatever happens, Ctrl-C included.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import signal
import subprocess
import sys
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from . import budget as budget_mod
from .build import build
from .checks import PackagingError
from .conformance import CheckResult
from .container import Mounts, Running, gpu_available, logs, mount_args, peak_memory_bytes, running, wait_healthy
from .docker_cli import Docker, DockerError, find_docker
from .image import CONTEXTS, build_image, prepare
from .paths import DIST, REPO, SUBMISSIONS
from .tiny_model import stand_in
from .spec import SpecError, spec_path


@dataclass
class Report:
    submission: str
    lines: list[tuple[str, str]] = field(default_factory=list)
    checks: list[CheckResult] = field(default_factory=list)

    def add(self, key: str, value: str) -> None:
        """A fact for the report, printed once, at the end."""
        self.lines.append((key, value))

    @property
    def passed(self) -> bool:
        return bool(self.checks) and all(c.passed for c in self.checks)

    def render(self) -> str:
        out = [f"== validation report: {self.submission} =="]
        out += [f"  {k:<18} {v}" for k, v in self.lines]
        for c in self.checks:
            out.append(f"  {'PASS' if c.passed else 'FAIL'}  {c.name:<42} {c.seconds * 1000:8.0f} ms  {c.detail}")
        out.append(f"== {'PASSED' if self.passed else 'FAILED'} ==")
        return "\n".join(out)


def step(message: str) -> None:
    """What a long step is doing now (stderr; the report repeats none of it)."""
    print(f"[validate] {message}", file=sys.stderr, flush=True)


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def _conformance(c, timeout: float) -> list[CheckResult]:
    cmd = c.in_netns(sys.executable, "-m", "packager.conformance", "http://127.0.0.1:80", "--json")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO)
    results = [CheckResult(**json.loads(line)) for line in proc.stdout.splitlines() if line.startswith("{")]
    if not results:
        raise DockerError(f"the conformance run produced no results: {proc.stderr[-2000:]}")
    return results


@contextmanager
def serving(name: str, offline: bool, model: Path | None, adapter: Path | None, timeout: float, report: Report,
            submissions: Path = SUBMISSIONS, strict: bool = False, dist: Path = DIST, contexts: Path = CONTEXTS,
            tag: str | None = None) -> Iterator[tuple[Docker, Running]]:
    """Build the submission's image, run it sealed off (--network none) and yield it once healthy; always removed.

    Facts about the build and the run go into `report`. `dist`, `contexts` and `tag` put every trace
    elsewhere (tests). Shared by `make validate-N` and `make eval-N`.
    """
    built = build(spec_path(submissions, name), dist, strict)  # spec refusals come before any Docker work
    docker = find_docker()
    spec = built.spec
    if model is None and offline:
        model = stand_in()
    mount_args(Mounts(model=model, adapter=adapter))  # an unreadable mount is refused before any build
    estimate = budget_mod.check(spec, model)
    report.add("gpu budget", estimate.describe())

    context, opts = prepare(docker, built, offline, fetch_models=model is None, contexts=contexts, tag=tag)
    with zipfile.ZipFile(built.zip_path) as zf:
        zipped = zf.read(f"{name}/Dockerfile")
    same = (context / "Dockerfile").read_bytes() == zipped
    report.add("dockerfile", f"{'identical to' if same else 'DIFFERS FROM'} {built.zip_path.name}'s (sha256 {_sha(zipped)})")
    step(f"building {opts.tag} from {context}/Dockerfile")
    image = build_image(docker, context, opts)
    report.add("mode", f"{'offline' if offline else 'online'}; base {opts.base_image or 'from the Dockerfile'}")
    report.add("build time", f"{image.seconds:.1f} s")
    report.add("image", f"{image.tag}, {image.size_bytes / 1e9:.2f} GB")

    gpus = gpu_available()
    mounts = Mounts(model=model, adapter=adapter)
    report.add("model", f"{model} (mounted read-only)" if model else "baked into the image at build time")
    if adapter is not None:
        report.add("adapter", f"{adapter} (mounted read-only, ADAPTER_PATH)")
    elif spec.adapter is not None and model is not None:
        report.add("adapter", f"NONE: the spec's adapter {spec.adapter.repo_id} is not served (a mounted model serves "
                              "without it); pass ADAPTER=dir to validate it")
    report.add("run", f"--network none, --read-only (tmpfs /tmp), non-root{', --gpus all' if gpus else ', CPU only'}")
    step("starting the container (--network none) and waiting for /health")
    with running(docker, image.tag, mounts, gpus) as c:
        try:
            report.add("time to healthy", f"{wait_healthy(docker, c, timeout):.1f} s")
        except DockerError:
            print("---- container logs (tail) ----\n" + logs(docker, c), file=sys.stderr)
            raise
        yield docker, c


def validate(name: str, offline: bool, model: Path | None, adapter: Path | None, timeout: float,
             submissions: Path = SUBMISSIONS, strict: bool = False, dist: Path = DIST, contexts: Path = CONTEXTS,
             tag: str | None = None) -> Report:
    """Build, run, drive and report."""
    report = Report(name)
    with serving(name, offline, model, adapter, timeout, report, submissions, strict, dist, contexts, tag) as (docker, c):
        try:
            step("driving it with HELM's client")
            report.checks = _conformance(c, timeout)
            peak = peak_memory_bytes(docker, c)
            report.add("peak memory", f"{peak / 1e9:.2f} GB (container cgroup)" if peak else "unknown")
        finally:
            if not report.passed:
                print("---- container logs (tail) ----\n" + logs(docker, c), file=sys.stderr)
    return report


def _interrupt(signum, frame):  # SIGTERM behaves as Ctrl-C, so cleanup runs
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("name", help="submission name, e.g. submission-1")
    p.add_argument("--offline", action="store_true", help="local base image + wheelhouse + mounted model")
    p.add_argument("--model", type=Path, help="local model directory to mount (offline default: a tiny stand-in)")
    p.add_argument("--adapter", type=Path, help="local adapter directory to mount")
    p.add_argument("--timeout", type=float, default=1200, help="seconds to wait for /health (default 1200)")
    p.add_argument("--submissions", type=Path, default=SUBMISSIONS, help="folder of <name>/spec.toml")
    p.add_argument("--strict", action="store_true", help="refuse revisions that are not commit hashes")
    args = p.parse_args(argv)
    for given in (args.model, args.adapter):
        if given is not None and not given.is_dir():
            print(f"error: {given} is not a directory", file=sys.stderr)
            return 2
    if args.adapter is not None and args.model is None and not args.offline:
        print("error: --adapter needs --model (or --offline): an adapter mounts beside a mounted model", file=sys.stderr)
        return 2
    for sig in (signal.SIGTERM, signal.SIGHUP):  # TERM and HUP behave as Ctrl-C: the container is removed
        signal.signal(sig, _interrupt)
    try:
        report = validate(args.name, args.offline, args.model, args.adapter, args.timeout, args.submissions, args.strict)
    except (SpecError, PackagingError, DockerError, budget_mod.BudgetError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except subprocess.TimeoutExpired as e:
        print(f"error: timed out: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: the container (if one started) was removed", file=sys.stderr)
        return 130
    print(report.render())
    return 0 if report.passed else 1


if __name__ == "__main__":
    raise SystemExit(main())
