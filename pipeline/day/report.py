"""build/day/NAME/report.html (one self-contained page, plots as data: URIs) and report.md (plots beside it).

Every section is always there: a stage that has not run says so. Nothing is fetched: no scripts,
no fonts, no stylesheets but the page's own; the page reads the same offline. Both files are
written whole (temporary file, then rename).
"""

from __future__ import annotations

import base64
import html
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path

from packager.spec import Spec, spec_path

from .layout import Layout
from .plan import DayPlan, hours_text

SECTIONS = {"plan": "Plan against actual", "data": "Training data", "quantization": "Quantization",
            "training": "Training", "humpback": "Humpback", "validation": "Validation", "helm": "HELM",
            "spec": "Spec and pinned revisions"}
PLOTS = ("plan", "loss", "humpback")


@dataclass
class Section:
    key: str
    blocks: list[tuple[str, object]]   # ("p", text) ("table", (head, rows)) ("img", name) ("pre", text)


def _json(path: Path) -> dict | list | None:
    try:
        return json.loads(path.read_text()) if path.is_file() else None
    except (OSError, json.JSONDecodeError):
        return None


def _fmt(v: object) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:,.3f}" if abs(v) < 100 else f"{v:,.1f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def _clock(seconds: float | None) -> str:
    if not seconds:
        return "-"
    s = int(seconds)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


# --- plots ---------------------------------------------------------------------------------------------


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return buf.getvalue()


def plot_plan(plan: DayPlan, state: dict) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in plan.rows if r.declared and r.hours is not None]
    fig, ax = plt.subplots(figsize=(7, 0.8 + 0.45 * max(len(rows), 1)))
    names = [r.stage for r in rows]
    here = [sum(a["seconds"] for a in state.get("stages", {}).get(r.stage, {}).get("attempts", [])) / 3600 for r in rows]
    largest = max([r.hours for r in rows] + here + [0.0])
    scale, unit = (1.0, "hours") if largest >= 1 or largest == 0 else (60.0, "minutes")  # a tiny day in minutes
    ax.barh(names, [r.hours * scale for r in rows], color="#4c72b0", label="planned, one RTX 4090")
    ax.barh(names, [h * scale for h in here], height=0.35, color="#dd8452", label="actual, this machine")
    if largest >= plan.budget_hours / 10:  # the day's limit, when it is on the scale
        ax.axvline(plan.budget_hours * scale, color="#c44e52", linestyle="--", label=f"{plan.budget_hours:.0f} h day")
    ax.invert_yaxis()
    ax.set_xlabel(unit)
    ax.legend(loc="best", fontsize=8)
    ax.set_title(f"{plan.submission}: {hours_text(plan.hours)} planned of the {plan.budget_hours:.0f} h day")
    return _png(fig)


def plot_loss(log: list[dict], title: str) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3))
    steps, losses = [r["step"] for r in log], [r["loss"] for r in log]
    ax.plot(steps, losses, color="#4c72b0", linewidth=1, label="loss")
    k = max(1, round(len(losses) ** 0.5))
    mean = [sum(losses[max(0, i - k + 1): i + 1]) / len(losses[max(0, i - k + 1): i + 1]) for i in range(len(losses))]
    ax.plot(steps, mean, color="#c44e52", linewidth=2, label=f"running mean ({k})")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.legend(fontsize=8)
    return _png(fig)


def plot_histogram(histogram: dict[str, int], threshold: int) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 2.6))
    keys = list(histogram)
    colors = ["#55a868" if k.isdigit() and int(k) >= threshold else "#8c8c8c" for k in keys]
    ax.bar(keys, [histogram[k] for k in keys], color=colors)
    ax.set_xlabel(f"score (kept at >= {threshold})")
    ax.set_ylabel("pairs")
    ax.set_title("Humpback: the seed model's ratings")
    return _png(fig)


# --- the sections ----------------------------------------------------------------------------------------


