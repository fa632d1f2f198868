"""Batched generation with a LoRA adapter on the quantized base: stages `generated` and `scored`.

The serving engine answers one request at a time; here throughput matters, so prompts go through
`generate` in left-padded batches. Prompts are tokenized piece by piece, exactly as the training
examples were, so the models see the text they were trained on. Each batch reseeds the sampler
from (seed, shard, batch): a resumed run writes the same shard an uninterrupted one would.
"""

from __future__ import annotations

import gc
from pathlib import Path

import torch
from transformers import GenerationConfig

from helm_server.hf_engine import GPTQ_KERNELS

from ..train.model import load_base


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


def release(model) -> None:
    del model
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


@torch.inference_mode()
def generate(model, tokenizer, prompts: list[list[int]], *, pad_id: int, eos_ids: list[int], stops: list[str],
             max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
             exact_length: bool = False) -> list[str]:
    """One batch: the texts, each cut at the first stop. Greedy when temperature is 0.

    `exact_length` makes every sequence run to max_new_tokens (the budget probe's worst case).
    """
    device = next(model.parameters()).device
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    # A whole GenerationConfig, so nothing of the checkpoint's generation_config.json (a repetition
    # penalty, a top-k) slips in: the paper's nucleus sampling has no top-k.
    sampling = dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=0) if temperature > 0 else dict(do_sample=False)
    config = GenerationConfig(max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens if exact_length else 0,
                              pad_token_id=pad_id, eos_token_id=None if exact_length else eos_ids,
                              stop_strings=None if exact_length or not stops else stops, **sampling)
    torch.manual_seed(seed)
    out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=config,
                         tokenizer=tokenizer)
    return [cut(t, stops) for t in tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)]
