"""`make plan-N` and `make day-N`: the challenge's day budgeted, run in order, interrupted, resumed, reported.

One day on the tiny world (tests/tiny_world.py: Hub-layout data, submission 3's spec shortened, the
tiny rater as the quantized artifact) is shared by the module: it is interrupted once with SIGINT
while training (as a terminal's Ctrl-C reaches make and the day) and run again to the end. The
report is rendered in headless Chromium (Debian's `chromium`; skipped without it unless
REQUIRE_CHROMIUM=1) with every page-initiated request logged, and none may leave the page.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from conftest import REPO, copy_rater
from tiny_world import write_specs, write_world

PASSAGES = 8  # two Humpback batches: the tiny rater gives some of them a 5
SECTIONS = ("plan", "data", "quantization", "training", "humpback", "validation", "helm", "spec")
PLOTS = ("plan", "loss", "humpback")


def make(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(["make", "--no-print-directory", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)


def day_py(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(REPO / ".venv" / "bin" / "python"), "-m", "pipeline.day", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


def _log_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


@pytest.fixture(scope="module")
def world(tmp_path_factory, rater_gptq) -> Path:
    root = write_world(tmp_path_factory.mktemp("day"))
    copy_rater(rater_gptq, root / "rater-gptq")
    spec = root / "submissions" / "submission-3" / "spec.toml"
    spec.write_text(re.sub(r"(?m)^epochs = \d+", "epochs = 1", spec.read_text()))  # one epoch: a day in a minute
    return root


def _switches(world: Path, out: Path) -> list[str]:
    return [f"SUBMISSIONS={world / 'submissions'}", f"DATA_DIR={world / 'hub'}", f"MODEL={world / 'rater-gptq'}",
            f"OUT={out}", f"PASSAGES={PASSAGES}", "VALIDATE=0"]


@pytest.fixture(scope="module")
def day(world):
    """make day-3, SIGINTed while training (after two optimizer steps), then run again to the end."""
    out = world / "out"
    args = ["make", "--no-print-directory", "day-3", *_switches(world, out)]
    first = subprocess.Popen(args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             start_new_session=True)  # its own group: the SIGINT below is the terminal's Ctrl-C
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(first.stdout), daemon=True)
    reader.start()
    deadline = time.monotonic() + 400
    while len(_log_rows(out / "train" / "log.jsonl")) < 2:
        if first.poll() is not None or time.monotonic() > deadline:
            reader.join(5)
            pytest.fail("the day ended before training had logged two steps:\n" + "".join(lines)[-4000:])
        time.sleep(0.5)
    os.killpg(first.pid, signal.SIGINT)
    first.wait(timeout=120)
    reader.join(10)
    interrupted = {"rc": first.returncode, "output": "".join(lines), "steps": len(_log_rows(out / "train" / "log.jsonl"))}
    second = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=400)
    return out, interrupted, second


# --- the day, end to end -------------------------------------------------------------------------------


def test_an_interrupted_day_resumes_to_the_end(day):
    out, first, second = day
    assert first["rc"] != 0, first["output"][-3000:]
    assert "== day interrupted in train" in first["output"] and "make day-3" in first["output"]
    assert "== humpback: done" in first["output"] and "== data: done" in first["output"]
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    for i, stage in enumerate(("humpback", "data", "train", "train-bundle", "zip"), 1):
        assert f"== day {i}/5: {stage}:" in second.stdout and f"== {stage}: done in" in second.stdout
    assert "reused" in second.stdout and "resuming from" in second.stdout  # nothing finished was redone
    assert "== day finished: 5 stages" in second.stdout

    state = json.loads((out / "day" / "state.json").read_text())
    assert state["finished"] and state["stages"]["train"]["status"] == "done"
    assert [a["rc"] != 0 for a in state["stages"]["train"]["attempts"]] == [True, False]
    assert len(state["stages"]["humpback"]["attempts"]) == 2
    steps = [r["step"] for r in _log_rows(out / "train" / "log.jsonl")]
    assert steps == list(range(1, len(steps) + 1)) and len(steps) >= first["steps"]  # resumed, not restarted
    assert json.loads((out / "train" / "run.json").read_text())["finished"]
    assert (out / "dist" / "submission-3.zip").is_file() and (out / "dist" / "submission-3-train.zip").is_file()
    assert (out / "day" / "logs" / "train.log").read_text().count("$ ") == 2


def test_the_plan_after_the_day_reads_what_is_done(world, day):
    out, _, _ = day
    done = day_py("plan", "submission-3", "--submissions", str(world / "submissions"), "--model",
                  str(world / "rater-gptq"), "--out", str(out), "--passages", str(PASSAGES), "--json")
    assert done.returncode == 0, done.stderr
    plan = json.loads(done.stdout)
    status = {r["stage"]: r["status"] for r in plan["rows"]}
    assert status == {"quantize": "given", "humpback": "done", "data": "done", "train": "done",
                      "train-bundle": "done", "zip": "done", "validate": "to run"}
    assert json.loads((out / "day" / "plan.json").read_text())["rows"] == plan["rows"]


def test_the_report_holds_every_section_and_plot(day):
    out, _, _ = day
    page = (out / "day" / "report.html").read_text()
    for key in SECTIONS:
        assert f'<section id="{key}">' in page
    for plot in PLOTS:
        data = re.search(rf'id="plot-{plot}"[^>]* src="data:image/png;base64,([^"]+)"', page)
        assert data and base64.b64decode(data.group(1)).startswith(b"\x89PNG"), plot
    assert not re.search(r'(src|href)="(?!data:|#)', page)  # nothing to fetch: no file, no URL
    assert "kept at &gt;= 5" in page and "NOT pinned (a branch)" in page
    md = (out / "day" / "report.md").read_text()
    for plot in PLOTS:
        assert f"](img/{plot}.png)" in md and (out / "day" / "img" / f"{plot}.png").is_file()
    assert "## Plan against actual" in md and "## Spec and pinned revisions" in md


def _chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        if os.environ.get("REQUIRE_CHROMIUM") == "1":
            pytest.fail("chromium is missing and REQUIRE_CHROMIUM=1: apt-get install -y chromium")
        pytest.skip("no chromium (apt-get install -y chromium)")
    return found


def _render(chromium: str, page: Path, work: Path) -> tuple[str, list[str]]:
    """The page's DOM after loading, and every URL the page itself asked for (from Chromium's net log)."""
    net = work / "net.json"
    done = subprocess.run(
        [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={work / 'profile'}",
         "--host-resolver-rules=MAP * ~NOTFOUND",  # the browser's own background calls never leave the machine
         f"--log-net-log={net}", "--virtual-time-budget=3000", "--dump-dom", page.as_uri()],
        capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    text = net.read_text()
    try:
        log = json.loads(text)
    except json.JSONDecodeError:  # a log cut at exit lacks its closing
        log = json.loads(text.rstrip().rstrip(",") + "]}")
    start = log["constants"]["logEventTypes"]["URL_REQUEST_START_JOB"]
    jobs = [e.get("params", {}) for e in log["events"] if e["type"] == start]
    return done.stdout, [p["url"] for p in jobs if "url" in p and p.get("initiator") != "not an origin"]  # the page's


def test_the_report_renders_offline_in_chromium(day, tmp_path):
    chromium = _chromium()
    out, _, _ = day
    control = tmp_path / "control.html"  # the check itself: a page that does fetch is caught
    control.write_text('<!doctype html><img src="http://example.invalid/x.png">')
    _, fetched = _render(chromium, control, tmp_path / "control")
    assert fetched == ["http://example.invalid/x.png"]

    dom, fetched = _render(chromium, out / "day" / "report.html", tmp_path / "report")
    assert fetched == []
    for key in SECTIONS:
        assert f'<section id="{key}">' in dom
    for plot in PLOTS:
        assert f'id="plot-{plot}"' in dom


# --- the plan and its refusals ---------------------------------------------------------------------------


def _over_budget(tmp_path: Path) -> Path:
    """Submission 2 for 45 epochs: about 31 h of training on one 4090 by the repository's figures."""
    folder = tmp_path / "subs" / "long"
    folder.mkdir(parents=True)
    text = (REPO / "submissions" / "submission-2" / "spec.toml").read_text()
    text = re.sub(r'(?m)^name = ".*"', 'name = "long"', text, count=1)
    (folder / "spec.toml").write_text(re.sub(r"(?m)^epochs = \d+", "epochs = 45", text))
    return tmp_path / "subs"


