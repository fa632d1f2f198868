"""The GPTQ run itself: GPTQModel with the spec's recipe, one decoder layer at a time.

GPTQModel is AutoGPTQ's maintained successor (AutoGPTQ no longer imports under
transformers 5). Its own additions are switched off so the algorithm is the
reference's plain GPTQ: no group-aware activation reordering (`act_group_aware`),
no round-to-nearest fallback for modules that see few tokens (a MoE concern).
"""

from __future__ import annotations

import csv
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

# GPTQModel sizes its CPU thread pools from the core count and fails on 2-core
# machines (its model loader asks for 2 workers of a 1-worker pool).
os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(max(2, (os.cpu_count() or 2) // 2)))

QUANT_LOG = "quant_log.csv"


@dataclass
class LayerStats:
    layer: int
    seconds: float = 0.0
    peak_gib: float = 0.0
    losses: dict[str, float] = field(default_factory=dict)


class LayerMeter:
    """Times each decoder layer and records its peak GPU memory, printing one line per layer.

    A forward pre-hook on every layer notices when the run moves on to the next one.
    """

    def __init__(self, layers: torch.nn.ModuleList, device: torch.device) -> None:
        self.total = len(layers)
        self.device = device
        self.stats: list[LayerStats] = []
        self._current: int | None = None
        self._started = 0.0
        self._handles = [layer.register_forward_pre_hook(self._hook(i)) for i, layer in enumerate(layers)]

    def _hook(self, index: int):
        def hook(module, args):
            if index != self._current:
                self._finish()
                self._current, self._started = index, time.perf_counter()
                if self.device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(self.device)

        return hook

    def _finish(self) -> None:
        if self._current is None or any(s.layer == self._current for s in self.stats):
            return
        peak = torch.cuda.max_memory_allocated(self.device) / (1 << 30) if self.device.type == "cuda" else 0.0
        stats = LayerStats(self._current, time.perf_counter() - self._started, peak)
        self.stats.append(stats)
        print(f"  layer {stats.layer + 1}/{self.total}: {stats.seconds:.1f} s, peak {stats.peak_gib:.2f} GiB", flush=True)

    def close(self) -> list[LayerStats]:
        self._finish()
        for h in self._handles:
            h.remove()
        return self.stats


def quantize_config(q) -> "object":
    from gptqmodel import QuantizeConfig

    return QuantizeConfig(
        bits=q.bits,
        group_size=q.group_size,
        desc_act=q.desc_act,
        sym=q.sym,
        damp_percent=q.damp_percent,
        true_sequential=True,
        act_group_aware=False,
        fallback=None,
    )


def run_gptq(base: Path, out: Path, q, windows: list[list[int]], device: torch.device, log_dir: Path) -> list[LayerStats]:
    """Quantize `base` (a Qwen2-layout folder) with the spec section `q`; save to `out`.

    GPTQModel writes one JSON log per processor into `./logs/` of the current
    directory; `log_dir` sends them to the stage's work folder instead.
    """
    from gptqmodel import GPTQModel
    from gptqmodel.looper import loop_processor

    log_dir.mkdir(parents=True, exist_ok=True)
    loop_processor._PROJECT_LOG_DIR = log_dir

    model = GPTQModel.load(str(base), quantize_config(q), device=str(device))
    calibration = [{"input_ids": torch.tensor([w]), "attention_mask": torch.ones(1, len(w), dtype=torch.long)} for w in windows]
    meter = LayerMeter(model.model.model.layers, device)
    try:
        model.quantize(calibration, batch_size=1)
    finally:
        stats = meter.close()
    model.save(str(out))
    attach_losses(stats, out / QUANT_LOG)
    return stats


def attach_losses(stats: list[LayerStats], log: Path) -> None:
    """Per-module GPTQ losses from GPTQModel's quant_log.csv (layer, module, loss, ...)."""
    if not log.is_file():
        return
    by_layer = {s.layer: s for s in stats}
    with log.open(newline="") as f:
        for row in csv.DictReader(f):
            layer = int(row["layer"])
            entry = by_layer.setdefault(layer, LayerStats(layer))
            entry.losses[row["module"]] = float(row["loss"])
    stats[:] = sorted(by_layer.values(), key=lambda s: s.layer)
