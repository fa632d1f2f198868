"""python -m pipeline.humpback NAME [--model DIR] [--data-dir DIR] [--out DIR] [--passages N] [--budget ignore]

Humpback self-augmentation from the spec's [training.humpback] section, into OUT
(default build/humpback/NAME): seed/, passages/, backward/ and m0/ (trainer runs),
generated/, scored-1/ (and m1/, scored-2/), curated/ (the dataset) and manifest.json.
Run it again after an interruption: finished shards and training checkpoints are kept.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from packager.paths import REPO
from packager.spec import SpecError, rating_prompt

from ..cli import add_run_switches, check_local_inputs, run_stage, spec_with, stage_parser
from ..hub import SourceError, model_folder, weights_fingerprint
from ..train.__main__ import Options, TrainError, train_adapter
from ..train.checkpoint import CheckpointError
from ..train.model import ModelError, weight_bytes
from ..train.plan import BudgetError, cards
from . import curate, rate, seed
from .generate import (DoesNotFit, encode, engine_for, fits, generate, load, release, row_seed, rows_that_fit,
                       stage_length, stop_of)
from .passages import PassageError, c4_files, select
from .plan import HumpbackPlan, Timed, project_stage
from .shards import Manifest, digest, file_sha256, folder_sha256, read_rows, shard_path, split, write_rows

HUMPBACK = REPO / "build" / "humpback"

ENGINE = "static-engine, fp16 adapters"  # how shards are generated: part of their identity (other numerics, other text)


class HumpbackError(Exception):
    """A run that produced nothing usable; the message says where to look."""


class Run:
    """What every stage of one run shares: spec, folders, base model, tokenizer, device."""

    def __init__(self, args: argparse.Namespace):
        import torch
        from transformers import AutoTokenizer

        from helm_server.hf_engine import pick_device

        from ..convert import as_qwen2

        self.spec, self.spec_sha, self.training = spec_with(args, "training", "build Humpback data for")
        self.hb = self.training.humpback
        if self.hb is None:
            raise SpecError(f"{self.spec.name}: the spec has no [training.humpback] section: nothing to augment")
        self.rating_text = rating_prompt(self.spec, Path(args.submissions) / args.name)
        self.out = args.out or HUMPBACK / self.spec.name
        self.count = args.passages or self.hb.passages
        self.context = self.spec.generation.context_length  # a prompt and its new tokens must fit the model's window
        self.args = args
        self.manifest = Manifest(self.out / "manifest.json", self.spec.name)
        self.base = as_qwen2(model_folder(self.spec.artifact.repo_id, self.spec.artifact.revision, args.model),
                             self.out / "work")
        self.tokenizer = AutoTokenizer.from_pretrained(self.base)
        self.device = pick_device(args.device)
        if args.emulate_4090 and self.device.type == "cuda":  # before any stage: rows are sized under the cap
            from ..device import emulate_4090

            emulate_4090(self.device, cards()["target"]["memory_gib"])
        self.dtype = torch.float16 if self.spec.artifact.dtype == "auto" else getattr(torch, self.spec.artifact.dtype)
        self.forward_template = self.training.template.for_source("oasst1")
        self.options = Options(budget=args.budget, device=args.device, emulate_4090=args.emulate_4090)
        # The seed models train with the spec's recipe for `seed_epochs` epochs.
        schedule = self.training.schedule.model_copy(update={"epochs": self.hb.seed_epochs})
        self.seed_training = self.training.model_copy(update={"schedule": schedule})

    # --- prompts: the text each model was trained on, up to where it answers ---------------------

    def backward_prompt(self, passage: str) -> list[int]:
        return encode([t for t, _ in seed.backward_pieces(self.hb.backward_template, passage)], self.tokenizer)

    def rating_prompt(self, instruction: str, passage: str) -> list[int]:
        t = self.forward_template
        return encode([t.system, t.prompt.format(prompt=rate.request(self.rating_text, instruction, passage))],
                      self.tokenizer)


# --- 1. seed pairs and passages ---------------------------------------------------------


def seed_sets(run: Run) -> tuple[list[dict], list[dict], list[dict]]:
    pairs, account = seed.pairs(run.hb.seed, run.args.data_dir)
    write_rows(run.out / "seed" / "pairs.jsonl", pairs)
    max_length = run.training.schedule.max_length
    forward = seed.forward_rows(pairs, run.forward_template, run.tokenizer, max_length)
    backward = seed.backward_rows(pairs, run.hb.backward_template, run.tokenizer, max_length)
    run.manifest.set("seed", **account)
    print(f"seed: {len(pairs)} oasst1 pairs ({account['rows_read']} rows read)", flush=True)
    return pairs, forward, backward


def passages(run: Run) -> list[list[dict]]:
    """The passages in shards, chosen once per (C4 files, filters, count) and reused after."""
    hb, folder = run.hb, run.out / "passages"
    files = c4_files(hb.unlabelled, run.args.data_dir)
    inputs = digest(hb.unlabelled.model_dump(), hb.min_chars, hb.max_chars, run.count, hb.shard_size,
                    [file_sha256(f) for f in files])
    n = -(-run.count // hb.shard_size)
    if all(run.manifest.done("passages", i, inputs, shard_path(folder, i)) for i in range(n)):
        print(f"passages: {run.count} in {n} shards (reused)", flush=True)
    else:
        print(f"passages: reading {len(files)} C4 file(s) for {run.count} passages", flush=True)
        started = time.perf_counter()
        chosen, read, dropped = select(files, run.count, hb.min_chars, hb.max_chars)
        for i, rows in enumerate(split(chosen, hb.shard_size)):
            write_rows(shard_path(folder, i), rows)
            run.manifest.record("passages", i, inputs, shard_path(folder, i), len(rows), time.perf_counter() - started)
        run.manifest.set("passages", documents_read=read, dropped=dict(dropped), passages=len(chosen))
        print(f"passages: {len(chosen)} of {read} documents (dropped: {dict(dropped)})", flush=True)
    run.manifest.forget_beyond("passages", folder, n)
    return [read_rows(shard_path(folder, i)) for i in range(n)]


# --- 2. the plan: every stage projected onto one RTX 4090 before any starts -----------------


def stage_engine(run: Run, model, stage: str, length: int, rows: int | None = None):
    """The serving engine over `rows` slots (default: as many as fit, up to batch_size) of `length` positions."""
    from helm_server.static_engine import UnsupportedModel

    rows = rows or rows_that_fit(model, run.device, length, run.hb.batch_size)
    print(f"{stage}: {rows} rows of {length} cache positions (batch_size {run.hb.batch_size})", flush=True)
    try:
        return engine_for(model, run.tokenizer, run.device, run.spec.generation.eos_token_ids, rows, length)
    except UnsupportedModel as e:
        raise HumpbackError(f"Humpback generates with the static engine, which cannot run this base: {e.args[0]}") from e


def timed_batch(run: Run, model, stage: str, prompts: list[list[int]], max_new_tokens: int, reserve: int = 0,
                **sampling) -> Timed:
    """One batch of the stage's engine with its sampling, every row run to max_new_tokens (the worst case);
    `reserve` more positions per row for text the prompts will hold (the rating's instruction)."""
    import torch

    fitting = [p for p in prompts if fits(p, max_new_tokens + reserve, run.context)]
    if not fitting:
        raise HumpbackError(f"{stage}: none of the {len(prompts)} prompts fits the model's {run.context} positions with "
                            f"{max_new_tokens + reserve} new tokens: lower max_chars or the stage's max_new_tokens")
    engine = stage_engine(run, model, stage, stage_length(fitting, max_new_tokens + reserve, run.context))
    batch = fitting[: len(engine.slots.caches)]
    generate(engine, batch[:1], [0], stops=[], max_new_tokens=2, exact_length=True, **sampling)  # warm-up
    if run.device.type == "cuda":
        torch.cuda.synchronize(run.device)
    started = time.perf_counter()
    generate(engine, batch, list(range(len(batch))), stops=[], max_new_tokens=max_new_tokens, exact_length=True,
             **sampling)
    if run.device.type == "cuda":
        torch.cuda.synchronize(run.device)
    seconds = time.perf_counter() - started
    del engine
    release()
    return Timed(stage, len(batch), seconds, max_new_tokens, sum(map(len, batch)))


def plan(run: Run, shards: list[list[dict]], forward: list[dict], backward: list[dict]) -> None:
    import torch

    hb = run.hb
    inputs = digest(hb.model_dump(), run.count, seed.rows_sha256(forward), seed.rows_sha256(backward),
                    weights_fingerprint(run.base), str(run.device), run.context, ENGINE)
    saved = run.manifest.stage("plan")
    if saved.get("inputs") != inputs:
        print("plan: measuring the seed models' training and one batch of each generation stage", flush=True)
        hours = 0.0
        for rows, folder in ((backward, "backward"), (forward, "m0")):
            projected = train_adapter(run.spec, run.spec_sha, run.seed_training, rows, seed.rows_sha256(rows), run.base,
                                      run.out / folder, run.options, plan_only=True)
            hours += projected.hours_4090
        if hb.iterations == 2:
            hours += projected.hours_4090  # M1 trains on the seed set and the curated pairs: at least M0's time
        model = load(run.base, None, run.device, run.dtype, fresh_lora=run.training.lora)
        every = [p for shard in shards for p in shard]
        # The rating prompt's instruction is not written yet: its whole budget of new tokens is reserved.
        timed = [timed_batch(run, model, "generated", [run.backward_prompt(p["text"]) for p in every],
                             hb.generate.max_new_tokens, temperature=hb.generate.temperature, top_p=hb.generate.top_p),
                 timed_batch(run, model, "scored", [run.rating_prompt("", p["text"]) for p in every],
                             hb.rating.max_new_tokens, reserve=hb.generate.max_new_tokens)]
        name = torch.cuda.get_device_name(run.device) if run.device.type == "cuda" else "cpu"
        size = weight_bytes(model)
        del model
        release()
        stages = [project_stage(t, run.count, name, size) for t in timed]
        if hb.iterations == 2:
            stages.append(project_stage(timed[1], run.count, name, size))
            stages[-1].stage = "scored-2"
        projected = HumpbackPlan(hours, stages, cards()["target"]["hours"])
        for line in projected.lines():
            print(line, flush=True)
        run.manifest.set("plan", inputs=inputs, **projected.to_json(), lines=projected.lines(),
                         probe=[t.__dict__ for t in timed])
        saved = run.manifest.stage("plan")
    else:
        print(saved["lines"][-1] + " (measured before; in manifest.json)", flush=True)
    if saved["hours_4090"] > saved["budget_hours"] and run.args.budget != "ignore":
        raise BudgetError(f"Humpback: projected {saved['hours_4090']:.1f} h on one RTX 4090, over the challenge's "
                          f"{saved['budget_hours']:.0f} h (plan in {run.manifest.path}); lower passages or "
                          "max_new_tokens, or run anyway with BUDGET=ignore")


# --- 3. the models -------------------------------------------------------------------------


def trained(run: Run, rows: list[dict], folder: str) -> Path:
    """A trainer run of the seed recipe in OUT/folder (resumed or reused); its adapter."""
    out = run.out / folder
    print(f"{folder}: training on {len(rows)} examples", flush=True)
    train_adapter(run.spec, run.spec_sha, run.seed_training, rows, seed.rows_sha256(rows), run.base, out, run.options)
    return out / "adapter"


# --- 4. generation through the serving engine, shard by shard ---------------------------------


def sharded(run: Run, stage: str, source: str, inputs: list[list[dict]], adapter: Path, make_prompt, to_row, *,
            seed: int, template: object, max_new_tokens: int, **sampling) -> list[list[dict]]:
    """Generate for every row of every input shard (stage `source`'s) whose output shard is not done yet.

    A prompt that does not fit the model's context with its new tokens is left out of the output
    shard and counted (`too_long`). A shard's identity: its input shard's hash, the adapter's files,
    the template, the sampling settings, the seed, and the engine's shape (rows and slot length: in
    half precision a row's numbers depend on the step it shares). The rows are sized once, recorded
    in the manifest and kept on later runs while they still fit, so a resumed stage runs as the
    first run did."""
    from tqdm import tqdm

    folder = run.out / stage
    adapter_sha = folder_sha256(adapter)
    prompts = [[make_prompt(r) for r in rows] for rows in inputs]
    kept = [[j for j, p in enumerate(ps) if fits(p, max_new_tokens, run.context)] for ps in prompts]
    length = stage_length([p for ps in prompts for p in ps], max_new_tokens, run.context)

    def identities(rows: int | None) -> list[str | None]:
        return [digest(stage, run.manifest.stage(source)["shards"][str(i)]["sha256"], adapter_sha, template, sampling,
                       max_new_tokens, seed, rows, length, ENGINE) if rows else None
                for i in range(len(inputs))]

    shape = run.manifest.stage(stage).get("engine") or {}
    pinned = shape.get("rows") if shape.get("positions") == length and shape.get("cap") == run.hb.batch_size else None
    wanted = identities(pinned)
    todo = [i for i in range(len(inputs)) if not (pinned and run.manifest.done(stage, i, wanted[i], shard_path(folder, i)))]
    run.manifest.forget_beyond(stage, folder, len(inputs))
    too_long = sum(len(ps) - len(ks) for ps, ks in zip(prompts, kept))
    total = sum(map(len, inputs))
    if todo:
        release()  # what the seed models' training left behind: the rows are sized on free memory
        model = load(run.base, adapter, run.device, run.dtype)
        rows = rows_that_fit(model, run.device, length, pinned or run.hb.batch_size)
        if pinned and rows < pinned:
            print(f"{stage}: {pinned} rows ran before, {rows} fit now: every shard is generated again", flush=True)
            todo = list(range(len(inputs)))
        wanted = identities(rows)
        run.manifest.set(stage, engine={"rows": rows, "positions": length, "cap": run.hb.batch_size})
        engine = stage_engine(run, model, stage, length, rows)
        bar = tqdm(total=total, initial=total - sum(len(inputs[i]) for i in todo), unit="passage", desc=stage,
                   dynamic_ncols=True, file=sys.stderr)
        for i in todo:
            started = time.perf_counter()
            texts = generate(engine, [prompts[i][j] for j in kept[i]], [row_seed(seed, i, j) for j in kept[i]],
                             max_new_tokens=max_new_tokens, done=lambda _: bar.update(1), **sampling)
            bar.update(len(inputs[i]) - len(kept[i]))
            write_rows(shard_path(folder, i), [to_row(inputs[i][j], t) for j, t in zip(kept[i], texts)])
            run.manifest.record(stage, i, wanted[i], shard_path(folder, i), len(kept[i]), time.perf_counter() - started,
                                too_long=len(inputs[i]) - len(kept[i]), engine_rows=rows)
        bar.close()
        del engine, model
        release()
    else:
        print(f"{stage}: {total} passages in {len(inputs)} shards (reused)", flush=True)
    if too_long:
        print(f"{stage}: {too_long} prompt(s) with their {max_new_tokens} new tokens do not fit the model's "
              f"{run.context} positions: left out (too_long in {run.manifest.path})", flush=True)
    run.manifest.set(stage, too_long=too_long)
    return [read_rows(shard_path(folder, i)) for i in range(len(inputs))]


def instructions(run: Run, shards: list[list[dict]], backward: Path) -> list[list[dict]]:
    g, template = run.hb.generate, run.hb.backward_template
    return sharded(run, "generated", "passages", shards, backward, lambda p: run.backward_prompt(p["text"]),
                   lambda p, text: {"id": p["id"], "url": p["url"], "instruction": text, "output": p["text"]},
                   seed=g.seed, template=template.model_dump(), temperature=g.temperature, top_p=g.top_p,
                   max_new_tokens=g.max_new_tokens, stops=stop_of(template.prompt))


def ratings(run: Run, stage: str, generated: list[list[dict]], rater: Path) -> list[dict]:
    """Every pair with its rater's verdict: score (None when unparseable) and the raw rating."""
    scored = sharded(run, stage, "generated", generated, rater, lambda g: run.rating_prompt(g["instruction"], g["output"]),
                     lambda g, text: {"id": g["id"], "score": rate.parse_score(rate.verdict(text)), "rating": text},
                     seed=0, template=[run.rating_text, run.forward_template.model_dump()], temperature=0.0,
                     max_new_tokens=run.hb.rating.max_new_tokens, stops=stop_of(run.forward_template.prompt))
    verdicts = {s["id"]: s for ss in scored for s in ss}  # a pair whose rating prompt did not fit has none
    return [{**g, **verdicts[g["id"]]} for gs in generated for g in gs if g["id"] in verdicts]


# --- 5. the whole run ----------------------------------------------------------------------


def curated(run: Run, stage: str, pairs: list[dict]) -> list[dict]:
    kept = curate.select(pairs, run.hb.rating.threshold)
    histogram = curate.histogram(pairs)
    run.manifest.set(stage, histogram=histogram, kept=len(kept), threshold=run.hb.rating.threshold,
                     examples=curate.examples_by_score(pairs))
    print(f"{stage}: scores {histogram}; kept {len(kept)} at >= {run.hb.rating.threshold}", flush=True)
    return kept


def run_all(args: argparse.Namespace) -> int:
    run = Run(args)
    print(f"{run.spec.name}: Humpback on {run.count} passages into {run.out} ({run.device})", flush=True)
    pairs, forward, backward = seed_sets(run)
    shards = passages(run)
    plan(run, shards, forward, backward)

    backward_adapter = trained(run, backward, "backward")
    m0 = trained(run, forward, "m0")
    generated = instructions(run, shards, backward_adapter)
    kept = curated(run, "scored-1", ratings(run, "scored-1", generated, m0))
    if run.hb.iterations == 2:
        web = seed.forward_rows(kept, run.training.template.for_source("humpback"), run.tokenizer,
                                run.training.schedule.max_length)
        m1 = trained(run, forward + web, "m1")
        kept = curated(run, "scored-2", ratings(run, "scored-2", generated, m1))

    if not kept:
        raise HumpbackError(f"no pair was rated {run.hb.rating.threshold} or higher (score histogram and example ratings "
                            f"in {run.manifest.path}); curated/ was not written: check the seed model and the rating "
                            "prompt, or lower [training.humpback.rating] threshold")
    curate.write_dataset(run.out / "curated", kept, {"submission": run.spec.name, "seed": len(pairs),
                                                      "passages": run.count, "threshold": run.hb.rating.threshold})
    run.manifest.set("curated", rows=len(kept), iteration=run.hb.iterations, folder=str(run.out / "curated"))
    print(f"wrote {run.out / 'curated'}: {len(kept)} pairs (make data-N reads them; make publish-humpback-N uploads them)")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = stage_parser("python -m pipeline.humpback", __doc__, "local quantized model folder (default: the spec's [artifact])",
                     "output folder (default build/humpback/NAME)")
    p.add_argument("--passages", type=int, help="passages to augment (default: the spec's; small runs)")
    add_run_switches(p, "run even when the 4090 projection is over the day")
    args = p.parse_args(argv)
    if args.passages is not None and args.passages <= 0:
        p.error(f"--passages {args.passages}: must be a positive number")
    def body() -> int:
        check_local_inputs(args)
        return run_all(args)

    return run_stage(body, (SpecError, SourceError, PassageError, HumpbackError, DoesNotFit, TrainError, ModelError,
                            CheckpointError, BudgetError, ValueError),
                     "run it again to continue; finished shards and training checkpoints are kept")


if __name__ == "__main__":
    raise SystemExit(main())
