"""The challenge's 2-hour limit, projected from an eval's measured per-request times.

Every scenario of the challenge's sample conf gets its request count (instances x perturbed
copies x shot settings, evaluation/conf.py) times the per-request time measured for that
scenario in this eval, or the eval's overall mean when the scenario was not run (the offline
profile runs none of them: the projection then says so). Times are the server's own
request_time, on the machine the eval ran on.
"""

from __future__ import annotations

from dataclasses import dataclass

from .conf import RunEntry
from .results import ScenarioRow

BUDGET_S = 2 * 3600


@dataclass(frozen=True)
class Line:
    scenario: str
    requests: int
    per_request_s: float
    measured: bool  # False: the eval's overall mean stands in


@dataclass(frozen=True)
class Projection:
    lines: list[Line]

    @property
    def seconds(self) -> float:
        return sum(l.requests * l.per_request_s for l in self.lines)

    def render(self) -> str:
        out = [f"projected challenge sample evaluation ({sum(l.requests for l in self.lines)} requests), on this machine:"]
        for l in self.lines:
            source = "measured" if l.measured else "overall mean (not run here)"
            out.append(f"  {l.scenario:<22} {l.requests:>6} requests x {l.per_request_s:7.3f} s = "
                       f"{l.requests * l.per_request_s / 60:7.1f} min   ({source})")
        verdict = "within" if self.seconds <= BUDGET_S else "OVER"
        out.append(f"  total {self.seconds / 3600:.2f} h: {verdict} the {BUDGET_S / 3600:.0f} h budget "
                   f"({100 * self.seconds / BUDGET_S:.0f}%)")
        return "\n".join(out)


def project(rows: list[ScenarioRow], challenge: list[RunEntry]) -> Projection:
    measured = {r.scenario: r.per_request_s for r in rows if r.requests}
    total_requests = sum(r.requests for r in rows)
    overall = sum(r.seconds for r in rows) / total_requests if total_requests else 0.0
    counts: dict[str, int] = {}
    for entry in challenge:
        counts[entry.scenario] = counts.get(entry.scenario, 0) + entry.requests(default_instances=1)
    return Projection([Line(s, n, measured.get(s, overall), s in measured) for s, n in counts.items()])
