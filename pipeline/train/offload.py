"""Gradient checkpointing whose saved layer inputs wait in host memory: a bigger micro-batch in the same GPU memory.

Under gradient checkpointing each decoder layer keeps only its input for the
backward pass, and those inputs are what grows with the micro-batch: 40 layers
x tokens x 5,120 x 2 bytes at Qwen-14B's shape, 3.1 GiB at 8,192 tokens. Here
each one is copied to pinned host memory on a side stream while the layer's
forward runs, and copied back one layer ahead of its backward (the input of
the layer before is fetched while this one recomputes), so the copies overlap
the compute: on a 4090 (PCIe 4.0) a layer input of 8,192 tokens moves in about
3 ms against roughly 100 ms of that layer's work.

The recomputation replays the forward exactly as torch's checkpoint does: the
RNG states (dropout draws the same masks) and the autocast state of the
forward. A layer whose input needs no gradient (the first: the embedding is
frozen) still gets its backward through a dummy input that does, so its LoRA
weights get their gradients. On a CPU nothing moves (the input is kept as is):
the tests check the replay there.
"""

from __future__ import annotations

import contextlib

import torch

from .swap import swapped


class _Slot:
    """One layer input between its forward and its backward: on the host, on its way back, or back."""

    def __init__(self, hidden: torch.Tensor, side: torch.cuda.Stream | None, before: "_Slot | None"):
        self.device, self.side, self.before = hidden.device, side, before
        self.gpu: torch.Tensor | None = None
        self.ready: torch.cuda.Event | None = None
        if side is None:
            self.host = hidden.detach()
            return
        side.wait_stream(torch.cuda.current_stream(hidden.device))  # the layer that wrote `hidden` first
        with torch.cuda.stream(side):
            self.host = torch.empty(hidden.shape, dtype=hidden.dtype, pin_memory=True)
            self.host.copy_(hidden.detach(), non_blocking=True)
        hidden.record_stream(side)  # its memory is not reused before the copy has read it

    def prefetch(self) -> None:
        """Start the copy back on the side stream (once)."""
        if self.side is None or self.gpu is not None or self.host is None:
            return
        with torch.cuda.stream(self.side):
            self.gpu = torch.empty(self.host.shape, dtype=self.host.dtype, device=self.device)
            self.gpu.copy_(self.host, non_blocking=True)
            self.ready = self.side.record_event()

    def take(self) -> torch.Tensor:
        """The input on its device, for the compute stream; the layer before starts its way back meanwhile."""
        if self.side is None:
            hidden, self.host = self.host, None
            return hidden
        self.prefetch()
        if self.before is not None:
            self.before.prefetch()
        current = torch.cuda.current_stream(self.device)
        current.wait_event(self.ready)
        hidden, self.gpu, self.host, self.before = self.gpu, None, None, None
        hidden.record_stream(current)
        return hidden


class _Stash:
    """The newest slot of the current forward pass: each slot links to the one before, fetched one layer ahead."""

    def __init__(self, device: torch.device):
        self.side = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.last: _Slot | None = None

    def put(self, hidden: torch.Tensor) -> _Slot:
        before = self.last if self.last is not None and self.last.host is not None else None  # this pass's only
        self.last = _Slot(hidden, self.side, before)
        return self.last


class _HostCheckpoint(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, dummy, run, stash: _Stash):
        del dummy  # only makes the output require a gradient
        kind = hidden.device.type
        ctx.run, ctx.kind = run, kind
        ctx.autocast = (torch.is_autocast_enabled(kind), torch.get_autocast_dtype(kind))
        ctx.cpu_rng = torch.get_rng_state()
        ctx.device_rng = torch.cuda.get_rng_state(hidden.device) if kind == "cuda" else None
        ctx.slot = stash.put(hidden)
        with torch.no_grad():
            return run(hidden)

    @staticmethod
    def backward(ctx, *grads):
        hidden = ctx.slot.take().detach().requires_grad_(ctx.needs_input_grad[0])
        with torch.random.fork_rng(devices=[hidden.device] if ctx.kind == "cuda" else []):
            torch.set_rng_state(ctx.cpu_rng)
            if ctx.device_rng is not None:
                torch.cuda.set_rng_state(ctx.device_rng, hidden.device)
            enabled, dtype = ctx.autocast
            with torch.enable_grad(), torch.autocast(ctx.kind, dtype=dtype, enabled=enabled):
                out = ctx.run(hidden)
        outs = out if isinstance(out, tuple) else (out,)
        pairs = [(o, g) for o, g in zip(outs, grads) if torch.is_tensor(o) and o.requires_grad and g is not None]
        if pairs:
            torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
        ctx.run = ctx.slot = None
        return (hidden.grad if ctx.needs_input_grad[0] else None), None, None, None


def checkpoint_on_host(stash: _Stash):
    """A `_gradient_checkpointing_func` for transformers' layers: `(layer forward with its kwargs bound, hidden)`."""
    dummy = torch.empty(0, requires_grad=True)

    def checkpointed(run, hidden, *rest):
        if rest:
            raise TypeError("checkpoint_on_host takes the layer's hidden states as its only positional input")
        return _HostCheckpoint.apply(hidden, dummy, run, stash)

    return checkpointed


@contextlib.contextmanager
def layer_inputs_on_host(model, device: torch.device):
    """For the block: every checkpointed decoder layer keeps its input in host memory (see the module's doc)."""
    layers = [m for m in model.modules() if getattr(m, "gradient_checkpointing", False)
              and hasattr(m, "_gradient_checkpointing_func")]
    if not layers:
        raise ValueError("offloading needs gradient checkpointing: the spec's [training.schedule] "
                         "gradient_checkpointing = true")
    stash = _Stash(device)
    try:
        with swapped(layers, "_gradient_checkpointing_func", checkpoint_on_host(stash)):
            yield
    finally:
        stash.last = None  # a pass that failed before its backward leaves nothing held
