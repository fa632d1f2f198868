"""Resumable training state: one folder per checkpoint, written atomically, the newest K kept.

A checkpoint holds the adapter (peft's files: it is also a usable adapter),
the optimizer and scheduler states, every RNG state (Python, NumPy, torch CPU
and CUDA) and the data position (epoch, next micro-batch, optimizer steps
done). Resuming restores all of it, so the losses continue exactly as an
uninterrupted run's would. `run_id` ties a checkpoint to its recipe and data:
a checkpoint of another recipe is never resumed.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from packager.staging import staged_folder

NAME = re.compile(r"^step-(\d{6,})$")
STATE = "state.json"


class CheckpointError(Exception):
    """A checkpoint that cannot be resumed; the message says why and what to do."""


@dataclass
class Position:
    epoch: int = 0   # the epoch being trained
    micro: int = 0   # the next micro-batch of that epoch's order
    step: int = 0    # optimizer steps done


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(root: Path, model, optimizer, scheduler, position: Position, run_id: str, keep: int) -> Path:
    """Write checkpoints/step-NNNNNN whole (or not at all), then drop all but the newest `keep`."""
    dst = root / f"step-{position.step:06d}"
    with staged_folder(dst) as tmp:
        model.save_pretrained(tmp / "adapter", save_embedding_layers=False)
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        torch.save(rng_state(), tmp / "rng.pt")
        (tmp / STATE).write_text(json.dumps({"run_id": run_id, **asdict(position)}, indent=2) + "\n")
    for old in listed(root)[:-keep]:
        hidden = old.with_name(f".{old.name}.dropped")  # out of `listed` at once: never half a checkpoint there
        os.replace(old, hidden)
        shutil.rmtree(hidden, ignore_errors=True)
    return dst


def listed(root: Path) -> list[Path]:
    """Complete checkpoints, oldest first (staging folders are hidden and never match)."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if NAME.match(p.name) and (p / STATE).is_file()]
    return sorted(found, key=lambda p: int(NAME.match(p.name).group(1)))


def latest(root: Path, run_id: str) -> Path | None:
    found = listed(root)
    if not found:
        return None
    newest = found[-1]
    theirs = json.loads((newest / STATE).read_text()).get("run_id")
    if theirs != run_id:
        raise CheckpointError(
            f"{root} holds checkpoints of another recipe or data set (run {theirs[:12] if theirs else '?'}, "
            f"this one {run_id[:12]}); move them away, or train into another folder with OUT=dir"
        )
    return newest


def load(folder: Path, model, optimizer, scheduler) -> Position:
    """Restore a checkpoint into the live objects; return where training stopped."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    weights = load_file(str(folder / "adapter" / "adapter_model.safetensors"))
    result = set_peft_model_state_dict(model, weights)
    if getattr(result, "unexpected_keys", None):
        raise CheckpointError(f"{folder}: adapter weights do not match the model ({result.unexpected_keys[:3]} ...)")
    optimizer.load_state_dict(torch.load(folder / "optimizer.pt", weights_only=False))
    scheduler.load_state_dict(torch.load(folder / "scheduler.pt", weights_only=False))
    set_rng_state(torch.load(folder / "rng.pt", weights_only=False))
    state = json.loads((folder / STATE).read_text())
    return Position(state["epoch"], state["micro"], state["step"])
