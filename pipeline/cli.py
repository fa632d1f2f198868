"""What every stage's command line shares: the submission, its local inputs, their checks."""

from __future__ import annotations

import argparse
from pathlib import Path

from packager.paths import SUBMISSIONS

from .hub import SourceError


def stage_parser(prog: str, doc: str | None, model_help: str, out_help: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=doc)
    p.add_argument("name", help="submission name (submissions/NAME/spec.toml)")
    p.add_argument("--submissions", default=str(SUBMISSIONS))
    p.add_argument("--model", type=Path, help=model_help)
    p.add_argument("--data-dir", type=Path, help="local copies of Hub datasets: DATA_DIR/<repo_id>/...")
    p.add_argument("--out", type=Path, help=out_help)
    return p


def check_local_inputs(args: argparse.Namespace) -> None:
    """MODEL and DATA_DIR, when given, must be folders: said before any slow work."""
    for flag, value in (("MODEL", args.model), ("DATA_DIR", args.data_dir)):
        if value is not None and not value.is_dir():
            raise SourceError(f"{flag}={value}: not a folder")
