"""The day's budget: every stage the spec declares, projected onto one RTX 4090, against 24 hours.

Each row takes the best figure there is, in this order: the stage's finished output (done), the
stage's own plan measured on this machine (measured: quantize's plan.json, train's plan.json,
Humpback's manifest), else the stage's own projection function fed with the repository's measured
figures (estimated: pipeline/day/figures.toml, packager/data/gpus.toml and models.toml). Nothing
here imports torch or loads a model: `make plan-N` runs anywhere, in seconds.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from packager.budget import Shape, estimate, models_table, weight_bytes
from packager.spec import Spec

from ..humpback.plan import HumpbackPlan, Projection, Timed, project_stage
from ..quantize.plan import LayerShape
from ..quantize.plan import project as quantize_project
from ..train import plan as train_plan
from ..train.schedule import optimizer_steps
from .figures import Figures
from .layout import Layout

GIB = 1 << 30
STAGES = ("quantize", "humpback", "data", "train", "train-bundle", "zip", "validate", "eval")


def hours_text(hours: float | None) -> str:
    """Hours as a person reads them: minutes below a tenth of an hour."""
    if hours is None:
        return "-"
    return f"{hours:.2f} h" if hours >= 0.1 or hours == 0 else f"{hours * 60:.1f} min"


@dataclass
class Row:
    """One stage of the day."""

    stage: str
    declared: bool
    work: str = ""
    hours: float | None = None       # projected on one RTX 4090 (None: not GPU time)
    peak_gib: float | None = None
    status: str = "estimated"        # done / measured / estimated / given / off / not declared
    source: str = ""                 # where the figures come from
    detail: dict = field(default_factory=dict)


@dataclass
class Lever:
    """A spec field whose change would shorten the day: now -> to, and the hours it saves."""

    field: str
    now: object
    to: object
    saves_hours: float
    fits: bool                       # the day fits with this change alone

    def describe(self) -> str:
        verdict = "fits the day alone" if self.fits else "not enough alone"
        return f"{self.field} {self.now} -> {self.to}: saves {self.saves_hours:.1f} h ({verdict})"


@dataclass
class DayPlan:
    submission: str
    rows: list[Row]
    budget_hours: float
    gpu: str
    gpu_gib: float
    helm: Row
    helm_budget_hours: float
    levers: list[Lever] = field(default_factory=list)

    @property
    def hours(self) -> float:
        return sum(r.hours or 0.0 for r in self.rows if r.declared)

    @property
    def peak_gib(self) -> float:
        return max([r.peak_gib or 0.0 for r in self.rows if r.declared] or [0.0])

    @property
    def over(self) -> list[str]:
        found = []
        if self.hours > self.budget_hours:
            found.append(f"projected {self.hours:.1f} h on one {self.gpu}, over the challenge's {self.budget_hours:.0f} h")
        for r in self.rows:
            if r.declared and r.peak_gib is not None and r.peak_gib > self.gpu_gib and r.status != "done":
                found.append(f"{r.stage}: projected peak {r.peak_gib:.1f} GiB, over the {self.gpu}'s {self.gpu_gib:.0f} GiB")
        return found

    def table(self) -> str:
        head = f"{'stage':<13} {'work':<44} {'4090':>9} {'peak GiB':>9}  status"
        lines = [f"{self.submission}: the day on one {self.gpu} ({self.budget_hours:.0f} h, {self.gpu_gib:.0f} GiB)", head,
                 "-" * len(head)]
        for r in [*self.rows, self.helm]:
            hours = "-" if r.hours is None else hours_text(r.hours)
            peak = "-" if r.peak_gib is None else f"{r.peak_gib:.1f}"
            lines.append(f"{r.stage:<13} {r.work[:44]:<44} {hours:>9} {peak:>9}  {r.status}")
        lines.append("-" * len(head))
        verdict = "within" if self.hours <= self.budget_hours else "OVER"
        lines.append(f"{'the day':<13} {'':<44} {hours_text(self.hours):>9} {self.peak_gib:>9.1f}  {verdict} the "
                     f"{self.budget_hours:.0f} h day ({100 * self.hours / self.budget_hours:.0f}%)")
        if self.helm.hours is not None:
            verdict = "within" if self.helm.hours <= self.helm_budget_hours else "OVER"
            lines.append(f"HELM sample conf: {self.helm.hours:.2f} h, {verdict} its {self.helm_budget_hours:.0f} h "
                         f"({self.helm.status})")
        for r in self.rows:
            if r.declared and r.source:
                lines.append(f"  {r.stage}: {r.source}")
        return "\n".join(lines)

    def to_json(self) -> dict:
        return {"submission": self.submission, "gpu": self.gpu, "gpu_gib": self.gpu_gib,
                "budget_hours": self.budget_hours, "hours": self.hours, "peak_gib": self.peak_gib,
                "over": self.over, "rows": [_slim(asdict(r)) for r in self.rows], "helm": asdict(self.helm),
                "helm_budget_hours": self.helm_budget_hours, "levers": [asdict(lv) for lv in self.levers]}


def _slim(row: dict) -> dict:
    """A row for JSON: per-example lengths (the max_length lever's input) left out."""
    sources = row["detail"].get("sources")
    if sources:
        row["detail"]["sources"] = {k: {f: v for f, v in s.items() if f != "lengths"} for k, s in sources.items()}
    return row


# --- the model's shape: a local folder's config.json, else the tables -------------------------------


@dataclass(frozen=True)
class ModelShape:
    layer: LayerShape
    vocab: int
    parameters: int
    embedding_parameters: int
    source: str

    @property
    def budget_shape(self) -> Shape:
        return Shape(self.parameters, self.embedding_parameters, self.layer.layers, self.layer.kv_heads,
                     self.layer.head_dim)


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text()) if path.is_file() else None
    except (OSError, json.JSONDecodeError):
        return None


