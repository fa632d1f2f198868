"""The Docker command line, found and run.

Images are built with BuildKit (build secrets and bind mounts need it). A
docker client of version 23 or newer builds with BuildKit only through the
buildx plugin; an older client (Debian's docker.io) uses the daemon's own
BuildKit when DOCKER_BUILDKIT=1. `find_docker()` picks a client that can.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path


class DockerError(RuntimeError):
    """Docker is missing, not running, or a docker command failed."""


START_HINT = (
    "start the daemon (`sudo systemctl start docker`, or `sudo dockerd >/tmp/dockerd.log 2>&1 &` "
    "where there is no systemd); install it with `sudo apt-get install docker.io`"
)


@dataclass(frozen=True)
class Docker:
    executable: str

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "DOCKER_BUILDKIT": "1"}

    def run(self, *args: str, check: bool = True, capture: bool = True, timeout: float | None = None,
            input: bytes | None = None) -> subprocess.CompletedProcess:
        proc = subprocess.run(
            [self.executable, *args], env=self.env, capture_output=capture, timeout=timeout, input=input
        )
        if check and proc.returncode != 0:
            err = proc.stderr.decode(errors="replace").strip() if capture else ""
            raise DockerError(f"docker {' '.join(args[:3])} ... failed ({proc.returncode}): {err[-2000:]}")
        return proc

    def out(self, *args: str, timeout: float | None = 120) -> str:
        return self.run(*args, timeout=timeout).stdout.decode().strip()

    def image_exists(self, tag: str) -> bool:
        return self.run("image", "inspect", tag, check=False).returncode == 0


def _candidates() -> list[str]:
    found = []
    if os.environ.get("DOCKER"):
        found.append(os.environ["DOCKER"])
    for folder in os.environ.get("PATH", "").split(os.pathsep):
        path = Path(folder) / "docker"
        if path.is_file() and os.access(path, os.X_OK) and str(path) not in found:
            found.append(str(path))
    return found


def _can_buildkit(executable: str) -> bool:
    def ok(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([executable, *args], capture_output=True, timeout=30)

    if ok("buildx", "version").returncode == 0:
        return True
    version = ok("version", "--format", "{{.Client.Version}}").stdout.decode().strip()
    try:
        return int(version.split(".")[0]) < 23
    except ValueError:
        return False


def find_docker() -> Docker:
    """A docker client that can build with BuildKit, talking to a running daemon."""
    candidates = _candidates()
    if not candidates and shutil.which("docker") is None:
        raise DockerError(f"no docker command found; {START_HINT}")
    usable = [c for c in candidates if _can_buildkit(c)]
    if not usable:
        raise DockerError(
            f"none of {candidates} can build with BuildKit: install the buildx plugin, or Debian's docker.io "
            "(its client uses the daemon's BuildKit), or set DOCKER=/path/to/docker"
        )
    docker = Docker(usable[0])
    info = docker.run("info", "--format", "{{.ServerVersion}}", check=False, timeout=30)
    if info.returncode != 0:
        raise DockerError(f"the Docker daemon is not running ({info.stderr.decode(errors='replace').strip()}); {START_HINT}")
    return docker
