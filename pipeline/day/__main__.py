"""python -m pipeline.day {plan,run,report} NAME [--model DIR] [--base DIR] [--data-dir DIR] [--out DIR] ...

The challenge's day for one spec: plan (every stage projected onto one RTX 4090, against 24 hours;
over budget is refused naming the levers), run (the stages in order as their own processes, each
skipping what is up to date; run it again after a failure, Ctrl-C, kill or reboot to go on), report
(build/day/NAME/report.html and report.md: plan against actual, and what each stage produced).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from packager.paths import SUBMISSIONS
from packager.spec import SpecError, load_spec, spec_path
from packager.staging import write_json

from . import figures as figures_file
from .layout import Layout
from .plan import DayPlan, Row, day_plan, hours_text
from .runner import State, run_stage
from .stages import Switches, plan_stages



class DayError(Exception):
    """A day that cannot start; the message names the problem and the fix."""


# --- 1. inputs -----------------------------------------------------------------------------------------


def inputs(args: argparse.Namespace):
    for flag, value in (("MODEL", args.model), ("BASE", args.base), ("DATA_DIR", args.data_dir)):
        if value is not None and not value.is_dir():
            raise DayError(f"{flag}={value}: not a folder")
    spec, _ = load_spec(spec_path(Path(args.submissions), args.name))
    lay = Layout(spec.name, Path(args.submissions), args.out, args.model, args.base, args.data_dir, args.passages)
    sw = Switches(budget_ignore=args.budget == "ignore", offline=args.offline, strict=args.strict,
                  validate=not args.no_validate, run_eval=args.eval, steps=args.steps, device=args.device)
    return spec, lay, sw


def again(args: argparse.Namespace) -> str:
    return args.again or shlex.join(["python", "-m", "pipeline.day", *sys.argv[1:]])


# --- 2. the plan ---------------------------------------------------------------------------------------


def planned(spec, lay: Layout, sw: Switches, args: argparse.Namespace, quiet: bool = False) -> DayPlan:
    plan = day_plan(spec, lay, figures_file.load(), validate=sw.validate, run_eval=sw.run_eval)
    write_json(lay.day / "plan.json", plan.to_json())
    if args.json:
        print(json.dumps(plan.to_json(), indent=2))
    elif not quiet:
        print(plan.table(), flush=True)
    return plan


def budget_gate(plan: DayPlan, sw: Switches, args: argparse.Namespace) -> int:
    """0 when the day fits (or BUDGET=ignore); 2 with the levers otherwise."""
    if not plan.over:
        return 0
    out = sys.stderr
    if sw.budget_ignore:
        print(f"BUDGET=ignore: {'; '.join(plan.over)}; going on", file=out)
        return 0
    print(f"error: {'; '.join(plan.over)} (plan in {plan_file(args)}). The largest levers in the spec:", file=out)
    for lever in plan.levers[:4]:
        print(f"  {lever.describe()}", file=out)
    print("Change the spec, or plan the day anyway with BUDGET=ignore", file=out)
    return 2


def plan_file(args: argparse.Namespace) -> Path:
    return Layout(args.name, Path(args.submissions), args.out).day / "plan.json"


# --- 3. the stages, in order -------------------------------------------------------------------------


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m{seconds % 60:02d}s" if seconds >= 3600 else \
        f"{seconds // 60}m{seconds % 60:02d}s"


def _planned(row: Row | None) -> str:
    if row is None or row.hours is None:
        return "not 4090 day time"
    return f"planned {hours_text(row.hours)} on one RTX 4090 ({row.status})"


def run_day(spec, lay: Layout, sw: Switches, args: argparse.Namespace) -> int:
    plan = planned(spec, lay, sw, args)
    gate = budget_gate(plan, sw, args)
    if gate:
        return gate
    stages = plan_stages(spec, lay, sw)
    state = State(lay.day / "state.json", spec.name)
    if (busy := state.still_running()) is not None:
        raise DayError(busy)
    state.set(plan=plan.to_json(), stages_in_order=[s.name for s in stages], again=again(args))
    rows = {r.stage: r for r in plan.rows}
    rows["eval"] = plan.helm
    for i, stage in enumerate(stages, 1):
        before = state.seconds(stage.name)
        spent = f"; {_clock(before)} spent before" if before else ""
        print(f"\n== day {i}/{len(stages)}: {stage.name}: {_planned(rows.get(stage.name))}{spent} ==", flush=True)
        outcome = run_stage(stage, lay.day / "logs" / f"{stage.name}.log", state)
        took = f"{_clock(outcome.seconds)} here ({_clock(before + outcome.seconds)} in all)"
        if outcome.rc == 0:
            state.record(stage.name, stage.argv, outcome, "done")
            print(f"== {stage.name}: done in {took}; {_planned(rows.get(stage.name))} ==", flush=True)
            continue
        status = "interrupted" if outcome.interrupted else "failed"
        state.record(stage.name, stage.argv, outcome, status)
        try:  # the report of a stopped day helps; its failure must not hide the stage's
            write_report(spec, lay, sw, args, quiet=True)
        except Exception as e:  # noqa: BLE001
            print(f"warning: the report was not written ({type(e).__name__}: {e})", file=sys.stderr)
        if status == "interrupted":
            print(f"\n== day interrupted in {stage.name} after {took}: run `{again(args)}` again to resume "
                  "(finished stages are kept) ==", file=sys.stderr, flush=True)
            return 130
        print(f"\n== day stopped: {stage.name} failed (exit {outcome.rc}) after {took}; its error is above "
              f"(log {lay.day / 'logs' / (stage.name + '.log')}). Fix it, then run `{again(args)}` to continue: "
              "finished stages are kept ==", file=sys.stderr, flush=True)
        return outcome.rc if 0 < outcome.rc < 128 else 1
    state.set(finished=True)
    path = write_report(spec, lay, sw, args, quiet=True)
    print(f"\n== day finished: {len(stages)} stages; report {path} (and {path.with_suffix('.md').name}) ==", flush=True)
    return 0


# --- 4. the report -----------------------------------------------------------------------------------


def write_report(spec, lay: Layout, sw: Switches, args: argparse.Namespace, quiet: bool = False) -> Path:
    from . import report

    state = State(lay.day / "state.json", spec.name)
    after = day_plan(spec, lay, figures_file.load(), validate=sw.validate, run_eval=sw.run_eval)
    path = report.write(spec, lay, state.data, after, Path(args.submissions))
    if not quiet:
        print(f"wrote {path} and {path.with_suffix('.md')}")
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipeline.day", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=["plan", "run", "report"])
    p.add_argument("name", help="submission name (submissions/NAME/spec.toml)")
    p.add_argument("--submissions", default=str(SUBMISSIONS))
    p.add_argument("--model", type=Path, help="the quantized artifact (MODEL=dir): quantize is skipped")
    p.add_argument("--base", type=Path, help="a local base model for quantize (BASE=dir)")
    p.add_argument("--data-dir", type=Path, help="local copies of Hub datasets (DATA_DIR=dir)")
    p.add_argument("--out", type=Path, help="one folder for every stage's output (OUT=dir)")
    p.add_argument("--passages", type=int, help="Humpback passages instead of the spec's (PASSAGES=n)")
    p.add_argument("--steps", type=int, help="stop training after n optimizer steps (STEPS=n; smoke runs)")
    p.add_argument("--budget", choices=["ignore"], help="plan or run past the 4090 day (BUDGET=ignore)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON (it is always written to plan.json)")
    p.add_argument("--offline", action="store_true", help="validate/eval from the local base image (OFFLINE=1)")
    p.add_argument("--strict", action="store_true", help="refuse unpinned revisions (STRICT=1)")
    p.add_argument("--no-validate", action="store_true", help="end with the zip, without make validate-N (VALIDATE=0)")
    p.add_argument("--eval", action="store_true", help="end with make eval-N (EVAL=1)")
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], help="for the GPU stages")
    p.add_argument("--again", help=argparse.SUPPRESS)  # the command that continues the day, as the user typed it
    args = p.parse_args(argv)
    for flag, value in (("--passages", args.passages), ("--steps", args.steps)):
        if value is not None and value <= 0:
            p.error(f"{flag} {value}: must be a positive number")
    try:
        spec, lay, sw = inputs(args)
        if args.command == "plan":
            return budget_gate(planned(spec, lay, sw, args), sw, args)
        if args.command == "report":
            write_report(spec, lay, sw, args)
            return 0
        return run_day(spec, lay, sw, args)
    except (DayError, SpecError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"interrupted: run `{again(args)}` again to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
