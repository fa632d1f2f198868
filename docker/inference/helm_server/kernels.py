"""GPTQ kernels compiled when the image is built and loaded when the server starts: no compiler runs at start.

GPTQModel compiles its Marlin kernel with nvcc the first time a model uses it (226 s on a fresh
H200, inside the evaluation's clock and the container's start-period). The image build runs
`python -m helm_server.kernels build DIR` instead: nvcc needs no GPU, only the cards' compute
capabilities (ARCHS). The image names DIR in HELM_SERVER_KERNELS; at start `load` registers the
prebuilt library with torch, after which GPTQModel finds its ops and compiles nothing. A folder
that does not cover the card, the torch or the GPTQModel it runs with is refused (`KernelsMissing`),
never quietly compiled: outside the image (HELM_SERVER_KERNELS unset) GPTQModel compiles as before.

    python -m helm_server.kernels build /opt/gptq-kernels     # the image build (a CUDA base; a CPU base: skipped)
    python -m helm_server.kernels check /opt/gptq-kernels     # what the folder holds
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from importlib import metadata
from pathlib import Path
from unittest import mock

import torch

KERNELS_ENV = "HELM_SERVER_KERNELS"  # the image's folder of prebuilt kernels; unset: GPTQModel compiles at first use
MANIFEST = "kernels.json"
# GPTQModel's extensions the server uses (fp16 models: the fp16 Marlin build), as data: name -> what it runs.
EXTENSIONS = {"marlin_fp16": "GPTQ matmuls of fp16 models (Marlin): 8-bit and 4-bit weights"}
# Compute capabilities compiled for, as data: capability -> the cards it serves.
ARCHS = {"8.9": "RTX 4090 (Ada), the challenge's card", "9.0": "H100 / H200 (Hopper)"}


class KernelsMissing(RuntimeError):
    """The image's prebuilt kernels cannot serve this process; the message names what differs and the fix."""


def versions() -> dict[str, str | None]:
    """What a compiled kernel is bound to: torch's C++ ABI, its CUDA, and GPTQModel's sources."""
    return {"torch": torch.__version__, "cuda": torch.version.cuda, "gptqmodel": metadata.version("gptqmodel")}


def build(folder: Path, archs: list[str]) -> dict:
    """Compile every extension of EXTENSIONS for `archs` into `folder` with its manifest; returns the manifest.
    Written beside the folder, then moved into place: a failed build leaves no folder that looks complete."""
    unknown = [a for a in archs if a not in ARCHS]
    if unknown:
        raise SystemExit(f"--archs {unknown}: not compute capabilities this server is built for; use some of "
                         f"{', '.join(ARCHS)}")
    if folder.exists():
        raise SystemExit(f"{folder} exists: remove it first (a build never mixes with an older one)")
    found = versions()
    if found["cuda"] is None:  # a CPU base (the offline validation image): GPTQModel's torch kernel, nothing to compile
        manifest = {**found, "archs": [], "extensions": {}}
        _write(folder, manifest, {})
        print(f"kernels: torch {found['torch']} has no CUDA: nothing to compile, {folder} records that", flush=True)
        return manifest
    work = folder.with_name(folder.name + ".build")
    shutil.rmtree(work, ignore_errors=True)
    libraries = {}
    from gptqmodel import extension

    for name in EXTENSIONS:
        started = time.perf_counter()
        print(f"kernels: compiling {name} for compute capabilities {', '.join(archs)} (minutes)", flush=True)
        # GPTQModel builds under GPTQMODEL_TORCH_EXTENSIONS_DIR (one folder per extension holds its one library),
        # for the capabilities in TORCH_CUDA_ARCH_LIST, and only where torch sees a GPU; nvcc needs none and
        # `docker build` sees none, so that check answers yes for the build alone.
        env = {"TORCH_CUDA_ARCH_LIST": ";".join(archs), "GPTQMODEL_TORCH_EXTENSIONS_DIR": str(work / name)}
        with mock.patch.dict(os.environ, env), mock.patch.object(torch.cuda, "is_available", lambda: True):
            extension.load(name)
        built = sorted(p for p in (work / name).rglob("*.so") if p.is_file())
        if len(built) != 1:
            raise SystemExit(f"kernels: {name} left {len(built)} libraries under {work / name} ({built}), "
                             "expected one: the folder is kept for a look")
        libraries[name] = built[0]
        print(f"kernels: {name} compiled in {time.perf_counter() - started:.0f} s", flush=True)
    manifest = {**found, "archs": list(archs), "extensions": {name: f"{name}.so" for name in libraries}}
    _write(folder, manifest, libraries)
    shutil.rmtree(work, ignore_errors=True)
    return manifest