def test_a_day_over_budget_is_refused_with_its_levers(tmp_path):
    subs = _over_budget(tmp_path)
    out = tmp_path / "out"
    plan = make("plan-long", f"SUBMISSIONS={subs}", f"OUT={out}")
    assert plan.returncode != 0
    assert "OVER the 24 h day" in plan.stdout
    assert "over the challenge's 24 h" in plan.stderr and "BUDGET=ignore" in plan.stderr
    assert re.search(r"training\.schedule\.epochs 45 -> \d+: saves [\d.]+ h \(fits the day alone\)", plan.stderr)
    assert json.loads((out / "day" / "plan.json").read_text())["levers"][0]["field"] == "training.schedule.epochs"

    refused = make("day-long", f"SUBMISSIONS={subs}", f"OUT={out}")
    assert refused.returncode != 0 and "training.schedule.epochs 45" in refused.stderr
    assert sorted(p.name for p in out.iterdir()) == ["day"]  # refused before any stage ran
    assert not (out / "day" / "state.json").exists()

    assert make("plan-long", f"SUBMISSIONS={subs}", f"OUT={out}", "BUDGET=ignore").returncode == 0


def test_the_real_spec_is_planned_from_the_repositorys_figures(tmp_path):
    done = day_py("plan", "submission-3", "--out", str(tmp_path), "--json")
    assert done.returncode in (0, 2), done.stderr
    plan = json.loads(done.stdout)
    rows = {r["stage"]: r for r in plan["rows"]}
    assert [r["stage"] for r in plan["rows"]] == ["quantize", "humpback", "data", "train", "train-bundle", "zip",
                                                  "validate"]
    assert rows["quantize"]["status"] == "estimated" and 0.3 < rows["quantize"]["hours"] < 2
    assert rows["humpback"]["hours"] > 5 and rows["train"]["hours"] > 1  # the measured H200 figures, moved to a 4090
    assert all(r["peak_gib"] <= 24 for r in rows.values() if r["peak_gib"] is not None)
    assert plan["helm"]["hours"] < plan["helm_budget_hours"]
    assert abs(plan["hours"] - sum(r["hours"] or 0 for r in plan["rows"])) < 1e-9
    assert (done.returncode == 2) == (plan["hours"] > plan["budget_hours"])


