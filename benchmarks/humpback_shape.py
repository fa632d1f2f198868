"""Humpback's generation stages on an 8-bit GPTQ random-weight model of a real layer shape: today's
engine beside the stage's previous path, in one run.

Builds (once, in --work) a Qwen2 GPTQ checkpoint of Qwen-14B's shape with random RTN-packed weights
(benchmarks/train_shape.py's builder), puts a fresh LoRA of the spec's rank on it (unmerged, as the
stage uses it), and runs synthetic passages whose lengths are drawn uniformly within the spec's
[min_chars, max_chars] through both paths:

- `hf`: the previous stage's path, transformers' `generate` over left-padded batches of --hf-batch;
- `engine`: the stage's own `generate` (pipeline/humpback/generate.py): the serving engine's static
  cache, CUDA-graph decode steps and continuous batching, rows as many as fit (at most each of --rows).

Stage `generated` (backward prompts, nucleus sampling, the spec's max_new_tokens) and stage `scored`
(rating prompts, greedy, its max_new_tokens). Every sequence runs to max_new_tokens (a random model
never stops): the worst case. Prints passages/s per stage and path, ms per decode step, the peak
memory, the engine's speed-up, and the projected RTX 4090 hours for the spec's passage count (and
how many passages the engine fits in the hours the previous path took).

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
from pipeline.humpback.generate import encode, engine_for, generate, load, release, rows_that_fit, stage_length  # noqa: E402
from pipeline.humpback.plan import Timed, project_stage  # noqa: E402
from pipeline.train import plan  # noqa: E402
from pipeline.train.model import weight_bytes  # noqa: E402
from train_shape import build_gptq  # noqa: E402

PAD = 151643 + 3 + 21  # <|extra_21|>


PATHS = ("hf", "engine_fp32", "engine")  # the order they run in


def passages(n: int, low: int, high: int, seed_: int = 0) -> list[str]:
    rng = random.Random(seed_)
    out = []
    for _ in range(n):
        target, words = rng.randint(low, high), []
        while sum(len(w) + 1 for w in words) < target:
            words.append(rng.choice(_WORDS))
        out.append(" ".join(words)[:target])
    return out


@torch.inference_mode()
def hf_generate(model, prompts: list[list[int]], max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
                seed_: int = 0) -> None:
    """The previous stage's path: one left-padded batch through transformers' `generate`, run to max_new_tokens."""
    from transformers import GenerationConfig

    device = next(model.parameters()).device
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), PAD, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    sampling = dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=0) if temperature > 0 else dict(do_sample=False)
    config = GenerationConfig(max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, pad_token_id=PAD,
                              eos_token_id=None, **sampling)
    torch.manual_seed(seed_)
    model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=config)


def timed(device, work) -> tuple[float, float]:
    """(seconds, peak GiB) of `work()`."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    started = time.perf_counter()
    work()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) / (1 << 30) if device.type == "cuda" else 0.0
    return time.perf_counter() - started, peak


def hf_stage(model, prompts, batch, device, **kw) -> tuple[float, float]:
    return timed(device, lambda: [hf_generate(model, prompts[i : i + batch], seed_=i, **kw)
                                  for i in range(0, len(prompts), batch)])


def engine_stage(engine, prompts, device, **kw) -> tuple[float, float]:
    return timed(device, lambda: generate(engine, prompts, list(range(len(prompts))), stops=[], exact_length=True, **kw))


