"""The Makefile as a user drives it: any spec name, and the switches reaching the commands."""

from __future__ import annotations

import subprocess
from pathlib import Path

from conftest import REPO


def make(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["make", "--no-print-directory", *args], cwd=REPO, capture_output=True, text=True)


def _named(tmp_path: Path, name: str) -> Path:
    text = (REPO / "submissions" / "submission-1" / "spec.toml").read_text().replace('name = "submission-1"', f'name = "{name}"')
    (tmp_path / name).mkdir(parents=True)
    (tmp_path / name / "spec.toml").write_text(text)
    return tmp_path


def test_per_submission_targets_take_any_spec_name(tmp_path):
    subs = _named(tmp_path / "subs", "mine")
    done = make("zip-mine", f"SUBMISSIONS={subs}", f"DIST={tmp_path / 'dist'}")
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "dist" / "mine.zip").is_file()
    done = make("submission-mine", f"SUBMISSIONS={subs}", f"DIST={tmp_path / 'dist2'}")
    assert done.returncode == 0 and (tmp_path / "dist2" / "mine.zip").is_file(), done.stderr
    # every per-submission target resolves the name the same way (dry run: the commands make would run)
    for target in ("image", "validate", "serve", "quantize", "data", "train", "train-bundle", "publish", "publish-train",
                   "humpback", "publish-humpback"):
        done = make("-n", f"{target}-mine", f"SUBMISSIONS={subs}")
        words = done.stdout.split()
        assert "mine" in words and "submission-mine" not in words, (target, done.stdout)
    # the numbered short form still means submissions/submission-N
    assert "submission-1" in make("-n", "validate-1").stdout.split()


def test_humpback_switches_reach_the_stage_and_data(tmp_path):
    run = make("-n", "humpback-3", "MODEL=/m", "DATA_DIR=/d", "OUT=/o", "PASSAGES=50", "BUDGET=ignore").stdout.split()
    assert {"pipeline.humpback", "submission-3", "--model", "/m", "--data-dir", "/d", "--out", "/o", "--passages", "50",
            "--budget", "ignore"} <= set(run)
    train = make("-n", "train-3", "STEPS=5", "DEADLINE=6h").stdout.split()
    assert {"--steps", "5", "--deadline", "6h"} <= set(train)
    data = make("-n", "train-3", "HUMPBACK=/o/curated").stdout.split()
    assert data.count("--humpback") == 1 and "/o/curated" in data
    publish = make("-n", "publish-humpback-3", "OUT=/o").stdout.split()
    assert {"--humpback", "--curated", "/o/curated"} <= set(publish) and "--train" not in publish


def test_make_help_says_how_to_name_a_submission():
    assert "zip-N" in make("help").stdout and "make zip-mine" in make("help").stdout


def test_switches_reach_every_target_that_can_honour_them():
    serve = make("-n", "serve-2", "STRICT=1", "MODEL=/m", "ADAPTER=/a").stdout.split()
    assert {"--strict", "--model", "/m", "--adapter", "/a", "submission-2"} <= set(serve)
    validate = make("-n", "validate-2", "STRICT=1", "OFFLINE=1", "MODEL=/m", "ADAPTER=/a").stdout.splitlines()[-1].split()
    assert {"--strict", "--offline", "--model", "/m", "--adapter", "/a"} <= set(validate)


def test_switches_a_target_cannot_honour_are_refused():
    for args, said in ((["zip-1", "MODEL=/m"], "MODEL=/m"), (["submission-1", "OFFLINE=1"], "OFFLINE=1"),
                       (["image-1", "ADAPTER=/a"], "ADAPTER=/a")):
        done = make("-n", *args)
        assert done.returncode != 0 and f"{said}" in done.stderr and "has no meaning for" in done.stderr, done.stderr


def test_validate_refuses_an_unpinned_spec_under_strict_before_any_docker_work(capsys):
    from packager import validate

    assert validate.main(["submission-1", "--strict"]) == 2
    assert "pin each revision" in capsys.readouterr().err


def test_local_folders_are_checked_before_the_offline_base_image_is_built(tmp_path):
    for target in ("serve-1", "validate-1", "image-1"):
        args = [target, "OFFLINE=1", f"ADAPTER={tmp_path / 'none'}"] if target == "image-1" else \
               [target, "OFFLINE=1", f"MODEL={tmp_path / 'none'}"]
        done = make(*args)
        said = done.stdout + done.stderr
        assert done.returncode != 0 and "not a folder" in said or "has no meaning" in said, said
        assert "debootstrap" not in said and "packager.offline" not in said


def test_serving_offline_without_a_model_serves_the_stand_in_as_validation_does(tmp_path, capsys):
    from packager.cli import serve_mounts

    mounts = serve_mounts(True, None, None, stand_in_dir=tmp_path / "tiny")
    assert mounts.model is not None and (mounts.model / "config.json").is_file() and mounts.adapter is None
    assert "tiny stand-in" in capsys.readouterr().err
    assert serve_mounts(False, None, None).model is None  # online: the image's own weights