def _write(folder: Path, manifest: dict, libraries: dict[str, Path]) -> None:
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    for name, library in libraries.items():
        shutil.copy2(library, partial / manifest["extensions"][name])
    (partial / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    partial.rename(folder)


def read_manifest(folder: Path) -> dict:
    path = folder / MANIFEST
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise KernelsMissing(f"{KERNELS_ENV}={folder} holds no {MANIFEST}: the image build did not compile the GPTQ "
                             "kernels; rebuild the image (`make image-N`)") from None
    except (OSError, ValueError) as e:
        raise KernelsMissing(f"{path} is unreadable ({e}): rebuild the image (`make image-N`)") from None


def check(manifest: dict, folder: Path, capability: tuple[int, int]) -> list[Path]:
    """The libraries to load for a card of `capability`, or KernelsMissing naming what differs."""
    found = versions()
    for key in ("torch", "cuda", "gptqmodel"):
        if manifest.get(key) != found[key]:
            raise KernelsMissing(f"the prebuilt GPTQ kernels in {folder} were compiled for {key} {manifest.get(key)}, "
                                 f"this server runs {found[key]}: rebuild the image (`make image-N`)")
    cap = f"{capability[0]}.{capability[1]}"
    archs = manifest.get("archs", [])
    if cap not in archs:
        raise KernelsMissing(f"this GPU has compute capability {cap}; the image's GPTQ kernels were compiled for "
                             f"{', '.join(archs) or 'none'} ({', '.join(ARCHS[a] for a in archs if a in ARCHS)}): "
                             f"add {cap} to helm_server/kernels.py ARCHS and rebuild the image")
    libraries = [folder / file for file in manifest.get("extensions", {}).values()]
    missing = [str(p) for p in libraries if not p.is_file()]
    if missing or not libraries:
        raise KernelsMissing(f"{folder} lacks {', '.join(missing) or 'every kernel library'}: rebuild the image")
    return libraries


def load(device: torch.device, dtype: torch.dtype | str = torch.float16) -> str | None:
    """At start, before a GPTQ model of `dtype` loads: register the image's prebuilt kernels for this card.
    Returns what was loaded (for the log), None where nothing applies (no folder named, not CUDA)."""
    named = os.environ.get(KERNELS_ENV)
    if not named or device.type != "cuda":
        return None
    if dtype == torch.bfloat16:  # GPTQModel would compile its bf16 Marlin build at the first load
        raise KernelsMissing("the image prebuilds Marlin for float16 models only (helm_server/kernels.py EXTENSIONS): "
                             "serve this GPTQ model with the spec's [artifact] dtype = \"float16\"")
    folder = Path(named)
    libraries = check(read_manifest(folder), folder, torch.cuda.get_device_capability(device))
    for library in libraries:
        torch.ops.load_library(str(library))
    return ", ".join(p.name for p in libraries)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="compile the kernels into a new folder (the image build)")
    b.add_argument("folder", type=Path)
    b.add_argument("--archs", default=",".join(ARCHS), help="compute capabilities, comma-separated (default %(default)s)")
    c = sub.add_parser("check", help="print what a folder holds and whether this process could load it")
    c.add_argument("folder", type=Path)
    args = p.parse_args(argv)
    if args.command == "build":
        build(args.folder, [a.strip() for a in args.archs.split(",") if a.strip()])
        return 0
    try:
        manifest = read_manifest(args.folder)
    except KernelsMissing as e:
        print(e, file=sys.stderr)
        return 2
    print(json.dumps(manifest, indent=2))
    if torch.cuda.is_available():
        try:
            check(manifest, args.folder, torch.cuda.get_device_capability())
        except KernelsMissing as e:
            print(f"not loadable here: {e}", file=sys.stderr)
            return 1
        print("loadable on this GPU")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
