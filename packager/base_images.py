"""The base-image table (data/base_images.toml): which image ships which torch and CUDA."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from importlib import resources


class UnknownBaseImage(KeyError):
    pass


@dataclass(frozen=True)
class BaseImage:
    key: str
    image: str
    torch: str
    cuda: str
    python: str
    gpus: str
    driver: str  # the oldest NVIDIA host driver its CUDA runs on ("none" for a CPU base)

    @property
    def tag(self) -> str | None:
        name = self.image.rsplit("/", 1)[-1]
        return name.split(":", 1)[1] if ":" in name else None


def load_table() -> dict[str, BaseImage]:
    raw = tomllib.loads(resources.files("packager").joinpath("data/base_images.toml").read_text(encoding="utf-8"))
    return {key: BaseImage(key=key, **fields) for key, fields in raw.items()}


def base_image(key: str) -> BaseImage:
    table = load_table()
    if key not in table:
        raise UnknownBaseImage(f"[image] base = {key!r} is not in packager/data/base_images.toml; use one of {sorted(table)}")
    return table[key]