def model_shape(spec: Spec, figures: Figures, local: list[Path]) -> ModelShape:
    for folder in local:
        config = _read_json(folder / "config.json") if folder is not None else None
        if config and "num_attention_heads" in config and "intermediate_size" in config:
            if config.get("model_type") == "qwen":  # Qwen v1: its MLP width counts both halves
                config = {**config, "intermediate_size": config["intermediate_size"] // 2,
                          "num_hidden_layers": config["num_hidden_layers"]}
            layer = LayerShape.from_config(config)
            vocab = int(config["vocab_size"])
            embeddings = vocab * layer.hidden * (1 if config.get("tie_word_embeddings") else 2)
            return ModelShape(layer, vocab, embeddings + layer.layers * layer.layer_params, embeddings,
                              f"{folder}/config.json")
    repo = spec.base_model.repo_id
    table, shapes = models_table(), figures.shapes
    if repo not in table or repo not in shapes:
        raise ValueError(f"{spec.name}: no shape for {repo} in packager/data/models.toml and pipeline/day/figures.toml: "
                         "add it there, or plan with a local MODEL=dir")
    t, s = table[repo], shapes[repo]
    layer = LayerShape(t["layers"], s.hidden, s.intermediate, s.heads, t["kv_heads"], t["head_dim"])
    return ModelShape(layer, s.vocab, t["parameters"], t["embedding_parameters"],
                      f"{repo} (packager/data/models.toml, figures.toml shapes)")


def lora_parameters(spec: Spec, shape: ModelShape) -> int:
    """Trainable LoRA parameters: r x (in + out) per targeted module and layer."""
    try:
        from packager.lora_targets import resolve
    except ImportError:  # before the move to packager
        from ..train.targets import resolve
    lora, L = spec.training.lora, shape.layer
    widths = {"self_attn.q_proj": (L.hidden, L.heads * L.head_dim), "self_attn.k_proj": (L.hidden, L.kv_heads * L.head_dim),
              "self_attn.v_proj": (L.hidden, L.kv_heads * L.head_dim), "self_attn.o_proj": (L.heads * L.head_dim, L.hidden),
              "mlp.gate_proj": (L.hidden, L.intermediate), "mlp.up_proj": (L.hidden, L.intermediate),
              "mlp.down_proj": (L.intermediate, L.hidden)}
    layers = L.layers if lora.layers == "all" else len(set(lora.layers))
    return layers * sum(lora.r * sum(widths[m]) for m in resolve(lora.target_modules))


