"""The static engine: a KV cache allocated once, the decode step replayed as a CUDA graph, prefix reuse.

Batch-1 decoding is bound by reading every weight once per token; what keeps the
HF engine far from that bound is work around the matmuls (a growing cache,
hundreds of kernel launches from Python per token). Here the model's own modules
(projections, norms, MLPs: plain, GPTQ or LoRA-wrapped alike) run inside a
forward written out below over fixed-size cache tensors, so that one decode step
has fixed shapes and can be captured once per cache-length bucket and replayed.

Prefix reuse: the cache keeps the tokens of the previous request (prompt and
completion). A new prompt that starts with the same tokens (HELM repeats a
subject's few-shot examples with every question) prefills only its new suffix.
The final hidden state of every cached position is kept too, so a reused
position still yields its logits (for echo scoring, and when the whole prompt
is cached).

Read top to bottom: `forward` (one pass over cached positions), `Steps` (its fixed
shapes, captured as CUDA graphs), `decode_one_token`, then `StaticEngine.generate` and `open_all`
(which prefills).

Batching (`[server] max_batch` > 1): the cache holds a slot per batch row (`Slots`), each slot keeps
its own previous request for prefix reuse, and `forward_rows`/`BatchSteps` run one decode step for
every slot at once; a request alone in the batch still takes its slot's batch-1 step. Requests that
arrive together are opened together (`StaticEngine.open_all`): a prefix another slot holds is copied,
not recomputed (`copy_positions`); a request that shares a long prefix with another one arriving with
it waits for that one's prefill and copies it (`next_wave`); the rest are prefilled side by side,
a chunk of each per pass (`PrefillSteps`).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from .dense_prefill import AGREE, MarlinDense, agrees, dense_from, dense_linears
from .engine import Generation, SamplingParams, ScoredToken, StopCheck
from .lora_products import lora_products
from .marlin_fusion import FusedPart, fuse_in_place
from .hf_engine import (Decoding, HFEngine, Row, Tokenizing, _generator, _to_host, checked_eos, load_model,
                        load_tokenizer, pick_device, score)
from .settings import ServeConfig

log = logging.getLogger("helm_server.engine")

# Decoder layouts this forward reproduces exactly (pre-norm, RoPE, optional GQA, no sliding window),
# as data: model_type -> what is known about it.
ARCHITECTURES = {
    "qwen2": "Qwen2ForCausalLM (Qwen-14B after `make convert`): q/k/v biases, RoPE, RMSNorm",
    "llama": "LlamaForCausalLM: no biases, RoPE, RMSNorm",
}

# RoPE variants whose tables depend on the current sequence length (the tables here are computed once).
LENGTH_DEPENDENT_ROPE = {"dynamic", "longrope"}

PREFILL_CHUNK = 512  # prompt positions per prefill pass: bounds activation memory for long prompts
SCORE_CHUNK = 512  # positions per logit matrix when scoring an echoed prompt
SMALLEST_BUCKET = 256  # steps attend over 256, 512, ... cache positions, the last one the whole cache
# Prefill chunk lengths captured as graphs; a chunk is padded up to the next one (short suffixes after a
# reused few-shot prefix are the common case).
PREFILL_SIZES = (16, 32, 64, 128, 192, 256, 384, 512)
BATCH_PREFILL_TOKENS = 1024  # rows x chunk positions in one batched prefill pass: bounds its activation memory
COPY_MIN = 16  # a prefix held by another slot is copied when it saves at least this many positions of prefill
WAIT_MIN = 64  # a request waits one pass for a neighbour's prefill when it would then copy this many more positions


class UnsupportedModel(RuntimeError):
    """A model this engine cannot run exactly; the message says to use engine = "hf"."""


@dataclass
class Layer:
    attn_norm: torch.nn.Module
    qkv: Callable[[torch.Tensor], torch.Tensor]  # queries, keys and values side by side
    o: Callable[[torch.Tensor], torch.Tensor]
    mlp_norm: torch.nn.Module
    mlp: Callable[[torch.Tensor], torch.Tensor]


@dataclass
class Weights:
    """The model's modules, in the order the forward calls them."""

    embed: torch.nn.Module
    layers: list[Layer]
    norm: torch.nn.Module
    lm_head: torch.nn.Module
    heads: int
    kv_heads: int
    head_dim: int
    scaling: float
    # The same layers with their GPTQ projections on dense weights (dense_prefill.py), for passes of at least
    # `dense_from` positions; None: every pass runs the layers' own kernels.
    dense_layers: list[Layer] | None = None
    dense_from: int = 0

    def layers_for(self, rows: int, tokens: int) -> list[Layer]:
        """The layers a pass of `tokens` positions in each of `rows` rows runs: a decode step (one position a row)
        always the layers' own kernels, a prefill pass of at least `dense_from` positions the dense ones."""
        if self.dense_layers is None or tokens == 1 or rows * tokens < self.dense_from:
            return self.layers
        return self.dense_layers


class Cache:
    """Keys and values of every layer, and the final hidden state, for `length` positions: one slot."""

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor], hidden: torch.Tensor, length: int) -> None:
        self.keys, self.values, self.hidden = keys, values, hidden  # keys[layer]: [1, kv_heads, length + 1, head_dim]
        self.length = length  # positions a request may use (the one after them is the scratch position)
        self.tokens: list[int] = []  # tokens whose keys, values and hidden states are valid, from position 0


