"""The static engine against the HF engine on a GPU, on a model that is not random.

A small Qwen2-shaped model (GQA, 4 layers) is trained for a few hundred steps on the tiny
model's corpus, then cast to fp16: its greedy continuations are text it learned, not near-ties.
Checked, with CUDA graphs on:
- identical greedy tokens from both engines, prompt logprobs (echo) within fp16 tolerance;
- identical output with prefix reuse on and off, under a sequence of requests that share,
  extend, shorten and repeat each other's prompts;
- no memory growth over 1,000 mixed requests (greedy, sampled, echo, stops, long and short);
- batching (`[server] max_batch`): 200 mixed requests sent at once through the scheduler to a
  4-row static engine (batched steps as CUDA graphs) against each alone at batch 1. In fp16 a
  batched matmul rounds differently, so a near tie may go another way: reported, and a FAIL only
  past BATCH_DIFFERING of the requests; every row free and no memory growth afterwards.

    python benchmarks/engine_check.py
"""

from __future__ import annotations

import random
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "docker" / "inference")]

from helm_server.engine import SamplingParams  # noqa: E402
from helm_server.hf_engine import HFEngine  # noqa: E402
from helm_server.static_engine import StaticEngine  # noqa: E402
from packager.tiny_model import _CORPUS, QWEN_EOS_ID, QWEN_VOCAB_SIZE, build_tokenizer  # noqa: E402

LOGPROB_TOLERANCE = 0.05  # fp16: two code paths round differently
BATCH_DIFFERING = 0.05  # share of requests whose batched answer may differ from batch 1's (fp16 near ties)


