"""python -m pipeline.train NAME [--model DIR] [--data DIR] [--out DIR] [--steps N] [--budget ignore]

QLoRA on the quantized artifact, from the spec's [training] section. Run it
again after a crash or Ctrl-C and it resumes from the newest checkpoint; run it
once more after it finished and it says the adapter is up to date.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from packager.paths import REPO
from packager.spec import SpecError

from .. import stops
from ..cli import add_run_switches, command_again, run_stage, spec_with
from ..hub import SourceError, model_folder, weights_fingerprint
from packager.staging import staged_folder, write_json
from ..data.__main__ import DATA
from ..stops import Deadline
from . import checkpoint, curves, fast, plan
from .checkpoint import CheckpointError, Position
from .loop import StepResult, make_optimizer, make_scheduler, probe, train
from .model import ModelError, add_lora, load_base, trainable_parameters, weight_bytes
from .schedule import optimizer_steps

TRAIN = REPO / "build" / "train"
VERSIONS = ("torch", "transformers", "peft", "gptqmodel", "lion-pytorch", "bitsandbytes", "liger-kernel")


class TrainError(Exception):
    """A run that cannot start; the message names the problem and the fix."""


# --- 1. inputs ----------------------------------------------------------------------


def read_data(folder: Path, name: str) -> tuple[list[dict], str]:
    """The data stage's examples, refused unless its manifest (written only on success) is there and agrees."""
    manifest_file, parquet = folder / "manifest.json", folder / "train.parquet"
    if not manifest_file.is_file() or not parquet.is_file():
        raise TrainError(f"{folder} has no finished training set (manifest.json, train.parquet): run `make data-N` first")
    manifest = json.loads(manifest_file.read_text())
    if manifest.get("submission") != name:
        raise TrainError(f"{folder} was built for {manifest.get('submission')!r}, not {name!r}: run `make data-N`")
    from datasets import Dataset

    rows = Dataset.from_parquet(str(parquet)).select_columns(["input_ids", "labels"]).to_list()
    if len(rows) != manifest.get("examples"):
        raise TrainError(f"{parquet} holds {len(rows)} examples, its manifest says {manifest.get('examples')}: rebuild it")
    return rows, hashlib.sha256(manifest_file.read_bytes()).hexdigest()


def pad_token_id(folder: Path, token: str, eos_ids: list[int]) -> int:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    ids = tokenizer.convert_tokens_to_ids([token])
    if token not in tokenizer.get_vocab() or ids[0] is None:
        raise TrainError(f"pad_token {token!r} is not in {folder}'s vocabulary; set [training.schedule] pad_token")
    if ids[0] in eos_ids or ids[0] == tokenizer.eos_token_id:
        raise TrainError(f"pad_token {token!r} is end-of-text: padding would teach the model to stop; pick another")
    return ids[0]