def test_a_failing_stage_stops_the_day_naming_the_command(tiny_model_dir, tmp_path):
    empty = tmp_path / "empty-hub"  # no data set there: the data stage fails
    empty.mkdir()
    subs = write_specs(tmp_path / "subs")
    done = make("day-2", f"SUBMISSIONS={subs}", f"DATA_DIR={empty}", f"MODEL={tiny_model_dir}",
                f"OUT={tmp_path / 'out'}", "VALIDATE=0", timeout=300)
    assert done.returncode != 0
    assert "error:" in done.stdout  # the stage's own error, as it printed it
    assert "== day stopped: data failed (exit 2)" in done.stderr and "`make day-2 " in done.stderr
    state = json.loads((tmp_path / "out" / "day" / "state.json").read_text())
    assert state["stages"]["data"]["status"] == "failed" and "train" not in state["stages"]
    assert (tmp_path / "out" / "day" / "report.html").is_file()


@pytest.mark.parametrize("switch, message", [
    ("MODEL=/nonexistent", "MODEL=/nonexistent: not a folder"),
    ("ADAPTER=/x", "ADAPTER=/x has no meaning for plan-3"),
])
def test_bad_switches_are_refused_before_anything(switch, message, tmp_path):
    done = make("plan-3", switch, f"OUT={tmp_path}")
    assert done.returncode != 0 and message in done.stderr


def test_a_spec_that_does_not_exist_names_the_fix(tmp_path):
    done = day_py("plan", "nope", "--out", str(tmp_path))
    assert done.returncode == 2 and "nope" in done.stderr


def test_the_stages_are_the_commands_a_person_would_type(tmp_path, monkeypatch):
    """The spec's stages in order; validate and eval as make targets with the day's artifact and adapter (dry run)."""
    from packager.spec import load_spec, spec_path
    from pipeline.day.layout import Layout
    from pipeline.day.stages import Switches, child_env, plan_stages

    spec, _ = load_spec(spec_path(REPO / "submissions", "submission-3"))
    lay = Layout(spec.name, REPO / "submissions", out=tmp_path, data_dir=tmp_path / "hub")
    stages = plan_stages(spec, lay, Switches(offline=True, run_eval=True))
    assert [s.name for s in stages] == ["quantize", "humpback", "data", "train", "train-bundle", "zip", "validate", "eval"]
    by = {s.name: s for s in stages}
    assert by["train"].argv[by["train"].argv.index("--model") + 1] == str(tmp_path / "artifact")  # the day's artifact
    assert by["data"].argv[by["data"].argv.index("--humpback") + 1] == str(tmp_path / "humpback" / "curated")
    validate = by["validate"].argv
    assert f"ADAPTER={tmp_path / 'train' / 'adapter'}" in validate and "OFFLINE=1" in validate
    monkeypatch.setenv("OUT", "/elsewhere")  # as `make day-3 OUT=...` exports its variables to the day
    monkeypatch.setenv("MAKEFLAGS", " -- OUT=/elsewhere")
    env = child_env(by["validate"])
    assert not {"MAKEFLAGS", "MAKELEVEL", "OUT"} & set(env)  # the nested make sees only what the day passes
    dry = subprocess.run([validate[0], "-n", *validate[1:]], capture_output=True, text=True, env=env)
    assert dry.returncode == 0 and "packager.validate submission-3" in dry.stdout, dry.stderr
    one = plan_stages(load_spec(spec_path(REPO / "submissions", "submission-1"))[0], lay, Switches(validate=False))
    assert [s.name for s in one] == ["quantize", "zip"]