def trained_model(device: torch.device, steps: int = 300, **shape):
    """The small model, trained; `shape` overrides its Qwen2Config fields (benchmarks/train_shape.py --trained)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(**{**dict(vocab_size=QWEN_VOCAB_SIZE, hidden_size=256, intermediate_size=512,
                                   num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2,
                                   max_position_embeddings=4096, tie_word_embeddings=False,
                                   eos_token_id=QWEN_EOS_ID), **shape})
    model = Qwen2ForCausalLM(config).to(device)
    tokenizer = build_tokenizer()
    text = " ".join(_CORPUS)
    ids = torch.tensor(tokenizer(text)["input_ids"], device=device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    for step in range(steps):
        start = random.Random(step).randrange(0, max(1, ids.numel() - 256))
        batch = ids[start:start + 256][None]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    print(f"trained {steps} steps, last loss {loss.item():.3f}")
    return model.half().eval(), tokenizer


def requests(tokenizer, n: int, seed: int):
    """Prompts that share, extend, shorten and repeat each other; mixed sampling settings."""
    rng = random.Random(seed)
    pieces = [tokenizer(t)["input_ids"] for t in _CORPUS[:5]]
    previous: list[int] = []
    for i in range(n):
        kind = rng.choice(["extend", "shorten", "repeat", "fresh", "long"])
        if kind == "extend" and previous:
            prompt = previous + rng.choice(pieces)
        elif kind == "shorten" and len(previous) > 2:
            prompt = previous[: rng.randrange(1, len(previous))]
        elif kind == "repeat" and previous:
            prompt = list(previous)
        elif kind == "long":
            prompt = [t for _ in range(rng.randrange(10, 40)) for t in rng.choice(pieces)]
        else:
            prompt = list(rng.choice(pieces))
        prompt = prompt[-1500:]
        previous = prompt
        sampled = rng.random() < 0.3
        params = SamplingParams(max_new_tokens=rng.choice([0, 1, 5, 40]) if i % 7 else 120,
                                temperature=0.7 if sampled else 0.0, top_k=rng.choice([0, 50]),
                                top_p=rng.choice([1.0, 0.9]), seed=i, top_logprobs=rng.choice([1, 5]),
                                echo_prompt=rng.random() < 0.3)
        stop_at = rng.choice([None, 3, 10])
        yield prompt, params, (lambda ids, k=stop_at: k is not None and len(ids) >= k)


def same(a, b) -> tuple[bool, float]:
    tokens = [t.token_id for t in a.prompt + a.completion] == [t.token_id for t in b.prompt + b.completion]
    diff = max((abs(x.logprob - y.logprob) for x, y in zip(a.prompt + a.completion, b.prompt + b.completion)), default=0.0)
    return tokens and a.finish_reason == b.finish_reason, diff


def main() -> int:
    device = torch.device("cuda")
    model, tokenizer = trained_model(device)
    hf = HFEngine(model, tokenizer, [QWEN_EOS_ID], device)
    static = StaticEngine(model, tokenizer, [QWEN_EOS_ID], device, context_length=2048)
    fresh = StaticEngine(model, tokenizer, [QWEN_EOS_ID], device, context_length=2048, reuse=False)
    failures, worst_hf, worst_reuse, greedy = 0, 0.0, 0.0, 0
    for prompt, params, stop in requests(tokenizer, 200, seed=1):
        a = static.generate(prompt, params, stop)
        b = fresh.generate(prompt, params, stop)
        ok, diff = same(a, b)
        worst_reuse = max(worst_reuse, diff)
        failures += not ok
        if params.temperature == 0.0:
            greedy += 1
            c = hf.generate(prompt, params, stop)
            ok, diff = same(a, c)
            worst_hf = max(worst_hf, diff)
            if not ok:
                failures += 1
                print("differs from HF:", [t.token_id for t in a.completion][:12], [t.token_id for t in c.completion][:12])
    print(f"200 requests ({greedy} greedy also on HF): {failures} differing; logprob max |diff| static vs HF "
          f"{worst_hf:.4f}, reuse vs fresh {worst_reuse:.5f} (tolerance {LOGPROB_TOLERANCE})")

    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    started = time.perf_counter()
    for prompt, params, stop in requests(tokenizer, 1000, seed=2):
        static.generate(prompt, params, stop)
    torch.cuda.synchronize()
    after = torch.cuda.memory_allocated()
    print(f"1,000 mixed requests in {time.perf_counter() - started:.1f} s: allocated {before / 2**20:.1f} -> "
          f"{after / 2**20:.1f} MiB ({(after - before) / 2**20:+.2f} MiB)")
    ok = failures == 0 and worst_hf <= LOGPROB_TOLERANCE and after - before <= 2**20
    ok = batched_check(model, tokenizer, fresh, device) and ok
    print("engine check:", "PASS" if ok else "FAIL")
    return 0 if ok else 1


def batched_check(model, tokenizer, alone, device) -> bool:
    """200 requests at once through the batch scheduler (4 rows, CUDA graphs) against each alone."""
    import threading

    from helm_server.batching import Batcher
    from helm_server.deadline import unlimited

    jobs = list(requests(tokenizer, 200, seed=3))
    expected = [alone.generate(prompt, params, stop) for prompt, params, stop in jobs]
    engine = StaticEngine(model, tokenizer, [QWEN_EOS_ID], device, context_length=2048, rows=4)
    batcher = Batcher(engine, 4, max_queue=256)
    # The scheduler thread's first matmuls allocate its own cuBLAS workspace (32 MiB on an H200), once: a
    # warm-up request first, so that what is measured is what the 200 requests leave behind.
    batcher.submit(jobs[0][0], jobs[0][1], jobs[0][2], unlimited())
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    got: list = [None] * len(jobs)

    def one(i: int) -> None:
        prompt, params, stop = jobs[i]
        got[i] = batcher.submit(prompt, params, stop, unlimited())

    started = time.perf_counter()
    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - started
    batcher.close()
    torch.cuda.synchronize()
    after = torch.cuda.memory_allocated()
    differing, worst = 0, 0.0
    for a, b in zip(got, expected):
        ok, diff = same(a, b)
        differing += not ok
        worst = max(worst, diff if ok else 0.0)
    print(f"batched: 200 requests, 4 rows ({batcher.steps} steps, up to {batcher.widest} rows) in {seconds:.1f} s: "
          f"{differing} differ from batch 1 (fp16 near ties), logprob max |diff| where the same {worst:.4f}; "
          f"allocated {before / 2**20:.1f} -> {after / 2**20:.1f} MiB, free rows {sorted(engine.free)}; prompt "
          f"positions copied between slots {engine.copied_tokens}, {engine.batched_passes} side-by-side prefill passes")
    return (differing <= BATCH_DIFFERING * len(jobs) and worst <= LOGPROB_TOLERANCE and after - before <= 2**20
            and sorted(engine.free) == [0, 1, 2, 3])


if __name__ == "__main__":
    raise SystemExit(main())
