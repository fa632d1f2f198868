"""Fewer elementwise kernels for the fast path: fused norm, rotary and SwiGLU, and a LoRA branch with one add.

A profile of the fast path on the 14B shape (docs/measurements.md) has the GPU
busy all the time, a third of it in elementwise kernels: transformers' RMSNorm
(a chain of casts, a square, a mean, a multiply), rotary embeddings (slices, a
concat, four products), SiLU times up, and in each of the 280 LoRA layers a
multiply by the scaling and an add over the layer's whole output width, all
of them run again when gradient checkpointing recomputes a layer.

- `Kernels` is the table of the three fused operations, as data: liger-kernel's
  Triton kernels on CUDA (`liger()`), or the plain computation they replace
  (`plain()`), which the tests swap in on a CPU to check the wiring.
- `lora_forward` computes peft's vanilla LoRA branch with the scaling applied to
  the r-wide product and the add done by the second GEMM (`addmm`): the same
  dropout calls in the same order (the same masks), fewer roundings in half
  precision (one where peft rounds the product, the scaled product and the sum),
  and the adapter's gradients written in fp32 (`_LoraProducts`), as peft's fp32
  branch has them: rounded to fp16, a 32-sequence step's small gradient entries
  went subnormal or zero, and Lion left those weights unmoved.
- `fused(model, kernels)` puts both in place for the duration of a step (forward
  and the backward's recomputation), and takes them away after.
"""

from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass
from typing import Callable

import torch


@dataclass(frozen=True)
class Kernels:
    name: str
    rms_norm: Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]   # (x, weight, eps)
    swiglu: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]            # silu(gate) * up
    rope: Callable[..., tuple[torch.Tensor, torch.Tensor]]                  # (q, k, cos, sin) -> (q, k)


def _plain_rms_norm(x, weight, eps):
    """transformers' Qwen2/Llama RMSNorm: normalised in fp32, cast back, times the weight."""
    h = x.float()
    return weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def _rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _plain_rope(q, k, cos, sin, unsqueeze_dim: int = 1):
    cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def plain() -> Kernels:
    """The computation the fused kernels replace, through the same wiring (tests; any device)."""
    return Kernels("plain", _plain_rms_norm, lambda a, b: torch.nn.functional.silu(a) * b, _plain_rope)


def liger() -> Kernels | None:
    """liger-kernel's Triton kernels, or None where it (or Triton) is not installed."""
    try:
        from liger_kernel.ops.rms_norm import LigerRMSNormFunction
        from liger_kernel.ops.rope import LigerRopeFunction
        from liger_kernel.ops.swiglu import LigerSiLUMulFunction
    except ImportError:
        return None

    def rms_norm(x, weight, eps):
        # "llama" casting: the inverse RMS in fp32, as transformers; a fresh gradient buffer (in_place=False)
        return LigerRMSNormFunction.apply(x, weight, eps, 0.0, "llama", False)

    def rope(q, k, cos, sin, unsqueeze_dim: int = 1):
        return LigerRopeFunction.apply(q, k, cos, sin, None, unsqueeze_dim)

    return Kernels("liger", rms_norm, LigerSiLUMulFunction.apply, rope)


def for_device(device: torch.device) -> Kernels | None:
    """The fused kernels the fast path takes on this device: liger's on CUDA when installed; none elsewhere."""
    return liger() if device.type == "cuda" else None


# --- the LoRA branch ----------------------------------------------------------------------


def _vanilla_lora(layer) -> str | None:
    """The one active adapter of a peft LoRA linear computed as plain LoRA (no DoRA or other variant, no bias on
    B, not merged, not disabled), or None: such a layer keeps peft's own forward."""
    active = getattr(layer, "active_adapters", None)
    if not active or len(active) != 1 or getattr(layer, "disable_adapters", True) or getattr(layer, "merged", True):
        return None
    name = active[0]
    if name not in getattr(layer, "lora_A", {}) or name in getattr(layer, "lora_variant", {}):
        return None
    if getattr(layer, "lora_bias", {}).get(name, False) or layer.lora_B[name].bias is not None:
        return None
    return name


_OUT_DTYPE_MM: dict[str, bool] = {}  # device type -> whether torch.mm takes out_dtype there (CUDA, torch >= 2.8)


