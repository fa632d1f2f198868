"""Unmerged LoRA adapters on GPTQ weights: one GEMM per group of projections for the A products, one per B product.

peft runs each adapted projection as base(x) + lora_B(lora_A(dropout(x))) x scaling: four kernels besides the
base (A, B, the scaling, the add), so an adapter on all seven projections of Qwen-14B adds 1,120 kernels to a
decode step, most of the unmerged adapter's cost (12.8 ms a token against 8.1 without it on an H200). Here the
projections that read the same input (q/k/v, gate/up) take their A products in one GEMM, over the A weights
concatenated (each adapter's A becomes a view of its rows: no second copy), and each B product is added into
its columns of the base's output in place, the scaling as the GEMM's alpha: 1 + n kernels for n projections.

Only vanilla LoRA as peft computes it in eval mode: one active adapter per layer, no DoRA or other variant, no
LoRA bias, dropout off, adapter weights in the base's dtype (the engine casts them: `adapters_in`). Anything else
keeps peft's own forward.
"""

from __future__ import annotations

import torch


def _vanilla(module: torch.nn.Module, dtype: torch.dtype) -> str | None:
    """The one active adapter's name if `module` is a peft LoRA layer this runs exactly, else None."""
    if not type(module).__module__.startswith("peft.tuners.lora") or type(module).__name__ not in (
            "Linear", "GPTQLoraLinear"):
        return None
    if getattr(module, "disable_adapters", True) or getattr(module, "merged", False):
        return None
    active = [a for a in module.active_adapters if a in module.lora_A]
    if len(active) != 1 or active[0] in getattr(module, "lora_variant", {}):
        return None
    name = active[0]
    a, b, dropout = module.lora_A[name], module.lora_B[name], module.lora_dropout[name]
    if type(a) is not torch.nn.Linear or type(b) is not torch.nn.Linear or a.bias is not None or b.bias is not None:
        return None
    if dropout.training and not isinstance(dropout, torch.nn.Identity):
        return None
    if a.weight.dtype != dtype or b.weight.dtype != dtype:
        return None
    return name


class LoraProducts:
    """The adapters of `modules` (peft LoRA layers reading the same input) for outputs side by side."""

    def __init__(self, modules: list[torch.nn.Module], names: list[str]) -> None:
        a_weights = [m.lora_A[n].weight for m, n in zip(modules, names)]
        self.a = torch.cat([w.data for w in a_weights])  # [sum of ranks, in]
        self.parts = []
        rank_at = out_at = 0
        for m, n, w in zip(modules, names, a_weights):
            rank = w.shape[0]
            w.data = self.a[rank_at : rank_at + rank]  # peft's own forward reads the same memory
            self.parts.append((out_at, out_at + m.out_features, rank_at, rank_at + rank, m.lora_B[n].weight,
                               float(m.scaling[n])))
            rank_at += rank
            out_at += m.out_features

    def add_to(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """`out` (the bases' outputs side by side, contiguous) plus every adapter's product, in place."""
        flat_out = out.view(-1, out.shape[-1])
        xa = x.reshape(-1, x.shape[-1]) @ self.a.t()
        for start, stop, r0, r1, b, scaling in self.parts:
            flat_out[:, start:stop].addmm_(xa[:, r0:r1], b.t(), alpha=scaling)
        return out


def lora_products(modules: list[torch.nn.Module], dtype: torch.dtype) -> LoraProducts | None:
    """The adapters of `modules` as `LoraProducts`, or None when any one is not a layer this runs exactly."""
    names = [_vanilla(m, dtype) for m in modules]
    if any(n is None for n in names):
        return None
    return LoraProducts(modules, names)
