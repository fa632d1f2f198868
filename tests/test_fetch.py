"""Build-time weight download: the spec's revisions, the token from the build secret only."""

from __future__ import annotations

import json

import pytest

from helm_server import fetch


def test_token_comes_from_the_secret_file_first(tmp_path, monkeypatch):
    secret = tmp_path / "hf_token"
    secret.write_text("hf_from_secret\n")
    monkeypatch.setenv("HF_TOKEN", "hf_from_env")
    assert fetch.read_token(secret) == "hf_from_secret"
    assert fetch.read_token(tmp_path / "absent") == "hf_from_env"
    monkeypatch.delenv("HF_TOKEN")
    assert fetch.read_token(tmp_path / "absent") is None


def test_fetches_artifact_and_adapter_at_their_revisions(tmp_path, monkeypatch):
    import huggingface_hub

    calls = []

    def snapshot_download(**kwargs):  # the Hub is out of reach: record what would be fetched
        calls.append(kwargs)
        return str(kwargs["local_dir"])

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.setattr(fetch, "SECRET_FILE", tmp_path / "none")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    config = tmp_path / "models.json"  # what the packager renders: the references and nothing else
    config.write_text(json.dumps({
        "model": {"repo_id": "org/artifact", "revision": "a" * 40},
        "adapter": {"repo_id": "org/adapter", "revision": "b" * 40},
    }))
    assert fetch.main([str(config), str(tmp_path / "models")]) == 0
    assert [(c["repo_id"], c["revision"], c["local_dir"].name, c["token"]) for c in calls] == [
        ("org/artifact", "a" * 40, "artifact", None),
        ("org/adapter", "b" * 40, "adapter", None),
    ]


def test_bad_config_is_refused(tmp_path):
    config = tmp_path / "serve_config.json"
    config.write_text(json.dumps({"submission": "s"}))
    with pytest.raises(Exception, match="model"):
        fetch.main([str(config), str(tmp_path)])
