"""Where a stage's inputs come from: the Hub at a pinned revision, or a local copy in the Hub layout.

A local copy is a folder laid out exactly like the Hub repo
(`DATA_DIR/<repo_id>/...`), so the same loading code reads both: downloads
land in the Hugging Face cache and are read from there.
"""

from __future__ import annotations

from pathlib import Path

MODEL_FILES = ["*.json", "*.safetensors", "*.tiktoken", "*.txt", "*.model", "LICENSE*", "NOTICE*"]
TOKENIZER_FILES = ["*.json", "*.tiktoken", "*.txt", "*.model"]


class SourceError(Exception):
    """An input that cannot be found; the message says where it was looked for and what to do."""


def model_folder(repo_id: str, revision: str, local: Path | None, patterns: list[str] = MODEL_FILES) -> Path:
    """The base model's folder: `local` if given, else a download of the repo's `patterns` at `revision`."""
    if local is not None:
        local = Path(local)
        if not (local / "config.json").is_file():
            raise SourceError(f"MODEL={local}: no config.json there; point MODEL at a Hugging Face model folder")
        return local
    from huggingface_hub import snapshot_download

    print(f"downloading {repo_id}@{revision} (set MODEL=dir to use a local copy)", flush=True)
    return Path(snapshot_download(repo_id=repo_id, revision=revision, allow_patterns=patterns))


def dataset_files(repo_id: str, revision: str, pattern: str, data_dir: Path | None) -> list[Path]:
    """Files of a dataset repo matching `pattern`, from `data_dir/<repo_id>/` or a download."""
    if data_dir is not None:
        root = Path(data_dir) / repo_id
        where = f"DATA_DIR={data_dir}"
    else:
        from huggingface_hub import snapshot_download

        print(f"downloading {repo_id}@{revision}: {pattern} (set DATA_DIR=dir to use a local copy)", flush=True)
        root = Path(snapshot_download(repo_id=repo_id, repo_type="dataset", revision=revision, allow_patterns=[pattern]))
        where = "the Hub download"
    files = sorted(root.glob(pattern))
    if not files:
        raise SourceError(f"no {pattern} under {root} ({where}); expected the dataset repo's files as on the Hub")
    return files
