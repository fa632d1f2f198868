"""The rules every submission zip must pass before it is written.

Each rule looks at the zip's entries ({path inside the zip: bytes}) and
returns problems phrased as what is wrong and how to fix it. They encode
what went wrong by hand before: the challenge's bot builds the first
Dockerfile it finds, stray `__pycache__` got zipped, requirements were
unpinned, and a Hub token was written into a Dockerfile.
"""

from __future__ import annotations

import json
import re
from pathlib import PurePosixPath
from typing import Callable

Files = dict[str, bytes]
Rule = Callable[[Files], list[str]]

MAX_FILE_BYTES = 1 << 20  # source, configs and lock only: anything bigger is not code
MAX_TOTAL_BYTES = 4 << 20
WEIGHT_SUFFIXES = {".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".onnx", ".h5", ".msgpack", ".npz", ".npy"}

_SECRET_PATTERNS = [
    (re.compile(rb"\bhf_[A-Za-z0-9]{30,}\b"), "a Hugging Face token (hf_...)"),
    (re.compile(rb"\b(?:ghp|gho|ghs|github_pat)_[A-Za-z0-9_]{20,}\b"), "a GitHub token"),
    (re.compile(rb"\bAKIA[0-9A-Z]{16}\b"), "an AWS access key"),
    (re.compile(rb"-----BEGIN [A-Z ]*PRIVATE KEY-----"), "a private key"),
]
_TOKEN_VARIABLE = re.compile(r"^\s*(ARG|ENV)\s+[^\n]*\b\w*(TOKEN|SECRET|PASSWORD|API_KEY)\w*\b", re.I | re.M)
_REQUIREMENT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(\[[A-Za-z0-9,._-]+\])?==[A-Za-z0-9.+!_-]+$")


class PackagingError(Exception):
    """The rendered submission breaks a zip rule; nothing was written."""


def _top(files: Files) -> str | None:
    tops = {PurePosixPath(p).parts[0] for p in files}
    return tops.pop() if len(tops) == 1 else None


def one_top_level_folder(files: Files) -> list[str]:
    tops = sorted({PurePosixPath(p).parts[0] for p in files})
    loose = [p for p in files if len(PurePosixPath(p).parts) == 1]
    if len(tops) != 1 or loose:
        return [f"the zip must hold exactly one top-level folder, found {tops}"]
    return []


def exactly_one_dockerfile(files: Files) -> list[str]:
    found = [p for p in files if PurePosixPath(p).name.lower() == "dockerfile"]
    if len(found) != 1:
        return [f"exactly one Dockerfile is allowed (the challenge bot builds the first it finds), found {found or 'none'}"]
    if len(PurePosixPath(found[0]).parts) != 2:
        return [f"the Dockerfile must sit directly in the top-level folder, found {found[0]}"]
    return []


def server_files_present(files: Files) -> list[str]:
    top = _top(files)
    if top is None:
        return []
    needed = ["main.py", "helm_server/api.py", "serve_config.json", "requirements.txt", "MANIFEST.json"]
    return [f"missing {top}/{n}: the packager renders it into every submission" for n in needed if f"{top}/{n}" not in files]


def requirements_pinned(files: Files) -> list[str]:
    problems = []
    for path, data in files.items():
        if not PurePosixPath(path).name.startswith("requirements") or not path.endswith(".txt"):
            continue
        for n, line in enumerate(data.decode("utf-8", "replace").splitlines(), 1):
            line = line.split("#", 1)[0].strip()
            if line and not _REQUIREMENT.match(line):
                problems.append(f"{path}:{n}: {line!r} is not pinned as name==version; regenerate the lock (make lock)")
    return problems


def _dockerfile(files: Files) -> tuple[str, str] | None:
    for path, data in files.items():
        if PurePosixPath(path).name.lower() == "dockerfile":
            return path, data.decode("utf-8", "replace")
    return None


def _arg_defaults(text: str) -> dict[str, str]:
    return dict(re.findall(r"^\s*ARG\s+(\w+)=(\S+)", text, re.M))


def base_image_tagged(files: Files) -> list[str]:
    found = _dockerfile(files)
    if found is None:
        return []
    path, text = found
    args = _arg_defaults(text)
    problems = []
    for ref in re.findall(r"^\s*FROM\s+(\S+)", text, re.M):
        image = re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m.group(1), m.group(0)), ref)
        name = image.rsplit("/", 1)[-1]
        if "$" in image:
            problems.append(f"{path}: FROM {ref} has no default; give the ARG a default image with an explicit tag")
        elif "@sha256:" not in image and (":" not in name or name.endswith(":latest")):
            problems.append(f"{path}: base image {image} needs an explicit version tag (not latest)")
    if not problems and not re.search(r"^\s*FROM\s", text, re.M):
        problems.append(f"{path}: no FROM line")
    return problems