def plan_section(plan: DayPlan, state: dict, images: dict) -> Section:
    attempts = state.get("stages", {})
    head = ["stage", "work", "planned on a 4090", "peak GiB", "plan status", "day status", "actual here", "attempts"]
    rows = []
    for r in [*plan.rows, plan.helm]:
        s = attempts.get("eval" if r.stage.startswith("HELM") else r.stage, {})
        seconds = sum(a["seconds"] for a in s.get("attempts", []))
        rows.append([r.stage, r.work, hours_text(r.hours), _fmt(r.peak_gib), r.status, s.get("status", "-"),
                     _clock(seconds), str(len(s.get("attempts", [])))])
    verdict = "within" if plan.hours <= plan.budget_hours else "OVER"
    images["plan"] = plot_plan(plan, state)
    blocks: list = [("p", f"The day's projection on one {plan.gpu}: {hours_text(plan.hours)} of {plan.budget_hours:.0f} h "
                          f"({verdict}); peak {plan.peak_gib:.1f} GiB of {plan.gpu_gib:.0f} GiB. HELM's sample conf: "
                          f"{hours_text(plan.helm.hours)} of its {plan.helm_budget_hours:.0f} h ({plan.helm.status}). "
                          "Actual is wall time on the machine the day ran on, over every attempt."),
                    ("table", (head, rows)), ("img", "plan")]
    blocks.append(("table", (["stage", "where the plan's figures come from"],
                             [[r.stage, r.source] for r in plan.rows if r.declared and r.source])))
    if plan.levers:
        blocks.append(("table", (["lever", "now", "to", "saves h", "fits alone"],
                                 [[lv.field, _fmt(lv.now), _fmt(lv.to), _fmt(lv.saves_hours), "yes" if lv.fits else "no"]
                                  for lv in plan.levers])))
    return Section("plan", blocks)


def data_section(lay: Layout) -> Section:
    manifest = _json(lay.data / "manifest.json")
    if not manifest:
        return Section("data", [("p", f"Not built: no {lay.data / 'manifest.json'} (make data-N).")])
    head = ["source", "rows read", "used", "dropped", "conversations", "examples", "tokens", "answer tokens", "truncated"]
    rows = [[name, _fmt(e["rows_read"]), _fmt(e["rows_used"]),
             ", ".join(f"{k}: {v}" for k, v in e["dropped"].items()) or "-", _fmt(e["conversations"]),
             _fmt(e["examples"]), _fmt(e["tokens"]), _fmt(e["answer_tokens"]), _fmt(e["truncated"])]
            for name, e in manifest["sources"].items()]
    return Section("data", [("p", f"{manifest['examples']:,} examples, cut at {manifest['max_length']} tokens "
                                  f"({lay.data})."), ("table", (head, rows))])


def quantization_section(lay: Layout, spec: Spec) -> Section:
    if spec.quantization is None:
        return Section("quantization", [("p", "The spec declares no [quantization].")])
    artifact = lay.model if lay.model is not None else lay.artifact
    report = _json(artifact / "report.json")  # make quantize-N's, also when MODEL is an artifact it made
    if not report:
        why = f"MODEL={lay.model} is the quantized artifact, and" if lay.model is not None else "not run:"
        return Section("quantization", [("p", f"Not quantized by this day: {why} no {artifact / 'report.json'}.")])
    ppl = report.get("perplexity") or {}
    rows = [["fp16 base", _fmt(ppl.get("base"))], ["quantized", _fmt(ppl.get("quantized"))]]
    if ppl.get("base") and ppl.get("quantized"):
        rows.append(["change", f"{100 * (ppl['quantized'] / ppl['base'] - 1):+.3f}%"])
    return Section("quantization", [
        ("p", f"{report['quantization']['bits']}-bit GPTQ, group {report['quantization']['group_size']}, "
              f"{report.get('seconds')} s on {report.get('device')}. Held-out perplexity ({ppl.get('windows')} windows "
              f"of {ppl.get('seq_len')} tokens, {ppl.get('split')} split):"),
        ("table", (["model", "perplexity"], rows))])


def training_section(lay: Layout, spec: Spec, images: dict) -> Section:
    if spec.training is None:
        return Section("training", [("p", "The spec declares no [training].")])
    log = [json.loads(line) for line in (lay.train / "log.jsonl").read_text().splitlines() if line.strip()] \
        if (lay.train / "log.jsonl").is_file() else []
    run = _json(lay.train / "run.json") or {}
    if not log:
        return Section("training", [("p", f"Not run: no {lay.train / 'log.jsonl'}.")])
    images["loss"] = plot_loss(log, f"{spec.name}: QLoRA r={spec.training.lora.r}, {spec.training.optimizer.name}")
    state = "finished" if run.get("finished") else f"stopped at step {run.get('steps')} of {run.get('total_steps')}"
    return Section("training", [
        ("p", f"{state}; {len(log)} optimizer steps logged, loss {log[0]['loss']:.4f} -> {log[-1]['loss']:.4f}; "
              f"adapter in {lay.train / 'adapter'}."), ("img", "loss")])


