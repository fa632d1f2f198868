"""8-bit GPTQ kernels at batch 1, through the server's own decode path, against fp16.

Loads the fp16 base and its GPTQ artifact (once per kernel backend, the way the
server loads it: transformers + GPTQModel), then for each: greedy decode of the
same prompt with `HFEngine` (prefill + decode_one_token), best of `--repeats`
after a warm-up, and the logprobs of the base's greedy continuation scored by
both (teacher-forced): max and mean |difference| of the chosen tokens' logprobs
and how many greedy tokens agree. A backend that fails to load or run is
reported with its error, never skipped silently.

    python benchmarks/gptq_kernels.py --base DIR --quantized DIR --backends torch,triton,marlin
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "docker" / "inference"))

from helm_server.engine import SamplingParams  # noqa: E402
from helm_server.hf_engine import HFEngine  # noqa: E402

EOS = 151643


def load(folder: Path, kernel: str):
    """The server's own loader, with the spec's `gptq_kernel` set to `kernel`."""
    from helm_server.hf_engine import load_model
    from helm_server.settings import GenerationSettings, ServeConfig, ServedModel

    model = ServedModel(repo_id=str(folder), dtype="float16", gptq_kernel=kernel)
    config = ServeConfig(submission="bench", model=model, generation=GenerationSettings(eos_token_ids=[EOS]))
    return load_model(config, torch.device("cuda"))


def bytes_per_token(model) -> int:
    """Bytes a decode step reads: every tensor but the input embedding (one row of it)."""
    total = sum(t.numel() * t.element_size() for n, t in model.state_dict().items() if "embed_tokens" not in n)
    return total


def decode(engine: HFEngine, prompt: list[int], new: int) -> list[int]:
    params = SamplingParams(max_new_tokens=new, temperature=0.0, min_new_tokens=new, top_logprobs=1)
    return [t.token_id for t in engine.generate(prompt, params, lambda ids: False).completion]


def timed(fn, repeats: int):
    fn()
    torch.cuda.synchronize()
    best, out = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best, out


@torch.inference_mode()
def chosen_logprobs(model, ids: list[int]) -> torch.Tensor:
    logits = model(input_ids=torch.tensor([ids], device="cuda")).logits[0, :-1].float()
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(ids[1:], device="cuda")[:, None])[:, 0]


MODULES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


@torch.inference_mode()
def layer_microseconds(model, iters: int = 200) -> tuple[float, int]:
    """Batch-1 time of one decoder layer's seven linear modules, kernels only (no Python per layer).

    Each module runs `iters` times back to back on a [1, 1, in] input; returns the
    summed microseconds per call and the bytes those modules hold.
    """
    layer = model.model.layers[0]
    total_us, nbytes = 0.0, 0
    for name in MODULES:
        module = layer.get_submodule(name)
        nbytes += sum(t.numel() * t.element_size() for t in module.state_dict().values())
        fan_in = getattr(module, "in_features", None) or module.weight.shape[-1]
        x = torch.randn(1, 1, fan_in, device="cuda", dtype=torch.float16)
        for _ in range(10):
            module(x)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            module(x)
        end.record()
        torch.cuda.synchronize()
        total_us += start.elapsed_time(end) * 1e3 / iters
    return total_us, nbytes


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base", type=Path, required=True)
    p.add_argument("--quantized", type=Path, required=True)
    p.add_argument("--backends", default="torch,triton,marlin")
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--micro-only", action="store_true", help="only the per-layer kernel timing")
    p.add_argument("--full-layers", type=int, default=40, help="layers of the real model, for the projection")
    args = p.parse_args()
    if args.micro_only:
        return micro(args)

    prompt = torch.randint(0, EOS, (args.prompt_tokens,), generator=torch.Generator().manual_seed(1)).tolist()
    print(f"device {torch.cuda.get_device_name()}; prompt {args.prompt_tokens}, {args.new_tokens} new tokens, "
          f"best of {args.repeats}")
    rows = []
    base = load(args.base, "auto")
    seconds, base_tokens = timed(lambda: decode(HFEngine(base, None, [EOS], torch.device("cuda")), prompt, args.new_tokens), args.repeats)
    reference = chosen_logprobs(base, prompt + base_tokens)
    rows.append(("fp16 (no quantization)", seconds, bytes_per_token(base), None, None, args.new_tokens))
    del base
    torch.cuda.empty_cache()

    for backend in args.backends.split(","):
        try:
            started = time.perf_counter()
            model = load(args.quantized, backend)
            kernel = type(model.model.layers[0].self_attn.q_proj).__name__
            engine = HFEngine(model, None, [EOS], torch.device("cuda"))
            first = time.perf_counter()
            decode(engine, prompt, 2)  # compiles or autotunes on first use
            warm = time.perf_counter() - first
            seconds, tokens = timed(lambda: decode(engine, prompt, args.new_tokens), args.repeats)
            diff = (chosen_logprobs(model, prompt + base_tokens) - reference).abs()
            same = sum(a == b for a, b in zip(tokens, base_tokens))
            rows.append((f"{backend} ({kernel}; load {first - started:.0f} s, first call {warm:.0f} s)", seconds,
                         bytes_per_token(model), diff.max().item(), diff.mean().item(), same))
            del model, engine
            torch.cuda.empty_cache()
        except Exception as e:  # report and go on: the table says which backend failed and why
            traceback.print_exc(limit=3)
            rows.append((f"{backend}: FAILED {type(e).__name__}: {str(e)[:120]}", float("nan"), 0, None, None, 0))

    for label, seconds, nbytes, dmax, dmean, same in rows:
        per_token = seconds / args.new_tokens
        agree = "" if dmax is None else f"  |dlogprob| max {dmax:.3f} mean {dmean:.4f}  greedy {same}/{args.new_tokens}"
        print(f"  {label}\n      {per_token * 1e3:7.2f} ms/token  {1 / per_token:7.1f} tokens/s  "
              f"{nbytes / 1e9:5.2f} GB read/token  {nbytes / per_token / 1e9:6.0f} GB/s{agree}")
    return 0


def micro(args) -> int:
    print(f"device {torch.cuda.get_device_name()}; one decoder layer's 7 linear modules at batch 1, kernels only")
    for kernel in ["fp16"] + args.backends.split(","):
        try:
            model = load(args.base if kernel == "fp16" else args.quantized, "auto" if kernel == "fp16" else kernel)
            us, nbytes = layer_microseconds(model)
            print(f"  {kernel:7s} {us:8.1f} us/layer  {nbytes / 1e6:7.1f} MB/layer  {nbytes / us / 1e3:6.0f} GB/s  "
                  f"-> {args.full_layers} layers: {us * args.full_layers / 1e3:6.2f} ms/token of linear kernels")
            del model
            torch.cuda.empty_cache()
        except Exception as e:
            print(f"  {kernel}: FAILED {type(e).__name__}: {str(e)[:160]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
