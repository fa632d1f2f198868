"""`make helm-mix URL=...`: HELM's request mix (the challenge's sample conf, synthetic prompts) against a server."""

from __future__ import annotations

import subprocess
import sys

from conftest import REPO, make_config, serving


def test_helm_mix_replays_every_scenario_against_a_running_server(tiny_model_dir):
    from helm_server.app import create_app

    # the tiny stand-in's tokenizer splits the synthetic words far finer than Qwen's: long prompts are cut
    with serving(create_app(make_config(tiny_model_dir, context_length=2048, overflow="truncate_left"))) as url:
        done = subprocess.run([sys.executable, "benchmarks/helm_mix.py", "--url", url, "--runs", "1", "--instances", "1"],
                              cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "2451 requests in the whole mix" in done.stdout
    for scenario in ("mmlu", "big_bench", "gsm", "summarization_cnndm", "bbq", "truthful_qa", "scoring (echo)"):
        assert scenario in done.stdout
    assert "whole conf" in done.stdout


def test_make_helm_mix_without_url_says_how():
    done = subprocess.run(["make", "-s", "helm-mix"], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 2 and "URL=http://127.0.0.1:8080" in done.stderr


def test_a_wrong_url_or_conf_is_one_clear_line():
    def run(*args):
        return subprocess.run([sys.executable, "benchmarks/helm_mix.py", *args], cwd=REPO, capture_output=True, text=True)

    bad = run("--url", "localhost:8080")
    assert bad.returncode == 2 and "http://127.0.0.1:8080" in bad.stderr and "Traceback" not in bad.stderr
    down = run("--url", "http://127.0.0.1:9", "--runs", "1", "--instances", "1")
    assert down.returncode != 0 and "is the submission running" in down.stderr and "Traceback" not in down.stderr
    missing = run("--url", "http://127.0.0.1:9", "--conf", "nope.conf")
    assert missing.returncode == 2 and "CONF=" in missing.stderr


def test_an_unknown_engine_name_is_one_clear_line():
    for bad in ("static-batch4-fast", "static-batch1", "static-batchX", "static-batch4-dense-serial",
                "static-batch4-nogather-dense", "static-batch4-serial-serial"):
        done = subprocess.run([sys.executable, "benchmarks/helm_mix.py", "--engines", f"static,{bad}"], cwd=REPO,
                              capture_output=True, text=True)
        assert done.returncode == 2 and "static-batchN-serial" in done.stderr and "Traceback" not in done.stderr


def test_a_dense_engine_without_its_threshold_is_one_clear_line():
    done = subprocess.run([sys.executable, "benchmarks/helm_mix.py", "--engines", "static,static-batch4-dense"],
                          cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 2 and "give --dense-from N" in done.stderr and "Traceback" not in done.stderr
    done = subprocess.run([sys.executable, "benchmarks/helm_mix.py", "--engines", "static-batch4-dense", "--dense-from",
                           "0"], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 2 and "positive number" in done.stderr and "Traceback" not in done.stderr
