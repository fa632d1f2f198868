"""Long prefill passes through dense fp16 weights: dequantize each GPTQ layer into a scratch buffer, then cuBLAS.

Marlin multiplies straight from the 8-bit codes: right for decode, where a step reads each weight once for a
few rows. A prefill pass of hundreds of positions is bound by compute instead, and on Hopper Marlin's MMA path
runs it far below the card's dense fp16 rate (15% to 27% on an H100, where cuBLAS reaches 36% to 66% over the
same projections: docs/measurements.md). From some number of positions
per pass, writing the layer's weight out in fp16 (one fused multiply-add over a reordered view of the codes,
3 bytes moved per weight) and running cuBLAS over it costs less. Where that number lies is measured per card
(`DENSE_FROM`); on the RTX 4090 Marlin's MMA path is the card's own, so it keeps Marlin for every pass.

Marlin's layout (GPTQModel's `gptq_marlin_repack`, gptqmodel_ext/marlin/gptq_marlin_repack.cu, 8-bit codes with
bias 128): the [K, N] codes are cut into 16 x 64 tiles, stored tile after tile along N within each row of tiles,
each tile's 1,024 codes in the order its MMA threads read them; the group scales are
permuted within blocks of 64 (`marlin_permute_scales`), a bias within blocks of 32 (`marlin_permute_bias`).
Within a tile the order is a reordering of digits (`TILE_DIGITS`), so the inversion is a view.
The engine checks this inversion against Marlin's own product at start (`agrees`) and keeps Marlin where it
does not agree.
"""

from __future__ import annotations

import logging
from typing import Callable

import torch

log = logging.getLogger("helm_server.engine")

# Compute capability -> positions per pass (rows x chunk) from which a pass runs on dense weights, from
# benchmarks/dense_prefill.py on that card. A card not listed keeps Marlin for every pass. Empty: on an H100
# `marlin_dense` moved its 3 bytes per weight at 11% of the bandwidth, and the dense path lost at every row
# count up to 1,024 (docs/measurements.md).
DENSE_FROM: dict[tuple[int, int], int] = {}

TILE_K, TILE_N = 16, 64  # a Marlin tile: 16 input x 64 output channels, 1,024 codes in 256 int32 words
CODE_BIAS = 128  # GPTQ's symmetric 8-bit codes: weight = (code - 128) x scale
AGREE = 2e-2  # largest |dense - Marlin| over the largest |Marlin| output accepted by the start-up check

# The repack kernel's 8-bit branch writes a tile's byte p = 4 x word + i (little-endian) from thread t of warp w,
# word = t x 8 + w x 2 + h, as the code of row k = (i % 2) x 8 + (t % 4) x 2 + i // 2, column n = w x 16 + h x 8
# + t // 4. Each digit of p moves whole into k or n, so the inversion is the tile's bytes viewed with these
# digits (outermost first: t // 4, t % 4, w, h, i // 2, i % 2) and its axes reordered into k's (i % 2, t % 4,
# i // 2) then n's (w, h, t // 4): no gather, one strided read of the codes.
TILE_DIGITS = (8, 4, 4, 2, 2, 2)
TILE_AXES_K, TILE_AXES_N = (5, 1, 4), (2, 3, 0)  # positions in TILE_DIGITS


def marlin_scale_order(single: bool) -> torch.Tensor:
    """Where `marlin_permute_scales` put each scale of a block (64 with groups, 32 for one scale per column).
    Both permutations happen to be their own inverses today; inverting them keeps this right if one changes."""
    from gptqmodel.utils.marlin import get_scale_perms

    grouped, per_column = get_scale_perms()
    return torch.argsort(torch.tensor(per_column if single else grouped))  # a permutation's inverse


def marlin_dense(qweight: torch.Tensor, scales: torch.Tensor, size_k: int, size_n: int, out: torch.Tensor,
                 scale_inverse: torch.Tensor) -> torch.Tensor:
    """The [K, N] weight of Marlin-layout 8-bit codes, written into `out` (at least K x N elements, the scales'
    dtype): (code - 128) x scale in one fused multiply-add over the codes' reordered view."""
    tiles_k, tiles_n = size_k // TILE_K, size_n // TILE_N
    groups = scales.shape[0]
    per_group = tiles_k // groups  # tiles of 16 rows that share a row of scales
    codes = qweight.detach().view(torch.uint8).view(groups, per_group, tiles_n, *TILE_DIGITS)
    axes = tuple(3 + a for a in TILE_AXES_K) + (2,) + tuple(3 + a for a in TILE_AXES_N)
    tiles = codes.permute(0, 1, *axes)  # [groups, per_group, k digits, tiles_n, n digits]
    k_digits = [TILE_DIGITS[a] for a in TILE_AXES_K]
    n_digits = [TILE_DIGITS[a] for a in TILE_AXES_N]
    s = scales.detach().reshape(-1, scale_inverse.numel()).index_select(1, scale_inverse)
    s = s.view(groups, 1, *[1] * len(k_digits), tiles_n, *n_digits)
    weight = out[: size_k * size_n]
    torch.addcmul(s * -CODE_BIAS, tiles, s, out=weight.view(groups, per_group, *k_digits, tiles_n, *n_digits))
    return weight.view(size_k, size_n)


