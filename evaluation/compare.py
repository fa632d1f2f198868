"""`make eval-compare A=... B=...`: two evals side by side, per scenario: the main metric and the time.

    python -m evaluation.compare A B

A and B are suite folders written by `make eval-N` (build/eval/NAME/SUITE), or NAME/SUITE
under build/eval. Scenarios either eval ran are listed; a dash marks one the other did not run.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .results import EVAL_ROOT, ScenarioRow, by_scenario, from_json


def locate(given: str) -> Path:
    for candidate in (Path(given), EVAL_ROOT / given):
        if (candidate / "report.json").is_file():
            return candidate
    raise FileNotFoundError(f"{given}: no eval there (no report.json); give a suite folder written by make eval-N, "
                            f"e.g. build/eval/submission-1/offline, or NAME/SUITE under {EVAL_ROOT}")


def load(folder: Path) -> tuple[dict, dict[str, ScenarioRow]]:
    report = json.loads((folder / "report.json").read_text(encoding="utf-8"))
    return report, {r.scenario: r for r in by_scenario(from_json(report["runs"]))}


def _value(row: ScenarioRow | None) -> str:
    return "-" if row is None or row.value is None else f"{row.value:.3f}"


def render(a_name: str, a: dict[str, ScenarioRow], b_name: str, b: dict[str, ScenarioRow]) -> str:
    head = f"{'scenario':<22} {'metric':<24} {'A':>7} {'B':>7} {'B-A':>7}  {'A s/req':>8} {'B s/req':>8} {'B/A s/req':>9}"
    lines = [f"A = {a_name}", f"B = {b_name}", head, "-" * len(head)]
    for scenario in dict.fromkeys([*a, *b]):
        ra, rb = a.get(scenario), b.get(scenario)
        metric = (ra or rb).metric
        delta = (f"{rb.value - ra.value:+.3f}" if ra and rb and ra.value is not None and rb.value is not None else "-")
        ta = f"{ra.per_request_s:.3f}" if ra else "-"
        tb = f"{rb.per_request_s:.3f}" if rb else "-"
        ratio = f"{rb.per_request_s / ra.per_request_s:.2f}x" if ra and rb and ra.per_request_s > 0 else "-"
        lines.append(f"{scenario:<22} {metric:<24} {_value(ra):>7} {_value(rb):>7} {delta:>7}  {ta:>8} {tb:>8} {ratio:>9}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m evaluation.compare", description=__doc__.splitlines()[0])
    p.add_argument("a")
    p.add_argument("b")
    args = p.parse_args(argv)
    try:
        (ra, a), (rb, b) = load(locate(args.a)), load(locate(args.b))
    except (FileNotFoundError, json.JSONDecodeError, KeyError, TypeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(render(f"{args.a} ({ra['submission']}, suite {ra['suite']})", a, f"{args.b} ({rb['submission']}, suite "
                 f"{rb['suite']})", b))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
