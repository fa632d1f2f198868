"""Will the Humpback stages fit one RTX 4090 day? Projected before any of them starts.

The seed models' training comes from the trainer's own projection. Generation and rating are
timed on one batch each (every sequence run to its max_new_tokens: the worst case). A decode step
is a fixed cost (kernel launches, sampling: measured on an H200 it dominates) plus reading the
weights once; only the reading is moved to the 4090's bandwidth:
    step_4090 = step_here + weight_bytes x (1 / bandwidth_4090 - 1 / bandwidth_here).
On a CPU or an unknown card the projection is a lower bound: the reading alone, at the 4090's bandwidth.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from ..train.plan import cards, known_card


@dataclass
class Timed:
    """One batch, measured."""

    stage: str               # "generated" or "scored"
    batch: int               # sequences in the batch
    seconds: float
    new_tokens: int          # per sequence (max_new_tokens)
    prompt_tokens: int       # in the batch


@dataclass
class Projection:
    stage: str
    items: int
    hours_here: float
    hours_4090: float
    how: str


def project_stage(timed: Timed, items: int, device_name: str, weight_bytes: int) -> Projection:
    batches = math.ceil(items / timed.batch)
    here = batches * timed.seconds / 3600
    steps = batches * timed.new_tokens
    target, row = cards()["target"], known_card(device_name) if device_name != "cpu" else None
    read_4090 = steps * weight_bytes / (target["bandwidth_gbs"] * 1e9) / 3600
    if row is not None:
        read_here = steps * weight_bytes / (row["bandwidth_gbs"] * 1e9) / 3600
        return Projection(timed.stage, items, here, max(here - read_here, 0) + read_4090,
                          f"{row['name']}: fixed per-step cost kept, weight reads at the 4090's bandwidth")
    return Projection(timed.stage, items, here, read_4090, "bandwidth lower bound (measured on a CPU)")


@dataclass
class HumpbackPlan:
    seed_training_hours: float
    stages: list[Projection]
    budget_hours: float

    @property
    def hours_4090(self) -> float:
        return self.seed_training_hours + sum(s.hours_4090 for s in self.stages)

    def lines(self) -> list[str]:
        rows = [f"seed models (backward, M0{', M1' if len(self.stages) > 2 else ''}): "
                f"{self.seed_training_hours:.2f} h on one RTX 4090 (the trainer's projection)"]
        rows += [f"{s.stage}: {s.items} passages: {s.hours_here:.2f} h here -> {s.hours_4090:.2f} h on one RTX 4090 "
                 f"({s.how})" for s in self.stages]
        rows.append(f"Humpback total: {self.hours_4090:.2f} h of the {self.budget_hours:.0f} h day "
                    "(train-N's own run comes on top)")
        return rows

    def over(self) -> str | None:
        if self.hours_4090 > self.budget_hours:
            return f"projected {self.hours_4090:.1f} h on one RTX 4090, over the challenge's {self.budget_hours:.0f} h"
        return None

    def to_json(self) -> dict:
        return {"seed_training_hours": self.seed_training_hours, "stages": [asdict(s) for s in self.stages],
                "hours_4090": self.hours_4090, "budget_hours": self.budget_hours}
