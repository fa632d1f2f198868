"""An unzipped submission, run the way a user runs it, serves a local model through MODEL_PATH.

    cd submission-1 && MODEL_PATH=/path/to/model uvicorn main:app --port 8080
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import zipfile

import pytest
import requests

from conftest import REPO, free_port
from helm_requests import completion, decoding, tokenization
from packager.build import build


@pytest.fixture(scope="module")
def unzipped_server(tmp_path_factory, tiny_model_dir):
    work = tmp_path_factory.mktemp("unzipped")
    built = build(REPO / "submissions" / "submission-1" / "spec.toml", work / "dist")
    with zipfile.ZipFile(built.zip_path) as zf:
        zf.extractall(work / "unzipped")
    folder = work / "unzipped" / "submission-1"
    port = free_port()
    env = {**os.environ, "MODEL_PATH": str(tiny_model_dir), "PYTHONDONTWRITEBYTECODE": "1"}
    env.pop("PYTHONPATH", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "main:app", "--host", "127.0.0.1", "--port", str(port)],
        cwd=folder,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    try:
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"server exited:\n{proc.stdout.read()}")
            try:
                if requests.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError("server never became healthy")
            time.sleep(0.2)
        yield url, folder
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture
def clients(unzipped_server):
    from helm.clients.http_model_client import HTTPModelClient
    from helm.common.cache import BlackHoleCacheConfig
    from helm.tokenizers.http_model_tokenizer import HTTPModelTokenizer

    url, _ = unzipped_server
    return HTTPModelClient(BlackHoleCacheConfig(), base_url=url), HTTPModelTokenizer(BlackHoleCacheConfig(), base_url=url)


def test_health_names_the_submission_and_the_overridden_model(unzipped_server, tiny_model_dir):
    url, _ = unzipped_server
    body = requests.get(f"{url}/health", timeout=5).json()
    assert body == {"status": "ok", "submission": "submission-1", "model": str(tiny_model_dir), "adapter": None}


def test_helm_greedy_echo_stop_truncation_and_decode(clients, tiny_tokenizer):
    client, tokenizer = clients
    prompt = "The capital of France is "

    greedy = client.make_request(completion(prompt, temperature=0.0, max_tokens=8))
    assert greedy.success and greedy.completions[0].text
    text = greedy.completions[0].text

    echo = client.make_request(completion(prompt, echo_prompt=True, max_tokens=0, temperature=0.0))
    assert echo.completions[0].text == prompt
    assert len(echo.completions[0].tokens) == len(tiny_tokenizer(prompt)["input_ids"])

    stop = text[3:6]
    stopped = client.make_request(completion(prompt, temperature=0.0, max_tokens=8, stop_sequences=[stop]))
    assert stopped.completions[0].text == text[: text.index(stop)]

    cut = tokenizer.tokenize(tokenization(prompt * 3, truncation=True, max_length=4))
    assert len(cut.tokens) == 4
    assert tokenizer.decode(decoding([t.value for t in cut.tokens])).text == tiny_tokenizer.decode(
        tiny_tokenizer(prompt)["input_ids"][:4]
    )


def test_the_zips_own_server_code_is_what_runs(unzipped_server):
    # The repository's copy is installed in this venv too; the zip's must take precedence.
    _, folder = unzipped_server
    probe = [sys.executable, "-c", "import helm_server; print(helm_server.__file__)"]
    imported = subprocess.run(probe, cwd=folder, capture_output=True, text=True, check=True).stdout.strip()
    assert imported == str(folder / "helm_server" / "__init__.py")
