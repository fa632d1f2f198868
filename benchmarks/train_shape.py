"""QLoRA steps of a recipe on an 8-bit GPTQ random-weight model of a real layer shape.

Builds a Qwen2 model with Qwen-14B's layer shape (`--layers` of its 40) and
vocabulary, packs its random weights as 8-bit GPTQ (round to nearest: the
kernel's work does not depend on how the codes were chosen), and trains it with
the training stage's own functions (`pipeline.train.model`, `.loop`,
`.checkpoint`, `.plan`) under a spec's recipe (submission-3: r=32, Lion,
batch 1 x 32, 2048 tokens, gradient checkpointing), on random examples whose
lengths are drawn uniformly in [--min-len, max_length]. Trains until
`--minutes` are spent, then moves the figures to the whole model: per-token time
from probes with 1 and all built layers (fixed part + per-layer part), peak
memory plus the remaining layers' bytes, and projects onto one RTX 4090.

    python benchmarks/train_shape.py --vocab qwen.tiktoken --layers 4 --minutes 6 --work /tmp/t14 --emulate-4090
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests"), str(REPO / "docker" / "inference")]

from decode_speed import SHAPES  # noqa: E402
from packager.spec import load_spec  # noqa: E402
from pipeline.convert.tokenizer import fast_tokenizer  # noqa: E402
from pipeline.device import emulate_4090  # noqa: E402
from pipeline.train import checkpoint, loop, plan  # noqa: E402
from pipeline.train.model import add_lora, load_base, trainable_parameters  # noqa: E402
from pipeline.train.schedule import optimizer_steps  # noqa: E402
from qwen1 import gptq_quantize  # noqa: E402

GROUP = 128
LINEAR = {"self_attn.q_proj": ("h", "h"), "self_attn.k_proj": ("h", "h"), "self_attn.v_proj": ("h", "h"),
          "self_attn.o_proj": ("h", "h"), "mlp.gate_proj": ("h", "i"), "mlp.up_proj": ("h", "i"),
          "mlp.down_proj": ("i", "h")}


def build_gptq(folder: Path, shape: dict, layers: int, vocab: Path, device: torch.device) -> None:
    """A Qwen2 GPTQ (8-bit, group 128, AutoGPTQ format) checkpoint of random weights, written shard per layer."""
    from safetensors.torch import save_file

    if (folder / "config.json").is_file():
        return
    folder.mkdir(parents=True, exist_ok=True)
    h, i, v = shape["hidden_size"], shape["intermediate_size"], 152064
    group = GROUP if h % GROUP == 0 and i % GROUP == 0 else 32
    dims = {"h": h, "i": i}
    g = torch.Generator(device=device).manual_seed(0)
    rand = lambda *s, std=0.02: (torch.randn(*s, generator=g, device=device) * std)  # noqa: E731
    index = {}
    top = {"model.embed_tokens.weight": rand(v, h).half(), "lm_head.weight": rand(v, h).half(),
           "model.norm.weight": torch.ones(h, dtype=torch.float16, device=device)}
    save_file({k: t.cpu().contiguous() for k, t in top.items()}, str(folder / "top.safetensors"))
    index.update({k: "top.safetensors" for k in top})
    for n in range(layers):
        tensors = {}
        for name, (fan_in, fan_out) in LINEAR.items():
            packed, _ = gptq_quantize(rand(dims[fan_out], dims[fan_in]).float(), group)
            for kind, t in packed.items():
                tensors[f"model.layers.{n}.{name}.{kind}"] = t
            if name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
                tensors[f"model.layers.{n}.{name}.bias"] = torch.zeros(dims[fan_out], dtype=torch.float16)
        for norm in ("input_layernorm", "post_attention_layernorm"):
            tensors[f"model.layers.{n}.{norm}.weight"] = torch.ones(h, dtype=torch.float16)
        file = f"layer-{n:02d}.safetensors"
        save_file({k: t.cpu().contiguous() for k, t in tensors.items()}, str(folder / file))
        index.update({k: file for k in tensors})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": index}))
    config = {
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": h, "intermediate_size": i,
        "num_hidden_layers": layers, "num_attention_heads": shape["num_attention_heads"],
        "num_key_value_heads": shape["num_key_value_heads"], "vocab_size": v, "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "tie_word_embeddings": False, "torch_dtype": "float16",
        "eos_token_id": 151643, "bos_token_id": 151643,
        "quantization_config": {"quant_method": "gptq", "bits": 8, "group_size": group, "desc_act": False,
                                "sym": True, "checkpoint_format": "gptq"},
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    fast_tokenizer(vocab).save_pretrained(folder)


def probe_layers(model, examples, schedule, pad_id, device, keep: int) -> plan.Probe:
    """The probe with only the first `keep` decoder layers in the stack."""
    inner = model.base_model.model.model
    full = inner.layers
    inner.layers = full[:keep]
    try:
        return loop.probe(model, examples, schedule, pad_id, device, timed=8)
    finally:
        inner.layers = full


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--spec", default="submission-3")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=Path, required=True)
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--minutes", type=float, default=5.0)
    p.add_argument("--min-len", type=int, default=128)
    p.add_argument("--examples", type=int, default=20000)
    p.add_argument("--emulate-4090", action="store_true")
    p.add_argument("--shape", choices=sorted(SHAPES), default="qwen-14b", help="tiny: smoke-test this script on a CPU")
    p.add_argument("--device", default="cuda")
    p.add_argument("--smoke", action="store_true", help="64-token examples, accumulation 2: check this script quickly")
    args = p.parse_args()

    spec, _ = load_spec(REPO / "submissions" / args.spec / "spec.toml")
    training, s = spec.training, spec.training.schedule
    if args.smoke:
        s = s.model_copy(update={"max_length": 64, "gradient_accumulation": 2})
    shape = SHAPES[args.shape]
    full_layers = shape["num_hidden_layers"]
    device = torch.device(args.device)
    if args.emulate_4090 and device.type == "cuda":
        emulate_4090(device, plan.cards()["target"]["memory_gib"])
    base = args.work / "base"
    started = time.perf_counter()
    build_gptq(base, shape, args.layers, args.vocab, device)
    print(f"built {base} in {time.perf_counter() - started:.0f} s", flush=True)

    rng = random.Random(0)
    examples = []
    for _ in range(args.examples):
        n = rng.randint(args.min_len, s.max_length)
        ids = [rng.randrange(0, 151643) for _ in range(n)]
        cut = n // 3  # a prompt without loss, then an answer with loss
        examples.append({"input_ids": ids, "labels": [-100] * cut + ids[cut:]})
    pad_id = 151643 + 3 + 21  # <|extra_21|>

    torch.manual_seed(s.seed)
    model = add_lora(load_base(base, device, torch.float16), training.lora, s.gradient_checkpointing, "bench")
    params = [q for _, q in trainable_parameters(model)]
    trainable = sum(q.numel() for q in params)
    total = optimizer_steps(len(examples), s.epochs, s.batch_size, s.gradient_accumulation)
    optimizer = loop.make_optimizer(params, training.optimizer, device)
    scheduler = loop.make_scheduler(optimizer, total, s)

    loop.probe(model, examples, s, pad_id, device)  # warm-up: first CUDA calls, allocator
    one = probe_layers(model, examples, s, pad_id, device, 1)
    built = probe_layers(model, examples, s, pad_id, device, args.layers)
    per_token = {k: pr.seconds / pr.tokens for k, pr in ((1, one), (args.layers, built))}
    layer_s = (per_token[args.layers] - per_token[1]) / max(1, args.layers - 1)
    fixed_s = per_token[1] - layer_s
    full_s = fixed_s + full_layers * layer_s
    per_layer_bytes = (sum(t.numel() * t.element_size() for n, t in model.named_buffers() if ".layers.0." in n)
                       + sum(t.numel() * t.element_size() for n, t in model.named_parameters() if ".layers.0." in n and not t.requires_grad)
                       + sum(q.numel() for n, q in model.named_parameters() if ".layers.0." in n and q.requires_grad) * (4 + 4 + plan.STATE_BYTES[training.optimizer.name])
                       + s.max_length * shape["hidden_size"] * 2)
    print(f"probe: 1 layer {1 / per_token[1]:,.0f} tok/s, {args.layers} layers {1 / per_token[args.layers]:,.0f} tok/s; "
          f"per layer {layer_s * 1e6:.1f} us/token, fixed {fixed_s * 1e6:.1f} us/token", flush=True)

    rows = []

    def peak_gib() -> float:
        return torch.cuda.max_memory_allocated(device) / (1 << 30) if device.type == "cuda" else 0.0

    def on_step(position, result):
        rows.append({"step": position.step, "loss": result.loss, "lr": result.lr, "tokens": result.tokens,
                     "seconds": result.seconds, "peak_gib": peak_gib()})
        if position.step % 10 == 0:
            r = rows[-1]
            print(f"step {r['step']:4d} loss {r['loss']:.4f} lr {r['lr']:.2e} {r['tokens'] / r['seconds']:,.0f} tok/s "
                  f"peak {r['peak_gib']:.2f} GiB", flush=True)
        if time.perf_counter() - train_start > args.minutes * 60:
            raise TimeoutError

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    train_start = time.perf_counter()
    position = checkpoint.Position()
    try:
        position = loop.train(model, optimizer, scheduler, examples, s, position, pad_id, device, on_step)
    except TimeoutError:
        pass
    elapsed = time.perf_counter() - train_start
    ck = time.perf_counter()
    saved = checkpoint.save(args.work / "checkpoints", model, optimizer, scheduler,
                            checkpoint.Position(0, len(rows) * s.gradient_accumulation, len(rows)), "bench", 1)
    ck = time.perf_counter() - ck
    tokens = sum(r["tokens"] for r in rows)
    peak = peak_gib() * (1 << 30)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    card = plan.known_card(name) if device.type == "cuda" else None
    target = plan.cards()["target"]
    ratio = max(card["bandwidth_gbs"] / target["bandwidth_gbs"], card["fp16_tflops"] / target["fp16_tflops"]) if card else None
    measured_per_token = elapsed / tokens
    full_per_token = measured_per_token * full_s / per_token[args.layers]
    peak_full = peak + (full_layers - args.layers) * per_layer_bytes
    params_full = 14_167_290_880
    flops_rate = 6 * params_full / full_per_token / 1e12
    print(json.dumps({
        "device": name, "layers_built": args.layers, "trainable_params": trainable,
        "optimizer_steps": len(rows), "micro_batches": len(rows) * s.gradient_accumulation, "tokens": tokens,
        "seconds": round(elapsed, 1), "tokens_per_s": round(tokens / elapsed), "peak_gib": round(peak / (1 << 30), 2),
        "checkpoint_s": round(ck, 1), "checkpoint": str(saved),
        "first_losses": [round(r["loss"], 4) for r in rows[:3]], "last_losses": [round(r["loss"], 4) for r in rows[-3:]],
        "full_model_tokens_per_s_here": round(1 / full_per_token), "full_model_peak_gib": round(peak_full / (1 << 30), 2),
        "ratio_to_4090": ratio, "full_model_tokens_per_s_4090": round(1 / (full_per_token * ratio)) if ratio else None,
        "hours_4090_per_million_tokens": round(full_per_token * ratio * 1e6 / 3600, 3) if ratio else None,
        "effective_tflops_here_6N": round(flops_rate, 1),
    }, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
