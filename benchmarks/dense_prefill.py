"""Marlin against dequantize-then-cuBLAS for the projections of one layer, over the positions of a prefill pass.

Loads an 8-bit GPTQ model with the server's loader (Marlin; the image's prebuilt kernels when HELM_SERVER_KERNELS
is set), takes the first layer's seven projections and times, for each number of rows (positions per pass),
Marlin's product and the dense path (helm_server/dense_prefill.py: the weight dequantized into a scratch buffer,
then cuBLAS), CUDA events, median of `--repeats`. Prints per row count the layer's time on each path, the dense
path's time less the dequantization timed alone (its GEMMs), FLOP/s against the card's dense fp16 rate, the
dequantization's bytes/s against the bandwidth, then the smallest row count from which dense is faster:
`DENSE_FROM`'s entry for this card.

    python benchmarks/dense_prefill.py --model /tmp/m14
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "docker" / "inference"), str(REPO / "benchmarks")]

from helm_server.dense_prefill import AGREE, MarlinDense, agrees, dense_linears  # noqa: E402

PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
               "mlp.up_proj", "mlp.down_proj")  # one decoder layer's, on a freshly loaded (unfused) model
ROWS = (16, 32, 64, 128, 192, 256, 384, 512, 1024)


def timed(fn, repeats: int) -> float:
    """Median seconds of `fn` on the GPU (CUDA events), after two warm-up calls."""
    fn(), fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, required=True,
                   help="an 8-bit GPTQ folder (benchmarks/train_shape.py build_gptq)")
    p.add_argument("--rows", default=",".join(map(str, ROWS)), help="positions per pass to time, comma-separated")
    p.add_argument("--repeats", type=int, default=20)
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("dense_prefill.py times GPU kernels: run it on a GPU machine")
    try:
        rows_list = [int(r) for r in args.rows.split(",")]
    except ValueError:
        rows_list = []
    if not rows_list or min(rows_list) < 1:
        raise SystemExit(f"--rows {args.rows!r}: give positive integers, comma-separated")
    if args.repeats < 1:
        raise SystemExit(f"--repeats {args.repeats}: give at least 1")
    if not (args.model / "config.json").is_file():
        raise SystemExit(f"--model {args.model}: no config.json (build one with benchmarks/helm_mix.py --gptq DIR)")
    from gptq_kernels import load
    from helm_mix import gpu_figures

    name, (bandwidth, flops) = gpu_figures()
    model = load(args.model, "marlin")
    layer = model.model.layers[0]
    modules = [layer.get_submodule(n) for n in PROJECTIONS]
    device = modules[0].qweight.device
    dense = dense_linears(modules, torch.float16, device)
    if dense is None or not all(isinstance(d, MarlinDense) for d in dense):
        raise SystemExit(f"{args.model}: its projections are not all 8-bit Marlin layers the dense path supports")
    for n, module, d in zip(PROJECTIONS, modules, dense):
        off = agrees(module, d)
        print(f"{n}: dense against Marlin, relative difference {off:.2e} ({'ok' if off <= AGREE else 'OFF'})")
    weights = sum(m.in_features * m.out_features for m in modules)
    print(f"{name}: one layer, {weights / 1e6:.0f}M weights in {len(modules)} projections; spec {flops / 1e12:.0f} "
          f"TFLOP/s dense fp16, {bandwidth / 1e12:.1f} TB/s")
    dequant = timed(lambda: [d.weight() for d in dense], args.repeats)
    moved = sum(m.in_features * m.out_features * 3 for m in modules)  # codes read, fp16 written
    print(f"dequantize the layer: {dequant * 1e3:.3f} ms, {moved / dequant / 1e9:.0f} GB/s moved "
          f"(3 bytes per weight) = {100 * moved / dequant / bandwidth:.0f}% of the bandwidth")
    print(f"{'rows':>6} {'Marlin ms':>10} {'TFLOP/s':>8} {'dense ms':>9} {'- dequant':>9} {'TFLOP/s':>8} "
          f"{'dense/Marlin':>13}")
    crossover = None
    for rows in rows_list:
        inputs = [torch.randn(rows, m.in_features, device=device, dtype=torch.float16) for m in modules]
        with torch.inference_mode():
            marlin = timed(lambda: [m(i) for m, i in zip(modules, inputs)], args.repeats)
            both = timed(lambda: [d(i) for d, i in zip(dense, inputs)], args.repeats)
        work = 2 * rows * weights
        ratio = both / marlin
        if ratio < 1 and crossover is None:
            crossover = rows
        elif ratio >= 1:
            crossover = None  # dense must stay faster from the crossover on
        print(f"{rows:>6} {marlin * 1e3:>10.3f} {work / marlin / 1e12:>8.0f} {both * 1e3:>9.3f} "
              f"{(both - dequant) * 1e3:>9.3f} {work / max(both - dequant, 1e-9) / 1e12:>8.0f} {ratio:>13.2f}")
    print(f"dense from {crossover} positions per pass" if crossover else "dense is not faster at any row count timed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