def humpback_section(lay: Layout, spec: Spec, images: dict) -> Section:
    hb = spec.training.humpback if spec.training else None
    if hb is None:
        return Section("humpback", [("p", "The spec declares no [training.humpback].")])
    stages = (_json(lay.humpback / "manifest.json") or {}).get("stages", {})
    scored = stages.get("scored-2") or stages.get("scored-1")
    if not scored or "histogram" not in scored:
        return Section("humpback", [("p", f"Not run: no ratings in {lay.humpback / 'manifest.json'}.")])
    images["humpback"] = plot_histogram(scored["histogram"], scored["threshold"])
    blocks: list = [("p", f"{sum(scored['histogram'].values())} pairs rated, {scored['kept']} kept at >= "
                          f"{scored['threshold']}; curated set in {lay.humpback / 'curated'}."), ("img", "humpback")]
    kept = _kept(lay.humpback / "curated")
    if kept:
        blocks.append(("table", (["instruction", "passage (start)", "score"],
                                 [[r["instruction"][:200], r["output"][:200], str(r["score"])] for r in kept[:5]])))
    return Section("humpback", blocks)


def _kept(folder: Path) -> list[dict]:
    files = sorted((folder / "data").glob("*.parquet")) if (folder / "data").is_dir() else []
    if not files:
        return []
    import pyarrow.parquet as pq

    return pq.read_table(files[0], columns=["instruction", "output", "score"]).slice(0, 5).to_pylist()


def validation_section(lay: Layout, state: dict) -> Section:
    entry = state.get("stages", {}).get("validate")
    log = lay.day / "logs" / "validate.log"
    if not entry:
        return Section("validation", [("p", "Not run by this day (VALIDATE=0, or the day stopped before it).")])
    text = log.read_text(errors="replace") if log.is_file() else ""
    report = text[text.rfind("== validation report"):] if "== validation report" in text else text[-3000:]
    return Section("validation", [("p", f"make validate-N: {entry['status']} (exit {entry['attempts'][-1]['rc']})."),
                                  ("pre", report.strip())])


def helm_section(lay: Layout, plan: DayPlan, state: dict) -> Section:
    entry = state.get("stages", {}).get("eval")
    blocks: list = [("p", f"Projected for the challenge's sample conf: {hours_text(plan.helm.hours)} of "
                          f"{plan.helm_budget_hours:.0f} h ({plan.helm.source}).")]
    if not entry:
        blocks.append(("p", "Not run by this day (EVAL=1 runs make eval-N)."))
        return Section("helm", blocks)
    log = lay.day / "logs" / "eval.log"
    text = log.read_text(errors="replace") if log.is_file() else ""
    blocks.append(("p", f"make eval-N: {entry['status']} (exit {entry['attempts'][-1]['rc']})."))
    suites = sorted(lay.eval.glob("*/report.json"), key=lambda p: p.stat().st_mtime)
    report = _json(suites[-1]) if suites else None
    if report and report.get("runs"):
        blocks.append(("p", f"Suite {report.get('suite')} ({suites[-1].parent}), per scenario:"))
        blocks.append(("table", _helm_table(report["runs"])))
    projected = text[text.rfind("projected challenge sample"):] if "projected challenge sample" in text else text[-3000:]
    blocks.append(("pre", projected.strip()))
    return Section("helm", blocks)


def _helm_table(runs: list[dict]) -> tuple[list[str], list[list[str]]]:
    """make eval-N's report.json runs, per scenario: the instance-weighted metric, requests, time per request."""
    rows = []
    for scenario in dict.fromkeys(r["scenario"] for r in runs):
        mine = [r for r in runs if r["scenario"] == scenario]
        scored = [r for r in mine if r.get("value") is not None]
        weight = sum(r["instances"] for r in scored)
        value = sum(r["value"] * r["instances"] for r in scored) / weight if weight else None
        requests, seconds = sum(r["requests"] for r in mine), sum(r["seconds"] for r in mine)
        rows.append([scenario, mine[0]["metric"], _fmt(value), _fmt(sum(r["instances"] for r in mine)), _fmt(requests),
                     _fmt(sum(r["failed_requests"] for r in mine)), _fmt(seconds / requests if requests else None)])
    return ["scenario", "metric", "value", "instances", "requests", "failed", "s/request"], rows


