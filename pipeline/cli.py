"""What every stage's command line shares: the submission, its local inputs, their checks."""

from __future__ import annotations

import argparse
import os
import re
import shlex
import sys
from pathlib import Path
from typing import Callable

from packager.paths import SUBMISSIONS
from packager.spec import SpecError, load_spec, spec_path

from . import stops
from .hub import SourceError


def stage_parser(prog: str, doc: str | None, model_help: str, out_help: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=doc)
    p.add_argument("name", help="submission name (submissions/NAME/spec.toml)")
    p.add_argument("--submissions", default=str(SUBMISSIONS))
    p.add_argument("--model", type=Path, help=model_help)
    p.add_argument("--data-dir", type=Path, help="local copies of Hub datasets: DATA_DIR/<repo_id>/...")
    p.add_argument("--out", type=Path, help=out_help)
    return p


def add_run_switches(p: argparse.ArgumentParser, budget_help: str) -> None:
    """What the GPU stages (train, humpback) share: the budget override, the device, the 4090 memory cap."""
    p.add_argument("--budget", choices=["ignore"], help=budget_help)
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    p.add_argument("--emulate-4090", action="store_true", help="cap GPU memory at 24 GiB (on a bigger card)")


def run_stage(action: Callable[[], int], errors: tuple[type[BaseException], ...], resume: str) -> int:
    """A resumable stage's body: a known error is one line and status 2; Ctrl-C, SIGTERM or SIGHUP one line
    saying how to go on (`resume`) and the shell's status for the signal (130, 143, 129), not a traceback."""
    try:
        with stops.raised():
            return action()
    except errors as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except stops.Stopped as stop:
        stops.say(f"{stop.line}; {resume}")
        return stop.status
    except KeyboardInterrupt as stop:
        stops.say(f"interrupted ({stops.Interrupted(stops.status_of(stop) - 128).name}): {resume}")
        return stops.status_of(stop)


def command_again(target: str, name: str, drop: dict[str, str] | None = None) -> str:
    """The command that starts this stage again as it was started: make's `target-NAME` with the variables
    given on make's command line (from MAKEFLAGS), or this very python command. `drop` leaves out switches,
    as {make variable: python flag} (e.g. {"STEPS": "--steps"}: continuing after a STEPS stop)."""
    drop = drop or {}
    if os.environ.get("MAKELEVEL"):
        flags = os.environ.get("MAKEFLAGS", "")
        assignments = shlex.split(flags.split("-- ", 1)[1]) if "-- " in flags else []
        kept = [a for a in assignments if a.split("=", 1)[0] not in drop]
        short = name.removeprefix("submission-") if re.fullmatch(r"submission-\d+", name) else name
        return shlex.join(["make", f"{target}-{short}", *kept])
    words, argv = [], iter(getattr(sys, "orig_argv", sys.argv))
    for word in argv:
        if word.split("=", 1)[0] in drop.values():
            if "=" not in word:
                next(argv, None)  # the flag's value
            continue
        words.append(word)
    return shlex.join(words)


def check_local_inputs(args: argparse.Namespace) -> None:
    """MODEL and DATA_DIR, when given, must be folders: said before any slow work."""
    for flag, value in (("MODEL", args.model), ("DATA_DIR", args.data_dir)):
        if value is not None and not value.is_dir():
            raise SourceError(f"{flag}={value}: not a folder")


def spec_with(args: argparse.Namespace, section: str, purpose: str):
    """The submission's spec, its sha256, and the section the stage runs; refused when the spec lacks it."""
    spec, sha = load_spec(spec_path(Path(args.submissions), args.name))
    value = getattr(spec, section)
    if value is None:
        raise SpecError(f"{args.name}: the spec has no [{section}] section; there is nothing to {purpose}")
    return spec, sha, value
