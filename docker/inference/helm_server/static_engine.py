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
shapes, captured as CUDA graphs), `prefill`, `decode_one_token`, then `StaticEngine.generate`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from typing import Callable

import torch
import torch.nn.functional as F

from .engine import Generation, SamplingParams, ScoredToken, StopCheck
from .hf_engine import (HFEngine, Tokenizing, _generator, _to_host, checked_eos, decode_loop, load_model, load_tokenizer,
                        pick_device, score)
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


class UnsupportedModel(RuntimeError):
    """A model this engine cannot run exactly; the message says to use engine = "hf"."""


@dataclass
class Layer:
    attn_norm: torch.nn.Module
    qkv: Callable[[torch.Tensor], torch.Tensor]  # queries, keys and values side by side
    o: torch.nn.Module
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


class Cache:
    """Keys and values of every layer, and the final hidden state, for `length` positions."""

    def __init__(self, w: Weights, length: int, hidden: int, dtype: torch.dtype, device: torch.device) -> None:
        shape = (1, w.kv_heads, length, w.head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in w.layers]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in w.layers]
        self.hidden = torch.zeros(length, hidden, dtype=dtype, device=device)
        self.length = length
        self.tokens: list[int] = []  # tokens whose keys, values and hidden states are valid, from position 0


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


def weights_of(model) -> Weights:
    """Map a transformers decoder onto `Weights` (fusing plain projections: see `fused`)."""
    lm = unwrap(model)
    config = lm.config
    check_supported(config)
    attn = lm.model.layers[0].self_attn
    layers = [Layer(l.input_layernorm, qkv_of(l.self_attn), l.self_attn.o_proj, l.post_attention_layernorm,
                    mlp_of(l.mlp)) for l in lm.model.layers]
    return Weights(lm.model.embed_tokens, layers, lm.model.norm, lm.lm_head, config.num_attention_heads,
                   config.num_key_value_heads, attn.head_dim, attn.scaling)


def fused(linears: list[torch.nn.Module]) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """One matmul for plain Linear layers that read the same input (fewer, larger kernels per step).

    Their weights are concatenated once and each layer's weight becomes a view of its rows, so the
    model is unchanged for any other caller and no memory is duplicated. GPTQ and LoRA-wrapped
    layers are not plain Linear: None, and the caller runs them one by one.
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


def qkv_of(attn) -> Callable[[torch.Tensor], torch.Tensor]:
    projections = [attn.q_proj, attn.k_proj, attn.v_proj]
    return fused(projections) or (lambda h: torch.cat([p(h) for p in projections], dim=-1))


def mlp_of(mlp) -> Callable[[torch.Tensor], torch.Tensor]:
    """down(act(gate(x)) * up(x)), gate and up in one matmul when they are plain Linear layers."""
    gate_up = fused([mlp.gate_proj, mlp.up_proj])
    if gate_up is None:
        return mlp
    width = mlp.gate_proj.weight.shape[0]

    def run(x: torch.Tensor) -> torch.Tensor:
        both = gate_up(x)
        return mlp.down_proj(mlp.act_fn(both[..., :width]) * both[..., width:])

    return run


def rope_tables(model, length: int, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin for every position, from the model's own rotary module (same numerics as its forward)."""
    rotary = unwrap(model).model.rotary_emb
    positions = torch.arange(length, device=device)[None]
    cos, sin = rotary(torch.zeros(1, dtype=dtype, device=device), positions)
    return cos[0], sin[0]


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


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
    for layer, k_cache, v_cache in zip(w.layers, cache.keys, cache.values):
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


