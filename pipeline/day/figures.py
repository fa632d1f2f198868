"""pipeline/day/figures.toml, validated: the measured (and assumed) figures a plan falls back on."""

from __future__ import annotations

import tomllib
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

FIGURES = Path(__file__).resolve().parent / "figures.toml"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelShape(_Strict):
    hidden: int = Field(gt=0)
    intermediate: int = Field(gt=0)
    heads: int = Field(gt=0)
    vocab: int = Field(gt=0)
    source: str


class Step(_Strict):
    stage: str
    batch: int = Field(gt=0)
    ms_per_step: float = Field(gt=0)
    peak_gib: float = Field(gt=0)


class HumpbackFigures(_Strict):
    source: str
    model: str
    device: str
    weight_gib: float = Field(gt=0)
    keep_rate: float = Field(gt=0, le=1)
    tokens_per_seed_pair: int = Field(gt=0)
    steps: list[Step] = Field(min_length=1)

    def step(self, stage: str, batch: int) -> tuple[Step, bool]:
        """The measured step of `stage` at `batch`, else the nearest batch (False: not the spec's batch)."""
        rows = [s for s in self.steps if s.stage == stage]
        best = min(rows, key=lambda s: abs(s.batch - batch))
        return best, best.batch == batch


class TrainingPath(_Strict):
    source: str
    speedup: float = Field(gt=0)
    peak_gib: float = Field(gt=0)


class TrainingFigures(_Strict):
    source: str
    model: str
    r: int
    max_length: int
    peak_gib: float
    paths: dict[str, TrainingPath] = {}


class SourceFigures(_Strict):
    examples: int | None = None
    tokens_per_example: int | None = None
    questions: dict[str, int] | None = None
    tokens_per_question: int | None = None
    tokens_per_example_fixed: int | None = None


class DataFigures(_Strict):
    source: str
    oasst1: SourceFigures
    lima: SourceFigures
    arc: SourceFigures
    humpback: SourceFigures


class HelmFigures(_Strict):
    source: str
    budget_hours: float = Field(gt=0)
    hours: float = Field(gt=0)
    peak_gib: float = Field(gt=0)
    hours_lora: float = Field(gt=0)
    peak_gib_lora: float = Field(gt=0)


class Figures(_Strict):
    shapes: dict[str, ModelShape]
    humpback: HumpbackFigures
    training: TrainingFigures
    data: DataFigures
    helm: HelmFigures


def load(path: Path = FIGURES) -> Figures:
    """The figures file, or a one-line error naming the field to fix."""
    try:
        return Figures.model_validate(tomllib.loads(path.read_text(encoding="utf-8")))
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise ValueError(f"{path}: cannot read the plan's figures ({e})") from None
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        raise ValueError(f"{path}: {where}: {err['msg']}; fix the figure (each has its source beside it)") from None
