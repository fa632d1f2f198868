"""Download the served model (and adapter) at image build time.

The organizers gave a container about 20 minutes to answer its first request,
and HELM runs with no guarantee of Hub access: weights belong in the image,
fetched once at the spec's pinned revisions. A Hub token for private repos is
read from a BuildKit secret file (`--secret id=hf_token,...`) and never
written anywhere.

    python -m helm_server.fetch models.json /models
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from .settings import ModelSource, Weights

SECRET_FILE = Path("/run/secrets/hf_token")


def read_token(secret_file: Path = SECRET_FILE) -> str | None:
    """The token from the build secret, else from the environment, else none (public repos)."""
    if secret_file.is_file():
        token = secret_file.read_text(encoding="utf-8").strip()
        if token:
            return token
    return os.environ.get("HF_TOKEN") or None


def fetch(source: ModelSource, target: Path, token: str | None) -> Path:
    from huggingface_hub import snapshot_download

    print(f"fetching {source.repo_id}@{source.revision} -> {target}", flush=True)
    snapshot_download(repo_id=source.repo_id, revision=source.revision, local_dir=target, token=token)
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("weights", type=Path, help="models.json: the model (and adapter) references")
    parser.add_argument("models_dir", type=Path, help="where artifact/ and adapter/ are written")
    args = parser.parse_args(argv)
    config = Weights.model_validate_json(args.weights.read_text(encoding="utf-8"))
    token = read_token()
    fetch(config.model, args.models_dir / "artifact", token)
    if config.adapter is not None:
        fetch(config.adapter, args.models_dir / "adapter", token)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
