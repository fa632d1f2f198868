"""Shared fixtures: a tiny Qwen-shaped model on disk, a live server on loopback, HELM's clients."""

from __future__ import annotations

import contextlib
import ctypes
import gc
import os
import socket
import threading
import time
from pathlib import Path
from typing import Iterator

import pytest

from packager.tiny_model import QWEN_EOS_ID, save_tiny_model

REPO = Path(__file__).resolve().parent.parent
# The suite runs on the CPU; TEST_DEVICE=cuda runs the server tests on a GPU machine.
TEST_DEVICE = os.environ.get("TEST_DEVICE", "cpu")


def rss_mib() -> float:
    """This process's resident memory after a collection, with glibc's free arena memory handed back
    (`malloc_trim`): each request thread gets an arena, and what those keep free is allocator noise, not a leak."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: RSS as it stands
        pass
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serving(app, timeout: float = 60.0) -> Iterator[str]:
    """Run an ASGI app with uvicorn in a thread on loopback; yield its base URL."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("server did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny-qwen"))


@pytest.fixture(scope="session")
def rater_gptq(tmp_path_factory) -> Path:
    """The tiny rater (tests/tiny_world.py), trained and quantized once for the suite: the Humpback stage's base.
    Tests copy it into their own world (`copy_rater`), so none can change another's."""
    from tiny_world import save_rater_gptq

    return save_rater_gptq(tmp_path_factory.mktemp("rater") / "rater-gptq")


def copy_rater(rater: Path, dst: Path) -> Path:
    import shutil

    return Path(shutil.copytree(rater, dst))


@pytest.fixture(scope="session")
def tiny_model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype="float32").eval()


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def make_config(model_dir: Path, server: dict | None = None, **generation):
    from helm_server.settings import ServeConfig

    gen = {"eos_token_ids": [QWEN_EOS_ID], "context_length": 256, "min_new_tokens": 0, **generation}
    return ServeConfig.model_validate({"submission": "test", "model": {"repo_id": str(model_dir)}, "generation": gen,
                                       "server": {"device": TEST_DEVICE, **(server or {})}})


# Every server test runs against each decode engine (on the CPU the static engine runs its padded
# shapes eagerly; on CUDA, TEST_DEVICE=cuda, as CUDA graphs).
ENGINES = ("hf", "static")


# Each engine one request at a time (the default) and batched (`[server] max_batch`, continuous batching).
SERVERS = [(engine, batch) for batch in (1, 4) for engine in ENGINES]


@pytest.fixture(scope="module", params=SERVERS, ids=[f"{e}-batch{b}" for e, b in SERVERS])
def every_server_url(request, tiny_model_dir) -> Iterator[str]:
    """A server per engine and batch setting: modules that check every one name it `base_url` (see their top)."""
    from helm_server.app import create_app

    engine, batch = request.param
    with serving(create_app(make_config(tiny_model_dir, server={"engine": engine, "max_batch": batch}))) as url:
        yield url


@pytest.fixture(scope="session", params=ENGINES)
def base_url(request, tiny_model_dir) -> Iterator[str]:
    from helm_server.app import create_app

    with serving(create_app(make_config(tiny_model_dir, server={"engine": request.param}))) as url:
        yield url


@pytest.fixture(autouse=True)
def _no_helm_url_override(monkeypatch):
    # HELM's clients prefer this variable over base_url; a stray one would test another server.
    monkeypatch.delenv("HELM_HTTP_MODEL_BASE_URL", raising=False)


@pytest.fixture
def helm_client(base_url):
    from helm.clients.http_model_client import HTTPModelClient
    from helm.common.cache import BlackHoleCacheConfig

    return HTTPModelClient(cache_config=BlackHoleCacheConfig(), base_url=base_url)


@pytest.fixture
def helm_tokenizer(base_url):
    from helm.common.cache import BlackHoleCacheConfig
    from helm.tokenizers.http_model_tokenizer import HTTPModelTokenizer

    return HTTPModelTokenizer(cache_config=BlackHoleCacheConfig(), base_url=base_url)


# --- the suite leaves the user's working tree and images as it found them ----------------


def _tree(root: Path) -> dict[str, float]:
    return {str(p.relative_to(REPO)): p.stat().st_mtime for p in root.rglob("*")} if root.is_dir() else {}


def _toolkit_images() -> set[str] | None:
    import subprocess

    try:
        done = subprocess.run(["docker", "images", "--no-trunc", "--filter", "reference=llm-challenge/*",
                               "--format", "{{.Repository}}:{{.Tag}} {{.ID}}"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return set(done.stdout.split("\n")) if done.returncode == 0 else None


@pytest.fixture(scope="session", autouse=True)
def _no_side_effects():
    """Tests work in temporary folders and under their own image names: dist/, build/ and the
    user's `llm-challenge/*` images are the same after the suite as before it."""
    before = {**_tree(REPO / "dist"), **_tree(REPO / "build")}
    images = _toolkit_images()
    yield
    after = {**_tree(REPO / "dist"), **_tree(REPO / "build")}
    changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
    assert not changed, f"the tests changed the working tree: {changed[:10]}"
    if images is not None:
        now = _toolkit_images()
        assert now is None or now == images, f"the tests changed the user's images: {sorted(now ^ images)[:10]}"
