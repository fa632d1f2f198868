"""The device a stage runs on, and the 4090's memory on a bigger card."""

from __future__ import annotations


def emulate_4090(device, gib: float) -> None:
    """Cap this process's GPU memory at the 4090's, so a bigger card proves the run fits."""
    import torch

    index = device.index if device.index is not None else torch.cuda.current_device()
    total = torch.cuda.get_device_properties(index).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, gib * (1 << 30) / total), index)
