"""Will the whole recipe fit one RTX 4090 day? Projected from a few measured micro-batches.

Time: the probe's tokens per second on this card, moved to the 4090 by the
larger of the bandwidth and fp16-rate ratios (packager/data/gpus.toml), times
every token of every epoch. On a card the table does not know (or a CPU) the
time comes from FLOPs instead: 6 x parameters per trained token at the 4090's
`training_efficiency`. Memory: the probe's CUDA peak (its first micro-batch is
the longest example) plus the optimizer state, not yet allocated then; on a CPU
an estimate from the model's own tensors.
"""

from __future__ import annotations

import tomllib
from dataclasses import asdict, dataclass
from pathlib import Path

from packager.paths import REPO

GPUS = REPO / "packager" / "data" / "gpus.toml"
GIB = 1 << 30

# Optimizer state per trainable parameter, in fp32 values (bitsandbytes' 8-bit AdamW: two bytes).
STATE_BYTES = {"lion": 4, "adamw": 8, "paged_adamw_8bit": 2}


class BudgetError(Exception):
    """The projection is over the 4090's day or memory; BUDGET=ignore trains anyway."""


def cards() -> dict:
    return tomllib.loads(GPUS.read_text())


def known_card(device_name: str) -> dict | None:
    for row in cards()["known"]:
        if any(m in device_name for m in row["match"]):
            return row
    return None


@dataclass
class Probe:
    """What a few forward + backward passes measured."""

    device: str                # torch.cuda.get_device_name() or "cpu"
    tokens: int                # tokens in the timed micro-batches
    seconds: float             # their wall time
    peak_bytes: int | None     # CUDA peak over the probe (None on a CPU)
    longest: int               # tokens of the longest example (the probe's first micro-batch)


@dataclass
class Plan:
    examples: int
    epochs: int
    optimizer_steps: int
    total_tokens: int
    tokens_per_s_here: float
    hours_here: float
    card: str                  # the row the time was moved from, or "FLOPs estimate"
    ratio: float | None        # 4090 time / this card's time
    hours_4090: float
    peak_gib_4090: float
    memory_source: str
    budget_hours: float
    budget_gib: float

    def over(self) -> list[str]:
        found = []
        if self.hours_4090 > self.budget_hours:
            found.append(f"projected {self.hours_4090:.1f} h on one RTX 4090, over the challenge's {self.budget_hours:.0f} h")
        if self.peak_gib_4090 > self.budget_gib:
            found.append(f"projected peak {self.peak_gib_4090:.1f} GiB, over the RTX 4090's {self.budget_gib:.0f} GiB")
        return found

    def lines(self) -> list[str]:
        ratio = f" x {self.ratio:.2f}" if self.ratio is not None else ""
        return [
            f"data: {self.examples} examples x {self.epochs} epochs = {self.total_tokens:,} tokens, "
            f"{self.optimizer_steps} optimizer steps",
            f"measured: {self.tokens_per_s_here:,.0f} tokens/s here -> {self.hours_here:.2f} h",
            f"RTX 4090 ({self.card}{ratio}): {self.hours_4090:.2f} h of {self.budget_hours:.0f} h; "
            f"peak {self.peak_gib_4090:.2f} GiB of {self.budget_gib:.0f} GiB ({self.memory_source})",
        ]

    def to_json(self) -> dict:
        return asdict(self)


def estimate_memory(weight_bytes: int, trainable: int, state_bytes: int, layers: int, hidden: int,
                    vocab: int, longest: int) -> int:
    """CPU fallback: weights, fp32 LoRA (values, grads, state), checkpointed hidden states, fp32 logits x 3."""
    lora = trainable * (4 + 4 + state_bytes)
    activations = layers * longest * hidden * 2 * 2  # each layer's input kept, plus one layer recomputed
    logits = longest * vocab * (2 + 4 + 4)           # fp16 logits, fp32 upcast for the loss, its gradient
    return weight_bytes + lora + activations + logits


def project(probe: Probe, *, examples: int, epochs: int, steps: int, total_tokens: int, parameters: int,
            trainable: int, optimizer: str, estimated_bytes: int) -> Plan:
    target = cards()["target"]
    per_s = probe.tokens / max(probe.seconds, 1e-9)
    hours_here = total_tokens / per_s / 3600
    row = known_card(probe.device) if probe.device != "cpu" else None
    if row is not None:
        ratio = max(row["bandwidth_gbs"] / target["bandwidth_gbs"], row["fp16_tflops"] / target["fp16_tflops"])
        hours, card = hours_here * ratio, row["name"]
    else:
        ratio, card = None, "FLOPs estimate"
        flops = 6 * parameters * total_tokens
        hours = flops / (target["fp16_tflops"] * 1e12 * target["training_efficiency"]) / 3600
    if probe.peak_bytes is not None:
        peak = probe.peak_bytes + trainable * STATE_BYTES[optimizer]
        memory = f"measured at {probe.longest} tokens + optimizer state"
    else:
        peak, memory = estimated_bytes, "estimated"
    return Plan(examples, epochs, steps, total_tokens, per_s, hours_here, card, ratio, hours, peak / GIB, memory,
                target["hours"], target["memory_gib"])


def check(plan: Plan, budget: str | None, out: Path) -> None:
    """Refuse an over-budget plan unless the user said BUDGET=ignore; the plan is written either way."""
    over = plan.over()
    if over and budget != "ignore":
        raise BudgetError("; ".join(over) + f" (plan in {out}); shorten the recipe, or train anyway with BUDGET=ignore")
