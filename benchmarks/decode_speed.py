"""Decode speed: this project's engine against the reference solution's generation path.

The reference server called `model.generate(output_scores=True,
return_dict_in_generate=True)` and then took a full-vocabulary softmax of
every step's scores and copied it to the host. The engine here keeps one
KV cache, gathers logprobs on the device and copies once per request.

Both run greedy on the same random-weight model of a real shape (built on
the device, no Hub), for the same prompt and the same number of new tokens
(end-of-text suppressed), after a warm-up. Printed: ms/token, tokens/s,
achieved weight-read bandwidth (weights bytes / ms per token: decoding
reads every weight once per token, so this approaches the memory bandwidth
as overheads vanish), peak memory, and the ratio.

    python benchmarks/decode_speed.py --shape qwen-14b --prompt-tokens 512 --new-tokens 128
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "docker" / "inference"))

from helm_server.engine import SamplingParams  # noqa: E402
from helm_server.hf_engine import HFEngine  # noqa: E402

EOS = 151643
SHAPES = {  # Qwen2-architecture equivalents; qwen-14b is Qwen-14B's shape (MHA, untied head)
    "qwen-14b": dict(hidden_size=5120, intermediate_size=13696, num_hidden_layers=40, num_attention_heads=40,
                     num_key_value_heads=40, vocab_size=151936, tie_word_embeddings=False),
    "qwen-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                    num_key_value_heads=32, vocab_size=151936, tie_word_embeddings=False),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=4, vocab_size=151936, tie_word_embeddings=False),
}


def build_model(shape: str, dtype: torch.dtype, device: torch.device):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(**SHAPES[shape], max_position_embeddings=8192, eos_token_id=EOS)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # create the weights in their final dtype: no fp32 copy of 14B params
    try:
        with torch.device(device):
            model = Qwen2ForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def run_engine(engine: HFEngine, prompt: list[int], new: int) -> list[int]:
    params = SamplingParams(max_new_tokens=new, temperature=0.0, min_new_tokens=new, top_logprobs=1)
    return [t.token_id for t in engine.generate(prompt, params, lambda ids: False).completion]


@torch.inference_mode()
def run_reference(model, prompt: list[int], new: int) -> list[int]:
    """The reference solution's path: generate with scores, full softmax per step, copy to host."""
    ids = torch.tensor([prompt], device=model.device)
    out = model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False, output_scores=True,
                         return_dict_in_generate=True, eos_token_id=EOS, pad_token_id=EOS)
    log_probs = torch.log(torch.stack(out.scores, dim=1).softmax(-1))
    gen = out.sequences[:, ids.shape[-1]:]
    gen_logprobs = torch.gather(log_probs, 2, gen[:, :, None]).squeeze(-1)
    top = torch.argmax(log_probs, dim=-1)
    top_logprobs = torch.gather(log_probs, 2, top[:, :, None]).squeeze(-1)
    _ = (gen_logprobs.tolist(), top.tolist(), top_logprobs.tolist())
    return gen[0].tolist()


def timed(fn, device: torch.device, repeats: int) -> tuple[float, list[int]]:
    fn()  # warm-up
    sync(device)
    best, result = float("inf"), []
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        sync(device)
        best = min(best, time.perf_counter() - start)
    return best, result


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="qwen-14b")
    p.add_argument("--dtype", choices=["float16", "bfloat16", "float32"], default="float16")
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()

    device = torch.device(args.device)
    torch.manual_seed(0)
    model = build_model(args.shape, getattr(torch, args.dtype), device)
    weight_bytes = sum(t.numel() * t.element_size() for t in model.parameters())
    engine = HFEngine(model, tokenizer=None, eos_token_ids=[EOS], device=device)
    prompt = torch.randint(0, EOS, (args.prompt_tokens,), generator=torch.Generator().manual_seed(1)).tolist()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"device {name}; shape {args.shape} ({weight_bytes / 1e9:.1f} GB of {args.dtype} weights); "
          f"prompt {args.prompt_tokens} tokens, {args.new_tokens} new tokens, best of {args.repeats}")

    rows = {}
    for label, fn in [("engine (this project)", lambda: run_engine(engine, prompt, args.new_tokens)),
                      ("reference generate+scores", lambda: run_reference(model, prompt, args.new_tokens))]:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        seconds, tokens = timed(fn, device, args.repeats)
        peak = torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else float("nan")
        rows[label] = (seconds, tokens)
        per_token = seconds / args.new_tokens
        print(f"  {label:28s} {seconds:7.3f} s  {per_token * 1e3:7.2f} ms/token  {1 / per_token:7.1f} tokens/s  "
              f"{weight_bytes / per_token / 1e9:7.0f} GB/s of weights  peak {peak:6.1f} GB")
    (a, ta), (b, tb) = rows.values()
    same = sum(x == y for x, y in zip(ta, tb))
    print(f"  speed-up engine vs reference: {b / a:.2f}x (prefill included); same greedy tokens: {same}/{len(ta)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
