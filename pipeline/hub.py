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


def download(repo_id: str, revision: str, patterns: list[str], repo_type: str, local_hint: str) -> Path:
    """snapshot_download into the Hugging Face cache; a Hub that cannot be reached is a SourceError."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id=repo_id, repo_type=repo_type, revision=revision, allow_patterns=patterns))
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise SourceError(f"could not download {repo_id}@{revision} ({reason}); set {local_hint} to use a local copy "
                          "in the Hub layout, or HF_TOKEN for a private repo") from None


def model_folder(repo_id: str, revision: str, local: Path | None, patterns: list[str] = MODEL_FILES) -> Path:
    """The base model's folder: `local` if given, else a download of the repo's `patterns` at `revision`."""
    if local is not None:
        local = Path(local)
        if not (local / "config.json").is_file():
            raise SourceError(f"MODEL={local}: no config.json there; point MODEL at a Hugging Face model folder")
        return local
    print(f"downloading {repo_id}@{revision} (set MODEL=dir to use a local copy)", flush=True)
    return download(repo_id, revision, patterns, repo_type="model", local_hint="MODEL=dir")


def dataset_files(repo_id: str, revision: str, pattern: str, data_dir: Path | None) -> list[Path]:
    """Files of a dataset repo matching `pattern`, from `data_dir/<repo_id>/` or a download."""
    if data_dir is not None:
        root = Path(data_dir) / repo_id
        where = f"DATA_DIR={data_dir}"
    else:
        print(f"downloading {repo_id}@{revision}: {pattern} (set DATA_DIR=dir to use a local copy)", flush=True)
        root = download(repo_id, revision, [pattern], repo_type="dataset", local_hint="DATA_DIR=dir")
        where = "the Hub download"
    files = sorted(root.glob(pattern))
    if not files:
        raise SourceError(f"no {pattern} under {root} ({where}); expected the dataset repo's files as on the Hub")
    return files


def weights_fingerprint(folder: Path) -> list:
    """A model folder's weight and config files with their sizes: cheap identity for a local copy."""
    return sorted([p.name, p.stat().st_size] for p in folder.iterdir() if p.suffix in (".safetensors", ".json"))
