"""The run's loss and learning-rate curves as a PNG: people look at curves, not logs."""

from __future__ import annotations

import json
from pathlib import Path


def read_log(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    text = path.read_text()
    lines = text.splitlines()
    if lines and not text.endswith("\n"):
        lines.pop()  # a row cut short by a kill mid-write: its step is trained again
    return [json.loads(line) for line in lines if line.strip()]


def plot(rows: list[dict], png: Path, title: str) -> Path:
    """Loss (and its 20-step running mean) over optimizer steps, the learning rate beneath."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in rows]
    loss = [r["loss"] for r in rows]
    window = 20
    smooth = [sum(loss[max(0, i - window + 1) : i + 1]) / len(loss[max(0, i - window + 1) : i + 1]) for i in range(len(loss))]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 6), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    top.plot(steps, loss, color="#9bb8d3", linewidth=0.8, label="loss")
    top.plot(steps, smooth, color="#1f4e79", linewidth=1.6, label=f"mean of {window} steps")
    top.set_ylabel("training loss")
    top.set_title(title)
    top.grid(alpha=0.3)
    top.legend()
    for r in rows:
        if r.get("end_of_epoch"):
            top.axvline(r["step"], color="#888", linewidth=0.6, linestyle=":")
    bottom.plot(steps, [r["lr"] for r in rows], color="#b5442c")
    bottom.set_ylabel("learning rate")
    bottom.set_xlabel("optimizer step")
    bottom.grid(alpha=0.3)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    tmp = png.with_name(f".{png.name}.partial.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(png)
    return png