def training_projection(spec: Spec, shape: ModelShape, figures: Figures, examples: int, tokens: int, epochs: int,
                        longest: int) -> tuple[train_plan.Plan, str]:
    """The trainer's own projection (its FLOPs path at the measured 4090 efficiency) and where the peak comes from."""
    t = spec.training
    s = t.schedule
    trainable = lora_parameters(spec, shape)
    q = spec.quantization
    weights = weight_bytes(shape.budget_shape, q.bits if q else 8, q.group_size if q else 128)
    estimated = train_plan.estimate_memory(int(weights), trainable, train_plan.STATE_BYTES[t.optimizer.name],
                                           shape.layer.layers, shape.layer.hidden, shape.vocab, longest)
    probe = train_plan.Probe(device="cpu", tokens=1, seconds=1.0, peak_bytes=None, longest=longest)
    plan = train_plan.project(probe, examples=examples, epochs=epochs,
                              steps=optimizer_steps(examples, epochs, s.batch_size, s.gradient_accumulation),
                              total_tokens=tokens * epochs, parameters=shape.parameters, trainable=trainable,
                              optimizer=t.optimizer.name, estimated_bytes=estimated)
    m = figures.training
    measured_shape = (spec.base_model.repo_id == m.model and t.lora.r == m.r and s.max_length == m.max_length
                      and shape.source.startswith(m.model))
    if measured_shape:
        plan.peak_gib_4090, plan.memory_source = m.peak_gib, "measured (figures.toml [training])"
    path = "fast" if t.path == "auto" else t.path  # auto: the fast path on CUDA, as on a 4090
    note = f"the {path} path"
    if path in m.paths:
        fast = m.paths[path]
        plan.hours_4090 /= fast.speedup
        plan.card = f"{plan.card}, {path} path / {fast.speedup:g}"
        note += f" at {fast.speedup:g}x the reference (figures.toml [training.paths.{path}])"
        if measured_shape:
            plan.peak_gib_4090 = fast.peak_gib
            plan.memory_source = f"measured on the {path} path"
    return plan, f"{note}; peak {plan.memory_source}"


# --- the rows -----------------------------------------------------------------------------------------


def quantize_row(spec: Spec, lay: Layout, shape: ModelShape) -> Row:
    q = spec.quantization
    if q is None:
        return Row("quantize", False, status="not declared")
    if lay.model is not None:
        return Row("quantize", False, "MODEL given", 0.0, None, "given", f"MODEL={lay.model} is the quantized artifact")
    cal = q.calibration
    work = f"{shape.layer.layers} layers x {cal.num_samples} windows of {cal.seq_len}"
    report = _read_json(lay.artifact / "report.json")
    if report and "plan" in report:
        p = report["plan"]
        ppl = report.get("perplexity") or {}
        return Row("quantize", True, work, p["hours"], p["peak_gib"], "done",
                   f"{lay.artifact}/report.json ({report.get('seconds')} s on {report.get('device')})",
                   {"seconds_here": report.get("seconds"), "perplexity": ppl})
    saved = _read_json(lay.quantize_work / "plan.json")
    if saved and "hours" in saved:
        return Row("quantize", True, work, saved["hours"], saved["peak_gib"], "estimated",
                   f"the stage's plan {lay.quantize_work}/plan.json")
    plan = quantize_project(shape.layer, cal.num_samples, cal.seq_len, models_table()["gpu"])
    return Row("quantize", True, work, plan.hours, plan.peak_gib, "estimated",
               f"pipeline/quantize/plan.py on {shape.source} at gptq_efficiency (models.toml [gpu])",
               {"seconds_per_layer": plan.seconds_per_layer})