class Slots:
    """The static cache of `rows` slots, one per batch row, allocated once: [rows, kv_heads, length + 1,
    head_dim] per layer. Each slot is a `Cache` over views of its row, so a batch-1 step and a batched step
    write the same memory; with one row this is exactly one slot's cache.

    Position `length` of every slot (`scratch`) belongs to no request: a batched step's filler (a slot
    without a running request, a row or chunk padded to a captured shape) writes there, and no step
    ever attends to it (attention reads at most the first `length` positions).
    """

    def __init__(self, w: Weights, rows: int, length: int, hidden: int, dtype: torch.dtype,
                 device: torch.device) -> None:
        shape = (rows, w.kv_heads, length + 1, w.head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in w.layers]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in w.layers]
        self.hidden = torch.zeros(rows, length + 1, hidden, dtype=dtype, device=device)
        self.length = self.scratch = length
        self.caches = [Cache([k[r : r + 1] for k in self.keys], [v[r : r + 1] for v in self.values], self.hidden[r],
                             length) for r in range(rows)]


def slot_bytes(config, length: int, itemsize: int) -> int:
    """Memory of one `Slots` row: keys and values of every layer plus the final hidden states, `length` positions
    and the scratch one."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    per_position = 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim + config.hidden_size
    return per_position * (length + 1) * itemsize


def unwrap(model) -> torch.nn.Module:
    """The causal LM under a peft wrapper (LoRA layers are injected into it in place)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def check_supported(config) -> None:
    """Refuse what this forward would get wrong."""
    if config.model_type not in ARCHITECTURES:
        raise UnsupportedModel(f"model_type {config.model_type!r}: the static engine runs {sorted(ARCHITECTURES)}; "
                               'set [server] engine = "hf" in the spec')
    if getattr(config, "use_sliding_window", False):
        raise UnsupportedModel('sliding-window attention is not implemented; set [server] engine = "hf"')
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if rope.get("rope_type", rope.get("type")) in LENGTH_DEPENDENT_ROPE:
        raise UnsupportedModel(f"rope {rope}: its tables change with the sequence length, which a static cache "
                               'cannot follow; set [server] engine = "hf"')


def weights_of(model, fuse: bool = True) -> Weights:
    """Map a transformers decoder onto `Weights`, the projections that read the same input in as few products as
    they allow (`group_of`; `fuse` off only to measure what that saves)."""
    lm = unwrap(model)
    config = lm.config
    check_supported(config)
    attn = lm.model.layers[0].self_attn
    dtype = lm.get_input_embeddings().weight.dtype
    layers = []
    for l in lm.model.layers:
        a = l.self_attn
        qkv = group_of(a, QKV, fuse, dtype) or _side_by_side(*[getattr(a, n) for n in QKV])
        layers.append(Layer(l.input_layernorm, qkv, group_of(a, ("o_proj",), fuse, dtype) or a.o_proj,
                            l.post_attention_layernorm, mlp_of(l.mlp, fuse, dtype)))
    return Weights(lm.model.embed_tokens, layers, lm.model.norm, lm.lm_head, config.num_attention_heads,
                   config.num_key_value_heads, attn.head_dim, attn.scaling)


def fused(linears: list[torch.nn.Module]) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """One matmul for plain Linear layers that read the same input (fewer, larger kernels per step).

    Their weights are concatenated once and each layer's weight becomes a view of its rows, so the
    model is unchanged for any other caller and no memory is duplicated. GPTQ and LoRA-wrapped
    layers are not plain Linear: None (GPTQ Marlin layers have their own fusion, marlin_fusion.py).
    """
    if not all(type(m) is torch.nn.Linear for m in linears):
        return None
    if len({m.bias is None for m in linears}) != 1:
        return None
    weight = torch.cat([m.weight.data for m in linears])
    bias = None if linears[0].bias is None else torch.cat([m.bias.data for m in linears])
    start = 0
    for m in linears:
        rows = m.weight.shape[0]
        m.weight.data = weight[start : start + rows]
        if bias is not None:
            m.bias.data = bias[start : start + rows]
        start += rows
    return lambda x: F.linear(x, weight, bias)


QKV, GATE_UP = ("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj")


def group_of(parent: torch.nn.Module, names: tuple[str, ...], fuse: bool,
             dtype: torch.dtype) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """`parent.<names>` with their outputs side by side in fewer kernels, or None where they gain nothing over
    running one after the other: plain weights concatenated (`fused`), GPTQ Marlin layers fused
    (marlin_fusion.py), unmerged LoRA adapters as one A GEMM for the group and one per B, added into their
    bases' output (lora_products.py, the bases fused where they can be)."""
    if not fuse:
        return None
    modules = [getattr(parent, n) for n in names]
    adapters = lora_products(modules, dtype)
    if adapters is not None:
        bases = [m.base_layer for m in modules]
        base = (len(names) > 1 and (fused(bases) or fuse_in_place(parent, names, inside="base_layer"))) or \
            _side_by_side(*bases)
        return lambda x: adapters.add_to(base(x), x)
    if len(modules) == 1:
        return None
    return fused(modules) or fuse_in_place(parent, names)


def mlp_of(mlp, fuse: bool, dtype: torch.dtype) -> Callable[[torch.Tensor], torch.Tensor]:
    """down(act(gate(x)) * up(x)), gate and up in one product where they can be (`group_of`)."""
    width = mlp.gate_proj.out_features  # before fusion replaces it
    gate_up, down = group_of(mlp, GATE_UP, fuse, dtype), group_of(mlp, ("down_proj",), fuse, dtype)
    if gate_up is None and down is None:
        return mlp
    return _gated(gate_up or _side_by_side(mlp.gate_proj, mlp.up_proj), width, down or mlp.down_proj, mlp.act_fn)