def run_id(training, data_sha: str, base: Path) -> str:
    """What a checkpoint must share to be resumed: recipe (without checkpoint cadence or the path that computes
    its steps: both paths take the same steps), data, base weights."""
    recipe = training.model_dump(mode="json", exclude={"checkpoints", "data", "template", "humpback", "path"})
    blob = json.dumps({"recipe": recipe, "data": data_sha, "base": weights_fingerprint(base)}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def versions() -> dict[str, str | None]:
    found = {}
    for name in VERSIONS:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    return found


# --- 2. the run ---------------------------------------------------------------------


class Progress:
    """The progress bar, the JSONL log and the checkpoint cadence (every `every` steps or `minutes`, and at
    each epoch's end), called after every optimizer step; `save` also writes the checkpoint of a stop."""

    def __init__(self, out: Path, total: int, position: Position, model, optimizer, scheduler, cfg, rid: str, device):
        from tqdm import tqdm

        self.out, self.total, self.cfg, self.rid, self.device = out, total, cfg, rid, device
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.saved_step, self.saved_at = position.step, stops.now()
        self.log = out / "log.jsonl"
        rows = curves.read_log(self.log)
        kept = [r for r in rows if r["step"] <= position.step]
        if len(kept) < len(rows) or (self.log.is_file() and not self.log.read_text().endswith("\n")):
            # steps logged after the newest checkpoint were lost with the process that ran them (SIGKILL, power)
            self.log.write_text("".join(json.dumps(r) + "\n" for r in kept))
            if position.step:
                print(f"{self.log}: {len(rows) - len(kept)} steps logged after step {position.step} were lost with the "
                      f"process that trained them; they are trained again", flush=True)
        self.bar = tqdm(total=total, initial=position.step, unit="step", dynamic_ncols=True, file=sys.stderr)

    def __call__(self, position: Position, result: StepResult) -> None:
        import torch

        mem = torch.cuda.max_memory_allocated(self.device) / (1 << 30) if self.device.type == "cuda" else None
        row = {"step": position.step, "epoch": position.epoch if not result.end_of_epoch else position.epoch - 1,
               "loss": result.loss, "lr": result.lr, "tokens": result.tokens,
               "tokens_per_s": result.tokens / max(result.seconds, 1e-9), "seconds": result.seconds,
               "peak_gib": mem, "end_of_epoch": result.end_of_epoch}
        with self.log.open("a") as f:
            f.write(json.dumps(row) + "\n")
        post = {"loss": f"{result.loss:.4f}", "lr": f"{result.lr:.2e}", "tok/s": f"{row['tokens_per_s']:.0f}"}
        if mem is not None:
            post["mem"] = f"{mem:.1f}G"
        try:
            self.bar.set_postfix(post, refresh=False)
            self.bar.update(1)
        except (OSError, ValueError):
            self.bar.disable = True  # the terminal is gone (SIGHUP): training and saving go on
        minutes = self.cfg.minutes is not None and stops.now() - self.saved_at >= self.cfg.minutes * 60
        if result.end_of_epoch or position.step % self.cfg.every == 0 or position.step == self.total or minutes:
            self.save(position)

    def save(self, position: Position) -> Path:
        """The checkpoint of `position` (written whole or not at all); nothing to do if it is the newest."""
        folder = self.out / "checkpoints" / f"step-{position.step:06d}"
        if self.saved_step != position.step or not folder.is_dir():
            folder = checkpoint.save(self.out / "checkpoints", self.model, self.optimizer, self.scheduler, position,
                                     self.rid, self.cfg.keep)
            self.saved_step, self.saved_at = position.step, stops.now()
        return folder

    def close(self) -> None:
        try:
            self.bar.close()
        except (OSError, ValueError):
            pass


def run(args: argparse.Namespace) -> int:
    from ..convert import as_qwen2

    spec, spec_sha, training = spec_with(args, "training", "train")
    out = args.out or TRAIN / spec.name
    data = args.data or DATA / spec.name

    # the data set (the data stage's output) and the base model (the quantized artifact, Qwen2 layout)
    examples, data_sha = read_data(data, spec.name)
    base = as_qwen2(model_folder(spec.artifact.repo_id, spec.artifact.revision, args.model), out / "work")
    train_adapter(spec, spec_sha, training, examples, data_sha, base, out, Options.of(args))
    return 0


@dataclass(frozen=True)
class Options:
    """How a run is driven, apart from the recipe: the trainer's switches (also set by the Humpback stage)."""

    steps: int | None = None
    budget: str | None = None
    device: str = "auto"
    emulate_4090: bool = False
    deadline: Deadline | None = None
    onward: str | None = None  # the command that continues after a STEPS or deadline stop, as the user runs it

    @classmethod
    def of(cls, args: argparse.Namespace) -> "Options":
        onward = command_again("train", args.name, {"STEPS": "--steps", "DEADLINE": "--deadline"})
        return cls(args.steps, args.budget, args.device, args.emulate_4090, args.deadline, onward)


def train_adapter(spec, spec_sha: str, training, examples: list[dict], data_sha: str, base: Path, out: Path,
                  options: Options = Options(), plan_only: bool = False):
    """Train `training`'s LoRA on `examples` into `out` (resuming there); True once finished, False when
    stopped at `options.steps` or the deadline; a stop signal raises `stops.Stopped` once the checkpoint is saved.

    With `plan_only`, measure and return the 4090 projection (a `plan.Plan`) and train nothing:
    the Humpback stage sums its seed models' plans before it starts any of them.
    """
    import torch

    from helm_server.hf_engine import pick_device

    from ..device import emulate_4090

    pad_id = pad_token_id(base, training.schedule.pad_token, spec.generation.eos_token_ids)
    rid = run_id(training, data_sha, base)
    record = out / "run.json"
    previous = json.loads(record.read_text()) if record.is_file() else {}
    if previous.get("run_id") == rid and previous.get("finished") and not plan_only:
        print(f"{out / 'adapter'} is up to date (same recipe, data and base): nothing to train")
        return True
    resume = None if plan_only else checkpoint.latest(out / "checkpoints", rid)

    # 1. model, LoRA, optimizer, schedule over the true number of optimizer steps
    s = training.schedule
    total = optimizer_steps(len(examples), s.epochs, s.batch_size, s.gradient_accumulation)
    device = pick_device(options.device)
    if options.emulate_4090 and device.type == "cuda":
        emulate_4090(device, plan.cards()["target"]["memory_gib"])
    dtype = torch.float16 if spec.artifact.dtype == "auto" else getattr(torch, spec.artifact.dtype)
    torch.manual_seed(s.seed)
    model = add_lora(load_base(base, device, dtype), training.lora, s.gradient_checkpointing, spec.artifact.repo_id)
    params = [p for _, p in trainable_parameters(model)]
    trainable = sum(p.numel() for p in params)
    optimizer = make_optimizer(params, training.optimizer, device)
    scheduler = make_scheduler(optimizer, total, s)
    path = fast.resolve_path(training.path, device)  # the fast path on CUDA by default; the reference elsewhere
    offload = s.gradient_checkpointing  # the fast path keeps checkpointed layers' inputs in host memory
    how = f"{path} path" + (f", {fast.kernels_used(device, offload)}" if path == "fast" else "")
    print(f"{spec.name}: LoRA r={training.lora.r} on {training.lora.resolved()}: "
          f"{trainable:,} trainable parameters; {total} optimizer steps on {device} ({how})", flush=True)

    # 2. fresh start: measure, project onto one RTX 4090, refuse over budget; resume: restore everything
    if resume is None:
        measured = (fast.probe(model, examples, s, pad_id, device, offload=offload) if path == "fast"
                    else probe(model, examples, s, pad_id, device))
        cfg = model.config
        total_tokens = s.epochs * sum(len(e["input_ids"]) for e in examples)
        estimated = plan.estimate_memory(weight_bytes(model), trainable,
                                         plan.STATE_BYTES[training.optimizer.name], cfg.num_hidden_layers,
                                         cfg.hidden_size, cfg.vocab_size, measured.longest)
        projected = plan.project(measured, examples=len(examples), epochs=s.epochs, steps=total, total_tokens=total_tokens,
                                 parameters=sum(p.numel() for p in model.parameters()), trainable=trainable,
                                 optimizer=training.optimizer.name, estimated_bytes=estimated)
        for line in projected.lines():
            print(line, flush=True)
        if plan_only:
            return projected
        write_json(out / "plan.json", {"submission": spec.name, "probe": measured.__dict__, **projected.to_json()})
        plan.check(projected, options.budget, out / "plan.json")
        position = Position()
    else:
        position = checkpoint.load(resume, model, optimizer, scheduler)
        print(f"resuming from {resume} (step {position.step} of {total}, epoch {position.epoch + 1}); "
              f"{out / 'log.jsonl'} continues at step {position.step + 1}", flush=True)

    # 3. train, checkpointing as it goes; a stop (STEPS, a signal, the deadline) saves where it is
    out.mkdir(parents=True, exist_ok=True)  # only now: a refused run leaves no folder behind
    progress = Progress(out, total, position, model, optimizer, scheduler, training.checkpoints, rid, device)
    started = time.perf_counter()
    stop_at = None if options.steps is None else min(total, options.steps)
    with stops.requested(on_stop_request, options.deadline) as requests:
        why = None
        if stop_at is None or position.step < stop_at:
            position, why = train(model, optimizer, scheduler, examples, s, position, pad_id, device, progress, stop_at,
                                  requests.reason, fast.Step(pad_id, device, offload=offload) if path == "fast" else None)
        progress.close()
        finished = position.step >= total
        saved = progress.save(position) if position.step and not finished else None

        # 4. the adapter, the record, the curves
        with staged_folder(out / "adapter") as tmp:
            model.save_pretrained(tmp, save_embedding_layers=False)
        rows = curves.read_log(out / "log.jsonl")
        write_json(record, {
            "submission": spec.name, "run_id": rid, "spec_sha256": spec_sha, "data_manifest_sha256": data_sha,
            "base": spec.artifact.model_dump(mode="json"), "finished": finished, "steps": position.step,
            "total_steps": total, "epochs_done": position.epoch, "final_loss": rows[-1]["loss"] if rows else None,
            "seconds_this_session": round(time.perf_counter() - started, 1), "device": str(device),
            "versions": versions(), "stopped_by": None if finished else (why or "STEPS"),
        })
        if rows:
            curves.plot(rows, out / "curves.png", f"{spec.name}: QLoRA r={training.lora.r}, {training.optimizer.name}")
    if finished:
        print(f"finished: adapter in {out / 'adapter'}, log {out / 'log.jsonl'}, curves {out / 'curves.png'}")
        return True
    kept = f"checkpoint {saved}" if saved else "nothing trained yet"
    line = f"stopped by {why or 'STEPS'} at step {position.step} of {total}; {kept}, adapter in {out / 'adapter'}"
    if requests.signalled:
        raise stops.Stopped(requests.signum, line)
    print(f"{line}; continue with: {options.onward}" if options.onward else f"{line}; run again to continue")
    return False


def on_stop_request(name: str) -> None:
    stops.say(f"{name}: stopping at the next micro-batch and saving a checkpoint of the last finished step "
              f"({name} again abandons the save; the previous checkpoint stays)")


def deadline(text: str) -> Deadline:
    try:
        return Deadline.parse(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def main(argv: list[str] | None = None) -> int:
    from packager.paths import SUBMISSIONS

    p = argparse.ArgumentParser(prog="python -m pipeline.train", description=__doc__)
    p.add_argument("name", help="submission name (submissions/NAME/spec.toml)")
    p.add_argument("--submissions", default=str(SUBMISSIONS))
    p.add_argument("--model", type=Path, help="local quantized model folder (default: the spec's [artifact])")
    p.add_argument("--data", type=Path, help="the data stage's folder (default build/data/NAME)")
    p.add_argument("--out", type=Path, help="run folder (default build/train/NAME)")
    p.add_argument("--steps", type=int, help="stop after this many optimizer steps in all (smoke runs; run again to go on)")
    p.add_argument("--deadline", type=deadline, metavar="WHEN",
                   help="stop cleanly by then, checkpoint saved: a date-time (2026-12-02T18:00) or a duration (6h, 90m)")
    add_run_switches(p, "train even when the 4090 projection is over budget")
    args = p.parse_args(argv)
    if args.steps is not None and args.steps <= 0:
        p.error(f"--steps {args.steps}: must be a positive number of optimizer steps")
    for flag, value in (("MODEL", args.model), ("DATA", args.data)):
        if value is not None and not value.is_dir():
            print(f"error: {flag}={value}: not a folder", file=sys.stderr)
            return 2
    return run_stage(lambda: run(args), (SpecError, SourceError, TrainError, ModelError, CheckpointError,
                                         plan.BudgetError, ValueError),
                     f"continue with: {command_again('train', args.name)}")


if __name__ == "__main__":
    raise SystemExit(main())