def humpback_estimate(spec: Spec, shape: ModelShape, figures: Figures, passages: int) -> tuple[HumpbackPlan, float, str]:
    """Humpback's own plan classes fed with the measured batch timings and the trainer's projection."""
    hb, f = spec.training.humpback, figures.humpback
    pairs = hb.seed.limit
    seed_plan, _ = training_projection(spec, shape, figures, pairs, pairs * f.tokens_per_seed_pair, hb.seed_epochs,
                                       min(spec.training.schedule.max_length, 2 * f.tokens_per_seed_pair))
    seed_hours = seed_plan.hours_4090 * (3 if hb.iterations == 2 else 2)
    stages, peaks, notes = [], [seed_plan.peak_gib_4090], []
    q = spec.quantization
    weights = weight_bytes(shape.budget_shape, q.bits if q else 8, q.group_size if q else 128)
    for stage, new_tokens in (("generated", hb.generate.max_new_tokens), ("scored", hb.rating.max_new_tokens)):
        step, exact = f.step(stage, hb.batch_size)
        # The rows the step was measured with: batch_size is the engine's cap, and fewer may fit.
        timed = Timed(stage, min(step.batch, hb.batch_size), step.ms_per_step / 1000 * new_tokens, new_tokens, 0)
        stages.append(project_stage(timed, passages, f.device, int(weights)))
        if shape.source.startswith(f.model):  # measured on this shape; another model's peak says nothing
            peaks.append(step.peak_gib)
        if not exact:
            notes.append(f"{stage} measured at batch {step.batch}, not {hb.batch_size}")
    if hb.iterations == 2:  # M1 rates every pair again
        s1 = stages[1]
        stages.append(Projection("scored-2", s1.items, s1.hours_here, s1.hours_4090, s1.how))
    plan = HumpbackPlan(seed_hours, stages, train_plan.cards()["target"]["hours"])
    return plan, max(peaks), "; ".join(notes)


def humpback_row(spec: Spec, lay: Layout, shape: ModelShape, figures: Figures) -> Row:
    hb = spec.training.humpback if spec.training else None
    if hb is None:
        return Row("humpback", False, status="not declared")
    passages = lay.passages or hb.passages
    work = f"{passages:,} passages, {hb.seed.limit:,} seed pairs x {hb.seed_epochs} ep"
    manifest = _read_json(lay.humpback / "manifest.json") or {}
    stages = manifest.get("stages", {})
    saved = stages.get("plan", {})
    detail = {"passages": passages, "per_passage_hours": None}
    if "hours_4090" in saved and saved.get("stages") and saved["stages"][0].get("items") == passages:
        status = "done" if "curated" in stages and (lay.humpback / "curated").is_dir() else "measured"
        per = sum(s["hours_4090"] for s in saved["stages"]) / max(passages, 1)
        detail.update(per_passage_hours=per, seed_hours=saved["seed_training_hours"])
        _, peak, _ = humpback_estimate(spec, shape, figures, passages)
        return Row("humpback", True, work, saved["hours_4090"], peak, status,
                   f"the stage's own probe in {lay.humpback}/manifest.json (peak: figures.toml)", detail)
    plan, peak, note = humpback_estimate(spec, shape, figures, passages)
    per = sum(s.hours_4090 for s in plan.stages) / max(passages, 1)
    detail.update(per_passage_hours=per, seed_hours=plan.seed_training_hours, lines=plan.lines())
    source = f"pipeline/humpback/plan.py on figures.toml [humpback] ({figures.humpback.device}), seed models by " \
             "pipeline/train/plan.py" + (f"; {note}" if note else "")
    return Row("humpback", True, work, plan.hours_4090, peak, "estimated", source, detail)


def data_sources(spec: Spec, lay: Layout, figures: Figures, passages: int | None) -> tuple[dict[str, dict], str]:
    """Per source: examples, tokens, the longest example (counted by make data-N, or estimated)."""
    manifest = _read_json(lay.data / "manifest.json")
    if manifest and manifest.get("submission") == spec.name:
        lengths = _lengths(lay.data / "train.parquet")
        rows = {}
        for name, e in manifest["sources"].items():
            rows[name] = {"examples": e["examples"], "tokens": e["tokens"], "truncated": e.get("truncated", 0),
                          "counted": True, "lengths": lengths.get(name)}
        return rows, "done"
    d, rows = figures.data, {}
    for cfg in spec.training.data:
        f = getattr(d, cfg.source)
        if cfg.source == "arc":
            questions = sum(f.questions.get(s, 0) for s in cfg.splits)
            n = math.ceil(questions / cfg.questions_per_example)
            per = f.tokens_per_example_fixed + cfg.questions_per_example * f.tokens_per_question
        elif cfg.source == "humpback":
            hb = spec.training.humpback
            curated = lay.humpback / "manifest.json"
            kept = ((_read_json(curated) or {}).get("stages", {}).get("curated", {}) or {}).get("rows")
            n = kept if kept is not None else round((passages or (hb.passages if hb else 0)) * figures.humpback.keep_rate)
            per = f.tokens_per_example
        else:
            n = cfg.expect or getattr(cfg, "limit", None) or f.examples
            per = f.tokens_per_example
        per = min(per, spec.training.schedule.max_length)
        rows[cfg.source] = {"examples": n, "tokens": n * per, "tokens_per_example": per, "counted": False}
    return rows, "estimated"


