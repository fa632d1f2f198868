"""Building zips: all reference specs, byte-identical rebuilds, atomic writes, the manifest."""

from __future__ import annotations

import hashlib
import json
import zipfile

import pytest

from conftest import REPO
from packager import __version__, checks
from packager.build import build
from packager.cli import main

SPECS = REPO / "submissions"
NAMES = ["submission-1", "submission-2", "submission-3"]


@pytest.mark.parametrize("name", NAMES)
def test_reference_specs_build_and_pass_the_rules(tmp_path, name):
    built = build(SPECS / name / "spec.toml", tmp_path)
    with zipfile.ZipFile(built.zip_path) as zf:
        entries = {n: zf.read(n) for n in zf.namelist()}
    assert checks.problems(entries) == []
    assert {n.split("/")[0] for n in entries} == {name}
    assert (built.context_dir / "Dockerfile").read_bytes() == entries[f"{name}/Dockerfile"]


def test_rebuild_is_byte_identical(tmp_path):
    first = build(SPECS / "submission-2" / "spec.toml", tmp_path / "a").zip_path.read_bytes()
    second = build(SPECS / "submission-2" / "spec.toml", tmp_path / "b").zip_path.read_bytes()
    assert hashlib.sha256(first).digest() == hashlib.sha256(second).digest()


def test_manifest_records_spec_hash_models_and_version(tmp_path):
    spec_file = SPECS / "submission-2" / "spec.toml"
    built = build(spec_file, tmp_path)
    manifest = json.loads((built.context_dir / "MANIFEST.json").read_text())
    assert manifest["spec"]["sha256"] == hashlib.sha256(spec_file.read_bytes()).hexdigest()
    assert manifest["packager_version"] == __version__
    assert manifest["models"]["adapter"] == {"repo_id": "ycchen/final-lora-r64-ep5", "revision": "main", "pinned": False}
    assert set(manifest["models"]) == {"base_model", "artifact", "adapter"}
    for path, digest in manifest["files"].items():
        assert hashlib.sha256((built.context_dir / path).read_bytes()).hexdigest() == digest


def test_serve_config_carries_the_spec_generation_settings(tmp_path):
    built = build(SPECS / "submission-3" / "spec.toml", tmp_path)
    config = json.loads((built.context_dir / "serve_config.json").read_text())
    assert config["generation"]["eos_token_ids"] == [151643]
    assert config["adapter"]["repo_id"] == "ycchen/final-lora-r32-ep5-arc"
    assert "ADAPTER_PATH=/models/adapter" in (built.context_dir / "Dockerfile").read_text()


def test_failed_build_leaves_no_partial_zip_and_keeps_the_old_one(tmp_path, monkeypatch):
    spec_file = SPECS / "submission-1" / "spec.toml"
    good = build(spec_file, tmp_path).zip_path.read_bytes()

    import packager.build as build_module

    def render_with_bytecode(spec, sha):
        from packager.render import render

        return {**render(spec, sha), "helm_server/__pycache__/x.pyc": b"\0"}

    monkeypatch.setattr(build_module, "render", render_with_bytecode)
    with pytest.raises(checks.PackagingError, match="bytecode"):
        build(spec_file, tmp_path)
    assert (tmp_path / "submission-1.zip").read_bytes() == good
    assert sorted(p.name for p in tmp_path.iterdir()) == ["submission-1", "submission-1.zip"]


def test_interrupted_zip_write_leaves_nothing(tmp_path, monkeypatch):
    import zipfile as zipmodule

    def explode(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(zipmodule.ZipFile, "writestr", explode)
    with pytest.raises(OSError):
        build(SPECS / "submission-1" / "spec.toml", tmp_path)
    assert not (tmp_path / "submission-1.zip").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_zip_never_contains_bytecode_even_when_sources_have_it(tmp_path):
    # The working tree gets __pycache__ as soon as the tests import the server.
    pycache = REPO / "docker" / "inference" / "helm_server" / "__pycache__"
    pycache.mkdir(exist_ok=True)
    built = build(SPECS / "submission-1" / "spec.toml", tmp_path)
    with zipfile.ZipFile(built.zip_path) as zf:
        assert not [n for n in zf.namelist() if "__pycache__" in n or n.endswith(".pyc")]


def test_cli_build_all(tmp_path, capsys):
    assert main(["build", "--dist", str(tmp_path)]) == 0
    assert sorted(p.name for p in tmp_path.glob("*.zip")) == [f"{n}.zip" for n in NAMES]
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1  # one summary line for every unpinned reference of every spec, not one per spec
    assert "submission-1: base_model Qwen/Qwen-14B@main" in warnings[0] and "submission-3:" in warnings[0]


def test_the_validation_report_states_each_fact_once(capsys):
    from packager.validate import Report, step

    report = Report("s")
    report.add("build time", "1.0 s")
    step("building")
    out, err = capsys.readouterr()
    assert out == "" and err == "[validate] building\n"
    assert report.render().count("build time") == 1


def test_prune_keeps_the_newest_image_per_submission_and_variant_and_never_base_or_foreign_images():
    from packager.image import image_tag, stale

    images = [
        {"ref": "llm-challenge/submission-1:aaa-offline", "created": "2026-11-28 01:00:00 +0000 UTC"},
        {"ref": "llm-challenge/submission-1:bbb-offline", "created": "2026-11-28 02:00:00 +0000 UTC"},
        {"ref": "llm-challenge/submission-1:aaa-online", "created": "2026-11-28 01:30:00 +0000 UTC"},
        {"ref": "llm-challenge/base-cpu:bookworm-torch2.13.0", "created": "2026-11-01 00:00:00 +0000 UTC"},
        {"ref": "llm-challenge/base-cpu:older", "created": "2026-10-01 00:00:00 +0000 UTC"},
        {"ref": "someone/else:latest", "created": "2026-01-01 00:00:00 +0000 UTC"},
    ]
    assert stale(images) == ["llm-challenge/submission-1:aaa-offline"]
    assert image_tag("mine", "f" * 64, offline=True) != image_tag("mine", "f" * 64, offline=False)
