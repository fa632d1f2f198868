"""GPTQ projections that read the same input (q/k/v, gate/up) as one Marlin call each.

A batch-1 decode step is bound by reading the weights, and Marlin reads a small matrix (Qwen-14B's 5,120 x 5,120
q, k and v) far below the bandwidth: too few tiles to keep every SM streaming, and one more launch each. The
plain-weight path concatenates such projections (static_engine.fused); this is the same for Marlin.

Marlin's layout is local to each 16 x 64 tile, stored tile after tile along N within a row of tiles, and its
scales and bias are permuted within blocks of 64 and 32 columns (dense_prefill.py tells the layout). So the
repacked codes of [Wq | Wk | Wv] are the three layers' codes side by side in each row of tiles, and their
scales and biases side by side: a concatenation, no repack, as long as every part is whole tiles.

The fused layer takes the parts' place in memory: the model's own q_proj, k_proj and v_proj become `FusedPart`
views that run the fused layer and return their columns (right for any other caller, at the fused layer's
cost), and the originals are freed. On a 24 GiB card there is no room for both copies (8.75 GB on Qwen-14B).
"""

from __future__ import annotations

import copy
import logging

import torch

from .dense_prefill import AGREE, TILE_K, TILE_N, agrees

log = logging.getLogger("helm_server.engine")


class FusedPart(torch.nn.Module):
    """Columns [start, stop) of a fused layer's output: what one of its parts returned before fusion."""

    def __init__(self, fused: torch.nn.Module, start: int, stop: int) -> None:
        super().__init__()
        object.__setattr__(self, "fused", fused)  # not a submodule: the parent holds it once (parameters, .to)
        self.start, self.stop = start, stop
        self.in_features, self.out_features = fused.in_features, stop - start

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fused(x)[..., self.start : self.stop].contiguous()


def why_not_fused(modules: list[torch.nn.Module]) -> str | None:
    """Why these layers cannot be one Marlin call, or None."""
    if not all(type(m).__module__.startswith("gptqmodel.") for m in modules):
        return "not GPTQ layers (plain ones are fused by the engine; LoRA-wrapped ones run their adapters apart)"
    from gptqmodel.nn_modules.qlinear.marlin import MarlinLinear

    if not all(type(m) is MarlinLinear for m in modules):
        return "a GPTQ kernel other than Marlin"
    first = modules[0]
    for m in modules:
        if getattr(m, "adapter", None) is not None:
            return "a GPTQModel adapter on a layer"
        if m.g_idx.numel() or m.qzeros.numel():
            return "act-order or zero points"
        if getattr(m, "_marlin_tile_padding", None) is not None:
            return "a tile-padded shape"
        if m.in_features % TILE_K or m.out_features % TILE_N:
            return "a shape that is not whole tiles"
        if (m.in_features, m.bits, m.scales.shape[0], m.scales.dtype, m.qweight.device, m.fp32) != (
                first.in_features, first.bits, first.scales.shape[0], first.scales.dtype, first.qweight.device,
                first.fp32):
            return "inputs, bits, groups, dtypes or devices that differ"
        if (m.bias is None) != (first.bias is None):
            return "a bias on some layers only"
    return None


def _set(module: torch.nn.Module, name: str, value: torch.Tensor) -> None:
    """Replace a parameter or buffer's tensor, keeping what kind of entry it is."""
    if name in module._parameters:
        module._parameters[name] = torch.nn.Parameter(value, requires_grad=False)
    elif name in module._buffers:
        module._buffers[name] = value
    else:
        setattr(module, name, value)


def concatenated(modules: list[torch.nn.Module]) -> torch.nn.Module:
    """A new Marlin layer computing the layers' outputs side by side (their tensors concatenated along N); the
    layers themselves are untouched."""
    fused = copy.copy(modules[0])  # the same kernel settings, workspace and empty act-order tensors
    fused._parameters, fused._buffers, fused._modules = (dict(modules[0]._parameters), dict(modules[0]._buffers),
                                                         dict(modules[0]._modules))
    with torch.no_grad():
        _set(fused, "qweight", torch.cat([m.qweight.data for m in modules], dim=1))
        _set(fused, "scales", torch.cat([m.scales.data for m in modules], dim=1))
        if modules[0].bias is not None:
            _set(fused, "bias", torch.cat([m.bias.data for m in modules]))
    fused.out_features = sum(m.out_features for m in modules)
    return fused


def fuse_in_place(parent: torch.nn.Module, names: tuple[str, ...], inside: str | None = None) -> torch.nn.Module | None:
    """The layers `parent.<names>` as one Marlin layer, or None (logged once per reason) when they cannot be.
    `inside`: the layers are `parent.<name>.<inside>` instead (peft's LoRA wrappers keep their base there).

    The fused layer's product is checked against the parts' on a random input first (a layout this module
    does not know would fail it: the parts then stay). The parent keeps the fused layer (`fused_<names>`) and
    every reference to a part in its container becomes a `FusedPart`, so the originals' memory is freed.
    Called again on the same layers (a second engine over the same model), it returns the same fused layer.
    """
    containers = [getattr(parent, n) for n in names] if inside else [parent] * len(names)
    parts = [c._modules.get(k) for c, k in zip(containers, [inside] * len(names) if inside else names)]
    if all(isinstance(p, FusedPart) for p in parts):
        fused = parts[0].fused
        if all(p.fused is fused for p in parts) and [(p.start, p.stop) for p in parts] == _ranges(parts) and \
                parts[-1].stop == fused.out_features:
            return fused
        return None
    if (reason := why_not_fused(parts)) is not None:
        if reason not in _logged:
            _logged.add(reason)
            log.info("static engine: q/k/v and gate/up stay separate products: %s", reason)
        return None
    try:
        fused = concatenated(parts)
        off = agrees(fused, lambda x: torch.cat([p(x) for p in parts], dim=-1), rows=4)
    except Exception as e:  # noqa: BLE001 - no room for the copy, or a kernel refusing the shape: the parts still run
        log.warning("static engine: %s fused failed to run (%s): they stay separate", "/".join(names), e)
        return None
    if off > AGREE:
        log.warning("static engine: %s fused differ from their separate products by %.3g (relative): they stay "
                    "separate", "/".join(names), off)
        return None
    parent.add_module("fused_" + "_".join(names), fused)
    for container, part, (start, stop) in zip(containers, parts, _ranges(parts)):
        view = FusedPart(fused, start, stop)
        for key, module in list(container._modules.items()):  # peft's GPTQ wrapper holds its base twice
            if module is part:
                container._modules[key] = view
    return fused


_logged: set[str] = set()


def _ranges(parts: list[torch.nn.Module]) -> list[tuple[int, int]]:
    ranges, start = [], 0
    for p in parts:
        ranges.append((start, start + p.out_features))
        start += p.out_features
    return ranges