def _lengths(parquet: Path) -> dict[str, list[int]]:
    """Each example's token count per source, from the data stage's train.parquet (for the max_length lever)."""
    try:
        import pyarrow.compute as pc
        import pyarrow.parquet as pq

        table = pq.read_table(parquet, columns=["source", "input_ids"])
    except Exception:  # no parquet (or no pyarrow): the lever falls back on the mean
        return {}
    found: dict[str, list[int]] = {}
    for source, n in zip(table.column("source").to_pylist(), pc.list_value_length(table.column("input_ids")).to_pylist()):
        found.setdefault(source, []).append(n)
    return found


def data_row(spec: Spec, lay: Layout, sources: dict, status: str) -> Row:
    examples, tokens = sum(s["examples"] for s in sources.values()), sum(s["tokens"] for s in sources.values())
    source = f"{lay.data}/manifest.json" if status == "done" else \
        "figures.toml [data] (an assumption until make data-N counts them)"
    return Row("data", True, f"{examples:,} examples, {tokens:,} tokens", None, None, status, source,
               {"sources": sources})


def train_row(spec: Spec, lay: Layout, shape: ModelShape, figures: Figures, sources: dict, data_status: str) -> Row:
    s = spec.training.schedule
    examples, tokens = sum(v["examples"] for v in sources.values()), sum(v["tokens"] for v in sources.values())
    work = f"{tokens:,} tokens x {s.epochs} ep"
    run = _read_json(lay.train / "run.json") or {}
    saved = _read_json(lay.train / "plan.json")
    detail = {"tokens_per_epoch": tokens, "epochs": s.epochs}
    if saved and "hours_4090" in saved and saved.get("total_tokens") == tokens * s.epochs:
        status = "done" if run.get("finished") else "measured"
        detail["hours_per_epoch"] = saved["hours_4090"] / s.epochs
        return Row("train", True, work, saved["hours_4090"], saved["peak_gib_4090"], status,
                   f"the stage's own probe in {lay.train}/plan.json ({saved['card']})", detail)
    plan, memory = training_projection(spec, shape, figures, examples, tokens, s.epochs, s.max_length)
    detail["hours_per_epoch"] = plan.hours_4090 / s.epochs
    status = "done" if run.get("finished") else "estimated"
    counted = "tokens counted by make data-N" if data_status == "done" else "tokens estimated"
    return Row("train", True, work, plan.hours_4090, plan.peak_gib_4090, status,
               f"pipeline/train/plan.py's FLOPs projection at training_efficiency (gpus.toml); {counted}; {memory}", detail)


def helm_row(spec: Spec, lay: Layout, figures: Figures, served: Path | None) -> Row:
    f = figures.helm
    lora = spec.adapter is not None
    peak = f.peak_gib_lora if lora else f.peak_gib
    local = served is not None and (served / "config.json").is_file()
    try:  # the packager's serving estimate: measured from a local artifact, else from the models table
        budget = estimate(spec, served if local else None).total_bytes / GIB
        peak = budget if local else max(peak, budget)
    except Exception:  # a shape the tables lack: the measured figure stands
        pass
    return Row("HELM (eval)", True, "2,451 requests (sample conf)", f.hours_lora if lora else f.hours, peak,
               "estimated", "figures.toml [helm]" + (" (unmerged LoRA)" if lora else ""))


# --- levers -------------------------------------------------------------------------------------------


