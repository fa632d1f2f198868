"""HELM's output folder -> one row per run and per scenario: main metric, requests, failures, tokens, time.

Read from the files helm-run writes for every run (`runs/<suite>/<run>/`): `run_spec.json` (the
run's name), `stats.json` (metrics, averaged over instances), `per_instance_stats.json` (token
counts per instance) and `scenario_state.json` (every request and its result: success, time).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

# The metric a scenario is judged on, as data (HELM's own choice for each; exact_match otherwise).
MAIN_METRIC = {
    "mmlu": "exact_match",
    "bbq": "quasi_exact_match",
    "truthful_qa": "exact_match",
    "gsm": "final_number_exact_match",
    "summarization_cnndm": "rouge_2",
    "big_bench": "exact_match",
    "simple_mcqa": "exact_match",
    "simple_classification": "exact_match",
}
DEFAULT_METRIC = "exact_match"
EVAL_ROOT = Path(__file__).resolve().parent.parent / "build" / "eval"  # make eval-N's suites: NAME/SUITE


@dataclass(frozen=True)
class RunResult:
    run: str  # HELM's run name, e.g. "mmlu:subject=anatomy,method=multiple_choice_joint,model=neurips_local,..."
    scenario: str
    metric: str
    value: float | None  # None: the run wrote no such statistic
    instances: int
    requests: int
    failed_requests: int
    prompt_tokens: int
    completion_tokens: int
    seconds: float  # summed request times, as the server reported them


def _load(path: Path):
    return json.loads(path.read_text(encoding="utf-8"))


def _stat(stats: list[dict], name: str) -> float | None:
    for s in stats:
        key = s["name"]
        if key["name"] == name and key.get("split") == "test" and not key.get("perturbation"):
            return s.get("mean")
    return None


def read_run(folder: Path) -> RunResult:
    name = _load(folder / "run_spec.json")["name"]
    scenario = name.split(":", 1)[0]
    metric = MAIN_METRIC.get(scenario, DEFAULT_METRIC)
    states = _load(folder / "scenario_state.json")["request_states"]
    failed = sum(1 for s in states if not (s.get("result") or {}).get("success"))
    seconds = sum((s.get("result") or {}).get("request_time") or 0.0 for s in states)
    instances = {s["instance"].get("id") for s in states if s["instance"].get("split") == "test"}
    prompt = completion = 0
    if (folder / "per_instance_stats.json").is_file():
        for row in _load(folder / "per_instance_stats.json"):
            for s in row.get("stats", []):
                if s["name"]["name"] == "num_prompt_tokens":
                    prompt += int(s.get("sum") or 0)
                elif s["name"]["name"] == "num_completion_tokens":
                    completion += int(s.get("sum") or 0)
    stats = _load(folder / "stats.json") if (folder / "stats.json").is_file() else []
    return RunResult(name, scenario, metric, _stat(stats, metric), len(instances), len(states), failed, prompt,
                     completion, seconds)


def read_suite(runs: Path) -> list[RunResult]:
    """Every finished run under HELM's `runs/<suite>/` folder (a run folder holds run_spec.json)."""
    return [read_run(d) for d in sorted(runs.iterdir()) if (d / "run_spec.json").is_file() and
            (d / "scenario_state.json").is_file()]


@dataclass(frozen=True)
class ScenarioRow:
    scenario: str
    metric: str
    value: float | None  # instance-weighted mean over the scenario's runs
    runs: int
    instances: int
    requests: int
    failed_requests: int
    prompt_tokens: int
    completion_tokens: int
    seconds: float

    @property
    def per_request_s(self) -> float:
        return self.seconds / self.requests if self.requests else 0.0


def by_scenario(results: list[RunResult]) -> list[ScenarioRow]:
    rows = []
    for scenario in dict.fromkeys(r.scenario for r in results):
        runs = [r for r in results if r.scenario == scenario]
        scored = [r for r in runs if r.value is not None]
        weight = sum(r.instances for r in scored)
        value = sum(r.value * r.instances for r in scored) / weight if weight else None
        rows.append(ScenarioRow(scenario, runs[0].metric, value, len(runs), sum(r.instances for r in runs),
                                sum(r.requests for r in runs), sum(r.failed_requests for r in runs),
                                sum(r.prompt_tokens for r in runs), sum(r.completion_tokens for r in runs),
                                sum(r.seconds for r in runs)))
    return rows


def table(rows: list[ScenarioRow]) -> str:
    head = (f"{'scenario':<22} {'metric':<26} {'value':>7} {'inst':>5} {'req':>5} {'fail':>5} "
            f"{'prompt tok':>10} {'compl tok':>9} {'time s':>8} {'s/req':>7}")
    lines = [head, "-" * len(head)]
    for r in rows:
        value = "-" if r.value is None else f"{r.value:.3f}"
        lines.append(f"{r.scenario:<22} {r.metric:<26} {value:>7} {r.instances:>5} {r.requests:>5} {r.failed_requests:>5} "
                     f"{r.prompt_tokens:>10} {r.completion_tokens:>9} {r.seconds:>8.1f} {r.per_request_s:>7.3f}")
    return "\n".join(lines)


def as_json(results: list[RunResult]) -> list[dict]:
    return [asdict(r) for r in results]


def from_json(rows: list[dict]) -> list[RunResult]:
    return [RunResult(**r) for r in rows]
