"""`make eval-N`: HELM's real runner (helm-run, helm-summarize from .venv-helm) against a live server.

The runs need `.venv-helm/` (`make helm-venv`); without it they skip, unless REQUIRE_HELM=1 (CI),
which turns the skip into a failure. The server is the toolkit's own, in process, on the tiny
model; the container path is `make eval-1 OFFLINE=1` in .ci/run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, make_config, serving
from evaluation.budget import BUDGET_S, project
from evaluation.conf import CHALLENGE_SAMPLE, OFFLINE, ConfError, RunEntry, read_conf
from evaluation.results import ScenarioRow

HELM_RUN = REPO / ".venv-helm" / "bin" / "helm-run"


@pytest.fixture(scope="module")
def helm_venv() -> Path:
    if not HELM_RUN.is_file():
        if os.environ.get("REQUIRE_HELM") == "1":
            pytest.fail(f"{HELM_RUN} is missing and REQUIRE_HELM=1: run `make helm-venv`")
        pytest.skip("no .venv-helm/ (make helm-venv)")
    return HELM_RUN


def evaluate(url: str, out: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "evaluation", "submission-1", "--offline", "--url", url, "--out", str(out), *extra]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)


def breaking(app, path: str, when: bytes):
    """The app, except that `path` answers 500 for request bodies containing `when` (a pure ASGI wrapper)."""

    async def wrapped(scope, receive, send):
        if scope["type"] != "http" or scope["path"] != path:
            return await app(scope, receive, send)
        chunks, more = [], True
        while more:
            message = await receive()
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        body = b"".join(chunks)
        if when in body:
            await send({"type": "http.response.start", "status": 500, "headers": [(b"content-type", b"text/plain")]})
            return await send({"type": "http.response.body", "body": b"broken on purpose"})
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        return await app(scope, replay, send)

    return wrapped


# --- the conf, as data --------------------------------------------------------------------------


def test_the_challenge_conf_is_the_published_file_and_reads_as_88_runs():
    import hashlib

    entries = read_conf(CHALLENGE_SAMPLE)
    assert hashlib.sha256(CHALLENGE_SAMPLE.read_bytes()).hexdigest().startswith("57be1226a89b4ebb")
    assert len(entries) == 88
    assert {e.scenario for e in entries} == {"big_bench", "mmlu", "truthful_qa", "summarization_cnndm", "gsm", "bbq"}
    # instances x perturbed copies (MMLU canonical: 5) x shot settings (BIG-bench: 4)
    assert sum(e.requests(default_instances=1) for e in entries) == 2451


def test_a_conf_without_entries_or_without_the_local_model_is_refused(tmp_path):
    empty = tmp_path / "empty.conf"
    empty.write_text("entries: []\n")
    with pytest.raises(ConfError, match="no run entries"):
        read_conf(empty)
    other = tmp_path / "other.conf"
    other.write_text('entries: [{description: "mmlu:model=openai/gpt2,subject=anatomy", priority: 1}]\n')
    with pytest.raises(ConfError, match="model=neurips/local"):
        read_conf(other)
    with pytest.raises(ConfError, match="CONF="):
        read_conf(tmp_path / "missing.conf")


def test_the_budget_projection_uses_each_scenarios_measured_time_else_the_mean():
    rows = [ScenarioRow("mmlu", "exact_match", 0.5, 1, 10, 10, 0, 1000, 10, 5.0),
            ScenarioRow("simple_mcqa", "exact_match", 0.2, 1, 10, 10, 0, 1000, 10, 15.0)]
    p = project(rows, read_conf(CHALLENGE_SAMPLE))
    by = {line.scenario: line for line in p.lines}
    assert by["mmlu"].measured and by["mmlu"].per_request_s == pytest.approx(0.5)
    assert not by["gsm"].measured and by["gsm"].per_request_s == pytest.approx(1.0)  # 20 s / 20 requests
    assert p.seconds == pytest.approx(1080 * 0.5 + (2451 - 1080) * 1.0)
    assert ("OVER" in p.render()) == (p.seconds > BUDGET_S)


@pytest.mark.parametrize("args, message", [
    (["--max-eval-instances", "0"], "MAX_EVAL_INSTANCES=0"),
    (["--suite", "../x"], "SUITE="),
    (["--conf", "nope.conf"], "CONF=nope.conf"),
])
def test_bad_switches_are_refused_before_anything_runs(tmp_path, args, message):
    done = evaluate("http://127.0.0.1:9", tmp_path, *args)
    assert done.returncode == 2 and message in done.stderr
    assert not any(tmp_path.iterdir())


# --- HELM itself --------------------------------------------------------------------------------


def test_eval_runs_helm_and_reports_every_scenario(helm_venv, tiny_model_dir, tmp_path):
    from helm_server.app import create_app

    with serving(create_app(make_config(tiny_model_dir, context_length=2048))) as url:
        done = evaluate(url, tmp_path, "--max-eval-instances", "4", "--suite", "t1")
    assert done.returncode == 0, done.stdout + done.stderr
    suite = tmp_path / "submission-1" / "t1"
    report = json.loads((suite / "report.json").read_text())
    assert {r["scenario"] for r in report["runs"]} == {"simple_mcqa", "simple_classification"}
    assert all(r["requests"] == 4 and r["failed_requests"] == 0 and r["prompt_tokens"] > 0 for r in report["runs"])
    assert (suite / "runs" / "t1" / "summary.json").is_file()  # helm-summarize ran
    for scenario in ("simple_mcqa", "simple_classification"):
        assert scenario in done.stdout
    assert "projected challenge sample evaluation (2451 requests)" in done.stdout and "== PASSED ==" in done.stdout
    assert not [p for p in suite.parent.iterdir() if p.name.startswith(".")]  # no partial folder left

    # make eval-compare: the same eval twice, side by side
    compare = subprocess.run([sys.executable, "-m", "evaluation.compare", str(suite), str(suite)], cwd=REPO,
                             capture_output=True, text=True)
    assert compare.returncode == 0 and "simple_mcqa" in compare.stdout and "1.00x" in compare.stdout


def test_an_interrupted_eval_writes_nothing_and_a_rerun_replaces_the_suite(helm_venv, tiny_model_dir, tmp_path):
    import signal
    import time

    from helm_server.app import create_app

    slow = breaking(create_app(make_config(tiny_model_dir, context_length=2048)), "/process", b"Parity:")
    with serving(slow) as url:  # simple_classification's requests fail and HELM backs off: time to interrupt
        cmd = [sys.executable, "-m", "evaluation", "submission-1", "--offline", "--url", url, "--out", str(tmp_path),
               "--max-eval-instances", "1"]
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for line in proc.stderr:
            if "run 2/2" in line:
                break
        time.sleep(1)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "nothing was written" in err
    assert not list((tmp_path / "submission-1").iterdir())  # no suite, no partial folder

    from helm_server.app import create_app as fresh

    with serving(fresh(make_config(tiny_model_dir, context_length=2048))) as url:
        for _ in range(2):
            assert evaluate(url, tmp_path, "--max-eval-instances", "1").returncode == 0
    assert [p.name for p in (tmp_path / "submission-1").iterdir()] == ["offline"]


def test_a_server_failing_one_scenario_fails_the_eval_naming_it(helm_venv, tiny_model_dir, tmp_path):
    """A 500 on /process for simple_classification's prompts only: that run fails, named; the other passes."""
    from helm_server.app import create_app

    app = breaking(create_app(make_config(tiny_model_dir, context_length=2048)), "/process", b"Parity:")
    with serving(app) as url:
        done = evaluate(url, tmp_path, "--max-eval-instances", "2")
    assert done.returncode == 1, done.stdout + done.stderr
    verdict = done.stdout.strip().splitlines()[-1]
    assert verdict.startswith("== FAILED") and "simple_classification" in verdict and "simple_mcqa" not in verdict
    report = json.loads((tmp_path / "submission-1" / "offline" / "report.json").read_text())
    assert report["failed_runs"] == ["simple_classification:model=neurips_local"]
    assert [r["scenario"] for r in report["runs"]] == ["simple_mcqa"]