class Steps:
    """`forward` at fixed shapes: the one-token decode step and prefill chunks padded to PREFILL_SIZES.

    On CUDA each (tokens, cache bucket) shape is captured once as a CUDA graph over static input
    tensors and replayed: a step then costs its kernels, not a thousand launches from Python (an
    eager 110-token prefill of a 14B model spends most of its time launching). Padding a chunk
    writes keys past the prompt's end: positions no cached token claims, overwritten later. On
    the CPU the same padded shapes run eagerly.
    """

    def __init__(self, w: Weights, cache: Cache, rope, graphs: bool) -> None:
        self.w, self.cache, self.rope = w, cache, rope
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
        tokens = [1] + [n for n in PREFILL_SIZES if n <= self.cache.length]
        return [(n, keys) for n in tokens for keys in self.buckets if keys >= n]

    def _capture(self) -> None:
        """Capture every shape (warmed up first: kernels chosen, workspaces allocated), sharing one pool."""
        started = time.perf_counter()
        pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for n, keys in self.shapes():
                self._run(n, keys)
        torch.cuda.current_stream().wait_stream(stream)
        for n, keys in sorted(self.shapes(), reverse=True):  # largest first: the pool is sized once
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                out = self._run(n, keys)
            self.graphs[(n, keys)] = (graph, out)
        torch.cuda.synchronize()
        self.cache.tokens.clear()  # warm-up and capture wrote the cache
        log.info("static engine: %d CUDA graphs captured (1-token decode and %s-token prefill, cache buckets %s) "
                 "in %.1f s", len(self.graphs), PREFILL_SIZES, self.buckets, time.perf_counter() - started)

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


def prefill(steps: Steps, cache: Cache, prompt: list[int], start: int) -> None:
    """Fill the cache for prompt[start:], a chunk at a time; `cache.tokens` stays true after each chunk."""
    del cache.tokens[start:]
    for begin in range(start, len(prompt), PREFILL_CHUNK):
        chunk = prompt[begin : begin + PREFILL_CHUNK]
        steps.prefill(chunk, begin)
        cache.tokens += chunk


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
    """Batch-1 generation over a static cache of `context_length` positions."""

    def __init__(self, model, tokenizer, eos_token_ids: list[int], device: torch.device, context_length: int,
                 graphs: bool | None = None, reuse: bool = True) -> None:
        self.model, self.tokenizer, self.device = model, tokenizer, device
        self.reuse = reuse  # off only to measure what prefix reuse saves
        self.w = weights_of(model)
        self.vocab_size = int(unwrap(model).get_output_embeddings().weight.shape[0])
        self.eos_token_ids = checked_eos(eos_token_ids, self.vocab_size)
        self._eos = torch.tensor(sorted(self.eos_token_ids), device=device)
        dtype = self.w.embed.weight.dtype
        hidden = self.w.embed.weight.shape[1]
        self.cache = Cache(self.w, context_length, hidden, dtype, device)
        self.rope = rope_tables(model, context_length, dtype, device)
        with torch.inference_mode():
            self.steps = Steps(self.w, self.cache, self.rope, device.type == "cuda" if graphs is None else graphs)
        self.reused_tokens = 0  # prompt tokens served from the cache, for logs and benchmarks

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
        return cls(model, tokenizer, config.generation.eos_token_ids, device, config.generation.context_length)

    @torch.inference_mode()
    def generate(self, prompt_ids: list[int], params: SamplingParams, should_stop: StopCheck) -> Generation:
        context = prompt_ids or [min(self.eos_token_ids)]
        if len(context) + params.max_new_tokens > self.cache.length:
            raise ValueError(f"{len(context)} prompt tokens + {params.max_new_tokens} new tokens exceed the "
                             f"static cache of {self.cache.length} positions")
        reused = shared_prefix(self.cache.tokens, context) if self.reuse else 0
        self.reused_tokens += reused
        prefill(self.steps, self.cache, context, reused)
        prompt_scored = (score_cached_prompt(self.w, self.cache, context, params.top_logprobs)
                         if params.echo_prompt and prompt_ids else [])
        next_logits = self.w.lm_head(self.cache.hidden[len(context) - 1])

        generated = decode_loop(next_logits, params, _generator(self.device, params.seed), self._eos,
                                self.eos_token_ids, should_stop,
                                lambda token, token_id: decode_one_token(self.steps, self.cache, token, token_id))
        return replace(generated, prompt=prompt_scored)


def _quantized(model) -> bool:
    return getattr(unwrap(model).config, "quantization_config", None) is not None