def projection_groups(layer: torch.nn.Module) -> tuple[list, torch.nn.Module, list, torch.nn.Module]:
    """A decoder layer's q/k/v, o, gate/up and down modules; a Marlin layer fused from parts stands for them."""

    def group(parent: torch.nn.Module, names: tuple[str, ...]) -> list[torch.nn.Module]:
        parts = [getattr(parent, n) for n in names]
        return [parts[0].fused] if isinstance(parts[0], FusedPart) else parts

    return group(layer.self_attn, QKV), layer.self_attn.o_proj, group(layer.mlp, GATE_UP), layer.mlp.down_proj


def dense_layers_of(model, w: Weights, dtype: torch.dtype, device: torch.device) -> list[Layer] | None:
    """`w`'s layers again with every projection on dense weights (dense_prefill.py), or None where a layer cannot
    have them or the start-up check finds the dense product off Marlin's (logged: Marlin then runs every pass)."""
    decoder = unwrap(model).model.layers
    groups = [projection_groups(layer) for layer in decoder]
    modules = [m for qkv, o, gate_up, down in groups for m in (*qkv, o, *gate_up, down)]
    dense = dense_linears(modules, dtype, device)
    if dense is None:
        return None
    dense_of = {id(m): d for m, d in zip(modules, dense)}
    qkv, _, _, down = groups[0]
    for what, m in (("q/k/v", qkv[0]), ("down", down)):  # q (with its bias), down (the longest input): layer 0
        if isinstance(dense_of[id(m)], MarlinDense) and (off := agrees(m, dense_of[id(m)])) > AGREE:
            log.warning("static engine: dense weights of %s differ from Marlin's product by %.3g (relative): "
                        "long passes stay on Marlin", what, off)
            return None
    layers = []
    for module, layer, (qkv, o, gate_up, down) in zip(decoder, w.layers, groups):
        layers.append(Layer(layer.attn_norm, _side_by_side(*[dense_of[id(m)] for m in qkv]), dense_of[id(o)],
                            layer.mlp_norm, _gated(_side_by_side(*[dense_of[id(m)] for m in gate_up]),
                                                   module.mlp.gate_proj.out_features, dense_of[id(down)],
                                                   module.mlp.act_fn)))
    return layers


