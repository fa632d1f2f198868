"""QLoRA steps of a recipe on an 8-bit GPTQ random-weight model of a real layer shape, by training path.

Builds a Qwen2 model with Qwen-14B's layer shape (`--layers` of its 40) and
vocabulary, packs its random weights as 8-bit GPTQ (round to nearest: the
kernel's work does not depend on how the codes were chosen), and trains it with
the training stage's own functions (`pipeline.train.model`, `.loop`, `.fast`,
`.checkpoint`, `.plan`) under a spec's recipe (submission-3: r=32, Lion,
batch 1 x 32, 2048 tokens, gradient checkpointing), on random examples whose
lengths are drawn uniformly in [--min-len, max_length]. Each path of `--path`
(reference, fast, fast@TOKENS) trains `--minutes` in turn in this one process,
from the same adapter and data order: tokens/s, the share of the card's dense
fp16 rate (6 x the linear parameters per token), peak memory and the projection
onto one RTX 4090, side by side. With fewer layers than the shape's, per-token
time is moved to the whole model from probes with 1 and all built layers.

    python benchmarks/train_shape.py --vocab qwen.tiktoken --layers 40 --minutes 1 --work /tmp/t40 --emulate-4090 \
        --path reference,fast_resident@6144,fast_resident@8192,fast@12288,fast@16384 --profile /tmp/prof
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
from pipeline.train import checkpoint, fast, loop, plan  # noqa: E402
from pipeline.train.model import add_lora, load_base, trainable_parameters  # noqa: E402
from pipeline.train.schedule import optimizer_steps  # noqa: E402
from qwen1 import gptq_quantize  # noqa: E402

GROUP = 128
FAST = {  # the fast path's variants: what `fast.Step` computes under
    "fast": {},  # as the stage runs it: packed, liger's kernels on CUDA, the one-add LoRA branch, inputs on the host
    "fast_padded": {"packed": False},  # micro-batches padded to their longest row (the fast path before packing)
    "fast_half_lora_grads": {"lora_grads32": False},  # the adapter's gradients rounded to fp16 (before _LoraProducts)
    "fast_unfused": {"kernels": None, "fused_lora": False, "packed": False},  # padded, transformers' and peft's own code
    "fast_lora": {"kernels": None},  # only the one-add LoRA branch
    "fast_torch_dequant": {"eval_dequant": False},  # GPTQModel's training-mode dequantization
    "fast_resident": {"offload": False},  # layer inputs kept on the GPU, 6,144-token micro-batches (before offloading)
}
LINEAR = {"self_attn.q_proj": ("h", "h"), "self_attn.k_proj": ("h", "h"), "self_attn.v_proj": ("h", "h"),
          "self_attn.o_proj": ("h", "h"), "mlp.gate_proj": ("h", "i"), "mlp.up_proj": ("h", "i"),
          "mlp.down_proj": ("i", "h")}


def build_gptq(folder: Path, shape: dict, layers: int, vocab: Path, device: torch.device,
               weights: dict[str, torch.Tensor] | None = None) -> None:
    """A Qwen2 GPTQ (8-bit, group 128, AutoGPTQ format) checkpoint of random weights (or of `weights`, a trained
    model's state dict of this shape, rounded to nearest), written shard per layer."""
    from safetensors.torch import save_file

    if (folder / "config.json").is_file():
        return
    folder.mkdir(parents=True, exist_ok=True)
    h, i, v = shape["hidden_size"], shape["intermediate_size"], 152064
    group = GROUP if h % GROUP == 0 and i % GROUP == 0 else 32
    dims = {"h": h, "i": i}
    g = torch.Generator(device=device).manual_seed(0)

    def rand(*s, std=0.02, name: str = ""):
        if weights is not None and name:
            return weights[name].to(device, torch.float32)
        return torch.randn(*s, generator=g, device=device) * std

    index = {}
    top = {"model.embed_tokens.weight": rand(v, h, name="model.embed_tokens.weight").half(),
           "lm_head.weight": rand(v, h, name="lm_head.weight").half(),
           "model.norm.weight": (weights["model.norm.weight"].to(device, torch.float16) if weights is not None
                                 else torch.ones(h, dtype=torch.float16, device=device))}
    save_file({k: t.cpu().contiguous() for k, t in top.items()}, str(folder / "top.safetensors"))
    index.update({k: "top.safetensors" for k in top})
    for n in range(layers):
        tensors = {}
        for name, (fan_in, fan_out) in LINEAR.items():
            key = f"model.layers.{n}.{name}"
            packed, _ = gptq_quantize(rand(dims[fan_out], dims[fan_in], name=f"{key}.weight").float(), group)
            for kind, t in packed.items():
                tensors[f"{key}.{kind}"] = t
            if name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
                tensors[f"{key}.bias"] = (weights[f"{key}.bias"].cpu().half() if weights is not None
                                          else torch.zeros(dims[fan_out], dtype=torch.float16))
        for norm in ("input_layernorm", "post_attention_layernorm"):
            key = f"model.layers.{n}.{norm}.weight"
            tensors[key] = weights[key].cpu().half() if weights is not None else torch.ones(h, dtype=torch.float16)
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


TRAINED = dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=8,
               num_key_value_heads=8)  # --trained: a small model that learned the tiny model's corpus