def cmd_runs_uvicorn_on_80(files: Files) -> list[str]:
    found = _dockerfile(files)
    if found is None:
        return []
    path, text = found
    cmds = re.findall(r"^\s*CMD\s+(\[.*\])\s*$", text, re.M)
    try:
        argv = json.loads(cmds[-1]) if cmds else []
    except json.JSONDecodeError:
        argv = []
    ok = bool(argv) and argv[0] == "uvicorn" and "--port" in argv and argv[argv.index("--port") + 1 :][:1] == ["80"]
    if not ok:
        return [f"{path}: the last CMD must be exec-form uvicorn with --port 80 (the challenge talks to port 80)"]
    return []


def no_bytecode(files: Files) -> list[str]:
    bad = [p for p in files if "__pycache__" in PurePosixPath(p).parts or p.endswith((".pyc", ".pyo"))]
    return [f"{p}: compiled bytecode does not belong in a submission" for p in bad]


def no_weights_or_large_files(files: Files) -> list[str]:
    problems = []
    for path, data in files.items():
        if PurePosixPath(path).suffix.lower() in WEIGHT_SUFFIXES:
            problems.append(f"{path}: weights are fetched at image build time, never zipped")
        elif len(data) > MAX_FILE_BYTES:
            problems.append(f"{path}: {len(data)} bytes exceeds the {MAX_FILE_BYTES}-byte cap for a source file")
    total = sum(len(d) for d in files.values())
    if total > MAX_TOTAL_BYTES:
        problems.append(f"the zip's files total {total} bytes, over the {MAX_TOTAL_BYTES}-byte cap")
    return problems


def no_secrets(files: Files) -> list[str]:
    problems = []
    for path, data in files.items():
        for pattern, what in _SECRET_PATTERNS:
            if pattern.search(data):
                problems.append(f"{path}: contains {what}; pass secrets at build or run time, never in a file")
    found = _dockerfile(files)
    if found is not None:
        path, text = found
        for m in _TOKEN_VARIABLE.finditer(text):
            problems.append(
                f"{path}: `{m.group(0).strip()}` puts a secret in an ARG/ENV (kept in the image's history); "
                "use a BuildKit secret: RUN --mount=type=secret,id=hf_token"
            )
    return problems


# Rules for every zip the toolkit writes (submissions and training bundles alike).
COMMON_RULES: list[Rule] = [
    one_top_level_folder,
    exactly_one_dockerfile,
    requirements_pinned,
    base_image_tagged,
    no_bytecode,
    no_weights_or_large_files,
    no_secrets,
]
# A submission is also a server the challenge talks to.
RULES: list[Rule] = COMMON_RULES[:2] + [server_files_present] + COMMON_RULES[2:4] + [cmd_runs_uvicorn_on_80] + COMMON_RULES[4:]


def problems(files: Files, rules: list[Rule] = RULES) -> list[str]:
    return [p for rule in rules for p in rule(files)]


def check(files: Files, rules: list[Rule] = RULES, what: str = "the submission") -> None:
    found = problems(files, rules)
    if found:
        raise PackagingError(f"{what} breaks the zip rules:\n" + "\n".join(f"  - {p}" for p in found))
