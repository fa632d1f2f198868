"""Humpback's generation stages on an 8-bit GPTQ random-weight model of a real layer shape.

Builds (once, in --work) a Qwen2 GPTQ checkpoint of Qwen-14B's shape with random RTN-packed weights
(benchmarks/train_shape.py's builder), puts a fresh LoRA of the spec's rank on it, and runs the
Humpback stage's own `generate` over synthetic passages whose lengths are drawn uniformly within
the spec's [min_chars, max_chars]: stage `generated` (backward prompts, nucleus sampling, the spec's
max_new_tokens) and stage `scored` (rating prompts, greedy, its max_new_tokens). Every sequence
runs to max_new_tokens (a random model never stops): the worst case. Prints passages/s per stage
and batch size, the peak memory, and the projected RTX 4090 hours for the spec's passage count.

    python benchmarks/humpback_shape.py --vocab qwen.tiktoken --work /tmp/hb14 --emulate-4090
    python benchmarks/humpback_shape.py --vocab qwen.tiktoken --work /tmp/hbt --shape tiny --device cpu --passages 8
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "benchmarks"), str(REPO / "tests"), str(REPO / "docker" / "inference")]

from decode_speed import SHAPES  # noqa: E402
from hub_fixtures import _WORDS  # noqa: E402
from packager.spec import load_spec, rating_prompt  # noqa: E402
from pipeline.device import emulate_4090  # noqa: E402
from pipeline.humpback import rate, seed  # noqa: E402
from pipeline.humpback.generate import encode, generate, load  # noqa: E402
from pipeline.humpback.plan import Timed, project_stage  # noqa: E402
from pipeline.train import plan  # noqa: E402
from pipeline.train.model import weight_bytes  # noqa: E402
from train_shape import build_gptq  # noqa: E402

PAD = 151643 + 3 + 21  # <|extra_21|>


def passages(n: int, low: int, high: int, seed_: int = 0) -> list[str]:
    rng = random.Random(seed_)
    out = []
    for _ in range(n):
        target, words = rng.randint(low, high), []
        while sum(len(w) + 1 for w in words) < target:
            words.append(rng.choice(_WORDS))
        out.append(" ".join(words)[:target])
    return out


def run_stage(model, tokenizer, prompts: list[list[int]], batch: int, device, **kw) -> tuple[float, float]:
    """(seconds, peak GiB) for all prompts in batches."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    started = time.perf_counter()
    for i in range(0, len(prompts), batch):
        generate(model, tokenizer, prompts[i : i + batch], pad_id=PAD, eos_ids=[], stops=[], exact_length=True,
                 seed=i, **kw)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) / (1 << 30) if device.type == "cuda" else 0.0
    return time.perf_counter() - started, peak


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--spec", default="submission-3")
    p.add_argument("--vocab", type=Path, required=True)
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--shape", choices=sorted(SHAPES), default="qwen-14b")
    p.add_argument("--layers", type=int, help="decoder layers built (default: all of the shape's)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--passages", type=int, default=192, help="passages timed per stage at the main batch size")
    p.add_argument("--batches", default="4,8,16", help="batch sizes: the first is timed on --passages, the rest on one "
                   "batch of the longest passages each (memory)")
    p.add_argument("--emulate-4090", action="store_true")
    args = p.parse_args()

    spec_file = REPO / "submissions" / args.spec / "spec.toml"
    spec, _ = load_spec(spec_file)
    hb, training = spec.training.humpback, spec.training
    shape, device = SHAPES[args.shape], torch.device(args.device)
    if args.emulate_4090 and device.type == "cuda":
        emulate_4090(device, plan.cards()["target"]["memory_gib"])
    base = args.work / "base"
    started = time.perf_counter()
    build_gptq(base, shape, args.layers or shape["num_hidden_layers"], args.vocab, device)
    print(f"built {base} in {time.perf_counter() - started:.0f} s", flush=True)

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base)
    model = load(base, None, device, torch.float16, fresh_lora=training.lora)
    size = weight_bytes(model)
    q = model.base_model.model.model.layers[0].self_attn.q_proj
    print(f"q_proj: {type(q).__name__} over {type(getattr(q, 'base_layer', q)).__name__}", flush=True)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"{args.shape}: {size / (1 << 30):.2f} GiB of weights + LoRA r={training.lora.r} (unmerged) on {name}", flush=True)

    texts = passages(args.passages, hb.min_chars, hb.max_chars)
    forward = training.template.for_source("oasst1")
    rating = rating_prompt(spec, spec_file.parent)
    instruction = "Summarise the main points of this text in a few sentences."
    prompts = {
        "generated": [encode([t for t, _ in seed.backward_pieces(hb.backward_template, x)], tokenizer) for x in texts],
        "scored": [encode([forward.system, forward.prompt.format(prompt=rate.request(rating, instruction, x))], tokenizer)
                   for x in texts],
    }
    settings = {"generated": dict(max_new_tokens=hb.generate.max_new_tokens, temperature=hb.generate.temperature,
                                  top_p=hb.generate.top_p),
                "scored": dict(max_new_tokens=hb.rating.max_new_tokens)}
    mean = {k: sum(map(len, v)) / len(v) for k, v in prompts.items()}
    print(f"prompts: {args.passages} passages of {hb.min_chars}..{hb.max_chars} characters; mean prompt tokens "
          f"generated {mean['generated']:.0f}, scored {mean['scored']:.0f}", flush=True)
    generate(model, tokenizer, prompts["generated"][:1], pad_id=PAD, eos_ids=[], stops=[], max_new_tokens=2,
             exact_length=True)  # warm-up

    sizes = [int(b) for b in args.batches.split(",")]
    few = prompts["generated"][: sizes[0]]
    for label, ctx in (("with LoRA", None), ("LoRA off", model.disable_adapter)):
        if ctx is None:
            seconds, _ = run_stage(model, tokenizer, few, sizes[0], device, max_new_tokens=64)
        else:
            with ctx():
                seconds, _ = run_stage(model, tokenizer, few, sizes[0], device, max_new_tokens=64)
        print(f"decode, batch {sizes[0]}, {label}: {seconds / 64 * 1e3:.1f} ms per step (64 steps, with prefill)", flush=True)
    for b in sizes[1:]:  # memory at the longest prompts
        for stage in ("generated", "scored"):
            longest = sorted(prompts[stage], key=len)[-b:]
            try:
                seconds, peak = run_stage(model, tokenizer, longest, b, device, **settings[stage])
                print(f"batch {b:>2} {stage:<9}: longest {len(longest[-1])} tokens: {b / seconds:.2f} passages/s, "
                      f"peak {peak:.2f} GiB", flush=True)
            except torch.OutOfMemoryError:
                print(f"batch {b:>2} {stage:<9}: out of memory at {len(longest[-1])} prompt tokens", flush=True)
                torch.cuda.empty_cache()
    b, total = sizes[0], 0.0
    for stage in ("generated", "scored"):
        seconds, peak = run_stage(model, tokenizer, prompts[stage], b, device, **settings[stage])
        per = Timed(stage, b, seconds / -(-args.passages // b), settings[stage]["max_new_tokens"], 0)
        projected = project_stage(per, hb.passages, name, size)
        total += projected.hours_4090
        print(f"batch {b:>2} {stage:<9}: {args.passages} passages in {seconds:.1f} s = {args.passages / seconds:.2f} "
              f"passages/s, {per.seconds / per.new_tokens * 1e3:.0f} ms per batch step, peak {peak:.2f} GiB -> {hb.passages} passages: {projected.hours_here:.2f} h here, "
              f"{projected.hours_4090:.2f} h on one RTX 4090 ({projected.how})", flush=True)
    print(f"stages generated + scored for {hb.passages} passages: {total:.2f} h on one RTX 4090", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
