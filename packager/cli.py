"""`python -m packager validate|build|list`: the commands the Makefile runs."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .build import build, validate
from .checks import PackagingError
from .paths import DIST, SUBMISSIONS
from .spec import SPEC_FILE, SpecError, spec_path


def _names(args: argparse.Namespace) -> list[str]:
    if args.names:
        return args.names
    return sorted(p.parent.name for p in Path(args.submissions).glob(f"*/{SPEC_FILE}"))


def _warn(lines: list[str]) -> None:
    for line in lines:
        print(f"warning: {line}", file=sys.stderr)


def cmd_validate(args: argparse.Namespace) -> None:
    for name in _names(args):
        spec, sha, warnings = validate(spec_path(Path(args.submissions), name), args.strict)
        _warn(warnings)
        print(f"ok  {name}  spec sha256 {sha[:12]}")


def cmd_build(args: argparse.Namespace) -> None:
    for name in _names(args):
        built = build(spec_path(Path(args.submissions), name), Path(args.dist), args.strict)
        _warn(built.warnings)
        print(f"built {built.zip_path}  (build context: {built.context_dir})")


def cmd_list(args: argparse.Namespace) -> None:
    for name in _names(args):
        print(name)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m packager", description="submission specs -> challenge zips")
    p.add_argument("--submissions", default=str(SUBMISSIONS), help="folder of <name>/spec.toml (default: %(default)s)")
    sub = p.add_subparsers(dest="command", required=True)
    for name, func, text in [
        ("validate", cmd_validate, "check specs; warn on unpinned revisions"),
        ("build", cmd_build, "render, check and zip specs into dist/"),
        ("list", cmd_list, "list the submissions"),
    ]:
        c = sub.add_parser(name, help=text)
        c.add_argument("names", nargs="*", help="submission names (default: all)")
        c.add_argument("--strict", action="store_true", help="refuse revisions that are not commit hashes")
        c.add_argument("--dist", default=str(DIST), help="output folder (default: %(default)s)")
        c.set_defaults(func=func)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        args.func(args)
    except (SpecError, PackagingError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
