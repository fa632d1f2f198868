"""Qwen (v1) tensor names -> Qwen2 tensor names, with the fused attention input split.

Qwen v1 computes `c_proj(w1(x) * silu(w2(x)))` in its MLP: `w2` is Qwen2's
`gate_proj` (the one under silu) and `w1` its `up_proj`. `attn.c_attn` is
q, k and v stacked along the output dimension.

The same mapping serves full-precision and GPTQ tensors. GPTQ (AutoGPTQ
format) keeps the output dimension in columns: `qweight` [in*bits/32, out],
`scales` [groups, out], `qzeros` [groups, out*bits/32] (packed along the
output), and `g_idx` [in] belongs to the input, so every split part keeps it.
"""

from __future__ import annotations

import re

import torch

from packager.qwen import LAYER_MODULES

LAYER = re.compile(r"^transformer\.h\.(\d+)\.(.+)$")

TOP_LEVEL = {
    "transformer.wte.weight": "model.embed_tokens.weight",
    "transformer.ln_f.weight": "model.norm.weight",
    "lm_head.weight": "lm_head.weight",
}

# Where the output dimension lies, per tensor kind; None: not split (copied to each part).
OUTPUT_DIM: dict[str, int | None] = {"weight": 0, "bias": 0, "qweight": 1, "scales": 1, "qzeros": 1, "g_idx": None}

# Buffers Qwen v1 may have saved that Qwen2 recomputes.
DROPPED = re.compile(r"(^|\.)rotary_emb\.inv_freq$")


class TensorMapError(ValueError):
    """A tensor the mapping does not know or cannot split exactly."""


def map_module(path: str) -> tuple[str, ...]:
    """The Qwen2 module path(s) of a Qwen v1 layer module (`transformer.h.3.attn.c_attn`)."""
    m = LAYER.match(path)
    if not m or m.group(2) not in LAYER_MODULES:
        raise TensorMapError(f"{path}: not a Qwen (v1) module this converter knows")
    layer, module = m.groups()
    return tuple(f"model.layers.{layer}.{target}" for target in LAYER_MODULES[module])


def map_name(name: str) -> tuple[str, ...]:
    """The Qwen2 name(s) of a Qwen v1 tensor; () for buffers that are recomputed."""
    if name in TOP_LEVEL:
        return (TOP_LEVEL[name],)
    if DROPPED.search(name):
        return ()
    module, _, kind = name.rpartition(".")
    if kind not in OUTPUT_DIM:
        raise TensorMapError(f"{name}: not a Qwen (v1) tensor this converter knows")
    return tuple(f"{target}.{kind}" for target in map_module(module))


def split_output(kind: str, tensor: torch.Tensor, parts: int) -> list[torch.Tensor]:
    """Split a tensor into `parts` equal slices of its output dimension."""
    dim = OUTPUT_DIM[kind]
    if dim is None:
        return [tensor.clone() for _ in range(parts)]
    size = tensor.shape[dim]
    if size % parts:
        raise TensorMapError(f"{kind} of shape {tuple(tensor.shape)} does not split into {parts} along dim {dim}")
    return [t.contiguous() for t in torch.split(tensor, size // parts, dim=dim)]


def map_tensor(name: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
    """One Qwen v1 tensor -> its Qwen2 tensor(s)."""
    targets = map_name(name)
    if len(targets) <= 1:
        return {t: tensor for t in targets}
    kind = name.rsplit(".", 1)[1]
    return dict(zip(targets, split_output(kind, tensor, len(targets))))
