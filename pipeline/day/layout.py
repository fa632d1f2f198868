"""Where a day's stages read and write: the stages' own defaults, or one OUT folder holding them all."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from packager.paths import DIST, REPO

BUILD = REPO / "build"


@dataclass(frozen=True)
class Layout:
    """One submission's day. `model` is MODEL (the quantized artifact: quantize is then skipped),
    `base` is BASE (a local base model for quantize), `out` is OUT (every stage's folder under it)."""

    name: str
    submissions: Path
    out: Path | None = None
    model: Path | None = None
    base: Path | None = None
    data_dir: Path | None = None
    passages: int | None = None

    def _at(self, sub: str, default: Path) -> Path:
        return self.out / sub if self.out is not None else default

    @property
    def artifact(self) -> Path:
        return self._at("artifact", BUILD / "artifacts" / self.name)

    @property
    def quantize_work(self) -> Path:
        return self._at("quantize", BUILD / "quantize" / self.name)

    @property
    def humpback(self) -> Path:
        return self._at("humpback", BUILD / "humpback" / self.name)

    @property
    def data(self) -> Path:
        return self._at("data", BUILD / "data" / self.name)

    @property
    def train(self) -> Path:
        return self._at("train", BUILD / "train" / self.name)

    @property
    def dist(self) -> Path:
        return self._at("dist", DIST)

    @property
    def day(self) -> Path:
        return self._at("day", BUILD / "day" / self.name)

    @property
    def eval(self) -> Path:
        return BUILD / "eval" / self.name

    def trained_on(self, quantizes: bool) -> Path | None:
        """The quantized model the later stages load: MODEL, else this day's artifact, else the spec's [artifact]."""
        if self.model is not None:
            return self.model
        return self.artifact if quantizes else None