class MarlinDense:
    """One GPTQModel MarlinLinear layer as x @ W (+ bias) over its dequantized weight."""

    def __init__(self, layer: torch.nn.Module, scratch: torch.Tensor) -> None:
        self.layer, self.scratch = layer, scratch
        self.k, self.n = layer.in_features, layer.out_features
        self.scale_inverse = marlin_scale_order(single=layer.scales.shape[0] == 1).to(layer.qweight.device)
        self.bias = None
        if layer.bias is not None:  # stored permuted for Marlin's epilogue
            self.bias = layer.bias.data.reshape(-1, 32).index_select(
                1, marlin_scale_order(single=True).to(layer.bias.device)).reshape(-1)

    def weight(self) -> torch.Tensor:
        return marlin_dense(self.layer.qweight, self.layer.scales, self.k, self.n, self.scratch, self.scale_inverse)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.k)
        w = self.weight()
        out = torch.mm(flat, w) if self.bias is None else torch.addmm(self.bias, flat, w)
        return out.view(*x.shape[:-1], self.n)


class DequantizedDense:
    """A GPTQ layer whose kernel can write out its own weight (`dequantize_weight`, GPTQModel's torch kernels):
    the same x @ W, there for the CPU tests of the switch between the two paths."""

    def __init__(self, layer: torch.nn.Module) -> None:
        self.layer = layer

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.matmul(x, self.layer.dequantize_weight().to(x.dtype))
        return out if self.layer.bias is None else out + self.layer.bias.to(x.dtype)


def marlin_supported(layer: torch.nn.Module) -> str | None:
    """Why this MarlinLinear cannot run dense, or None (Marlin itself takes symmetric codes only)."""
    if layer.bits != 8:
        return f"{layer.bits}-bit codes (the inversion is written for 8-bit)"
    if layer.g_idx.numel():
        return "act-order"
    if getattr(layer, "adapter", None) is not None:
        return "a GPTQModel adapter on the layer"
    if getattr(layer, "_marlin_tile_padding", None) is not None:
        return "a tile-padded shape"
    if layer.in_features % TILE_K or layer.out_features % TILE_N:
        return "a shape that is not whole tiles"
    return None


def dense_linears(modules: list[torch.nn.Module], dtype: torch.dtype,
                  device: torch.device) -> list[Callable[[torch.Tensor], torch.Tensor]] | None:
    """A dense callable for each module (one shared scratch buffer), or None when any one cannot have one (a plain
    or LoRA-wrapped layer, an unsupported code layout): the engine then keeps Marlin for every pass."""
    if not all(type(m).__module__.startswith("gptqmodel.") for m in modules):
        return None  # fp16 (or merged) weights are dense already; a LoRA wrapper's adapter runs beside its base
    from gptqmodel.nn_modules.qlinear.marlin import MarlinLinear

    marlin = [m for m in modules if type(m) is MarlinLinear]
    if marlin and len(marlin) == len(modules):
        reasons = {r for r in map(marlin_supported, marlin) if r}
        if reasons:
            log.info("static engine: long passes stay on Marlin: %s", "; ".join(sorted(reasons)))
            return None
        # One buffer for the weight of the layer being run, shared by every layer and pass (one stream runs them
        # in turn): the largest projection's size.
        scratch = torch.empty(max(m.in_features * m.out_features for m in marlin), dtype=dtype, device=device)
        return [MarlinDense(m, scratch) for m in marlin]
    if device.type == "cpu" and all(hasattr(m, "dequantize_weight") and getattr(m, "adapter", None) is None
                                    for m in modules):
        return [DequantizedDense(m) for m in modules]  # what the torch kernel does anyway: for the switch's tests
    return None


@torch.inference_mode()
def agrees(layer: torch.nn.Module, dense: Callable[[torch.Tensor], torch.Tensor], rows: int = 64) -> float:
    """|dense - kernel| over the largest |kernel| output for random inputs: the start-up check of the inversion."""
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(rows, layer.in_features, generator=g).to(layer.scales.device, layer.scales.dtype)
    expected, got = layer(x), dense(x)
    return float((got.float() - expected.float()).abs().max() / expected.float().abs().max().clamp_min(1e-6))


def dense_from(device: torch.device, override: int | None) -> int | None:
    """Positions per pass from which a pass runs dense (None: never): `override` (0: never), else this card's
    entry in `DENSE_FROM`."""
    if override is not None:
        if override < 0:
            raise ValueError(f"dense={override}: give the positions per pass from which prefill runs dense, or 0 "
                             "for never")
        return override or None
    if device.type != "cuda":
        return None
    return DENSE_FROM.get(torch.cuda.get_device_capability(device))
