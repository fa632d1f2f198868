"""`make eval-N`: HELM's own runner against a submission, its summary, a table and the 2-hour projection.

    python -m evaluation NAME [--offline] [--conf FILE] [--max-eval-instances N] [--suite NAME]
                         [--url URL] [--model DIR] [--adapter DIR] [--submissions DIR] [--out DIR]

Without --url the submission's image is built and run exactly as `make validate-N` runs it
(--network none, read-only, the tiny stand-in model with --offline), and helm-run runs inside the
container's network namespace against http://127.0.0.1:80. HELM comes from `.venv-helm/` (`make
helm-venv`, a pinned lock of its own). The suite's folder (`build/eval/NAME/SUITE/`) appears only
once the eval has ended; it then holds HELM's output (runs/, helm-summarize's files), both tools'
logs and report.json, also when a run failed, for inspection. Exit status: 0 every run passed,
1 a run failed (named), 2 the eval could not start.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from packager.paths import REPO, SUBMISSIONS

from .budget import project
from .conf import CHALLENGE_SAMPLE, OFFLINE, ConfError, read_conf
from .results import EVAL_ROOT, as_json, by_scenario, read_suite, table

HELM_VENV = REPO / ".venv-helm"
OFFLINE_INSTANCES = 10  # the offline profile's default: seconds on a CPU
CONF_INSTANCES = 1000  # helm-run needs a value; the challenge conf's entries each set their own, which wins
_RUNNING = re.compile(r"INFO\s+Running (\S+) \{")
_SPECS = re.compile(r"entries produced (\d+) run specs")
_FAILED = re.compile(r"Failed runs: \[(.*)\]")
# HELM retries a failed call to the server, then gives up: a request fails its run, but a tokenization inside a
# metric only logs and the run goes on with wrong statistics. Both count here, attributed to the running run.
_SERVER_ERROR = re.compile(r"Local Model error: (.*)")
_GAVE_UP = re.compile(r"Failed to (\w+) after retrying")

Wrap = Callable[[list[str]], list[str]]  # puts a host command where it can reach the server (a netns)


class EvalError(RuntimeError):
    """The eval could not start or run; the message names the fix."""


def say(message: str) -> None:
    print(f"[eval] {message}", file=sys.stderr, flush=True)


def helm_tool(name: str) -> str:
    tool = HELM_VENV / "bin" / name
    if not tool.is_file():
        raise EvalError(f"{tool} is missing: run `make helm-venv` (HELM in a venv of its own, from "
                        "requirements/helm-eval.lock), or use `make eval-N`, which creates it")
    return str(tool)


@dataclass
class HelmRun:
    exit_code: int = 0
    failed: list[str] = field(default_factory=list)  # runs HELM reported failed
    server_errors: dict[str, int] = field(default_factory=dict)  # run -> server errors (retried or not)
    gave_up: dict[str, int] = field(default_factory=dict)  # run -> calls HELM abandoned after its retries
    last_error: str = ""


def run_helm(wrap: Wrap, url: str, conf: Path, suite: str, max_eval: int, work: Path) -> HelmRun:
    """helm-run, its output streamed to work/helm-run.log with one progress line per run."""
    cmd = wrap([helm_tool("helm-run"), "--conf-paths", str(conf), "--suite", suite, "--max-eval-instances",
                str(max_eval), "-o", str(work), "--disable-cache"])
    env = {k: v for k, v in os.environ.items() if k != "HF_TOKEN"} | {"HELM_HTTP_MODEL_BASE_URL": url}
    outcome = HelmRun()
    total, started, current = "?", 1, "(before any run)"
    with open(work / "helm-run.log", "w", encoding="utf-8") as log, subprocess.Popen(
            cmd, cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1) as proc:
        try:
            for line in proc.stdout:
                log.write(line)
                if m := _SPECS.search(line):
                    total = m[1]
                elif m := _RUNNING.search(line):
                    current = m[1]
                    say(f"run {started}/{total}: {current}")
                    started += 1
                elif m := _SERVER_ERROR.search(line):
                    outcome.server_errors[current] = outcome.server_errors.get(current, 0) + 1
                    outcome.last_error = m[1]
                elif m := _GAVE_UP.search(line):
                    outcome.gave_up[current] = outcome.gave_up.get(current, 0) + 1
                elif m := _FAILED.search(line):
                    outcome.failed = [r.strip().strip('"') for r in m[1].split(",") if r.strip()]
        except BaseException:  # Ctrl-C, SIGTERM: helm-run goes too
            proc.terminate()
            raise
    outcome.exit_code = proc.returncode
    return outcome


def summarize(suite: str, work: Path) -> int:
    """helm-summarize over the suite (reads files only: runs on the host)."""
    with open(work / "helm-summarize.log", "w", encoding="utf-8") as log:
        return subprocess.run([helm_tool("helm-summarize"), "--suite", suite, "-o", str(work)], cwd=work,
                              stdout=log, stderr=subprocess.STDOUT).returncode


@contextmanager
def server(args) -> Iterator[tuple[str, Wrap, str]]:
    """(base URL, command wrapper, description): a given URL, or the submission's container."""
    if args.url:
        yield args.url.rstrip("/"), (lambda cmd: cmd), args.url
        return
    from packager.validate import Report, serving

    report = Report(args.name)
    with serving(args.name, args.offline, args.model, args.adapter, args.timeout, report, args.submissions,
                 args.strict) as (_, container):
        for key, value in report.lines:
            say(f"{key}: {value}")
        yield "http://127.0.0.1:80", lambda cmd: container.in_netns(*cmd), f"container of {args.name} ({dict(report.lines)['image']})"