def spec_section(spec: Spec, submissions: Path, lay: Layout) -> Section:
    refs = [[k, r.repo_id, r.revision, "pinned" if r.is_pinned else "NOT pinned (a branch)"]
            for k, r in spec.model_refs().items()]
    if spec.quantization is not None:
        c = spec.quantization.calibration
        refs.append(["calibration", c.dataset, c.revision, "pinned" if len(c.revision) == 40 else "NOT pinned"])
    for cfg in (spec.training.data if spec.training else []):
        refs.append([f"data: {cfg.source}", cfg.repo_id, cfg.revision,
                     "pinned" if len(cfg.revision) == 40 else "NOT pinned"])
    versions = (_json(lay.train / "run.json") or {}).get("versions") or {}
    blocks: list = [("table", (["reference", "repo", "revision", ""], refs))]
    if versions:
        blocks.append(("table", (["package (training)", "version"], [[k, _fmt(v)] for k, v in versions.items()])))
    blocks.append(("pre", spec_path(submissions, spec.name).read_text()))
    return Section("spec", blocks)


# --- rendering ---------------------------------------------------------------------------------------------

STYLE = """body{font:14px/1.45 system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.6em 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:left;vertical-align:top}
th{background:#f2f2f2}pre{background:#f7f7f7;padding:.6em;overflow-x:auto;font-size:12px}img{max-width:100%}
h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.6em}"""


def _html(title: str, sections: list[Section], images: dict[str, bytes]) -> str:
    e = html.escape
    out = [f"<!doctype html><html lang=en><head><meta charset=utf-8><title>{e(title)}</title><style>{STYLE}</style>"
           f"</head><body><h1>{e(title)}</h1><nav>" +
           " | ".join(f'<a href="#{s.key}">{e(SECTIONS[s.key])}</a>' for s in sections) + "</nav>"]
    for s in sections:
        out.append(f'<section id="{s.key}"><h2>{e(SECTIONS[s.key])}</h2>')
        for kind, value in s.blocks:
            if kind == "p":
                out.append(f"<p>{e(value)}</p>")
            elif kind == "pre":
                out.append(f"<pre>{e(value)}</pre>")
            elif kind == "img" and value in images:
                data = base64.b64encode(images[value]).decode()
                out.append(f'<img id="plot-{value}" alt="{e(value)} plot" src="data:image/png;base64,{data}">')
            elif kind == "table":
                head, rows = value
                out.append("<table><tr>" + "".join(f"<th>{e(h)}</th>" for h in head) + "</tr>" +
                           "".join("<tr>" + "".join(f"<td>{e(str(c))}</td>" for c in row) + "</tr>" for row in rows) +
                           "</table>")
        out.append("</section>")
    out.append("</body></html>")
    return "\n".join(out)


def _md(title: str, sections: list[Section], images: dict[str, bytes]) -> str:
    cell = lambda c: str(c).replace("|", "\\|").replace("\n", " ")  # noqa: E731
    out = [f"# {title}", ""]
    for s in sections:
        out += [f"## {SECTIONS[s.key]}", ""]
        for kind, value in s.blocks:
            if kind == "p":
                out += [value, ""]
            elif kind == "pre":
                out += ["```", value, "```", ""]
            elif kind == "img" and value in images:
                out += [f"![{value} plot](img/{value}.png)", ""]
            elif kind == "table":
                head, rows = value
                out += ["| " + " | ".join(map(cell, head)) + " |", "|" + " --- |" * len(head)]
                out += ["| " + " | ".join(map(cell, row)) + " |" for row in rows] + [""]
    return "\n".join(out)


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def write(spec: Spec, lay: Layout, state: dict, plan: DayPlan, submissions: Path) -> Path:
    """Both pages and the Markdown page's images; returns report.html's path."""
    images: dict[str, bytes] = {}
    sections = [plan_section(plan, state, images), data_section(lay), quantization_section(lay, spec),
                training_section(lay, spec, images), humpback_section(lay, spec, images),
                validation_section(lay, state), helm_section(lay, plan, state), spec_section(spec, submissions, lay)]
    title = f"{spec.name}: the challenge's day"
    for name, data in images.items():
        _write(lay.day / "img" / f"{name}.png", data)
    _write(lay.day / "report.md", _md(title, sections, images).encode())
    _write(lay.day / "report.html", _html(title, sections, images).encode())
    return lay.day / "report.html"
