"""GPTQ of a random-weight model of a real layer shape, with real-length calibration windows.

Builds a Qwen2 model of the shape's layer size (as many layers as `--layers`)
with the real Qwen tokenizer, a synthetic WikiText in the Hub layout, and a
spec with submission-1's [quantization] section, then runs the pipeline's own
`python -m pipeline.quantize` on it. Prints per-layer time and peak memory, and
projects the whole model (all of the shape's layers) onto one RTX 4090 from
the FLOPs of a layer at the measured rate scaled by the cards' fp16 rates.

    python benchmarks/quantize_shape.py --vocab qwen.tiktoken --layers 6 --work /tmp/q14 --emulate-4090
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tomllib
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests"), str(REPO / "docker" / "inference")]

from decode_speed import SHAPES, build_model  # noqa: E402
from hub_fixtures import wikitext_lines  # noqa: E402
from pipeline.convert.tokenizer import fast_tokenizer  # noqa: E402
from pipeline.quantize import __main__ as quantize  # noqa: E402
from pipeline.quantize.plan import SEQUENTIAL_GROUPS, LayerShape  # noqa: E402

# Dense fp16 tensor rates (TFLOP/s) used to move a measured time from one card to another.
FP16_TFLOPS = {"H100": 989.0, "H200": 989.0, "RTX 4090": 165.2}


def spec_text(name: str) -> str:
    """submission-1's spec with a local base model: the recipe under test is its [quantization]."""
    text = (REPO / "submissions" / "submission-1" / "spec.toml").read_text()
    text = re.sub(r'^name = ".*"$', f'name = "{name}"', text, count=1, flags=re.M)
    return text.replace('repo_id = "Qwen/Qwen-14B"', 'repo_id = "local/random-qwen-14b-shape"')


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="qwen-14b")
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--vocab", type=Path, required=True, help="qwen.tiktoken (the Qwen v1 vocabulary)")
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--emulate-4090", action="store_true")
    p.add_argument("--device", default="cuda", help="cuda; cpu only to smoke-test this script")
    args = p.parse_args()

    shape = dict(SHAPES[args.shape])
    full_layers = shape["num_hidden_layers"]
    SHAPES["bench"] = {**shape, "num_hidden_layers": args.layers, "vocab_size": 152064}
    base, specs = args.work / "base", args.work / "specs"
    if not (base / "config.json").is_file():
        torch.manual_seed(0)
        build_model("bench", torch.float16 if args.device == "cuda" else torch.float32, torch.device(args.device)).save_pretrained(base)
        fast_tokenizer(args.vocab).save_pretrained(base)
    # The synthetic WikiText goes straight to the calibration step: parquet loading through
    # `datasets` is tested on the CPU, and pyarrow is not on the GPU machine.
    lines = {split: wikitext_lines(600, seed) for seed, split in enumerate(("train", "validation", "test"))}
    quantize.dataset_files = lambda repo, rev, pattern, data_dir: [Path(pattern.split("/")[-1].split("-")[0])]
    quantize.split_text = lambda files, field: "".join(l or " \n" for l in lines[files[0].name])
    (specs / "bench-14b").mkdir(parents=True, exist_ok=True)
    (specs / "bench-14b" / "spec.toml").write_text(spec_text("bench-14b"))

    argv = ["bench-14b", "--submissions", str(specs), "--model", str(base), 
            "--out", str(args.work / "quantized"), "--work", str(args.work / "work"), "--device", args.device]
    code = quantize.main(argv + (["--emulate-4090"] if args.emulate_4090 else []))
    if code:
        return code

    report = json.loads((args.work / "quantized" / "report.json").read_text())
    layers = report["layers"]
    steady = layers[1:] or layers  # the first layer includes warm-up
    seconds = sum(layer["seconds"] for layer in steady) / len(steady)
    peak = max(layer["peak_gib"] for layer in layers)
    config = json.loads((base / "config.json").read_text())
    ls = LayerShape.from_config(config)
    cal = report["calibration"]
    tokens = len(cal["offsets"]) * cal["seq_len"]
    flops = (SEQUENTIAL_GROUPS + 1) * 2 * ls.layer_params * tokens + 2 * tokens * (3 * ls.hidden**2 + ls.intermediate**2)
    card = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    measured_on = "H200" if "H200" in card else "H100"
    efficiency = flops / max(seconds, 1e-9) / (FP16_TFLOPS[measured_on] * 1e12)
    on_4090 = flops / (FP16_TFLOPS["RTX 4090"] * 1e12 * efficiency)
    gpu = tomllib.loads((REPO / "packager" / "data" / "models.toml").read_text())["gpu"]
    print(f"\n{card}: {args.layers} layers of {args.shape}, {tokens:,} calibration tokens"
          f"{' (memory capped at 24 GiB)' if args.emulate_4090 else ''}")
    print(f"  {seconds:.1f} s a layer (mean after the first), peak {peak:.2f} GiB; whole run {report['seconds']:.0f} s")
    print(f"  {flops / 1e12:.0f} TFLOP a layer -> {efficiency:.2f} of the card's dense fp16 rate")
    print(f"  projected on one RTX 4090 at that efficiency: {on_4090:.0f} s a layer, "
          f"{on_4090 * full_layers / 3600:.2f} h for {full_layers} layers (plan assumes efficiency {gpu['gptq_efficiency']})")
    print(f"  perplexity (random weights, held-out windows): fp16 {report['perplexity']['base']:.1f} "
          f"-> 8-bit {report['perplexity']['quantized']:.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
