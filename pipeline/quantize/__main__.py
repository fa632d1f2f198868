"""python -m pipeline.quantize NAME [--model DIR] [--data-dir DIR] [--out DIR] [--dry-run] [--budget ignore]"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from pathlib import Path

from packager.budget import models_table
from packager.paths import REPO
from packager.spec import SpecError

from ..cli import check_local_inputs, run_stage, spec_with, stage_parser
from ..convert import ConvertError, as_qwen2
from ..device import emulate_4090
from ..hub import SourceError, dataset_files, model_folder, weights_fingerprint
from packager.staging import staged_folder, write_json
from .calibration import calibration_windows, heldout_windows, split_text, windows_sha256
from .plan import LayerShape, project

ARTIFACTS = REPO / "build" / "artifacts"
WORK = REPO / "build" / "quantize"
RECORD = "quantize.json"


class QuantizeError(Exception):
    """A run that cannot start or finish; the message names the problem and the fix."""


def parquet_pattern(config: str | None, split: str) -> str:
    return f"{config}/{split}-*.parquet" if config else f"**/{split}-*.parquet"


def split_token_ids(cal, split: str, tokenizer, data_dir: Path | None) -> list[int]:
    """One split of the calibration dataset, joined as the reference joined it, tokenized once."""
    files = dataset_files(cal.dataset, cal.revision, parquet_pattern(cal.config, split), data_dir)
    return tokenizer(split_text(files, cal.text_field), add_special_tokens=False, verbose=False)["input_ids"]


def inputs_sha256(spec, base: Path, local: bool, calibration: str, heldout: str) -> str:
    from importlib.metadata import version

    ref = {"local": weights_fingerprint(base)} if local else spec.base_model.model_dump()
    inputs = {
        "quantization": spec.quantization.model_dump(mode="json"),
        "base_model": ref,
        "calibration_sha256": calibration,
        "heldout_sha256": heldout,
        "gptqmodel": version("gptqmodel"),
    }
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()


def up_to_date(out: Path, inputs: str) -> bool:
    record = out / RECORD
    return record.is_file() and json.loads(record.read_text()).get("inputs_sha256") == inputs


def run(args: argparse.Namespace) -> int:
    spec, _, q = spec_with(args, "quantization", "quantize")
    out = args.out or ARTIFACTS / spec.name
    work = args.work or WORK / spec.name  # created by its first write: a refused run leaves nothing behind

    # 1. the base model, in the Qwen2 layout
    base = as_qwen2(model_folder(spec.base_model.repo_id, spec.base_model.revision, args.model), work)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base)
    config = json.loads((base / "config.json").read_text())

    # 2. calibration windows and held-out windows
    cal, ppl = q.calibration, q.perplexity
    cal_ids = split_token_ids(cal, cal.split, tokenizer, args.data_dir)
    offsets, windows = calibration_windows(cal_ids, cal.num_samples, cal.seq_len, cal.seed)
    heldout = heldout_windows(split_token_ids(cal, ppl.split, tokenizer, args.data_dir), ppl.windows, ppl.seq_len)
    calibration = {
        "dataset": cal.dataset, "revision": cal.revision, "config": cal.config, "split": cal.split,
        "text_tokens": len(cal_ids), "seq_len": cal.seq_len, "seed": cal.seed, "offsets": offsets,
        "sha256": windows_sha256(windows),
    }
    write_json(work / "calibration.json", {**calibration, "windows": windows})

    # 3. the plan: memory and time on one 4090
    plan = project(LayerShape.from_config(config), cal.num_samples, cal.seq_len, models_table()["gpu"])
    write_json(work / "plan.json", {"base": str(base), "out": str(out), "quantization": q.model_dump(mode="json"), **plan.as_dict()})
    print(plan.describe(), flush=True)
    if args.dry_run:
        print(f"dry run: calibration windows in {work / 'calibration.json'}, plan in {work / 'plan.json'}; nothing quantized")
        return 0
    if not plan.fits and args.budget != "ignore":
        raise QuantizeError(f"{plan.describe()}; lower calibration.num_samples or seq_len, or pass BUDGET=ignore")

    inputs = inputs_sha256(spec, base, args.model is not None, calibration["sha256"], windows_sha256(heldout))
    if up_to_date(out, inputs):
        print(f"{out} is up to date (same spec section, base model and calibration): skipped")
        return 0

    # 4. GPTQ, into a temporary sibling of OUT renamed into place when complete
    from helm_server.hf_engine import pick_device

    from .gptq import run_gptq
    from .report import scored, table

    device = pick_device(args.device)
    if args.emulate_4090 and device.type == "cuda":
        emulate_4090(device, models_table()["gpu"]["memory_gib"])
    with staged_folder(out) as tmp:
        started = time.perf_counter()
        print(f"quantizing {base} on {device}: {q.bits}-bit, group {q.group_size}, act-order {q.desc_act}", flush=True)
        stats = run_gptq(base, tmp, q, windows, device, log_dir=work / "logs")
        seconds = time.perf_counter() - started

        # 5. perplexity before and after, on held-out windows
        ppl_base = scored("fp16 base", base, device, heldout)
        ppl_quant = scored("quantized", tmp, device, heldout)
        report = {
            "inputs_sha256": inputs,
            "base": str(base),
            "quantization": q.model_dump(mode="json"),
            "calibration": calibration,
            "device": str(device),
            "seconds": round(seconds, 1),
            "plan": plan.as_dict(),
            "perplexity": {"split": ppl.split, "windows": len(heldout), "seq_len": ppl.seq_len,
                           "base": ppl_base, "quantized": ppl_quant},
            "layers": [vars(s) for s in stats],
        }
        write_json(tmp / "report.json", report)
        write_json(tmp / RECORD, {"inputs_sha256": inputs, "submission": spec.name})
    print(table(stats))
    if ppl_base is not None and ppl_quant is not None:
        print(f"perplexity on {len(heldout)} held-out windows: base {ppl_base:.3f} -> quantized {ppl_quant:.3f}")
    print(f"wrote {out} in {seconds:.0f} s (report: {out / 'report.json'})")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = stage_parser("python -m pipeline.quantize", __doc__, "local base model folder instead of the Hub download",
                     "artifact folder (default build/artifacts/NAME)")
    p.add_argument("--work", type=Path, help="calibration windows, plan, converted base (default build/quantize/NAME)")
    p.add_argument("--dry-run", action="store_true", help="write calibration windows and plan; quantize nothing")
    p.add_argument("--budget", choices=["check", "ignore"], default="check", help="refuse a run that cannot fit a 4090")
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    p.add_argument("--emulate-4090", action="store_true", help="cap GPU memory at 24 GiB (on a bigger card)")
    args = p.parse_args(argv)

    def checked_run() -> int:
        check_local_inputs(args)
        return run(args)

    return run_stage(checked_run, (QuantizeError, SpecError, SourceError, ConvertError, ValueError),
                     "run it again: the converted base and calibration windows are kept, GPTQ starts again "
                     "from the first layer (it keeps no state between layers that could be resumed)")


if __name__ == "__main__":
    raise SystemExit(main())
