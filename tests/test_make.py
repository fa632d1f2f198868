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
    for target in ("image", "validate", "serve", "quantize", "data", "train", "train-bundle", "publish", "publish-train"):
        done = make("-n", f"{target}-mine", f"SUBMISSIONS={subs}")
        words = done.stdout.split()
        assert "mine" in words and "submission-mine" not in words, (target, done.stdout)
    # the numbered short form still means submissions/submission-N
    assert "submission-1" in make("-n", "validate-1").stdout.split()


def test_make_help_says_how_to_name_a_submission():
    assert "zip-N" in make("help").stdout and "make zip-mine" in make("help").stdout
