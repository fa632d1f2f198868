"""Each zip rule, on a correctly rendered submission and on a broken copy of it."""

from __future__ import annotations

import pytest

from conftest import REPO
from packager import checks
from packager.render import render
from packager.spec import load_spec

TOP = "submission-1"


@pytest.fixture
def files() -> dict[str, bytes]:
    spec, sha = load_spec(REPO / "submissions" / TOP / "spec.toml")
    return {f"{TOP}/{p}": data for p, data in render(spec, sha).items()}


def dockerfile_with(files, old: str, new: str) -> dict[str, bytes]:
    text = files[f"{TOP}/Dockerfile"].decode()
    assert old in text
    return {**files, f"{TOP}/Dockerfile": text.replace(old, new).encode()}


def test_rendered_submission_passes_every_rule(files):
    assert checks.problems(files) == []


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda f: {**f, f"{TOP}/docker/Dockerfile": b"FROM x:1"}, "exactly one Dockerfile"),
        (lambda f: {k: v for k, v in f.items() if not k.endswith("/Dockerfile")}, "exactly one Dockerfile"),
        (lambda f: {**f, "other/readme.txt": b"hi"}, "one top-level folder"),
        (lambda f: {**f, "loose.txt": b"hi"}, "one top-level folder"),
        (lambda f: {k: v for k, v in f.items() if not k.endswith("/main.py")}, "missing submission-1/main.py"),
        (lambda f: {k: v for k, v in f.items() if not k.endswith("/api.py")}, "helm_server/api.py"),
        (lambda f: {**f, f"{TOP}/requirements.txt": b"fastapi>=0.100\n"}, "not pinned"),
        (lambda f: {**f, f"{TOP}/requirements.txt": b"torch\n"}, "not pinned"),
        (lambda f: {**f, f"{TOP}/helm_server/__pycache__/api.cpython-311.pyc": b"\0"}, "bytecode"),
        (lambda f: {**f, f"{TOP}/stray.pyc": b"\0"}, "bytecode"),
        (lambda f: {**f, f"{TOP}/model.safetensors": b"\0" * 10}, "weights"),
        (lambda f: {**f, f"{TOP}/data.txt": b"x" * (checks.MAX_FILE_BYTES + 1)}, "cap"),
        (lambda f: {**f, f"{TOP}/notes.txt": b"token hf_" + b"a1B2" * 9}, "Hugging Face token"),
        (lambda f: {**f, f"{TOP}/key.pem": b"-----BEGIN RSA PRIVATE KEY-----\n"}, "private key"),
    ],
)
def test_each_rule_catches_its_failure(files, mutate, message):
    found = checks.problems(mutate(files))
    assert any(message in p for p in found), found


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        ("ARG BASE_IMAGE=pytorch/pytorch:2.11.0-cuda13.0-cudnn9-devel", "ARG BASE_IMAGE=pytorch/pytorch", "explicit version tag"),
        ("ARG BASE_IMAGE=pytorch/pytorch:2.11.0-cuda13.0-cudnn9-devel", "ARG BASE_IMAGE=pytorch/pytorch:latest", "explicit version tag"),
        ("ARG BASE_IMAGE=pytorch/pytorch:2.11.0-cuda13.0-cudnn9-devel", "ARG BASE_IMAGE", "no default"),
        ('"--port", "80"]', '"--port", "8080"]', "port 80"),
        ('CMD ["uvicorn", "main:app"', 'CMD ["python", "main.py"', "port 80"),
        ("WORKDIR /submission", "WORKDIR /submission\nENV HUGGING_FACE_HUB_TOKEN=abc", "use a BuildKit secret"),
        ("WORKDIR /submission", "WORKDIR /submission\nARG HF_TOKEN", "use a BuildKit secret"),
    ],
)
def test_dockerfile_rules(files, old, new, message):
    found = checks.problems(dockerfile_with(files, old, new))
    assert any(message in p for p in found), found


def test_digest_pinned_base_image_is_accepted(files):
    pinned = "ARG BASE_IMAGE=pytorch/pytorch@sha256:" + "a" * 64
    assert checks.problems(dockerfile_with(files, "ARG BASE_IMAGE=pytorch/pytorch:2.11.0-cuda13.0-cudnn9-devel", pinned)) == []


def test_check_raises_with_every_problem_listed(files):
    broken = {**files, f"{TOP}/a.pyc": b"", f"{TOP}/requirements.txt": b"numpy\n"}
    with pytest.raises(checks.PackagingError) as err:
        checks.check(broken)
    assert "bytecode" in str(err.value) and "not pinned" in str(err.value)