def test_a_server_breaking_tokenize_fails_the_eval_though_helm_carries_on(helm_venv, tiny_model_dir, tmp_path):
    """HELM tokenizes completions for its statistics through /tokenize: when that keeps failing it logs, gives up
    and finishes the run with wrong token counts (exit 0). The eval reads its log and fails, naming the run."""
    from helm_server.app import create_app

    conf = tmp_path / "one.conf"
    conf.write_text('entries: [{description: "simple_mcqa:model=neurips/local", priority: 1}]\n')
    app = breaking(create_app(make_config(tiny_model_dir, context_length=2048)), "/tokenize", b"")
    with serving(app) as url:
        done = evaluate(url, tmp_path / "out", "--max-eval-instances", "1", "--conf", str(conf))
    assert done.returncode == 1, done.stdout + done.stderr
    verdict = done.stdout.strip().splitlines()[-1]
    assert "gave up on" in verdict and "simple_mcqa" in verdict
    report = json.loads((tmp_path / "out" / "submission-1" / "offline" / "report.json").read_text())
    assert report["helm_run_exit"] == 0 and report["abandoned_calls"]


def test_the_offline_conf_needs_no_download():
    """Only HELM scenarios that generate their data locally (verified with crfm-helm 0.5.16)."""
    assert {e.scenario for e in read_conf(OFFLINE)} == {"simple_mcqa", "simple_classification"}
    assert RunEntry("simple_mcqa:model=neurips/local", 1).requests(default_instances=10) == 10