def _side_by_side(*projections: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
    if len(projections) == 1:
        return projections[0]
    return lambda h: torch.cat([p(h) for p in projections], dim=-1)


def _gated(gate_up: Callable, width: int, down: Callable, act: Callable) -> Callable[[torch.Tensor], torch.Tensor]:
    """down(act(gate) * up) from gate and up side by side (`width` columns of gate)."""

    def run(x: torch.Tensor) -> torch.Tensor:
        both = gate_up(x)
        return down(act(both[..., :width]) * both[..., width:])

    return run


def adapters_in(model, dtype: torch.dtype) -> int:
    """Unmerged LoRA weights in the base's dtype (in place; returns how many were cast). peft keeps adapter weights
    in fp32 and casts each input up, so every adapter product beside an fp16 base was an fp32 GEMM (13% of a
    Humpback decode step on the 14B shape); in fp16 they round as a merged fp16 adapter would."""
    cast = 0
    for name, p in model.named_parameters():
        if (".lora_A." in name or ".lora_B." in name) and p.is_floating_point() and p.dtype != dtype:
            p.data = p.data.to(dtype)
            cast += 1
    return cast


def rope_tables(model, length: int, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin for every position, from the model's own rotary module (same numerics as its forward), the
    sin with the sign `rotate` needs folded in: minus on the first half of each head, plus on the second."""
    rotary = unwrap(model).model.rotary_emb
    positions = torch.arange(length, device=device)[None]
    cos, sin = rotary(torch.zeros(1, dtype=dtype, device=device), positions)
    half = sin.shape[-1] // 2
    sign = torch.cat([-torch.ones(half), torch.ones(half)]).to(device, sin.dtype)
    return cos[0], sin[0] * sign


def rotate(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """RoPE, x cos + rotate_half(x) sin, in three kernels (four where `x` is strided: the roll copies it first):
    rotate_half(x) is x rolled by half a head with the first half negated, and the sign is in the table
    (`rope_tables`)."""
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, -1), signed_sin)


def rms_norm(x: torch.Tensor, norm: torch.nn.Module) -> torch.Tensor:
    """The model's RMSNorm as one fused kernel (its module runs about seven)."""
    return F.rms_norm(x, (x.shape[-1],), norm.weight, norm.variance_epsilon)


def forward(w: Weights, cache: Cache, rope: tuple[torch.Tensor, torch.Tensor], ids: torch.Tensor,
            positions: torch.Tensor, keys: int) -> torch.Tensor:
    """Run `ids` at `positions`, writing their keys, values and final hidden states into the cache.

    Attention reads the first `keys` cache positions, masked to those at or before each query's
    position; anything cached beyond (an older request's tokens) is never seen.
    Returns the final hidden states [n, hidden].
    """
    n = ids.shape[0]
    cos, sin = rope[0][positions][None, None], rope[1][positions][None, None]
    mask = torch.arange(keys, device=ids.device)[None, :] <= positions[:, None]
    x = w.embed(ids)[None]
    for layer, k_cache, v_cache in zip(w.layers_for(1, n), cache.keys, cache.values):
        h = rms_norm(x, layer.attn_norm)
        qkv = layer.qkv(h).view(1, n, w.heads + 2 * w.kv_heads, w.head_dim).transpose(1, 2)
        qk = rotate(qkv[:, : w.heads + w.kv_heads], cos, sin)  # queries and keys: one rotation for both
        q, k, v = qk[:, : w.heads], qk[:, w.heads :], qkv[:, w.heads + w.kv_heads :]
        k_cache.index_copy_(2, positions, k)
        v_cache.index_copy_(2, positions, v)
        a = F.scaled_dot_product_attention(q, k_cache[:, :, :keys], v_cache[:, :, :keys], attn_mask=mask,
                                           scale=w.scaling, enable_gqa=w.kv_heads != w.heads)
        x = x + layer.o(a.transpose(1, 2).reshape(1, n, w.heads * w.head_dim))
        x = x + layer.mlp(rms_norm(x, layer.mlp_norm))
    hidden = rms_norm(x, w.norm)[0]
    cache.hidden.index_copy_(0, positions, hidden)
    return hidden


def forward_rows(w: Weights, slots: Slots, rope: tuple[torch.Tensor, torch.Tensor], ids: torch.Tensor,
                 positions: torch.Tensor, slot_of: torch.Tensor, keys: int, every_slot: bool = False) -> torch.Tensor:
    """Rows of tokens, each in its own slot: row r's `ids[r]` at `positions[r]` of slot `slot_of[r]`, attending to
    that slot's first `keys` positions at or before each token. `forward` for a batch; returns [rows, tokens, hidden].

    `every_slot`: row r is slot r, every slot once (the decode step): attention reads the cache in place.
    Otherwise the rows' slots are gathered, up to `keys` positions (a batched prefill pass: a few rows).
    """
    rows, n = ids.shape
    cos, sin = rope[0][positions][:, None], rope[1][positions][:, None]
    mask = (torch.arange(keys, device=ids.device)[None, None, :] <= positions[:, :, None])[:, None]
    where = slot_of[:, None].expand(rows, n)
    x = w.embed(ids)
    for layer, k_cache, v_cache in zip(w.layers_for(rows, n), slots.keys, slots.values):
        h = rms_norm(x, layer.attn_norm)
        qkv = layer.qkv(h).view(rows, n, w.heads + 2 * w.kv_heads, w.head_dim).transpose(1, 2)
        qk = rotate(qkv[:, : w.heads + w.kv_heads], cos, sin)
        q, k, v = qk[:, : w.heads], qk[:, w.heads :], qkv[:, w.heads + w.kv_heads :]
        k_cache[where, :, positions] = k.transpose(1, 2)
        v_cache[where, :, positions] = v.transpose(1, 2)
        k_read, v_read = k_cache[:, :, :keys], v_cache[:, :, :keys]
        if not every_slot:
            k_read, v_read = k_read.index_select(0, slot_of), v_read.index_select(0, slot_of)
        a = F.scaled_dot_product_attention(q, k_read, v_read, attn_mask=mask, scale=w.scaling,
                                           enable_gqa=w.kv_heads != w.heads)
        x = x + layer.o(a.transpose(1, 2).reshape(rows, n, w.heads * w.head_dim))
        x = x + layer.mlp(rms_norm(x, layer.mlp_norm))
    hidden = rms_norm(x, w.norm)
    slots.hidden[where, positions] = hidden
    return hidden


def copy_positions(slots: Slots, source: int, target: int, begin: int, end: int) -> None:
    """Positions begin..end-1 of slot `source` into slot `target`: keys, values and final hidden states.
    A device copy of what a prefill of those positions would compute (up to the rounding of its chunking)."""
    for k_cache, v_cache in zip(slots.keys, slots.values):
        k_cache[target, :, begin:end] = k_cache[source, :, begin:end]
        v_cache[target, :, begin:end] = v_cache[source, :, begin:end]
    slots.hidden[target, begin:end] = slots.hidden[source, begin:end]


def shared_prefix(cached: list[int], prompt: list[int]) -> int:
    n = 0
    for a, b in zip(cached, prompt):
        if a != b:
            break
        n += 1
    return n


def buckets(length: int) -> list[int]:
    """Cache lengths a step attends over: powers of two from SMALLEST_BUCKET, then the whole cache."""
    sizes, size = [], SMALLEST_BUCKET
    while size < length:
        sizes.append(size)
        size *= 2
    return sizes + [length]


def row_counts(rows: int) -> list[int]:
    """Row counts a batched prefill pass is captured for: powers of two from 2, then every slot."""
    counts, count = [], 2
    while count < rows:
        counts.append(count)
        count *= 2
    return counts + [rows] if rows > 1 else []


def capture(graphs: dict, shapes: list, run: Callable, what: str) -> None:
    """Capture `run(*shape)` for every shape as a CUDA graph into `graphs`, all sharing one memory pool
    (warmed up first: kernels chosen, workspaces allocated; the largest shape, by the product of its
    sizes, first: it sizes the pool)."""
    started = time.perf_counter()
    pool = torch.cuda.graph_pool_handle()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for shape in shapes:
            run(*shape)
    torch.cuda.current_stream().wait_stream(stream)
    for shape in sorted(shapes, key=math.prod, reverse=True):
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            out = run(*shape)
        graphs[shape] = (graph, out)
    torch.cuda.synchronize()
    log.info("static engine: %d CUDA graphs captured (%s) in %.1f s", len(shapes), what, time.perf_counter() - started)


class Steps:
    """`forward` at fixed shapes: the one-token decode step and prefill chunks padded to PREFILL_SIZES.

    On CUDA each (tokens, cache bucket) shape is captured once as a CUDA graph over static input
    tensors and replayed: a step then costs its kernels, not a thousand launches from Python (an
    eager 110-token prefill of a 14B model spends most of its time launching). Padding a chunk
    writes keys past the prompt's end: positions no cached token claims, overwritten later. On
    the CPU the same padded shapes run eagerly.
    """

    def __init__(self, w: Weights, cache: Cache, rope, graphs: bool, prefill_graphs: bool = True) -> None:
        self.w, self.cache, self.rope = w, cache, rope
        self.prefill_graphs = prefill_graphs  # off: prefill chunks run eagerly (fewer graphs, less capture time)
        device = cache.hidden.device
        self.ids = torch.zeros(PREFILL_CHUNK, dtype=torch.long, device=device)
        self.positions = torch.zeros(PREFILL_CHUNK, dtype=torch.long, device=device)
        self.buckets = buckets(cache.length)
        self.graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor | None]] = {}
        if graphs:
            self._capture()

    def _run(self, n: int, keys: int) -> torch.Tensor | None:
        hidden = forward(self.w, self.cache, self.rope, self.ids[:n], self.positions[:n], keys)
        return self.w.lm_head(hidden)[0] if n == 1 else None

    def shapes(self) -> list[tuple[int, int]]:
        tokens = [1] + [n for n in PREFILL_SIZES if n <= self.cache.length and self.prefill_graphs]
        return [(n, keys) for n in tokens for keys in self.buckets if keys >= n]

    def _capture(self) -> None:
        capture(self.graphs, self.shapes(), self._run,
                f"1-token decode and {PREFILL_SIZES}-token prefill, cache buckets {self.buckets}")
        self.cache.tokens.clear()  # warm-up and capture wrote the cache

    def _replay_or_run(self, n: int, keys: int) -> torch.Tensor | None:
        if (n, keys) in self.graphs:
            graph, out = self.graphs[(n, keys)]
            graph.replay()
            return out
        return self._run(n, keys)

    def decode(self, token: torch.Tensor, position: int) -> torch.Tensor:
        """One token in at `position`, the next position's logits out."""
        self.ids[:1].copy_(token.view(1))
        self.positions[:1].fill_(position)
        return self._replay_or_run(1, next(b for b in self.buckets if b > position))

    def prefill(self, chunk: list[int], begin: int) -> None:
        """`chunk` at positions begin.., padded up to a captured size when one fits in the cache."""
        n = len(chunk)
        size = next((s for s in PREFILL_SIZES if s >= n and begin + s <= self.cache.length), n)
        padded = torch.tensor(chunk + [0] * (size - n), dtype=torch.long)
        self.ids[:size].copy_(padded, non_blocking=True)
        torch.arange(begin, begin + size, out=self.positions[:size])
        self._replay_or_run(size, next(b for b in self.buckets if b >= begin + size))


