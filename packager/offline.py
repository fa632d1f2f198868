"""What an offline image build needs, made on the host: a local base image and a wheelhouse.

Docker Hub and the Hugging Face Hub are out of reach from air-gapped clusters
(and from CI here). The submission's own Dockerfile still builds, given
- a base image built locally: Debian bookworm from `debootstrap`, imported with
  `docker import`, plus a venv holding torch (docker/base-cpu/Dockerfile);
- a wheelhouse: the lock's wheels, downloaded on the host with pip.

    python -m packager.offline base-image | wheelhouse
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .base_images import base_image
from .docker_cli import Docker, DockerError, find_docker
from .paths import LOCK, REPO

ROOTFS_IMAGE = "llm-challenge/debian-rootfs:bookworm"
LOCAL_BASE_KEY = "local-cpu"
DEBIAN_SUITE = "bookworm"  # python3 3.11, as in the CUDA base image
DEBIAN_MIRROR = "http://deb.debian.org/debian"
WHEELHOUSE = REPO / "build" / "wheelhouse"


def _run(cmd: list[str], **kwargs) -> None:
    print("+ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, **kwargs)


def build_rootfs_image(docker: Docker, mirror: str = DEBIAN_MIRROR) -> str:
    """debootstrap a minimal bookworm with python3 and import it as an image (skipped if present)."""
    if docker.image_exists(ROOTFS_IMAGE):
        return ROOTFS_IMAGE
    if shutil.which("debootstrap") is None:
        raise DockerError("debootstrap is missing: `sudo apt-get install debootstrap`")
    with tempfile.TemporaryDirectory(prefix="rootfs-") as tmp:
        root = Path(tmp) / "root"
        print(f"debootstrap {DEBIAN_SUITE} (minbase + python3) from {mirror}: a few minutes; its own log is quiet", flush=True)
        started = time.perf_counter()
        _run(["debootstrap", "--variant=minbase", "--include=python3,python3-venv,ca-certificates",
              DEBIAN_SUITE, str(root), mirror], stdout=subprocess.DEVNULL)
        print(f"debootstrap done in {time.perf_counter() - started:.0f} s; importing it as {ROOTFS_IMAGE}", flush=True)
        tar = subprocess.Popen(["tar", "-C", str(root), "--numeric-owner", "-c", "."], stdout=subprocess.PIPE)
        imported = subprocess.run([docker.executable, "import", "-", ROOTFS_IMAGE], stdin=tar.stdout,
                                  capture_output=True, env=docker.env)
        tar.wait()
        if tar.returncode or imported.returncode:
            raise DockerError(f"docker import failed: {imported.stderr.decode(errors='replace')}")
    return ROOTFS_IMAGE


def build_local_base(docker: Docker) -> str:
    """The local-cpu base of the table: the rootfs plus a venv with the table's torch."""
    base = base_image(LOCAL_BASE_KEY)
    if docker.image_exists(base.image):
        return base.image
    build_rootfs_image(docker)
    with tempfile.TemporaryDirectory(prefix="base-cpu-") as tmp:
        context = Path(tmp)
        shutil.copy(REPO / "docker" / "base-cpu" / "Dockerfile", context / "Dockerfile")
        print(f"downloading torch=={base.torch} (CPU) for {base.image}", flush=True)
        _run([sys.executable, "-m", "pip", "download", "--progress-bar", "on", "--only-binary=:all:",
              f"torch=={base.torch}", "-d", str(context / "wheels")])
        docker.run("build", "--build-arg", f"ROOTFS_IMAGE={ROOTFS_IMAGE}", "-t", base.image, str(context), capture=False)
    return base.image


def _normalise(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def missing_wheels(lock: Path, dest: Path) -> list[str]:
    """Pins of the lock with no wheel of that name and version in `dest`."""
    have = set()
    for wheel in dest.glob("*.whl"):
        name, version = wheel.name.split("-")[:2]
        have.add((_normalise(name), version))
    pins = [line.split("==") for line in lock.read_text().splitlines() if "==" in line and not line.startswith("#")]
    return [f"{n}=={v}" for n, v in pins if (_normalise(n), v.strip()) not in have]


def build_wheelhouse(lock: Path = LOCK, dest: Path = WHEELHOUSE) -> Path:
    """The locked requirements as wheels; a complete wheelhouse is left as is (no network).

    Published wheels are downloaded; the few pins published only as source
    (GPTQModel and its small helpers, pypcre, a C extension needing gcc and the
    libpcre2 headers) are built here, for this Python, which is the offline
    base image's (Debian bookworm, 3.11).
    """
    dest.mkdir(parents=True, exist_ok=True)
    missing = missing_wheels(lock, dest)
    if not missing:
        return dest
    with tempfile.NamedTemporaryFile("w", suffix=".txt") as pins:
        pins.write("\n".join(missing) + "\n")
        pins.flush()
        _run([sys.executable, "-m", "pip", "wheel", "--progress-bar", "on", "--no-deps", "--prefer-binary", "-r", pins.name, "-w", str(dest)])
    still = missing_wheels(lock, dest)
    if still:
        raise DockerError(f"no wheel for {', '.join(still)} in {dest}: see pip's output above")
    return dest


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("what", choices=["base-image", "wheelhouse"])
    args = p.parse_args(argv)
    try:
        if args.what == "base-image":
            print(build_local_base(find_docker()))
        else:
            print(build_wheelhouse())
    except (DockerError, subprocess.CalledProcessError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