def levers(spec: Spec, plan: DayPlan) -> list[Lever]:
    """What each spec field would save, largest first: the smallest change that fits, else the largest one."""
    over = plan.hours - plan.budget_hours
    rows = {r.stage: r for r in plan.rows if r.declared}
    found: list[Lever] = []

    def add(name: str, now, options: list, saves) -> None:
        best = None
        for to in options:  # from the mildest change to the strongest
            saved = saves(to)
            if saved <= 0:
                continue
            best = Lever(name, now, to, saved, saved >= over)
            if best.fits:
                break
        if best is not None:
            found.append(best)

    train = rows.get("train")
    if train is not None and train.hours:
        s = spec.training.schedule
        per_epoch = train.detail.get("hours_per_epoch") or train.hours / s.epochs
        add("training.schedule.epochs", s.epochs, list(range(s.epochs - 1, 0, -1)), lambda e: (s.epochs - e) * per_epoch)
        sources = (rows.get("data").detail.get("sources") if rows.get("data") else None) or {}
        tokens = sum(v["tokens"] for v in sources.values())
        if tokens:
            h_per_token = per_epoch / tokens

            def cut(limit: int) -> float:
                kept = sum(sum(min(n, limit) for n in v["lengths"]) if v.get("lengths")
                           else v["examples"] * min(v["tokens"] / max(v["examples"], 1), limit) for v in sources.values())
                return (tokens - kept) * h_per_token
            add("training.schedule.max_length", s.max_length,
                [m for m in (1536, 1024, 768, 512, 256) if m < s.max_length], cut)
    hb = rows.get("humpback")
    if hb is not None and hb.hours and hb.detail.get("per_passage_hours"):
        n, per = hb.detail["passages"], hb.detail["per_passage_hours"]
        enough = math.floor(n - over / per)  # the most passages that fit, everything else unchanged
        add("training.humpback.passages", n, [enough] if 0 < enough < n else
            [p for p in (int(n * k) for k in (0.75, 0.5, 0.25, 0.1)) if p > 0], lambda p: (n - p) * per)
    q = rows.get("quantize")
    if q is not None and q.hours and q.status != "done":
        ns = spec.quantization.calibration.num_samples
        add("quantization.calibration.num_samples", ns, [m for m in (ns // 2, ns // 4) if m > 0],
            lambda m: q.hours * (ns - m) / ns)
    return sorted(found, key=lambda lv: -lv.saves_hours)


# --- the whole plan -----------------------------------------------------------------------------------


def day_plan(spec: Spec, lay: Layout, figures: Figures, validate: bool = True, run_eval: bool = False) -> DayPlan:
    quantizes = spec.quantization is not None and lay.model is None
    local = [lay.model, lay.base, lay.quantize_work / "base-qwen2"]
    shape = model_shape(spec, figures, [p for p in local if p is not None])
    rows = [quantize_row(spec, lay, shape)]
    if spec.training is not None:
        rows.append(humpback_row(spec, lay, shape, figures))
        sources, status = data_sources(spec, lay, figures, lay.passages)
        rows.append(data_row(spec, lay, sources, status))
        rows.append(train_row(spec, lay, shape, figures, sources, status))
        rows.append(_file_row("train-bundle", lay.dist / f"{spec.name}-train.zip", "the training reproduction zip"))
    else:
        rows += [Row(s, False, status="not declared") for s in ("humpback", "data", "train", "train-bundle")]
    rows.append(_file_row("zip", lay.dist / f"{spec.name}.zip", "the entry's zip"))
    rows.append(Row("validate", validate, "container, HELM's client", None, None, "to run" if validate else "off",
                    "make validate-N (not 4090 day time)"))
    served = lay.trained_on(quantizes)
    helm = helm_row(spec, lay, figures, served)
    target = train_plan.cards()["target"]
    plan = DayPlan(spec.name, rows, target["hours"], target["name"], target["memory_gib"], helm,
                   figures.helm.budget_hours)
    if run_eval:
        rows.append(Row("eval", True, "HELM's conf (EVAL=1)", None, None, "to run", "make eval-N: its own 2 h budget"))
    plan.levers = levers(spec, plan) if plan.hours > plan.budget_hours else []
    return plan


def _file_row(stage: str, path: Path, what: str) -> Row:
    return Row(stage, True, what, None, None, "done" if path.is_file() else "to run", f"{path} (CPU, seconds)")
