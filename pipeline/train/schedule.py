"""The learning-rate schedule over the true number of optimizer steps.

Warm-up is linear from 0 over `warmup_ratio` of the steps (a fraction of a step
allowed, as the reference computed it), then cosine to 0, linear to 0, or
constant. Step k (0-based) trains at lr x factor(k): the first step's rate is
0, as under transformers' schedulers (`LambdaLR`), which the reference used.
"""

from __future__ import annotations

import math


def optimizer_steps(examples: int, epochs: int, batch_size: int, gradient_accumulation: int) -> int:
    """Steps per epoch are ceil(micro-batches / accumulation): a short last group still steps."""
    micro_batches = math.ceil(examples / batch_size)
    return epochs * math.ceil(micro_batches / gradient_accumulation)


def lr_factor(step: int, total: int, warmup_ratio: float, kind: str) -> float:
    warmup = total * warmup_ratio
    if step < warmup:
        return step / max(1.0, warmup)
    if kind == "constant":
        return 1.0
    progress = (step - warmup) / max(1.0, total - warmup)
    if kind == "linear":
        return max(0.0, 1.0 - progress)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
