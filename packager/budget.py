"""Will the spec's model fit the challenge GPU? Weights at their bit width + KV cache + runtime.

Checked before an image is built, so a spec that cannot fit a 24 GB RTX 4090
is refused with the numbers instead of failing hours later inside HELM.
"""

from __future__ import annotations

import json
import tomllib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from .spec import Spec

GIB = 1 << 30
WEIGHT_SUFFIXES = (".safetensors", ".bin")


class BudgetError(Exception):
    """The model cannot fit the GPU (or its size cannot be known)."""


@dataclass(frozen=True)
class Shape:
    parameters: int
    embedding_parameters: int
    layers: int
    kv_heads: int
    head_dim: int
    exact_context: int | None = None


@dataclass(frozen=True)
class Budget:
    weights_bytes: float
    kv_cache_bytes: float
    overhead_bytes: float
    gpu_bytes: float
    gpu_name: str
    source: str

    @property
    def total_bytes(self) -> float:
        return self.weights_bytes + self.kv_cache_bytes + self.overhead_bytes

    @property
    def fits(self) -> bool:
        return self.total_bytes <= self.gpu_bytes

    def describe(self) -> str:
        g = lambda b: f"{b / GIB:.1f} GiB"  # noqa: E731
        verdict = "fits" if self.fits else "does NOT fit"
        return (
            f"weights {g(self.weights_bytes)} + KV cache {g(self.kv_cache_bytes)} + runtime {g(self.overhead_bytes)} "
            f"= {g(self.total_bytes)} of {g(self.gpu_bytes)} ({self.gpu_name}): {verdict} [{self.source}]"
        )


def known_shape(repo_id: str) -> Shape | None:
    """The table's shape of a Hub model, if it has one."""
    entry = models_table().get(repo_id)
    return Shape(**entry) if entry else None


def models_table() -> dict:
    return tomllib.loads(resources.files("packager").joinpath("data/models.toml").read_text(encoding="utf-8"))


def kv_cache_bytes(layers: int, kv_heads: int, head_dim: int, context: int, dtype_bytes: int = 2) -> float:
    return 2.0 * layers * kv_heads * head_dim * context * dtype_bytes  # keys and values


def weight_bytes(shape: Shape, bits: int | None, group_size: int) -> float:
    if bits is None:
        return shape.parameters * 2.0
    per_weight = bits + (32 / group_size if group_size > 0 else 0)  # + fp16 scale and packed zero per group
    quantized = shape.parameters - shape.embedding_parameters
    return quantized * per_weight / 8 + shape.embedding_parameters * 2.0


def _local_shape(model_dir: Path) -> tuple[float, Shape]:
    try:
        config = json.loads((model_dir / "config.json").read_text())
    except FileNotFoundError:
        raise BudgetError(f"{model_dir} has no config.json: not a Hugging Face model directory") from None
    except json.JSONDecodeError as e:
        raise BudgetError(f"{model_dir}/config.json is not valid JSON ({e})") from None
    size = sum(p.stat().st_size for p in model_dir.rglob("*") if p.name.endswith(WEIGHT_SUFFIXES))
    heads = config.get("num_attention_heads", 1)
    hidden = config.get("hidden_size", 0)
    shape = Shape(
        parameters=0,
        embedding_parameters=0,
        layers=config.get("num_hidden_layers", 0),
        kv_heads=config.get("num_key_value_heads", heads),
        head_dim=config.get("head_dim") or config.get("kv_channels") or hidden // max(heads, 1),
    )
    return float(size), shape


def estimate(spec: Spec, model_dir: Path | None = None) -> Budget:
    table = models_table()
    gpu = table["gpu"]
    context = spec.generation.context_length
    if model_dir is not None:
        weights, shape = _local_shape(model_dir)
        source = f"measured {model_dir}"
    else:
        key = spec.base_model.repo_id
        if key not in table:
            raise BudgetError(f"no shape for {key} in packager/data/models.toml: add it, or validate with a local MODEL")
        shape = Shape(**table[key])
        q = spec.quantization
        weights = weight_bytes(shape, q.bits if q else None, q.group_size if q else -1)
        source = f"estimated from {key}" + (f", {q.bits}-bit group {q.group_size}" if q else ", fp16")
    return Budget(
        weights_bytes=weights,
        kv_cache_bytes=kv_cache_bytes(shape.layers, shape.kv_heads, shape.head_dim, context),
        overhead_bytes=gpu["runtime_overhead_gib"] * GIB,
        gpu_bytes=gpu["memory_gib"] * GIB,
        gpu_name=gpu["name"],
        source=source + f", context {context}",
    )


def check(spec: Spec, model_dir: Path | None = None) -> Budget:
    budget = estimate(spec, model_dir)
    if not budget.fits:
        raise BudgetError(f"{spec.name}: {budget.describe()}; lower bits, context_length, or pick a smaller model")
    return budget
