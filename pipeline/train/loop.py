"""One optimizer step at a time: data order, micro-batches, forward + backward, the update.

Read top to bottom: `epoch_order` shuffles, `micro_batches` cuts, `collate`
pads, `forward_backward` runs one micro-batch, `optimizer_step` accumulates a
group of them and steps, `train` walks the epochs from a saved position. The
loss of a step is the mean of its micro-batches' losses (each the mean over its
answer tokens), as HF Trainer computed it for the reference.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable

import torch

from .checkpoint import Position, rng_state, set_rng_state
from .plan import Probe
from .schedule import lr_factor

IGNORE = -100


@dataclass
class StepResult:
    loss: float
    lr: float
    tokens: int
    seconds: float
    end_of_epoch: bool


def epoch_order(n: int, epoch: int, seed: int) -> list[int]:
    """A permutation per epoch, from the seed and the epoch alone (so a resumed run sees the same order)."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1000 + epoch)).tolist()


def micro_batches(order: list[int], batch_size: int) -> list[list[int]]:
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def collate(rows: list[dict], pad_id: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Right-pad to the longest row: padding is `pad_id`, masked out of attention and loss."""
    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[i, :n] = torch.tensor(r["input_ids"])
        labels[i, :n] = torch.tensor(r["labels"])
        mask[i, :n] = 1
    return {"input_ids": ids.to(device), "labels": labels.to(device), "attention_mask": mask.to(device)}


def forward_backward(model, batch: dict[str, torch.Tensor], scale: float) -> float:
    loss = model(**batch).loss
    (loss * scale).backward()
    return loss.item()


def make_optimizer(params, cfg, device: torch.device):
    if cfg.name == "lion":
        from lion_pytorch import Lion

        return Lion(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.name == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if device.type != "cuda":
        raise ValueError("optimizer paged_adamw_8bit (bitsandbytes) needs a CUDA GPU; use lion or adamw on a CPU")
    import bitsandbytes as bnb

    return bnb.optim.PagedAdamW8bit(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def make_scheduler(optimizer, total_steps: int, schedule):
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, total_steps, schedule.warmup_ratio, schedule.scheduler)
    )


def optimizer_step(model, optimizer, scheduler, batches: list[dict], max_grad_norm: float | None,
                   dropped: Callable[[], bool] = lambda: False) -> tuple[float, float] | None:
    """Accumulate gradients over `batches`, clip, step; return (mean loss, learning rate used).

    `dropped` is asked after each micro-batch: when it says so, the step's gradients are discarded and
    nothing is updated (None): the model, optimizer and schedule stay at the last finished step."""
    lr = scheduler.get_last_lr()[0]
    losses = []
    for b in batches:
        losses.append(forward_backward(model, b, 1 / len(batches)))
        if len(losses) < len(batches) and dropped():
            optimizer.zero_grad(set_to_none=True)
            return None
    loss = sum(losses) / len(batches)
    if max_grad_norm is not None:
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], max_grad_norm)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return loss, lr


def train(model, optimizer, scheduler, examples: list[dict], schedule, position: Position, pad_id: int,
          device: torch.device, on_step: Callable[[Position, StepResult], None], stop_at: int | None = None,
          stop: Callable[[float], str | None] = lambda _: None, step: Callable | None = None) -> tuple[Position, str | None]:
    """Train from `position` to the end of the last epoch, `stop_at` optimizer steps, or a stop.

    `stop(seconds)` says why to stop (or None); it is asked before each optimizer step (with the last
    step's duration, so a deadline stops before a step that would end past it) and between its
    micro-batches. A step stopped in flight is dropped whole: its gradients discarded and every RNG put
    back as it was when the step began, so the returned position resumes exactly. Returns the position
    reached and the reason it stopped early (None at the end or at `stop_at`)."""
    model.train()
    acc = schedule.gradient_accumulation
    last = 0.0
    for epoch in range(position.epoch, schedule.epochs):
        micros = micro_batches(epoch_order(len(examples), epoch, schedule.seed), schedule.batch_size)
        start = position.micro if epoch == position.epoch else 0
        for first in range(start, len(micros), acc):
            if (why := stop(last)) is not None:
                return position, why
            group = micros[first : first + acc]
            started, rng = time.perf_counter(), rng_state()
            if step is not None:  # another path's step (pipeline/train/fast.py): same group, same contract
                done = step(model, optimizer, scheduler, [[examples[i] for i in ids] for ids in group],
                            schedule.max_grad_norm, lambda: stop(0.0) is not None)
            else:
                batches = [collate([examples[i] for i in ids], pad_id, device) for ids in group]
                done = optimizer_step(model, optimizer, scheduler, batches, schedule.max_grad_norm,
                                      lambda: stop(0.0) is not None)
            if done is None:
                set_rng_state(rng)
                return position, stop(0.0)
            loss, lr = done
            tokens = sum(len(examples[i]["input_ids"]) for ids in group for i in ids)
            end = first + len(group) >= len(micros)
            position = Position(epoch + 1, 0, position.step + 1) if end else Position(epoch, first + len(group), position.step + 1)
            last = time.perf_counter() - started
            on_step(position, StepResult(loss, lr, tokens, last, end))
            if not math.isfinite(loss):
                raise FloatingPointError(f"loss is {loss} at step {position.step}; lower the learning rate")
            if stop_at is not None and position.step >= stop_at:
                return position, None
    return position, None


def measured(model, device: torch.device, peak: Callable[[], None], timed: Callable[[], int], longest: int) -> Probe:
    """A plan's probe: run `peak` (the memory peak's forward + backward), then time `timed` (it returns the tokens
    it ran); gradients are discarded and every RNG put back, so training is unchanged."""
    saved = rng_state()
    model.train()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    peak()
    started = time.perf_counter()
    tokens = timed()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - started
    peak_bytes = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    model.zero_grad(set_to_none=True)
    set_rng_state(saved)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return Probe(name, tokens, seconds, peak_bytes, longest)


def probe(model, examples: list[dict], schedule, pad_id: int, device: torch.device, timed: int = 3) -> Probe:
    """Forward + backward on the longest example (the memory peak), then `timed` micro-batches of
    epoch 0's order (the rate)."""
    longest = max(range(len(examples)), key=lambda i: len(examples[i]["input_ids"]))
    order = micro_batches(epoch_order(len(examples), 0, schedule.seed), schedule.batch_size)[:timed]

    def rate() -> int:
        tokens = 0
        for ids in order:
            batch = collate([examples[i] for i in ids], pad_id, device)
            forward_backward(model, batch, 1.0)
            tokens += int(batch["attention_mask"].sum())
        return tokens

    return measured(model, device, lambda: forward_backward(model, collate([examples[longest]], pad_id, device), 1.0),
                    rate, len(examples[longest]["input_ids"]))