def _mm32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b with an fp32 result: half-precision inputs on the tensor cores where torch offers out_dtype, else in
    fp32. A gradient product written in fp16 loses its small entries (below 6e-5 fp16 is subnormal)."""
    if a.dtype in (torch.float16, torch.bfloat16) and _OUT_DTYPE_MM.get(a.device.type, True):
        try:
            return torch.mm(a, b, out_dtype=torch.float32)
        except (TypeError, NotImplementedError):  # a torch without the argument, or a device without the kernel
            _OUT_DTYPE_MM[a.device.type] = False
    return torch.mm(a.float(), b.float())


class _LoraProducts(torch.autograd.Function):
    """base + (x @ A^T * scaling) @ B^T in x's dtype, one add (addmm, in place in base); the gradients of A and B
    in fp32, as peft's fp32 branch computes them (the reference path), not rounded to half precision on the way."""

    @staticmethod
    def forward(ctx, base, x, a, b, scaling: float):
        a_half, b_half = a.to(x.dtype), b.to(x.dtype)
        mid = (x @ a_half.t()) * scaling
        ctx.save_for_backward(x, mid, a, b)
        ctx.scaling = scaling
        ctx.mark_dirty(base)  # added into the base product's own buffer: no copy of it (nothing saved it)
        return base.addmm_(mid, b_half.t())

    @staticmethod
    def backward(ctx, grad):
        x, mid, a, b = ctx.saved_tensors
        with torch.autocast(grad.device.type, enabled=False):
            grad_mid = _mm32(grad, b.to(grad.dtype)) * ctx.scaling   # d loss / d (x @ A^T), fp32 [N, r]
            grad_b = _mm32(grad.t(), mid)                             # [out, r]
            # grad_mid to half for the products with x: scaled by a power of two so its largest entry sits near
            # 2^12 (exact; no entry underflows), the fp32 product scaled back
            top = grad_mid.abs().amax().clamp_min(torch.finfo(torch.float32).tiny)
            scale = torch.exp2((12 - torch.ceil(torch.log2(top))).clamp(-100, 100))  # all-zero (B = 0): finite
            grad_a = _mm32((grad_mid * scale).to(x.dtype).t(), x) / scale
            grad_x = grad_mid.to(x.dtype) @ a.to(x.dtype)
        return grad, grad_x, grad_a.to(a.dtype), grad_b.to(b.dtype), None


def lora_forward(layer, name: str, grads32: bool = True) -> Callable:
    """base(x) + scaling * B(A(dropout(x))), as peft computes it, with the scaling on the r-wide product and the
    sum done by the second GEMM (addmm: C + M1 @ M2): no multiply or add over the layer's output width; the
    adapter's gradients in fp32 (`_LoraProducts`; `grads32=False`: as autograd rounds them, for comparison)."""
    original = layer.forward

    def forward(x, *args, **kwargs):
        if args or kwargs:
            return original(x, *args, **kwargs)
        result = layer.base_layer(x)
        a, b = layer.lora_A[name].weight, layer.lora_B[name].weight
        dropped = layer.lora_dropout[name](x)
        if not grads32:
            mid = layer.lora_A[name](dropped) * layer.scaling[name]
            out = torch.addmm(result.reshape(-1, result.shape[-1]), mid.reshape(-1, mid.shape[-1]), b.t())
            return out.reshape(result.shape).to(result.dtype)
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else a.dtype
        flat = dropped.reshape(-1, dropped.shape[-1]).to(dtype)
        out = _LoraProducts.apply(result.reshape(-1, result.shape[-1]).to(dtype), flat, a, b, layer.scaling[name])
        return out.reshape(result.shape).to(result.dtype)

    return forward


# --- in place for a step ------------------------------------------------------------------


def _is_rms_norm(m) -> bool:
    return type(m).__name__.endswith("RMSNorm") and hasattr(m, "variance_epsilon") and getattr(m, "weight", None) is not None


SILU = ("SiLU", "SiLUActivation")  # torch's module, transformers' ACT2FN["silu"]


def _is_swiglu_mlp(m) -> bool:
    act = getattr(m, "act_fn", None)
    return all(hasattr(m, n) for n in ("gate_proj", "up_proj", "down_proj")) and type(act).__name__ in SILU


@contextlib.contextmanager
def fused(model, kernels: Kernels | None, lora: bool = True, lora_grads32: bool = True):
    """`kernels` (when given) in place of the model's RMSNorm, SwiGLU and rotary code, and (`lora`) the one-add LoRA
    branch (`lora_grads32`: see `lora_forward`), for the duration of the block; every module's own forward comes
    back after it."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    patched: list[torch.nn.Module] = []
    globals_: list[tuple[object, str, object]] = []
    try:
        for m in model.modules():
            if lora and isinstance(m, BaseTunerLayer) and (name := _vanilla_lora(m)) is not None:
                m.forward = lora_forward(m, name, lora_grads32)
            elif kernels is not None and _is_rms_norm(m):
                m.forward = (lambda n: lambda x: kernels.rms_norm(x, n.weight, n.variance_epsilon))(m)
            elif kernels is not None and _is_swiglu_mlp(m):
                m.forward = (lambda p: lambda x: p.down_proj(kernels.swiglu(p.gate_proj(x), p.up_proj(x))))(m)
            elif kernels is not None and hasattr(m, "q_proj") and hasattr(m, "k_proj"):
                module = sys.modules[type(m).__module__]
                if hasattr(module, "apply_rotary_pos_emb") and all(g[0] is not module for g in globals_):
                    globals_.append((module, "apply_rotary_pos_emb", module.apply_rotary_pos_emb))
                    module.apply_rotary_pos_emb = kernels.rope
                continue
            else:
                continue
            patched.append(m)
        yield
    finally:
        for m in patched:
            m.__dict__.pop("forward", None)
        for module, attr, value in globals_:
            setattr(module, attr, value)
