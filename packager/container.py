"""Image -> running container: start it sealed off, wait for health, always remove it.

The container runs with `--network none` and the model mounted read-only,
which proves nothing is fetched at run time. The host reaches the server by
entering the container's network namespace (nsenter, as root) and talking to
its loopback: no port is published, no other address is used.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from .docker_cli import Docker, DockerError

MODELS_DIR = "/models"


@dataclass
class Mounts:
    model: Path | None = None  # mounted at /models/artifact (read-only)
    adapter: Path | None = None  # mounted at /models/adapter; None with a model mount serves no adapter


@dataclass
class Running:
    id: str
    name: str
    pid: int

    def in_netns(self, *cmd: str) -> list[str]:
        """A host command run inside the container's network namespace."""
        return ["nsenter", "-t", str(self.pid), "-n", *cmd]


def gpu_available() -> bool:
    return shutil.which("nvidia-smi") is not None and subprocess.run(["nvidia-smi", "-L"], capture_output=True).returncode == 0


# Validation runs the container as hardened as anyone might: root filesystem read-only, a tmpfs
# at /tmp (executable: compiled kernels load from there) for everything the server writes.
READ_ONLY = ["--read-only", "--tmpfs", "/tmp:rw,exec,nosuid,size=4g"]


def run_args(image: str, name: str, mounts: Mounts, gpus: bool) -> list[str]:
    args = ["run", "-d", "--name", name, "--network", "none", "--health-interval", "2s", "--health-start-period", "1200s",
            *READ_ONLY]
    if gpus:
        args += ["--gpus", "all"]
    return [*args, *mount_args(mounts), image]


def unreadable(folder: Path) -> list[Path]:
    """What the server's unprivileged user could not read in a mounted folder (dirs need a+rx, files a+r)."""
    found = []
    for path in [folder, *folder.rglob("*")]:
        need = stat.S_IROTH | (stat.S_IXOTH if path.is_dir() else 0)
        if path.stat().st_mode & need != need:
            found.append(path)
    return found


def mount_args(mounts: Mounts) -> list[str]:
    """Read-only weight mounts; a mounted model without an adapter serves no adapter (the image's would not match).

    The server runs as an unprivileged user: a folder it cannot read is refused here, with the fix."""
    if mounts.model is None:
        return []
    for folder in (mounts.model, mounts.adapter):
        bad = unreadable(folder) if folder is not None else []
        if bad:
            raise DockerError(f"{folder}: {len(bad)} entries (first {bad[0]}) are not readable by the container's "
                              f"unprivileged user; make them readable: chmod -R a+rX {folder}")
    args = ["-v", f"{mounts.model.resolve()}:{MODELS_DIR}/artifact:ro"]
    if mounts.adapter is not None:
        return [*args, "-v", f"{mounts.adapter.resolve()}:{MODELS_DIR}/adapter:ro"]
    return [*args, "-e", "ADAPTER_PATH=none"]


@contextmanager
def running(docker: Docker, image: str, mounts: Mounts, gpus: bool) -> Iterator[Running]:
    """Start the container; remove it on exit, on failure and on Ctrl-C alike."""
    if os.geteuid() != 0 or shutil.which("nsenter") is None:
        raise DockerError("reaching a --network none container needs root and nsenter (util-linux): run as root")
    name = f"llmc-validate-{uuid.uuid4().hex[:8]}"
    try:
        cid = docker.out(*run_args(image, name, mounts, gpus))
        pid = int(docker.out("inspect", "--format", "{{.State.Pid}}", cid))
        yield Running(cid, name, pid)
    finally:
        docker.run("rm", "-f", name, check=False)


def wait_healthy(docker: Docker, c: Running, timeout: float) -> float:
    """Seconds until the image's own HEALTHCHECK reports healthy."""
    start = time.perf_counter()
    while True:
        state = docker.out("inspect", "--format", "{{.State.Status}} {{if .State.Health}}{{.State.Health.Status}}{{end}}", c.id)
        if state == "running healthy":
            return time.perf_counter() - start
        if not state.startswith(("running", "created")):
            raise DockerError(f"the container stopped while starting (state: {state})")
        if time.perf_counter() - start > timeout:
            raise DockerError(f"not healthy after {timeout:.0f} s (state: {state})")
        time.sleep(0.5)


def peak_memory_bytes(docker: Docker, c: Running) -> int | None:
    """Peak memory of the container's cgroup (v2 memory.peak, else v1 max_usage_in_bytes)."""
    for path in ("/sys/fs/cgroup/memory.peak", "/sys/fs/cgroup/memory/memory.max_usage_in_bytes"):
        proc = docker.run("exec", c.id, "cat", path, check=False)
        if proc.returncode == 0 and proc.stdout.strip().isdigit():
            return int(proc.stdout)
    return None


def logs(docker: Docker, c: Running, tail: int = 200) -> str:
    proc = docker.run("logs", "--tail", str(tail), c.id, check=False)
    return (proc.stdout + proc.stderr).decode(errors="replace")