def corpus_ids() -> list[int]:
    from packager.tiny_model import _CORPUS, build_tokenizer

    return build_tokenizer()(" ".join(_CORPUS) * 4)["input_ids"]


def trained_weights(device: torch.device, steps: int = 300) -> dict[str, torch.Tensor]:
    """engine_check's small model in TRAINED's shape, trained on the tiny model's corpus: its predictions are
    learned, not the near-uniform ones of random weights, so a path that computes otherwise shows in the losses."""
    from engine_check import trained_model

    model, _ = trained_model(device, steps, vocab_size=152064, max_position_embeddings=2048, rms_norm_eps=1e-6,
                             rope_theta=10000.0, **TRAINED)
    return dict(model.state_dict())


def probe_layers(model, run_probe, keep: int) -> plan.Probe:
    """`run_probe()` with only the first `keep` decoder layers in the stack."""
    inner = model.base_model.model.model
    full = inner.layers
    inner.layers = full[:keep]
    try:
        return run_probe()
    finally:
        inner.layers = full


def profile_step(model, step, optimizer, scheduler, group, max_grad_norm, out: Path | None) -> None:
    """One optimizer step under torch.profiler: wall time against GPU kernel time, kernel launches, top kernels."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    started = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step(model, optimizer, scheduler, group)
        torch.cuda.synchronize()
    wall = time.perf_counter() - started
    events = prof.key_averages()
    on_gpu = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]  # kernels, not the ops above them
    gpu = sum(e.self_device_time_total for e in on_gpu) / 1e6
    kernels = sum(e.count for e in on_gpu)
    print(f"profile: one optimizer step {wall:.2f} s wall (profiled), GPU kernels {gpu:.2f} s, {kernels} kernel launches",
          flush=True)
    table = events.table(sort_by="self_device_time_total", row_limit=25, max_name_column_width=70)
    print(table, flush=True)
    if out is not None:
        out.write_text(table)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--spec", default="submission-3")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=Path, required=True)
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--minutes", type=float, default=5.0, help="training time of each path")
    p.add_argument("--path", default="reference,fast",
                   help="paths measured one after the other in this process, from the same adapter and data order: "
                        "reference or a fast variant (" + ", ".join(FAST) + "), each fast one optionally @TOKENS "
                        "(tokens per micro-batch: padded ones for the padded variants)")
    p.add_argument("--min-len", type=int, default=128)
    p.add_argument("--examples", type=int, default=20000)
    p.add_argument("--emulate-4090", action="store_true")
    p.add_argument("--profile", type=Path, help="profile one optimizer step of each fast path; tables written there")
    p.add_argument("--shape", choices=sorted(SHAPES), default="qwen-14b", help="tiny: smoke-test this script on a CPU")
    p.add_argument("--device", default="cuda")
    p.add_argument("--smoke", action="store_true", help="64-token examples, accumulation 2: check this script quickly")
    p.add_argument("--trained", action="store_true",
                   help="a 4-layer model trained on the tiny model's corpus, and windows of that corpus, instead of the "
                        "shape's random weights and tokens: the paths' losses compared where they mean something")
    p.add_argument("--pretrain-steps", type=int, default=300, help="--trained: the small model's own training steps")
    p.add_argument("--steps", type=int, help="stop each path after this many optimizer steps (and --minutes)")
    p.add_argument("--no-dropout", action="store_true", help="LoRA dropout 0: the paths draw no random numbers")
    args = p.parse_args()
    for path in args.path.split(","):
        kind, at, tokens_arg = path.partition("@")
        if kind not in ("reference", *FAST) or (at and (kind == "reference" or not tokens_arg.isdigit())):
            p.error(f"--path {path!r}: each of reference, {', '.join(FAST)}; a fast one may end in @TOKENS (a number)")
    for flag in ("steps", "pretrain_steps"):
        if getattr(args, flag) is not None and getattr(args, flag) <= 0:
            p.error(f"--{flag.replace('_', '-')} {getattr(args, flag)}: must be positive")

    spec, _ = load_spec(REPO / "submissions" / args.spec / "spec.toml")
    training, s = spec.training, spec.training.schedule
    if args.smoke:
        s = s.model_copy(update={"max_length": 64, "gradient_accumulation": 2})
    if args.no_dropout:
        training = training.model_copy(update={"lora": training.lora.model_copy(update={"dropout": 0.0})})
    shape = TRAINED if args.trained else SHAPES[args.shape]
    full_layers = shape["num_hidden_layers"]
    if args.trained:
        args.layers = full_layers
    device = torch.device(args.device)
    if args.emulate_4090 and device.type == "cuda":
        emulate_4090(device, plan.cards()["target"]["memory_gib"])
    base = args.work / ("trained" if args.trained else "base")
    started = time.perf_counter()
    fresh = args.trained and not (base / "config.json").is_file()
    build_gptq(base, shape, args.layers, args.vocab, device, trained_weights(device, args.pretrain_steps) if fresh else None)
    print(f"built {base} in {time.perf_counter() - started:.0f} s", flush=True)

    rng = random.Random(0)
    corpus = corpus_ids() if args.trained else None
    longest = min(s.max_length, len(corpus)) if corpus else s.max_length
    examples = []
    for _ in range(args.examples):
        n = rng.randint(args.min_len, longest)
        if corpus:  # a window of the text the model learned
            start = rng.randrange(0, len(corpus) - n + 1)
            ids = corpus[start:start + n]
        else:
            ids = [rng.randrange(0, 151643) for _ in range(n)]
        cut = n // 3  # a prompt without loss, then an answer with loss
        examples.append({"input_ids": ids, "labels": [-100] * cut + ids[cut:]})
    pad_id = 151643 + 3 + 21  # <|extra_21|>

    torch.manual_seed(s.seed)
    model = add_lora(load_base(base, device, torch.float16), training.lora, s.gradient_checkpointing, "bench")
    named = trainable_parameters(model)
    params = [q for _, q in named]
    initial = {n: q.detach().cpu().clone() for n, q in named}  # every path starts from the same adapter
    trainable = sum(q.numel() for q in params)
    total = optimizer_steps(len(examples), s.epochs, s.batch_size, s.gradient_accumulation)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    card = plan.known_card(name) if device.type == "cuda" else None
    target = plan.cards()["target"]
    ratio = max(card["bandwidth_gbs"] / target["bandwidth_gbs"], card["fp16_tflops"] / target["fp16_tflops"]) if card else None
    dense_tflops = card["fp16_tflops"] if card else None
    linear_params = full_layers * (4 * shape["hidden_size"] ** 2 + 3 * shape["hidden_size"] * shape["intermediate_size"]) \
        + 152064 * shape["hidden_size"]  # the decoder's linears and the output layer: 13.39 G at Qwen-14B's shape

    def peak_gib() -> float:
        return torch.cuda.max_memory_allocated(device) / (1 << 30) if device.type == "cuda" else 0.0

    def reserved_gib() -> float:  # what the allocator held from the card: the figure a real 24 GiB card must fit
        return torch.cuda.max_memory_reserved(device) / (1 << 30) if device.type == "cuda" else 0.0

    results = []
    for path in args.path.split(","):
        kind, _, tokens_arg = path.partition("@")
        micro_tokens = int(tokens_arg) if tokens_arg else fast.micro_tokens_for(FAST.get(kind, {}).get("offload", True))
        with torch.no_grad():
            for n, q in named:
                q.copy_(initial[n])
        torch.manual_seed(s.seed)
        optimizer = loop.make_optimizer(params, training.optimizer, device)
        scheduler = loop.make_scheduler(optimizer, total, s)
        if kind in FAST:
            how = FAST[kind]
            step = fast.Step(pad_id, device, micro_tokens, **how)
            run_probe = lambda: fast.probe(model, examples, s, pad_id, device, micro_tokens, **how)  # noqa: E731
        else:
            step = None
            run_probe = lambda: loop.probe(model, examples, s, pad_id, device, timed=8)  # noqa: E731
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        try:
            measured = run_probe()  # warm-up, and the stage's own plan figure for this path
            if args.layers < full_layers:
                one, built = probe_layers(model, run_probe, 1), probe_layers(model, run_probe, args.layers)
                per_token = {k: pr.seconds / pr.tokens for k, pr in ((1, one), (args.layers, built))}
                layer_s = (per_token[args.layers] - per_token[1]) / max(1, args.layers - 1)
                scale = (per_token[1] - layer_s + full_layers * layer_s) / per_token[args.layers]
            else:
                scale = 1.0
            if args.profile is not None and device.type == "cuda" and kind.startswith("fast"):
                acc = s.gradient_accumulation
                order = loop.micro_batches(loop.epoch_order(len(examples), 0, s.seed), s.batch_size)[:acc]
                group = [[examples[i] for i in ids] for ids in order]

                def one_step(m, o, sc, g):
                    if step is not None:
                        return step(m, o, sc, g, s.max_grad_norm)
                    return loop.optimizer_step(m, o, sc, [loop.collate(r, pad_id, device) for r in g], s.max_grad_norm)

                args.profile.mkdir(parents=True, exist_ok=True)
                profile_step(model, one_step, optimizer, scheduler, group, s.max_grad_norm,
                             args.profile / f"profile-{kind}{tokens_arg}.txt")
                with torch.no_grad():  # the profiled step is not part of the measured run
                    for n, q in named:
                        q.copy_(initial[n])
                optimizer = loop.make_optimizer(params, training.optimizer, device)
                scheduler = loop.make_scheduler(optimizer, total, s)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            rows = []

            def on_step(position, result):
                rows.append({"step": position.step, "loss": result.loss, "tokens": result.tokens,
                             "seconds": result.seconds, "peak_gib": peak_gib()})
                r = rows[-1]
                print(f"{path} step {r['step']:4d} loss {r['loss']:.4f} {r['tokens'] / r['seconds']:,.0f} tok/s "
                      f"peak {r['peak_gib']:.2f} GiB", flush=True)
                if time.perf_counter() - train_start > args.minutes * 60 or (args.steps and position.step >= args.steps):
                    raise TimeoutError

            train_start = time.perf_counter()
            try:
                loop.train(model, optimizer, scheduler, examples, s, checkpoint.Position(), pad_id, device, on_step,
                           step=step)
            except TimeoutError:
                pass
        except torch.OutOfMemoryError as e:
            print(f"{path}: out of memory ({str(e).splitlines()[0]})", flush=True)
            results.append({"path": path, "error": "out of memory"})
            model.zero_grad(set_to_none=True)
            continue
        tokens = sum(r["tokens"] for r in rows)
        seconds = sum(r["seconds"] for r in rows)
        full_per_token = seconds / tokens * scale
        results.append({
            "path": path, "optimizer_steps": len(rows), "tokens": tokens, "seconds": round(seconds, 1),
            "tokens_per_s": round(tokens / seconds), "peak_gib": round(peak_gib(), 2),
            "peak_reserved_gib": round(reserved_gib(), 2),
            "probe_tokens_per_s": round(measured.tokens / measured.seconds),
            "probe_peak_gib": round(measured.peak_bytes / (1 << 30), 2) if measured.peak_bytes else None,
            "losses": [round(r["loss"], 6) for r in rows],
            "full_model_tokens_per_s_here": round(1 / full_per_token),
            "share_of_dense_fp16": round(6 * linear_params / full_per_token / (dense_tflops * 1e12), 3) if dense_tflops else None,
            "full_model_tokens_per_s_4090": round(1 / (full_per_token * ratio)) if ratio else None,
            "hours_4090_per_million_tokens": round(full_per_token * ratio * 1e6 / 3600, 3) if ratio else None,
        })
        del optimizer, scheduler
        model.zero_grad(set_to_none=True)

    ck = time.perf_counter()
    optimizer = loop.make_optimizer(params, training.optimizer, device)
    scheduler = loop.make_scheduler(optimizer, total, s)
    saved = checkpoint.save(args.work / "checkpoints", model, optimizer, scheduler, checkpoint.Position(), "bench", 1)
    reference = next((r for r in results if r["path"] == "reference" and "error" not in r), None)
    for r in results:
        if reference is not None and "error" not in r:
            r["speed_vs_reference"] = round(r["tokens_per_s"] / reference["tokens_per_s"], 2)
            pairs = list(zip(r["losses"], reference["losses"]))
            r["max_rel_loss_vs_reference"] = max(abs(a - b) / abs(b) for a, b in pairs) if pairs else None
    print(json.dumps({
        "device": name, "layers_built": args.layers, "trainable_params": trainable, "ratio_to_4090": ratio,
        "checkpoint_s": round(time.perf_counter() - ck, 1), "checkpoint": str(saved), "paths": results,
    }, indent=2))
    print("| path | optimizer steps | tokens | tokens/s | vs reference | share of dense fp16 | peak GiB (reserved) | 4090 tokens/s "
          "| largest relative loss difference from reference |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in results:
        if "error" in r:
            print(f"| {r['path']} | {r['error']} | | | | | | | |")
            continue
        print(f"| {r['path']} | {r['optimizer_steps']} | {r['tokens']:,} | {r['full_model_tokens_per_s_here']:,} | "
              f"{r.get('speed_vs_reference', '')} | {r['share_of_dense_fp16']} | {r['peak_gib']} ({r['peak_reserved_gib']}) | "
              f"{r['full_model_tokens_per_s_4090']} | {r.get('max_rel_loss_vs_reference')} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
