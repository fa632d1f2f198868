"""The day's stages as the commands a person would type, in order, each with its own folder.

Every stage runs as its own process (`python -m pipeline.<stage>`, `python -m packager ...`, and
`make validate-N` / `make eval-N` for the container stages, whose prerequisites live in the
Makefile): its output, its exit status and its resumability stay its own.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field

from packager.paths import REPO
from packager.spec import Spec

from .layout import Layout


@dataclass(frozen=True)
class Switches:
    """The day's switches (make plan-N / day-N): what the stages are told beyond the spec."""

    budget_ignore: bool = False
    offline: bool = False
    strict: bool = False
    validate: bool = True
    run_eval: bool = False
    steps: int | None = None
    device: str | None = None


@dataclass(frozen=True)
class Stage:
    name: str
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)  # added to the day's environment


def _opt(flag: str, value: object | None) -> list[str]:
    return [] if value is None else [flag, str(value)]


# The day's own switches: make exports command-line variables to its recipes' environment, so a nested
# make would read them; it gets only what the day passes. (CONF, SUITE, URL, ... still reach make eval-N.)
DAY_SWITCHES = ("SUBMISSIONS", "MODEL", "BASE", "ADAPTER", "DATA_DIR", "OUT", "PASSAGES", "STEPS", "BUDGET", "OFFLINE",
                "STRICT", "VALIDATE", "EVAL", "JSON", "DIST")


def _make_env() -> dict[str, str]:
    """Removed from a nested make's environment (an empty value removes): the day's make and its switches."""
    return {k: "" for k in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL", "MAKEOVERRIDES", *DAY_SWITCHES)}


def _make(target: str, variables: dict[str, object | None]) -> list[str]:
    return ["make", "--no-print-directory", "-C", str(REPO), target,
            *[f"{k}={v}" for k, v in variables.items() if v not in (None, "", False)]]


def plan_stages(spec: Spec, lay: Layout, sw: Switches) -> list[Stage]:
    """The stages the spec declares, in the day's order."""
    py, name = sys.executable, spec.name
    common = [name, "--submissions", str(lay.submissions)]
    budget = ["--budget", "ignore"] if sw.budget_ignore else []
    device = _opt("--device", sw.device)
    quantizes = spec.quantization is not None and lay.model is None
    model = lay.trained_on(quantizes)
    stages: list[Stage] = []
    if quantizes:
        stages.append(Stage("quantize", [py, "-m", "pipeline.quantize", *common, "--out", str(lay.artifact),
                                         "--work", str(lay.quantize_work), *_opt("--model", lay.base),
                                         *_opt("--data-dir", lay.data_dir), *budget, *device]))
    t = spec.training
    if t is not None:
        if t.humpback is not None:
            stages.append(Stage("humpback", [py, "-m", "pipeline.humpback", *common, "--out", str(lay.humpback),
                                             *_opt("--model", model), *_opt("--data-dir", lay.data_dir),
                                             *_opt("--passages", lay.passages), *budget, *device]))
        curated = ["--humpback", str(lay.humpback / "curated")] if t.humpback is not None else []
        stages.append(Stage("data", [py, "-m", "pipeline.data", *common, "--out", str(lay.data),
                                     *_opt("--model", model or lay.base), *_opt("--data-dir", lay.data_dir), *curated]))
        stages.append(Stage("train", [py, "-m", "pipeline.train", *common, "--data", str(lay.data),
                                      "--out", str(lay.train), *_opt("--model", model), *_opt("--steps", sw.steps),
                                      *budget, *device]))
        stages.append(Stage("train-bundle", [py, "-m", "packager.train_bundle", *common, "--dist", str(lay.dist)]))
    stages.append(Stage("zip", [py, "-m", "packager", "--submissions", str(lay.submissions), "build",
                                *(["--strict"] if sw.strict else []), "--dist", str(lay.dist), name]))
    container = {"SUBMISSIONS": lay.submissions, "OFFLINE": "1" if sw.offline else None,
                 "STRICT": "1" if sw.strict else None, "MODEL": model,
                 "ADAPTER": lay.train / "adapter" if t is not None and model is not None else None}
    if sw.validate:
        stages.append(Stage("validate", _make(f"validate-{name}", container), _make_env()))
    if sw.run_eval:
        stages.append(Stage("eval", _make(f"eval-{name}", container), _make_env()))
    return stages


def child_env(stage: Stage) -> dict[str, str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **stage.env}
    return {k: v for k, v in env.items() if v != "" or k not in stage.env}
