"""Humpback's generation through the serving engine: stages `generated` and `scored`.

Throughput is the point, and decoding is bound by reading the weights once per step, so every
running prompt shares that read: the static engine (helm_server/static_engine.py: a KV-cache slot
per row, the decode step of all rows as one CUDA graph, the LoRA unmerged as trained) runs up to
`rows` prompts at once, and a prompt takes a row the step after another's ends (continuous
batching). The loop is driven here, in one thread, in the prompts' order: which prompt runs in
which row at which step depends only on the prompts, so a resumed shard is written byte for byte
as before. Each prompt samples with its own seeded generator (`row_seed`): its text does not
depend on its neighbours' sampling.

Prompts are tokenized piece by piece, exactly as the training examples were, so the models see
the text they were trained on; `fits` keeps out what the model's context cannot hold.
"""

from __future__ import annotations

import gc
import hashlib
from collections import deque
from pathlib import Path
from typing import Callable

import torch

from helm_server.engine import SamplingParams
from helm_server.hf_engine import GPTQ_KERNELS
from helm_server.static_engine import SMALLEST_BUCKET, StaticEngine, slot_bytes, step_rows, unwrap
from helm_server.stopping import StopMatcher

from ..train.model import load_base

# Memory kept free beside the cache slots on a GPU: the decode graphs' pools, one prefill chunk's
# activations and the rows' logits (measured with benchmarks/humpback_shape.py on the 14B shape).
HEADROOM_BYTES = 3 << 29  # 1.5 GiB


class DoesNotFit(Exception):
    """Not even one cache slot fits beside the model; the message names the levers."""


def load(base: Path, adapter: Path | None, device: torch.device, dtype: torch.dtype, fresh_lora=None):
    """The base with `adapter` (unmerged, as trained), or with a new LoRA of `fresh_lora`'s shape (a probe)."""
    from peft import PeftModel

    from ..train.model import add_lora

    model = load_base(base, device, dtype, kernel=GPTQ_KERNELS[device.type][0])
    if adapter is not None:
        model = PeftModel.from_pretrained(model, str(adapter))
    elif fresh_lora is not None:
        model = add_lora(model, fresh_lora, gradient_checkpointing=False, base_repo=str(base))
    model.config.use_cache = True
    return model.eval()


def release() -> None:
    """Give back what the caller just dropped (a model, an engine's cache and graphs) before the next loads."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def encode(pieces: list[str], tokenizer) -> list[int]:
    """Piece by piece, no special tokens: as the data stage tokenized the training text."""
    return [i for text in pieces for i in tokenizer(text, add_special_tokens=False)["input_ids"]]


def stop_of(prompt_template: str) -> list[str]:
    """Where the next round would begin (`\\nQUESTION: {prompt}` -> `\\nQUESTION:`): the trained models
    never saw end-of-text, so the start of a new round is where an answer ends; no stop without such text."""
    head = prompt_template.split("{", 1)[0].rstrip()
    return [head] if head.strip() else []


def cut(text: str, stops: list[str]) -> str:
    ends = [text.find(s) for s in stops if s and s in text]
    return (text[: min(ends)] if ends else text).strip()


def fits(prompt: list[int], max_new_tokens: int, context: int) -> bool:
    """The prompt and every token it may generate within the model's context (a dense 4,000-character
    passage can overflow a rating prompt; its answer would be read from positions the model never learned)."""
    return len(prompt) + max_new_tokens <= context


def row_seed(seed: int, shard: int, index: int) -> int:
    """The sampling seed of one prompt: distinct for every (stage seed, shard, position), stable across runs."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{shard}/{index}".encode()).digest()[:7], "big")


# --- the engine: rows that fit -------------------------------------------------------------


def slot_length(longest: int, context: int) -> int:
    """Cache positions per row: the longest prompt + its new tokens, rounded up to the engine's bucket size."""
    return min(context, -(-longest // SMALLEST_BUCKET) * SMALLEST_BUCKET)


def stage_length(prompts: list[list[int]], max_new_tokens: int, context: int) -> int:
    """The slot length of a stage: its longest prompt that `fits`, plus the new tokens."""
    longest = max((len(p) for p in prompts if fits(p, max_new_tokens, context)), default=1)
    return slot_length(longest + max_new_tokens, context)


def rows_that_fit(model, device: torch.device, length: int, wanted: int) -> int:
    """At most `wanted` rows of `length` positions; on a GPU as many as its free memory holds (under the
    4090 cap when one is set) beside HEADROOM_BYTES."""
    if device.type != "cuda":
        return wanted
    per_row = slot_bytes(unwrap(model).config, length, unwrap(model).dtype.itemsize)
    index = device.index if device.index is not None else torch.cuda.current_device()
    torch.cuda.empty_cache()  # cached blocks are not counted as free: fragments may not hold a cache tensor
    free, total = torch.cuda.mem_get_info(index)
    cap = torch.cuda.get_per_process_memory_fraction(index) * total  # the allocator checks what it has reserved
    available = min(free, cap - torch.cuda.memory_reserved(index)) - HEADROOM_BYTES
    rows = min(wanted, int(available // per_row))
    if rows < 1:
        raise DoesNotFit(f"one cache row of {length} positions ({per_row / 2**30:.2f} GiB) does not fit beside the "
                         f"model ({available / 2**30:.2f} GiB free after {HEADROOM_BYTES / 2**30:.1f} GiB headroom): "
                         "lower max_chars or the stage's max_new_tokens")
    return rows


def engine_for(model, tokenizer, device: torch.device, eos_ids: list[int], rows: int, length: int,
               half_adapters: bool = True) -> StaticEngine:
    """The serving engine over `rows` slots of `length` positions; prefill runs eagerly (a prompt is
    prefilled once, a decode step is replayed hundreds of times). `half_adapters=False` only to measure
    what peft's fp32 adapter products cost (benchmarks/humpback_shape.py)."""
    return StaticEngine(model, tokenizer, eos_ids, device, length, rows=rows, prefill_graphs=False,
                        half_adapters=half_adapters)


# --- generation ----------------------------------------------------------------------------


def generate(engine: StaticEngine, prompts: list[list[int]], seeds: list[int], *, stops: list[str],
             max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0, exact_length: bool = False,
             done: Callable[[int], None] = lambda index: None) -> list[str]:
    """Every prompt's text, each cut at its first stop; greedy when temperature is 0.

    Prompts enter free rows in order, between two decode steps (prefix reuse between them, none from
    earlier calls); `done(i)` is called as prompt i ends.
    `exact_length` runs every prompt to max_new_tokens (the plan's worst case).
    """
    params = [SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_k=0, top_p=top_p,
                             min_new_tokens=max_new_tokens if exact_length else 0, seed=s) for s in seeds]
    matcher = StopMatcher(lambda ids: engine.decode(ids, skip_special_tokens=True), [] if exact_length else stops)
    engine.reset()  # a batch's texts depend on its prompts only, not on what the engine ran before
    waiting, running = deque(range(len(prompts))), []
    texts: list[str] = [""] * len(prompts)
    try:
        with torch.inference_mode():
            while waiting or running:
                while waiting and engine.free:
                    i = waiting.popleft()
                    running.append((i, engine.open(prompts[i], params[i], matcher)))
                ended, running = step_rows(engine, running)
                for i, row in ended:
                    texts[i] = cut(engine.decode(row.decoding.chosen, skip_special_tokens=True), stops)
                    engine.close(row)
                    done(i)
    finally:
        for _, row in running:
            engine.close(row)
    return texts
