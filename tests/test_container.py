"""Images and containers on the real Docker daemon.

Skipped where no daemon runs or the offline base image is missing; CI sets
REQUIRE_DOCKER=1, which turns those skips into failures.
"""

from __future__ import annotations

import json
import os
import subprocess
import tarfile
from pathlib import Path

import pytest

from conftest import REPO
from packager.base_images import base_image
from packager.budget import BudgetError, check, estimate
from packager.build import build
from packager.container import Mounts, run_args
from packager.docker_cli import DockerError, find_docker
from packager.image import BuildOptions, build_image, unzip_context
from packager.offline import LOCAL_BASE_KEY, WHEELHOUSE, missing_wheels
from packager.paths import LOCK
from packager.spec import load_spec

DUMMY_TOKEN = "hf_" + "DummyBuildSecretForLayerScan0123456789"


def _docker_or_skip():
    try:
        docker = find_docker()
    except DockerError as e:
        if os.environ.get("REQUIRE_DOCKER") == "1":
            raise
        pytest.skip(str(e))
    base = base_image(LOCAL_BASE_KEY).image
    if not docker.image_exists(base) or missing_wheels(LOCK, WHEELHOUSE):
        if os.environ.get("REQUIRE_DOCKER") == "1":
            pytest.fail("run `make base-image wheelhouse` before the container tests")
        pytest.skip("no local base image or wheelhouse (make base-image wheelhouse)")
    return docker, base


def test_no_layer_of_the_image_contains_the_build_secret(tmp_path):
    docker, base = _docker_or_skip()
    built = build(REPO / "submissions" / "submission-1" / "spec.toml", tmp_path / "dist")
    context = unzip_context(built.zip_path, tmp_path / "ctx")
    tag = "llm-challenge-test/secret-scan:1"
    opts = BuildOptions(tag=tag, base_image=base, fetch_models=False, wheelhouse=WHEELHOUSE, token=DUMMY_TOKEN, no_cache=True)
    try:
        image = build_image(docker, context, opts, capture=True)
        assert "a hub token was provided as a build secret" in image.log  # the secret reached the build
        assert DUMMY_TOKEN not in image.log
        saved = tmp_path / "image.tar"
        docker.run("save", "-o", str(saved), tag)
        assert DUMMY_TOKEN.encode() not in saved.read_bytes()
        with tarfile.open(saved) as outer:  # layers are tars inside the tar: look inside each
            for member in outer.getmembers():
                if member.isfile():
                    data = outer.extractfile(member).read()
                    assert DUMMY_TOKEN.encode() not in data, member.name
                    if member.name.endswith(".tar"):
                        _scan_layer(data, member.name)
        history = docker.out("history", "--no-trunc", tag)
        assert DUMMY_TOKEN not in history and "HF_TOKEN=" not in history
    finally:
        docker.run("rmi", "-f", tag, check=False)


def _scan_layer(data: bytes, name: str) -> None:
    import io

    with tarfile.open(fileobj=io.BytesIO(data)) as layer:
        for member in layer.getmembers():
            if member.isfile():
                assert DUMMY_TOKEN.encode() not in layer.extractfile(member).read(), f"{name}:{member.name}"


def test_container_is_sealed_off_with_a_read_only_model(tmp_path):
    model = tmp_path / "m"
    model.mkdir()
    args = run_args("img:1", "c", Mounts(model=model), gpus=False)
    assert args[args.index("--network") + 1] == "none" and "--read-only" in args
    assert f"{model}:/models/artifact:ro" in args and "ADAPTER_PATH=none" in args
    assert "--gpus" in run_args("img:1", "c", Mounts(), gpus=True)


def test_budget_accepts_the_reference_and_refuses_fp16_qwen_14b(tmp_path):
    spec, _ = load_spec(REPO / "submissions" / "submission-1" / "spec.toml")
    assert check(spec).fits
    unquantized = spec.model_copy(update={"quantization": None})
    with pytest.raises(BudgetError, match=r"of 24.0 GiB \(RTX 4090\): does NOT fit"):
        check(unquantized)
    assert estimate(unquantized).total_bytes > 24 * (1 << 30)