class BatchSteps:
    """The decode step of every slot at once (`forward_rows`), for two or more running rows.

    Its shape is fixed (every slot is a row; a slot without a running request feeds a dummy token at its
    scratch position), so on CUDA it is captured once per cache bucket like `Steps`. The bucket follows
    the running rows' positions only.
    """

    def __init__(self, w: Weights, slots: Slots, rope, graphs: bool) -> None:
        self.w, self.slots, self.rope = w, slots, rope
        rows = len(slots.caches)
        device = slots.hidden.device
        self.ids = torch.zeros(rows, 1, dtype=torch.long, device=device)
        self.positions = torch.full((rows, 1), slots.scratch, dtype=torch.long, device=device)  # capture: scratch only
        self.every = torch.arange(rows, device=device)
        self.buckets = buckets(slots.length)
        self.graphs: dict[tuple[int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        if graphs:
            capture(self.graphs, [(keys,) for keys in self.buckets], self._run,
                    f"batched decode, {rows} rows, cache buckets {self.buckets}")

    def _run(self, keys: int) -> torch.Tensor:
        hidden = forward_rows(self.w, self.slots, self.rope, self.ids, self.positions, self.every, keys,
                              every_slot=True)
        return self.w.lm_head(hidden[:, 0])

    def decode(self, ids: list[int], positions: list[int], top: int) -> torch.Tensor:
        """Row r's token ids[r] in at positions[r]; every row's next logits out [rows, vocab].
        `top` is the highest position a running row writes (it picks the cache bucket)."""
        self.ids.copy_(torch.tensor(ids, dtype=torch.long)[:, None], non_blocking=True)
        self.positions.copy_(torch.tensor(positions, dtype=torch.long)[:, None], non_blocking=True)
        keys = next(b for b in self.buckets if b > top)
        if (keys,) in self.graphs:
            graph, out = self.graphs[(keys,)]
            graph.replay()
            return out
        return self._run(keys)


@dataclass
class Fill:
    """One request's prefill: its slot's cache and its prompt. The cache's `tokens` are always a prefix of the
    prompt: their count is the first position still to compute."""

    slot: int
    cache: Cache
    context: list[int]

    @property
    def start(self) -> int:
        return len(self.cache.tokens)


class PrefillSteps:
    """A chunk of each of several prompts in one pass (`forward_rows` over [rows, chunk]).

    Side by side, a pass reads the weights once for every prompt in it: chunks short enough to be bound by
    that read cost about what one alone does (longer ones are bound by compute, side by side or not).
    Shapes are fixed as in `Steps`: rows padded to a count of `row_counts`, chunks to a size of
    PREFILL_SIZES (at most BATCH_PREFILL_TOKENS positions a pass); padding writes at the scratch
    position. On CUDA each shape is captured as a CUDA graph (when `graphs`), else it runs eagerly.
    """

    def __init__(self, w: Weights, slots: Slots, rope, graphs: bool) -> None:
        self.w, self.slots, self.rope = w, slots, rope
        device = slots.hidden.device
        self.ids = torch.zeros(BATCH_PREFILL_TOKENS, dtype=torch.long, device=device)
        self.positions = torch.full((BATCH_PREFILL_TOKENS,), slots.scratch, dtype=torch.long, device=device)
        self.slot_of = torch.zeros(len(slots.caches), dtype=torch.long, device=device)
        self.counts = row_counts(len(slots.caches))
        self.buckets = buckets(slots.length)
        self.graphs: dict[tuple[int, int, int], tuple[torch.cuda.CUDAGraph, None]] = {}
        if graphs and self.counts:
            shapes = [(rows, size, keys) for rows in self.counts for size in self.sizes(rows)
                      for keys in self.buckets if keys >= size]
            capture(self.graphs, shapes, self._run, f"batched prefill of {self.counts} rows")

    def sizes(self, rows: int) -> list[int]:
        return [s for s in PREFILL_SIZES if rows * s <= BATCH_PREFILL_TOKENS and s <= self.slots.length]

    def _run(self, rows: int, size: int, keys: int) -> None:
        n = rows * size
        forward_rows(self.w, self.slots, self.rope, self.ids[:n].view(rows, size),
                     self.positions[:n].view(rows, size), self.slot_of[:rows], keys)

    def prefill(self, fills: list[Fill]) -> list[int]:
        """The next chunk of every fill (two or more) in one pass; returns how many positions each advanced."""
        rows = next(c for c in self.counts if c >= len(fills))
        sizes = self.sizes(rows)
        longest = max(len(f.context) - f.start for f in fills)
        size = next((s for s in sizes if s >= longest), sizes[-1])
        scratch = self.slots.scratch
        ids, positions = [[0] * size for _ in range(rows)], [[scratch] * size for _ in range(rows)]
        slot_of = [fills[0].slot] * rows  # a padding row writes its slot's scratch position only
        taken = []
        for r, f in enumerate(fills):
            n = min(len(f.context) - f.start, size)
            ids[r][:n] = f.context[f.start : f.start + n]
            positions[r][:n] = range(f.start, f.start + n)
            slot_of[r] = f.slot
            taken.append(n)
        top = max(f.start + n for f, n in zip(fills, taken))
        keys = next(b for b in self.buckets if b >= top)
        count = rows * size
        self.ids[:count].copy_(torch.tensor(ids, dtype=torch.long).view(-1), non_blocking=True)
        self.positions[:count].copy_(torch.tensor(positions, dtype=torch.long).view(-1), non_blocking=True)
        self.slot_of[:rows].copy_(torch.tensor(slot_of, dtype=torch.long), non_blocking=True)
        if (rows, size, keys) in self.graphs:
            self.graphs[(rows, size, keys)][0].replay()
        else:
            self._run(rows, size, keys)
        return taken


def decode_one_token(steps: Steps, cache: Cache, token: torch.Tensor, token_id: int) -> torch.Tensor:
    """Feed the sampled token at the next free position; returns the following position's logits."""
    logits = steps.decode(token, len(cache.tokens))
    cache.tokens.append(token_id)
    return logits


def score_cached_prompt(w: Weights, cache: Cache, prompt: list[int], k: int) -> list[ScoredToken]:
    """Teacher-forced logprobs of the prompt from the cached hidden states (fresh or reused alike)."""
    scored = [ScoredToken(prompt[0], 0.0, [(prompt[0], 0.0)])]  # no context: 0.0, as HELM reports
    targets_all = torch.tensor(prompt, device=cache.hidden.device)
    for start in range(0, len(prompt) - 1, SCORE_CHUNK):
        end = min(start + SCORE_CHUNK, len(prompt) - 1)
        logits = w.lm_head(cache.hidden[start:end])
        targets = targets_all[start + 1 : end + 1]
        scored += _to_host(targets, *score(logits, targets, k))
    return scored


class StaticEngine(Tokenizing):
    """Generation over a static cache of `context_length` positions per slot; `rows` slots for batching.

    `generate` is batch 1 (today's path: the best slot for prefix reuse, its own steps). The batch
    scheduler (`batching.py`) calls `open_all`, `feed` and `close`: with one running row `feed` is that
    slot's batch-1 step, with more the batched step over every slot.
    """

    def __init__(self, model, tokenizer, eos_token_ids: list[int], device: torch.device, context_length: int,
                 graphs: bool | None = None, reuse: bool = True, rows: int = 1, prefill_graphs: bool = True,
                 half_adapters: bool = True, share: bool = True, dense: int | None = None, fuse: bool = True) -> None:
        self.model, self.tokenizer, self.device = model, tokenizer, device
        self.reuse = reuse  # off only to measure what prefix reuse saves
        self.share = share  # off only to measure: requests opened one by one, no prefix copied between slots
        self.vocab_size = int(unwrap(model).get_output_embeddings().weight.shape[0])
        self.eos_token_ids = checked_eos(eos_token_ids, self.vocab_size)
        self._eos = torch.tensor(sorted(self.eos_token_ids), device=device)
        if rows < 1:
            raise ValueError(f"rows must be at least 1, not {rows}")
        check_supported(unwrap(model).config)  # before anything changes the model
        dtype = unwrap(model).get_input_embeddings().weight.dtype
        if half_adapters:  # off only to measure what fp32 adapter products cost (peft's own forward then runs them)
            adapters_in(model, dtype)
        self.w = weights_of(model, fuse)  # `fuse` off only to measure what fewer, larger products save
        hidden = self.w.embed.weight.shape[1]
        # `dense`: from how many positions a prefill pass runs on dense weights (0: never); None: the card's entry.
        threshold = dense_from(device, dense)
        if threshold is not None:
            self.w.dense_layers, self.w.dense_from = dense_layers_of(model, self.w, dtype, device), threshold
            if self.w.dense_layers is not None:
                log.info("static engine: prefill passes of %d positions or more run on dense weights", threshold)
            else:
                log.info("static engine: every pass runs the layers' own kernels (no dense weights for this model)")
        self.slots = Slots(self.w, rows, context_length, hidden, dtype, device)
        self.cache = self.slots.caches[0]
        self.rope = rope_tables(model, context_length + 1, dtype, device)  # and the scratch position
        graphs = device.type == "cuda" if graphs is None else graphs
        with torch.inference_mode():
            self.slot_steps = [Steps(self.w, cache, self.rope, graphs, prefill_graphs) for cache in self.slots.caches]
            self.batch_steps = BatchSteps(self.w, self.slots, self.rope, graphs) if rows > 1 else None
            side_by_side = rows > 1 and context_length >= PREFILL_SIZES[0]  # else each prompt alone in its slot
            self.prefill_steps = PrefillSteps(self.w, self.slots, self.rope, graphs and prefill_graphs) if side_by_side else None
        self.steps = self.slot_steps[0]
        self.free = list(range(rows))  # slots no running request holds
        # For logs, tests and benchmarks: prompt positions served from the request's own slot, copied from
        # another slot, computed; and prefill passes that ran several requests side by side.
        self.reused_tokens = self.copied_tokens = self.prefilled_tokens = self.batched_passes = 0

    @classmethod
    def from_config(cls, config: ServeConfig, fallback: bool = False):
        """Load and warm up; `fallback` (engine = "auto"): a model this forward cannot run is served by the HF engine."""
        device = pick_device(config.server.device)
        model = load_model(config, device)
        tokenizer = load_tokenizer(config.model)
        try:
            check_supported(unwrap(model).config)
        except UnsupportedModel as e:
            if not fallback:
                raise
            log.warning("static engine: %s; serving with the hf engine instead", e)
            return HFEngine(model, tokenizer, config.generation.eos_token_ids, device)
        if config.adapter is not None and not _quantized(model):
            log.info("static engine: merging the LoRA adapter into the %s weights", unwrap(model).dtype)
            model = model.merge_and_unload()
        return cls(model, tokenizer, config.generation.eos_token_ids, device, config.generation.context_length,
                   rows=config.server.max_batch)

    @torch.inference_mode()
    def generate(self, prompt_ids: list[int], params: SamplingParams, should_stop: StopCheck) -> Generation:
        row = self.open(prompt_ids, params, should_stop)
        try:
            steps, cache = self.slot_steps[row.state], self.slots.caches[row.state]
            decoding = row.decoding
            while (token := decoding.pick()) is not None:
                decoding.next_logits = decode_one_token(steps, cache, token, decoding.chosen[-1])
            return row.result()
        finally:
            self.close(row)

    @torch.inference_mode()
    def open(self, prompt_ids: list[int], params: SamplingParams, should_stop: StopCheck) -> Row:
        """One request: `open_all` of one (its error raised)."""
        opened = self.open_all([(prompt_ids, params, should_stop)])[0]
        if isinstance(opened, BaseException):
            raise opened
        return opened

    @torch.inference_mode()
    def open_all(self, requests: list[tuple[list[int], SamplingParams, StopCheck]]) -> list[Row | BaseException]:
        """Prefill requests that arrive together: each gets its row, or the error that is its own alone.

        Each takes the free slot whose cached tokens share the longest prefix with its prompt (`take_slot`).
        A longer prefix that another slot holds is copied; one that an earlier request of this call is about
        to compute is waited for, then copied (`next_wave`); what is left of the prompts in a wave is prefilled
        a chunk of each per pass (`prefill_together`).
        """
        opened: list[Row | BaseException | None] = [None] * len(requests)
        fills: dict[int, Fill] = {}
        for i, (prompt_ids, params, _) in enumerate(requests):
            try:
                fills[i] = self.take_slot(prompt_ids or [min(self.eos_token_ids)], params)
            except Exception as e:  # noqa: BLE001 - this request's own (422): the others go on
                opened[i] = e
        waiting = list(fills)
        try:
            while waiting:
                wave, waiting = self.next_wave(waiting, fills)
                try:
                    self.prefill_together([fills[i] for i in wave])
                except Exception as e:  # noqa: BLE001 - fails the requests in this pass, not the later ones
                    for i in wave:
                        opened[i] = e
                        self.free.append(fills[i].slot)
                    continue
                for i in wave:
                    try:
                        opened[i] = self.row(fills[i], *requests[i])
                    except Exception as e:  # noqa: BLE001
                        opened[i] = e
                        self.free.append(fills[i].slot)
        except BaseException:  # a copy or an interrupt: every slot taken here goes back, opened rows too
            for i in fills:
                if isinstance(opened[i], Row):
                    self.close(opened[i])
                elif opened[i] is None:
                    self.free.append(fills[i].slot)
            raise
        return opened

    def take_slot(self, context: list[int], params: SamplingParams) -> Fill:
        """The free slot whose cached tokens share the longest prefix with `context` (slot 0 at batch 1)."""
        if len(context) + params.max_new_tokens > self.slots.length:
            raise ValueError(f"{len(context)} prompt tokens + {params.max_new_tokens} new tokens exceed the "
                             f"static cache of {self.slots.length} positions")
        if not self.free:
            raise RuntimeError(f"all {len(self.slots.caches)} cache slots are in use")
        caches = self.slots.caches
        shared = {slot: shared_prefix(caches[slot].tokens, context) if self.reuse else 0 for slot in self.free}
        slot = max(self.free, key=lambda s: shared[s])  # the first of the best
        self.free.remove(slot)
        del caches[slot].tokens[shared[slot] :]  # what this request's prefill will overwrite is no longer held
        self.reused_tokens += shared[slot]
        return Fill(slot, caches[slot], context)

    def next_wave(self, waiting: list[int], fills: dict[int, Fill]) -> tuple[list[int], list[int]]:
        """Split `waiting` into the requests prefilled now and those that wait for a neighbour's prefill. A
        request prefilled now first copies the longest prefix another slot holds, when that saves COPY_MIN."""
        if not (self.reuse and self.share):
            return waiting[:1], waiting[1:]
        caches = self.slots.caches
        wave, later = [], []
        for i in waiting:
            f = fills[i]
            held, donor = max(((shared_prefix(c.tokens, f.context), s) for s, c in enumerate(caches) if s != f.slot),
                              default=(0, f.slot))
            sibling = max((shared_prefix(fills[j].context, f.context) for j in wave), default=0)
            if sibling >= max(held, f.start) + WAIT_MIN:
                later.append(i)
                continue
            if held >= f.start + COPY_MIN:
                copy_positions(self.slots, donor, f.slot, f.start, held)
                self.copied_tokens += held - f.start
                f.cache.tokens[:] = f.context[:held]
            wave.append(i)
        return wave, later

    def prefill_together(self, fills: list[Fill]) -> None:
        """Compute what the slots do not hold yet: a chunk of every prompt per pass (two or more side by side
        in `PrefillSteps`, one alone in its slot's `Steps`); `tokens` stays true after every pass."""
        active = [f for f in fills if f.start < len(f.context)]
        while active:
            if len(active) > 1 and self.prefill_steps is not None:
                taken = self.prefill_steps.prefill(active)
                self.batched_passes += 1
            else:
                f = active[0]
                taken = [min(len(f.context) - f.start, PREFILL_CHUNK)]
                self.slot_steps[f.slot].prefill(f.context[f.start : f.start + taken[0]], f.start)
                active = active[:1]
            for f, n in zip(active, taken):
                f.cache.tokens += f.context[f.start : f.start + n]
            self.prefilled_tokens += sum(taken)
            active = [f for f in fills if f.start < len(f.context)]

    def row(self, fill: Fill, prompt_ids: list[int], params: SamplingParams, should_stop: StopCheck) -> Row:
        """A prefilled request's row: its echoed prompt scored, its first logits."""
        cache = fill.cache
        prompt_scored = (score_cached_prompt(self.w, cache, fill.context, params.top_logprobs)
                         if params.echo_prompt and prompt_ids else [])
        next_logits = self.w.lm_head(cache.hidden[len(fill.context) - 1])
        decoding = Decoding(next_logits, params, _generator(self.device, params.seed), self._eos, self.eos_token_ids,
                            should_stop)
        return Row(decoding, prompt_scored, fill.slot)

    @torch.inference_mode()
    def feed(self, rows: list[Row], tokens: list[torch.Tensor]) -> None:
        """One decode step for the running rows: one row alone takes its slot's batch-1 step."""
        if len(rows) == 1:
            row, token = rows[0], tokens[0]
            row.decoding.next_logits = decode_one_token(self.slot_steps[row.state], self.slots.caches[row.state],
                                                        token, row.decoding.chosen[-1])
            return
        caches = self.slots.caches
        ids, positions = [0] * len(caches), [self.slots.scratch] * len(caches)  # a slot not fed: its scratch
        for row in rows:
            ids[row.state], positions[row.state] = row.decoding.chosen[-1], len(caches[row.state].tokens)
        top = max(positions[row.state] for row in rows)
        logits = self.batch_steps.decode(ids, positions, top)
        for row in rows:
            caches[row.state].tokens.append(row.decoding.chosen[-1])
            row.decoding.next_logits = logits[row.state]

    def reset(self) -> None:
        """Forget every slot's cached tokens (no prefix reuse across the reset), all slots free in order:
        what runs next computes exactly as on a fresh engine (Humpback's shards, resumed or not)."""
        for cache in self.slots.caches:
            cache.tokens.clear()
        self.free = list(range(len(self.slots.caches)))

    def close(self, row: Row) -> None:
        if row.state is not None and row.state not in self.free:
            self.free.append(row.state)
        row.state = None


def step_rows(engine: StaticEngine, running: list[tuple[object, Row]]) -> tuple[list, list]:
    """One turn of a batch run without the scheduler (Humpback's generation): every row picks its next token;
    the rows that ended are returned for the caller to answer and close, the rest go through one `feed`.
    Returns (ended, still running), each as the (key, row) pairs given."""
    ended, feeding, tokens = [], [], []
    for key, row in running:
        token = row.decoding.pick()
        if token is None:
            ended.append((key, row))
        else:
            feeding.append((key, row))
            tokens.append(token)
    if feeding:
        engine.feed([row for _, row in feeding], tokens)
    return ended, feeding


def _quantized(model) -> bool:
    return getattr(unwrap(model).config, "quantization_config", None) is not None
