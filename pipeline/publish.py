"""`make publish-N`: upload a finished artifact to the spec's [artifact] repo and print the commit to pin.

    python -m pipeline.publish NAME [--artifact DIR]

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
REQUIRED = ("config.json", "report.json", "quantize.json")


class PublishError(Exception):
    """Nothing was uploaded; the message says why and what to do."""


def check_artifact(folder: Path) -> None:
    if not folder.is_dir():
        raise PublishError(f"{folder} does not exist: run `make quantize-N` first (or pass OUT=dir)")
    missing = [name for name in REQUIRED if not (folder / name).is_file()]
    if missing:
        raise PublishError(f"{folder} lacks {', '.join(missing)}: not a finished `make quantize-N` artifact")


def publish(repo_id: str, folder: Path, token: str, message: str) -> str:
    """Create the repo if needed, upload the folder as one commit, return the commit hash."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    api.create_repo(repo_id, repo_type="model", private=True, exist_ok=True)
    info = api.upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message=message)
    return info.oid


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipeline.publish", description=__doc__.splitlines()[0])
    p.add_argument("name")
    p.add_argument("--submissions", default=str(SUBMISSIONS))
    p.add_argument("--artifact", type=Path, help="default build/artifacts/NAME")
    args = p.parse_args(argv)
    try:
        spec, _ = load_spec(spec_path(Path(args.submissions), args.name))
        folder = args.artifact or ARTIFACTS / spec.name
        check_artifact(folder)
        token = os.environ.get("HF_TOKEN", "").strip()
        if not token:
            raise PublishError("HF_TOKEN is not set: export a Hub token with write access to " + spec.artifact.repo_id)
        commit = publish(spec.artifact.repo_id, folder, token, f"{spec.name}: GPTQ artifact from make quantize")
    except (PublishError, SpecError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"uploaded {folder} to {spec.artifact.repo_id} at commit {commit}")
    print(f'pin it in submissions/{spec.name}/spec.toml: [artifact] revision = "{commit}"')
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
