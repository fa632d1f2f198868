"""Packed micro-batches: a micro-batch's sequences end to end in one row, no padding, attention kept inside each.

Padding a length-sorted micro-batch to its longest row spends about 9% of the
fast path's tokens on padding at submission 3's lengths (128 to 2,048), in
every matmul, norm and dropout of the forward, the recomputation and the
backward; and the padding mask keeps attention off the flash kernels. Packed,
a micro-batch is one row of exactly its sequences' tokens:

- `layout` gives each token its position inside its own sequence (so rotary
  embeddings see what they see at batch 1) and the sequences' boundaries as
  cumulative offsets;
- `attention` (registered with transformers' attention interface under `NAME`)
  attends causally within each sequence: torch's varlen flash attention on
  CUDA, per-sequence `scaled_dot_product_attention` elsewhere (the plain
  computation, which the CPU tests run);
- `within_sequences(model)` puts it in place for the duration of a step.

Nothing crosses a boundary, so each sequence's logits, loss and gradient are
those of the sequence alone, up to rounding.
"""

from __future__ import annotations

import contextlib
import functools
import inspect

import torch

from .swap import swapped

NAME = "packed_varlen"   # the attention implementation's name in transformers' interface


def layout(lengths: list[int]) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(position ids [1, T], cumulative offsets [n + 1] int32, longest length) for sequences laid end to end."""
    positions = torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0)
    offsets = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    offsets[1:] = torch.tensor(lengths, dtype=torch.int32).cumsum(0)
    return positions, offsets, max(lengths)


# --- attention within each sequence ------------------------------------------------


def attend_plain(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, offsets: torch.Tensor, scale: float,
                 dropout: float = 0.0) -> torch.Tensor:
    """Causal attention per sequence ([T, heads, dim] in and out), one `scaled_dot_product_attention` each."""
    out = []
    bounds = offsets.tolist()
    for a, b in zip(bounds[:-1], bounds[1:]):
        qs, ks, vs = (t[a:b].transpose(0, 1) for t in (q, k, v))
        gqa = {"enable_gqa": True} if ks.shape[0] != qs.shape[0] else {}
        out.append(torch.nn.functional.scaled_dot_product_attention(
            qs, ks, vs, dropout_p=dropout, is_causal=True, scale=scale, **gqa).transpose(0, 1))
    return torch.cat(out)


def varlen_arguments(params) -> dict | None:
    """How this torch's `varlen_attn` is asked for causal attention and its scale (keyword names, as data), or None
    where its signature is one this code does not know: 2.11 on take `window_size` and `scale`, 2.10 `is_causal`."""
    if "window_size" in params:
        causal = {"window_size": (-1, 0)}
    elif "is_causal" in params:
        causal = {"is_causal": True}
    else:
        return None
    return {"causal": causal, "scale": "scale" in params, "gqa": "enable_gqa" in params}


@functools.cache
def _varlen():
    """torch's varlen flash attention and `varlen_arguments` for it, or None where it is missing or unknown."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    try:
        how = varlen_arguments(inspect.signature(varlen_attn).parameters)
    except (TypeError, ValueError):  # no signature to read
        return None
    return (varlen_attn, how) if how is not None else None


def attend_flash(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, offsets: torch.Tensor, longest: int,
                 scale: float) -> torch.Tensor:
    """The same computation with torch's varlen flash attention (CUDA, half precision)."""
    varlen_attn, how = _varlen()
    extra = dict(how["causal"])
    if k.shape[1] != q.shape[1]:
        if how["gqa"]:
            extra["enable_gqa"] = True
        else:
            k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], dim=1) for t in (k, v))
    if how["scale"]:
        extra["scale"] = scale
    elif scale != q.shape[-1] ** -0.5:  # without the argument the kernel uses 1/sqrt(dim): fold the rest into q
        q = q * (scale * q.shape[-1] ** 0.5)
    return varlen_attn(q, k, v, offsets, offsets, longest, longest, **extra)


@functools.cache
def flash_available(device: torch.device) -> bool:
    """torch's varlen kernel is flash attention: CUDA, a build with it, an Ampere or newer card (a 4090: sm_89)."""
    return (device.type == "cuda" and _varlen() is not None and torch.backends.cuda.is_flash_attention_available()
            and torch.cuda.get_device_capability(device) >= (8, 0))


def attention(module, query, key, value, attention_mask, scaling: float | None = None, dropout: float = 0.0,
              cu_seq_lens_q: torch.Tensor | None = None, max_length_q: int | None = None, **kwargs):
    """transformers' attention-interface call for one packed row: query/key/value [1, heads, T, dim], the
    boundaries in `cu_seq_lens_q`; returns ([1, T, heads, dim], None) as the built-in implementations do."""
    if cu_seq_lens_q is None or query.shape[0] != 1:
        raise ValueError("packed attention needs one row and its sequences' offsets (cu_seq_lens_q)")
    if kwargs.get("sliding_window") is not None:
        raise ValueError("packed attention has no sliding window: set [training] path = \"reference\"")
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))
    scale = scaling if scaling is not None else q.shape[-1] ** -0.5
    offsets = cu_seq_lens_q.to(device=q.device, dtype=torch.int32)
    if dropout == 0.0 and q.dtype in (torch.float16, torch.bfloat16) and flash_available(q.device):
        out = attend_flash(q, k, v, offsets, int(max_length_q), scale)
    else:
        out = attend_plain(q, k, v, offsets, scale, dropout)
    return out.unsqueeze(0), None


def _no_mask(*args, **kwargs):
    """Packed rows need no mask: `attention` reads the boundaries."""
    return None


@contextlib.contextmanager
def within_sequences(model):
    """The model's attention is `attention` (under `NAME`) until the block ends; its own comes back after."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, attention)
    AttentionMaskInterface.register(NAME, _no_mask)
    configs = [m.config for m in model.modules() if hasattr(m, "config") and hasattr(m.config, "_attn_implementation")]
    with swapped({id(c): c for c in configs}.values(), "_attn_implementation", NAME):
        yield
