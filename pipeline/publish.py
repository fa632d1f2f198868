"""`make publish-N` / `make publish-train-N`: upload a finished artifact (or adapter) and print the commit to pin.

    python -m pipeline.publish NAME [--artifact DIR]       # -> the spec's [artifact] repo
    python -m pipeline.publish NAME --train [--run DIR]    # the adapter of a finished run -> [adapter] repo
    python -m pipeline.publish NAME --humpback [--curated DIR]   # make humpback-N's set -> the humpback source's repo

The token comes from HF_TOKEN and goes only to the Hub client. Only finished
artifacts go up: the folder must hold the quantize stage's report.json and
record (a partial folder never has them).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from packager.spec import SpecError, load_spec, spec_path
from packager.paths import REPO, SUBMISSIONS

ARTIFACTS = REPO / "build" / "artifacts"
TRAIN = REPO / "build" / "train"
HUMPBACK = REPO / "build" / "humpback"
REQUIRED = ("config.json", "report.json", "quantize.json")


class PublishError(Exception):
    """Nothing was uploaded; the message says why and what to do."""


def check_artifact(folder: Path) -> None:
    if not folder.is_dir():
        raise PublishError(f"{folder} does not exist: run `make quantize-N` first (or pass OUT=dir)")
    missing = [name for name in REQUIRED if not (folder / name).is_file()]
    if missing:
        raise PublishError(f"{folder} lacks {', '.join(missing)}: not a finished `make quantize-N` artifact")


def check_run(run: Path) -> None:
    """Only a finished training run's adapter goes up (a STEPS= smoke run or a partial one never does)."""
    import json

    record = run / "run.json"
    if not record.is_file():
        raise PublishError(f"{run} has no run.json: run `make train-N` first (or pass OUT=dir)")
    state = json.loads(record.read_text())
    if not state.get("finished"):
        raise PublishError(f"{run} stopped at step {state.get('steps')} of {state.get('total_steps')}: "
                           "run `make train-N` again to finish it first")
    missing = [n for n in ("adapter_config.json", "adapter_model.safetensors") if not (run / "adapter" / n).is_file()]
    if missing:
        raise PublishError(f"{run / 'adapter'} lacks {', '.join(missing)}")


def adapter_upload(run: Path, staging: Path) -> Path:
    """The adapter's files with the run's record and curves beside them (no checkpoints, no optimizer state)."""
    import shutil

    for f in (run / "adapter").iterdir():
        shutil.copy2(f, staging / f.name)
    for name in ("run.json", "curves.png"):
        if (run / name).is_file():
            shutil.copy2(run / name, staging / name)
    return staging


def check_curated(folder: Path) -> None:
    """Only a finished Humpback set goes up: its card and parquet files (written together, at the end)."""
    if not (folder / "README.md").is_file() or not list(folder.glob("data/train-*.parquet")):
        raise PublishError(f"{folder} is not a finished curated set (README.md, data/train-*.parquet): "
                           "run `make humpback-N` first (or pass OUT=dir)")


def humpback_repo(spec) -> str:
    sources = [d for d in (spec.training.data if spec.training else []) if d.source == "humpback"]
    if not sources:
        raise PublishError(f"{spec.name} reads no humpback data source: nothing names the dataset repo")
    if Path(sources[0].repo_id).is_dir():
        raise PublishError(f"{spec.name}'s humpback source is the local folder {sources[0].repo_id}: name a Hub "
                           "dataset repo id there to publish to")
    return sources[0].repo_id


def publish(repo_id: str, folder: Path, token: str, message: str, repo_type: str = "model") -> str:
    """Create the repo if needed, upload the folder as one commit, return the commit hash."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    api.create_repo(repo_id, repo_type=repo_type, private=True, exist_ok=True)
    info = api.upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message=message, repo_type=repo_type)
    return info.oid


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipeline.publish", description=__doc__.splitlines()[0])
    p.add_argument("name")
    p.add_argument("--submissions", default=str(SUBMISSIONS))
    p.add_argument("--artifact", type=Path, help="default build/artifacts/NAME")
    p.add_argument("--train", action="store_true", help="publish the trained adapter to the spec's [adapter] repo")
    p.add_argument("--run", type=Path, help="the training run folder (default build/train/NAME)")
    p.add_argument("--humpback", action="store_true", help="publish make humpback-N's curated set to the humpback source's repo")
    p.add_argument("--curated", type=Path, help="the curated folder (default build/humpback/NAME/curated)")
    args = p.parse_args(argv)
    try:
        spec, _ = load_spec(spec_path(Path(args.submissions), args.name))
        if args.humpback:
            folder, section, repo_id = args.curated or HUMPBACK / spec.name / "curated", None, humpback_repo(spec)
            check_curated(folder)
        elif args.train:
            if spec.adapter is None or spec.training is None:
                raise PublishError(f"{spec.name} has no [training] and [adapter] sections: nothing to publish")
            folder, section, repo_id = args.run or TRAIN / spec.name, "adapter", spec.adapter.repo_id
            check_run(folder)
        else:
            folder, section, repo_id = args.artifact or ARTIFACTS / spec.name, "artifact", spec.artifact.repo_id
            check_artifact(folder)
        token = os.environ.get("HF_TOKEN", "").strip()
        if not token:
            raise PublishError("HF_TOKEN is not set: export a Hub token with write access to " + repo_id)
        if args.humpback:
            commit = publish(repo_id, folder, token, f"{spec.name}: Humpback curated set from make humpback", "dataset")
        elif args.train:
            import tempfile

            with tempfile.TemporaryDirectory(prefix="adapter-upload-") as tmp:
                commit = publish(repo_id, adapter_upload(folder, Path(tmp)), token, f"{spec.name}: LoRA adapter from make train")
        else:
            commit = publish(repo_id, folder, token, f"{spec.name}: GPTQ artifact from make quantize")
    except (PublishError, SpecError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"uploaded {folder} to {repo_id} at commit {commit}")
    where = f"[{section}]" if section else 'the [[training.data]] table with source = "humpback":'
    print(f'pin it in submissions/{spec.name}/spec.toml: {where} revision = "{commit}"')
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