def test_budget_names_a_bad_model_directory(tmp_path):
    spec, _ = load_spec(REPO / "submissions" / "submission-1" / "spec.toml")
    with pytest.raises(BudgetError, match="no config.json"):
        estimate(spec, tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(BudgetError, match="not valid JSON"):
        estimate(spec, tmp_path)


def test_budget_measures_a_local_model(tiny_model_dir):
    spec, _ = load_spec(REPO / "submissions" / "submission-1" / "spec.toml")
    measured = estimate(spec, tiny_model_dir)
    assert 0 < measured.weights_bytes < 50e6 and "measured" in measured.source


def test_docker_errors_say_how_to_fix(monkeypatch, tmp_path):
    fake = tmp_path / "docker"
    fake.write_text("#!/bin/sh\n[ \"$1\" = version ] && echo 20.10.0 && exit 0\necho 'Cannot connect' >&2; exit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("DOCKER", raising=False)
    with pytest.raises(DockerError, match="daemon is not running.*start the daemon"):
        find_docker()


def test_validate_cli_refuses_a_missing_model_dir(capsys):
    from packager.validate import main

    assert main(["submission-1", "--offline", "--model", "/no/such/dir"]) == 2
    assert "/no/such/dir is not a directory" in capsys.readouterr().err
    assert main(["submission-1", "--adapter", "/tmp"]) == 2
    assert "--adapter needs --model" in capsys.readouterr().err


def test_serve_cli_checks_its_inputs_before_any_work(tmp_path, capsys):
    from packager.cli import main

    assert main(["serve", "submission-1", "--offline", "--adapter", str(tmp_path)]) == 2
    assert "--adapter needs --model" in capsys.readouterr().err
    assert main(["serve", "submission-1", "--model", "/no/such/dir"]) == 2
    assert "is not a directory" in capsys.readouterr().err


def test_failed_validation_prints_logs_and_removes_the_container(tmp_path, capsys, tiny_model_dir):
    docker, _ = _docker_or_skip()
    broken = tmp_path / "broken-model"  # passes the budget check, then fails to load in the container
    broken.mkdir()
    (broken / "config.json").write_text((tiny_model_dir / "config.json").read_text())
    from packager.validate import validate

    tag = "llm-challenge-test/broken:1"
    try:
        with pytest.raises(DockerError, match="stopped while starting"):
            validate("submission-1", offline=True, model=broken, adapter=None, timeout=120, dist=tmp_path / "dist",
                     contexts=tmp_path / "ctx", tag=tag)
    finally:
        docker.run("rmi", "-f", tag, check=False)
    assert "container logs" in capsys.readouterr().err
    leftovers = docker.out("ps", "-a", "--filter", "name=llmc-validate", "--format", "{{.Names}}")
    assert leftovers == ""


def test_offline_container_serves_a_tiny_gptq_artifact(tmp_path):
    """`make validate-1 OFFLINE=1 MODEL=<tiny gptq>`: GPTQModel from the wheelhouse, no C compiler in the image."""
    docker, _ = _docker_or_skip()
    from pipeline.quantize.tiny import save_tiny_gptq
    from packager.validate import validate

    model = save_tiny_gptq(tmp_path / "tiny-gptq")
    assert json.loads((model / "config.json").read_text())["quantization_config"]["bits"] == 8
    tag = "llm-challenge-test/gptq:1"
    try:
        report = validate("submission-1", offline=True, model=model, adapter=None, timeout=300, dist=tmp_path / "dist",
                          contexts=tmp_path / "ctx", tag=tag)
    finally:
        docker.run("rmi", "-f", tag, check=False)
    assert report.passed, [c for c in report.checks if not c.passed]


def test_stopping_serve_removes_the_container_and_says_so_in_one_line(tmp_path):
    """Any stop (TERM here, as `kill -TERM` of make forwards it) removes the container: nothing keeps serving."""
    import signal
    import sys
    import time
    import urllib.request

    from conftest import free_port

    docker, _ = _docker_or_skip()
    port, tag = free_port(), "llm-challenge-test/serve:1"
    cmd = [sys.executable, "-m", "packager", "serve", "--offline", "--port", str(port), "--dist", str(tmp_path / "dist"),
           "--contexts", str(tmp_path / "ctx"), "--tag", tag, "--model", str(_stand_in(tmp_path)), "submission-1"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline, healthy = time.time() + 600, False
        while time.time() < deadline and proc.poll() is None and not healthy:
            try:
                healthy = urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).status == 200
            except OSError:
                time.sleep(1)
        assert healthy, proc.stderr.read() if proc.poll() is not None else "never healthy"
        ours = ["ps", "-a", "-q", "--filter", f"name=llm-challenge-serve-submission-1-{proc.pid}"]
        assert docker.out(*ours)  # it is running
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
        assert docker.out(*ours) == ""  # removed, not orphaned
        assert "Traceback" not in err
        assert [line for line in err.splitlines() if "removed" in line] == [
            f"stopped: container llm-challenge-serve-submission-1-{proc.pid} removed"]
    finally:
        proc.kill()
        docker.run("rmi", "-f", tag, check=False)


def _stand_in(tmp_path: Path) -> Path:
    from packager.tiny_model import stand_in

    return stand_in(tmp_path / "tiny-model")


def test_a_generation_edit_rebuilds_neither_requirements_nor_weights(tmp_path):
    docker, base = _docker_or_skip()
    text = (REPO / "submissions" / "submission-2" / "spec.toml").read_text()
    tags = []
    try:
        logs = []
        for n, edit in enumerate(("", "default_max_new_tokens = 50", "# a comment")):
            folder = tmp_path / f"subs{n}" / "submission-2"
            folder.mkdir(parents=True)
            changed = text.replace("default_max_new_tokens = 50", "default_max_new_tokens = 64") if n == 1 else text
            (folder / "spec.toml").write_text(changed + ("\n# a comment\n" if n == 2 else ""))
            built = build(folder / "spec.toml", tmp_path / f"dist{n}")
            context = unzip_context(built.zip_path, tmp_path / f"ctx{n}")
            tags.append(f"llm-challenge-test/cache:{n}")
            opts = BuildOptions(tag=tags[-1], base_image=base, fetch_models=False, wheelhouse=WHEELHOUSE)
            logs.append(build_image(docker, context, opts, capture=True).log)
        for log in logs[1:]:
            steps = [line for line in log.splitlines()
                     if any(s in line for s in ("pip install --no-deps", "helm_server.kernels build", "helm_server.fetch"))]
            assert len({line.split()[0] for line in steps}) >= 3, log[-3000:]
            for line in steps:  # BuildKit prints "#N CACHED" after a step's header line
                step = line.split()[0]
                assert f"{step} CACHED" in log, (line, log[-3000:])
    finally:
        for tag in tags:
            docker.run("rmi", "-f", tag, check=False)


def test_an_unreachable_registry_shows_the_failing_lines_and_suggests_offline(tmp_path):
    docker, _ = _docker_or_skip()
    built = build(REPO / "submissions" / "submission-1" / "spec.toml", tmp_path / "dist")
    context = unzip_context(built.zip_path, tmp_path / "ctx")
    opts = BuildOptions(tag="llm-challenge-test/unreachable:1", base_image="registry.invalid/nothing:1", fetch_models=False)
    with pytest.raises(DockerError) as e:
        build_image(docker, context, opts)
    msg = str(e.value)
    assert "its last lines" in msg and "registry.invalid" in msg and "OFFLINE=1" in msg
    assert (tmp_path / "ctx" / "submission-1.build.log").is_file()


def test_the_server_runs_as_a_non_root_user_on_a_read_only_root_filesystem(tmp_path, tiny_model_dir):
    """`make validate-N` runs the container --read-only with a tmpfs at /tmp; the server is not root."""
    from packager.container import READ_ONLY
    from packager.validate import validate

    import shutil

    docker, _ = _docker_or_skip()
    tag = "llm-challenge-test/hardened:1"
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    model.chmod(0o700)  # unreadable by the server's user: refused before any Docker work, with the fix
    with pytest.raises(DockerError, match=r"chmod -R a\+rX"):
        validate("submission-1", offline=True, model=model, adapter=None, timeout=300, dist=tmp_path / "dist",
                 contexts=tmp_path / "ctx", tag=tag)
    model.chmod(0o755)
    try:
        report = validate("submission-1", offline=True, model=model, adapter=None, timeout=300,
                          dist=tmp_path / "dist", contexts=tmp_path / "ctx", tag=tag)
        assert report.passed and "--read-only" in dict(report.lines)["run"]
        user = docker.out("image", "inspect", "--format", "{{.Config.User}}", tag)
        assert user == "10001"
        who = docker.out("run", "--rm", *READ_ONLY, "--entrypoint", "sh", tag, "-c", "id -u; touch /x 2>&1 || echo ro")
        assert who.splitlines()[0] == "10001" and who.splitlines()[-1] == "ro"
        # The image build ran the GPTQ kernel step; on the CPU base it records that there is nothing to compile.
        kernels = json.loads(docker.out("run", "--rm", *READ_ONLY, "--entrypoint", "sh", tag, "-c",
                                        'cat "$HELM_SERVER_KERNELS/kernels.json"'))
        assert kernels["cuda"] is None and kernels["extensions"] == {}
        assert kernels["torch"].startswith(base_image(LOCAL_BASE_KEY).torch)
    finally:
        docker.run("rmi", "-f", tag, check=False)