def profile_engine(engine, prompts, steps: int = 16) -> None:
    """The engine's top CUDA kernels over `steps` decode steps of a full batch (prefill included)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        generate(engine, prompts, list(range(len(prompts))), stops=[], max_new_tokens=steps, exact_length=True)
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=15), flush=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--spec", default="submission-3")
    p.add_argument("--vocab", type=Path, required=True)
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--shape", choices=sorted(SHAPES), default="qwen-14b")
    p.add_argument("--layers", type=int, help="decoder layers built (default: all of the shape's)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--passages", type=int, default=64, help="passages timed per stage and path")
    p.add_argument("--paths", default="hf,engine", help=f"of {', '.join(PATHS)}: hf (the previous stage's path), "
                   "engine_fp32 (the engine with peft's fp32 adapter weights), engine (today's); run in that order "
                   "(the engine casts the adapter to fp16 in place)")
    p.add_argument("--hf-batch", type=int, default=4, help="the hf path's batch (the previous spec's batch_size)")
    p.add_argument("--hf-passages", type=int, help="passages timed on the hf path (default --passages; it is slow)")
    p.add_argument("--rows", default="4,8,16", help="the engine's row caps (each lowered to what fits)")
    p.add_argument("--profile", action="store_true", help="print the engine's top CUDA kernels")
    p.add_argument("--emulate-4090", action="store_true")
    args = p.parse_args()
    paths = args.paths.split(",")
    if not paths or set(paths) - set(PATHS):
        p.error(f"--paths {args.paths!r}: a comma list of {', '.join(PATHS)}")
    if not all(r.isdigit() and int(r) > 0 for r in args.rows.split(",")):
        p.error(f"--rows {args.rows!r}: a comma list of positive row caps, e.g. 4,8,16")
    row_caps = [int(r) for r in args.rows.split(",")]
    for flag in ("passages", "hf_passages", "hf_batch"):
        if getattr(args, flag) is not None and getattr(args, flag) <= 0:
            p.error(f"--{flag.replace('_', '-')} {getattr(args, flag)}: must be positive")

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
    hf_stage(model, prompts["generated"][:1], 1, device, max_new_tokens=2)  # warm-up

    # (path, stage) -> seconds, peak GiB, rows, ms per step, passages
    results: dict[tuple[str, str], tuple[float, float, int, float, int]] = {}

    def show(path: str, stage: str) -> None:
        seconds, peak, rows, ms, n = results[(path, stage)]
        old = results.get(("hf", stage))
        speedup = f", {n / seconds / (old[4] / old[0]):.1f}x hf" if old and path != "hf" else ""
        print(f"{path:<10} {stage:<9}: {n} passages in {seconds:.1f} s = {n / seconds:.2f} passages/s{speedup}, "
              f"{rows} rows, {ms:.1f} ms per step, peak {peak:.2f} GiB", flush=True)

    def hf_path() -> None:
        b, few = args.hf_batch, args.hf_passages or args.passages
        for stage in ("generated", "scored"):
            try:
                seconds, peak = hf_stage(model, prompts[stage][:few], b, device, **settings[stage])
            except torch.OutOfMemoryError:
                print(f"hf     {stage:<9}: out of memory at batch {b}", flush=True)
                torch.cuda.empty_cache()
                continue
            ms = seconds / -(-few // b) / settings[stage]["max_new_tokens"] * 1e3
            results[("hf", stage)] = (seconds, peak, b, ms, few)
            show("hf", stage)

    def engine_path(half_adapters: bool = True) -> None:
        label = "engine" if half_adapters else "fp32"
        for wanted in row_caps:
            for stage in ("generated", "scored"):
                n = settings[stage]["max_new_tokens"]
                length = stage_length(prompts[stage], n, spec.generation.context_length)
                rows = rows_that_fit(model, device, length, wanted)
                engine = engine_for(model, tokenizer, device, spec.generation.eos_token_ids, rows, length, half_adapters)
                engine_stage(engine, prompts[stage][:rows], device, max_new_tokens=2)  # warm-up
                seconds, peak = engine_stage(engine, prompts[stage], device, **settings[stage])
                ms = seconds / -(-args.passages // rows) / n * 1e3
                results[(f"{label}@{rows}", stage)] = (seconds, peak, rows, ms, args.passages)
                show(f"{label}@{rows}", stage)
                if args.profile and device.type == "cuda" and stage == "generated" and wanted == max(row_caps):
                    profile_engine(engine, prompts[stage][:rows])
                del engine
                release()

    for path in sorted(paths, key=PATHS.index):  # a failure in a later one still prints the earlier
        {"hf": hf_path, "engine_fp32": lambda: engine_path(half_adapters=False), "engine": engine_path}[path]()

    total: dict[str, float] = {}
    for (path, stage), (seconds, peak, rows, ms, n) in results.items():
        per = Timed(stage, rows, seconds / -(-n // rows), settings[stage]["max_new_tokens"], 0)
        projected = project_stage(per, hb.passages, name, size)
        total[path] = total.get(path, 0.0) + projected.hours_4090
        old = results.get(("hf", stage))
        speedup = f" ({n / seconds / (old[4] / old[0]):.1f}x hf's passages/s)" if old and path != "hf" else ""
        print(f"{path:<10} {stage:<9}: {hb.passages} passages: {projected.hours_here:.2f} h here, "
              f"{projected.hours_4090:.2f} h on one RTX 4090 ({projected.how}){speedup}", flush=True)
    for path, hours in total.items():
        line = f"{path:<10} generated + scored, {hb.passages} passages: {hours:.2f} h on one RTX 4090"
        if "hf" in total and path != "hf":
            line += (f" ({total['hf'] / hours:.1f}x hf; the hf path's {total['hf']:.2f} h fit "
                     f"{int(hb.passages * total['hf'] / hours)} passages)")
        print(line, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