def evaluate(args) -> int:
    conf = args.conf or (OFFLINE if args.offline else CHALLENGE_SAMPLE)
    entries = read_conf(conf)
    max_eval = args.max_eval_instances or (OFFLINE_INSTANCES if args.offline else CONF_INSTANCES)
    suite = args.suite or ("offline" if args.offline else "challenge")
    helm_tool("helm-run")  # before any image is built
    final = args.out / args.name / suite
    work = args.out / args.name / f".{suite}.partial-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        started = time.perf_counter()
        with server(args) as (url, wrap, where):
            say(f"helm-run: {len(entries)} entries of {conf} against {where}, suite {suite}")
            helm = run_helm(wrap, url, conf.resolve(), suite, max_eval, work.resolve())
        wall = time.perf_counter() - started
        summarized = summarize(suite, work.resolve())
        results = read_suite(work / "runs" / suite) if (work / "runs" / suite).is_dir() else []
        write_report(work, args.name, suite, conf, where, max_eval, results, helm, summarized, wall)
        shutil.rmtree(final, ignore_errors=True)
        work.rename(final)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise

    rows = by_scenario(results)
    print(f"== eval {args.name}, suite {suite} ({conf.name}, {where}) ==")
    print(table(rows))
    print(project(rows, read_conf(CHALLENGE_SAMPLE)).render())
    print(f"HELM output: {final}/ (helm-summarize {'done' if summarized == 0 else 'FAILED: see helm-summarize.log'})")
    problems = []
    if helm.failed:
        problems.append("failed runs: " + ", ".join(helm.failed))
    elif helm.exit_code != 0:
        last = next((l for l in reversed((final / "helm-run.log").read_text(errors="replace").splitlines()) if l.strip()), "")
        problems.append(f"helm-run exited with {helm.exit_code} ({last.strip()[:200]}): see {final}/helm-run.log")
    if helm.gave_up:
        problems.append("server calls HELM gave up on (its statistics are wrong) in " +
                        ", ".join(f"{run} ({n})" for run, n in helm.gave_up.items()))
    if helm.server_errors:
        print("server errors seen by HELM (retried): " + ", ".join(f"{run}: {n}" for run, n in helm.server_errors.items())
              + f"; last: {helm.last_error}")
    bad = [f"{r.scenario} ({r.failed_requests} of {r.requests} requests)" for r in rows if r.failed_requests]
    if bad:
        problems.append("failed requests in " + ", ".join(bad))
    if summarized != 0:
        problems.append("helm-summarize failed")
    if not results:
        problems.append("no run finished")
    if problems:
        print("== FAILED: " + "; ".join(problems) + " ==")
        return 1
    print("== PASSED ==")
    return 0


def write_report(work: Path, name: str, suite: str, conf: Path, where: str, max_eval: int, results, helm: HelmRun,
                 summarized: int, wall: float) -> None:
    report = {"submission": name, "suite": suite, "conf": str(conf), "server": where, "max_eval_instances": max_eval,
              "helm_run_exit": helm.exit_code, "failed_runs": helm.failed, "server_errors": helm.server_errors,
              "abandoned_calls": helm.gave_up, "helm_summarize_exit": summarized, "wall_s": wall,
              "runs": as_json(results)}
    (work / "report.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m evaluation", description=__doc__.splitlines()[0])
    p.add_argument("name", help="submission name, e.g. submission-1")
    p.add_argument("--offline", action="store_true", help="HELM's offline scenarios, the local base image, the tiny "
                   "stand-in model (unless --model)")
    p.add_argument("--conf", type=Path, help="a run-spec conf (default: the challenge's sample, or the offline one)")
    p.add_argument("--max-eval-instances", type=int, help="instances per run for entries that set none")
    p.add_argument("--suite", help="HELM suite name (default: challenge, or offline)")
    p.add_argument("--url", help="an already running submission (no image is built)")
    p.add_argument("--model", type=Path, help="local model directory to mount")
    p.add_argument("--adapter", type=Path, help="local adapter directory to mount")
    p.add_argument("--submissions", type=Path, default=SUBMISSIONS, help="folder of <name>/spec.toml")
    p.add_argument("--strict", action="store_true", help="refuse revisions that are not commit hashes")
    p.add_argument("--timeout", type=float, default=1200, help="seconds to wait for /health (default 1200)")
    p.add_argument("--out", type=Path, default=EVAL_ROOT, help="where suites are written (default build/eval)")
    args = p.parse_args(argv)
    problems = []
    if args.max_eval_instances is not None and args.max_eval_instances < 1:
        problems.append(f"MAX_EVAL_INSTANCES={args.max_eval_instances}: give a whole number of at least 1")
    if args.suite is not None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", args.suite):
        problems.append(f"SUITE={args.suite!r}: use letters, digits, '_', '.' and '-' (it names a folder)")
    if args.url and not re.match(r"https?://[^/\s]+", args.url):
        problems.append(f"URL={args.url!r}: give the server's base URL, e.g. http://127.0.0.1:8080")
    if args.url and (args.model or args.adapter):
        problems.append("MODEL/ADAPTER mount weights into a container this eval starts; with URL the server is yours")
    for given in (args.model, args.adapter):
        if given is not None and not given.is_dir():
            problems.append(f"{given} is not a directory")
    if args.conf is not None and not args.conf.is_file():
        problems.append(f"CONF={args.conf}: no such file; give a HELM run-spec conf (see evaluation/confs/)")
    if problems:
        for problem in problems:
            print(f"error: {problem}", file=sys.stderr)
        return 2
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _interrupt)
    from packager.checks import PackagingError
    from packager.docker_cli import DockerError
    from packager.spec import SpecError
    from packager.budget import BudgetError

    try:
        return evaluate(args)
    except (EvalError, ConfError, SpecError, PackagingError, DockerError, BudgetError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: nothing was written; the container (if one started) was removed", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
