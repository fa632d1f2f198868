"""HELM's request mix: the challenge's sample run specs replayed with synthetic prompts, per decode engine.

Every run of `evaluation/confs/challenge_sample.conf` becomes requests shaped as HELM's
adapters send them (crfm-helm 0.5.16's run spec functions, summarized in SCENARIOS): a
prefix shared by the run (instructions and in-context examples), a question per instance,
HELM's max_tokens, stop sequences and temperature. Answers run to a realistic length (on a
random-weight model the stop sequence would never come, so max_new_tokens is the answer length).
A few runs of each scenario are timed; the whole conf is projected from their per-request
means, then to an RTX 4090 (prefill scaled by fp16 throughput, decode by memory bandwidth).

In process on a GPU (the engines side by side, one model, one run):

    python benchmarks/helm_mix.py --shape qwen-14b --engines reference,hf,static,static-noreuse --decode
    python benchmarks/helm_mix.py --gptq DIR --lora 64 --context 4096 --emulate-4090 --engines hf,static --decode

Against a running submission (`make helm-mix URL=http://127.0.0.1:8080`):

    python benchmarks/helm_mix.py --url http://127.0.0.1:8080
    python benchmarks/helm_mix.py --url http://127.0.0.1:8080 --concurrency 4   # as HELM sends them
    python benchmarks/helm_mix.py --gptq DIR --engines static,static-batch4 --concurrency 4   # batched, in process
    python benchmarks/helm_mix.py --gptq DIR --engines static,static-batch4-serial,static-batch4 --concurrency 4

`--concurrency N` keeps N requests in flight (HELM's client sends up to 4 at once; a server with
`[server] max_batch` > 1 decodes them together; in process, `static-batchN` is the static engine with
N cache slots behind the server's batch scheduler, and the other engines still run one request at a
time, so both sides of the comparison are in one run; `static-batchN-serial` opens the requests admitted
together one at a time with no prefix copied between slots, as the engine did before `open_all`;
`-nogather` admits whoever waits at once, as the scheduler did before it waited for the clients it had
just answered). Each request is then counted for its share of the
wall clock (its latency x wall / summed latencies), so the projection is of throughput.

`reference` is the reference solution's server path, reimplemented: `generate(do_sample=True,
top_k=200, temperature=max(T, 1e-3), output_scores=True)`, a per-token stopping check, then a
full-vocabulary softmax of every step's scores.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import statistics
import sys
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "benchmarks"), str(REPO / "docker" / "inference")]

from evaluation.conf import CHALLENGE_SAMPLE, ConfError, RunEntry, read_conf  # noqa: E402
from gptq_kernels import bytes_per_token  # noqa: E402

BUDGET_S = 2 * 3600  # the challenge's limit for the sample evaluation on one 4090
EOS = 151643


@dataclass(frozen=True)
class Shape:
    """One scenario's requests. Token counts are typical of the real prompts (HELM's adapters)."""

    prefix: int  # instructions + in-context examples, identical for every request of a run
    question: int
    answer: int  # tokens a real answer runs to before its stop sequence
    max_tokens: int  # what HELM asks for
    stop: tuple[str, ...]
    temperature: float
    echo: bool = False


SCENARIOS = {
    # multiple_choice_joint, 5 shots, max_tokens 1, stop "\n", temperature 0 (perturbed copies: evaluation/conf.py)
    "mmlu": Shape(prefix=520, question=110, answer=1, max_tokens=1, stop=("\n",), temperature=0.0),
    "bbq": Shape(prefix=600, question=150, answer=1, max_tokens=1, stop=("\n",), temperature=0.0),
    "truthful_qa": Shape(prefix=420, question=90, answer=1, max_tokens=1, stop=("\n",), temperature=0.0),
    # generation, 5 shots of worked solutions, max_tokens 400, stop "\n\n"
    "gsm": Shape(prefix=900, question=90, answer=120, max_tokens=400, stop=("\n\n",), temperature=0.0),
    # summarization: 5 shots of <=512-token articles cut to the window, max_tokens 128, temperature 0.3, stop "###"
    "summarization_cnndm": Shape(prefix=1400, question=450, answer=70, max_tokens=128, stop=("###",), temperature=0.3),
    # max_tokens 64, temperature 0; run with 0, 1, 2 and 3 shots (evaluation/conf.py): the prefix is their mean
    "big_bench": Shape(prefix=180, question=90, answer=12, max_tokens=64, stop=(), temperature=0.0),
}
# Echo-only scoring (max_tokens 0): HELM's language-modeling and separate multiple-choice adapters. The sample conf
# has none; it is timed and reported, never added to the conf's total.
SCORING = Shape(prefix=0, question=400, answer=0, max_tokens=0, stop=(), temperature=0.0, echo=True)

# Spec-sheet figures: HBM bandwidth (bytes/s) and dense fp16 tensor throughput with fp32 accumulation (FLOP/s).
GPUS = {
    "H200": (4.8e12, 989e12),
    "H100 PCIe": (2.0e12, 756e12),
    "H100": (3.35e12, 989e12),
    "A100": (2.0e12, 312e12),
    "RTX 4090": (1.008e12, 165e12),
}
RTX_4090 = GPUS["RTX 4090"]

WORDS = ("the of and to in is was for that on as with by at from his an were are which this be has or had one "
         "not but first new after who they have her she two been other when there all during into school time may "
         "years more most only over city some world would where later up such used many can state about national "
         "out known university united then made").split()


@dataclass
class Request:
    scenario: str
    run: str
    prompt: str
    max_new_tokens: int
    stop: tuple[str, ...]
    temperature: float
    echo: bool


def words(n: int, rng: random.Random) -> str:
    """About n tokens of text: common English words are one token each in Qwen's vocabulary."""
    return "".join(" " + rng.choice(WORDS) for _ in range(n))


def requests_of(entry: RunEntry, shape: Shape, instances: int, scenario: str) -> list[Request]:
    rng = random.Random(entry.description)
    prefix = words(shape.prefix, rng) + "\n\n" if shape.prefix else ""
    out = []
    for _ in range(instances * entry.requests_per_instance):
        prompt = prefix + words(shape.question, rng) + "\nAnswer:"
        out.append(Request(scenario, entry.description, prompt, shape.answer, shape.stop, shape.temperature, shape.echo))
    return out


def the_mix(conf: Path, runs: int, instances: int) -> tuple[list[Request], dict[str, int]]:
    """Timed requests (the first `runs` runs of each scenario, `instances` each) and each scenario's full count."""
    entries = read_conf(conf)
    totals: dict[str, int] = defaultdict(int)
    taken: dict[str, int] = defaultdict(int)
    timed: list[Request] = []
    for entry in entries:
        shape = SCENARIOS.get(entry.scenario)
        if shape is None:
            raise SystemExit(f"{conf}: scenario {entry.scenario!r} has no shape in SCENARIOS; add one")
        totals[entry.scenario] += entry.requests(default_instances=1)
        if taken[entry.scenario] < runs:
            taken[entry.scenario] += 1
            timed += requests_of(entry, shape, min(instances, entry.max_eval_instances or 1), entry.scenario)
    scoring = RunEntry("scoring:model=neurips/local", 1)
    timed += requests_of(scoring, SCORING, instances, "scoring (echo)")
    return timed, dict(totals)


def sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


# --- ways to serve one request: (seconds, prompt tokens, new tokens) ------------------------------

Serve = Callable[[Request], tuple[float, int, int]]


def http_server(url: str) -> Serve:
    import requests

    def serve(r: Request) -> tuple[float, int, int]:
        body = {"prompt": r.prompt, "max_new_tokens": r.max_new_tokens, "temperature": r.temperature or 1e-7,
                "stop_sequences": list(r.stop), "echo_prompt": r.echo, "top_k_per_token": 1, "num_return_sequences": 1}
        started = time.perf_counter()
        try:
            answer = requests.post(f"{url}/process", json=body, timeout=600)
        except requests.RequestException as e:
            raise SystemExit(f"error: {url}/process: {e}; is the submission running (make serve-N)?") from None
        seconds = time.perf_counter() - started
        if answer.status_code != 200:
            raise SystemExit(f"{url}/process answered {answer.status_code}: {answer.text[:300]}")
        tokens = answer.json()["tokens"]
        return seconds, 0, len(tokens) if not r.echo else 0

    return serve


def in_process(engine, settings, batcher=None) -> Serve:
    """The server's own request path (CompletionService), without HTTP; with a `batcher`, as the server
    runs it with `[server] max_batch` > 1 (requests from any thread decode together)."""
    from helm_server.api import ProcessRequest
    from helm_server.deadline import unlimited
    from helm_server.service import CompletionService

    service = CompletionService(engine, settings, batcher.submit if batcher else None)

    def serve(r: Request) -> tuple[float, int, int]:
        req = ProcessRequest(prompt=r.prompt, max_new_tokens=r.max_new_tokens, temperature=r.temperature or 1e-7,
                             stop_sequences=list(r.stop) or None, echo_prompt=r.echo)
        sync()
        started = time.perf_counter()
        outcome = service.process(req, unlimited())
        sync()
        return time.perf_counter() - started, outcome.prompt_tokens, outcome.new_tokens

    return serve


def reference_path(model, tokenizer) -> Serve:
    """The reference solution's /process, reimplemented (see the module docstring)."""
    import torch
    from transformers import StoppingCriteria

    class StopOnLastToken(StoppingCriteria):
        def __init__(self, stops):
            self.stops = stops

        def __call__(self, input_ids, scores, **kwargs) -> bool:
            last = tokenizer.decode(input_ids[0, -1:])
            return any(s in last for s in self.stops)

    @torch.inference_mode()
    def serve(r: Request) -> tuple[float, int, int]:
        sync()
        started = time.perf_counter()
        ids = tokenizer(r.prompt, return_tensors="pt")["input_ids"].to(model.device)
        if r.max_new_tokens == 0:  # the reference could not answer max_tokens 0; its cost floor is one forward
            logits = model(ids).logits
            torch.log(logits.float().softmax(-1)).gather(-1, ids[..., None]).tolist()
            sync()
            return time.perf_counter() - started, ids.shape[1], 0
        out = model.generate(ids, max_new_tokens=r.max_new_tokens, min_new_tokens=min(1, r.max_new_tokens),
                             do_sample=True, temperature=max(r.temperature, 1e-3), top_k=200, eos_token_id=[EOS],
                             pad_token_id=EOS, stopping_criteria=[StopOnLastToken(list(r.stop))],
                             return_dict_in_generate=True, output_scores=True)
        log_probs = torch.log(torch.stack(out.scores, dim=1).softmax(-1))
        generated = out.sequences[:, ids.shape[1]:]
        chosen = log_probs.gather(2, generated[:, :, None]).squeeze(-1)
        best = log_probs.argmax(-1)
        texts = [tokenizer.decode([t]) for t in generated[0].tolist()] + [tokenizer.decode([t]) for t in best[0].tolist()]
        _ = (chosen.tolist(), texts)
        sync()
        return time.perf_counter() - started, ids.shape[1], generated.shape[1]

    return serve


# --- measurements ---------------------------------------------------------------------------------


def run_mix(serve: Serve, timed: list[Request], concurrency: int = 1) -> dict[str, list[tuple[float, int, int]]]:
    for scenario in dict.fromkeys(r.scenario for r in timed):  # warm-up, not timed: first use of each shape
        serve(next(r for r in timed if r.scenario == scenario))
    if concurrency > 1:
        return run_concurrently(serve, timed, concurrency)
    results: dict[str, list[tuple[float, int, int]]] = defaultdict(list)
    for i, r in enumerate(timed):
        results[r.scenario].append(serve(r))
        print(f"\r  {i + 1}/{len(timed)} requests", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    return results


def run_concurrently(serve: Serve, timed: list[Request], concurrency: int) -> dict[str, list[tuple[float, int, int]]]:
    """`concurrency` requests in flight, in the mix's order; each counted for its share of the wall clock."""
    from concurrent.futures import ThreadPoolExecutor

    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        answers = list(pool.map(serve, timed))
    wall = time.perf_counter() - started
    share = wall / max(sum(s for s, _, _ in answers), 1e-9)
    print(f"  {len(timed)} requests, {concurrency} in flight: {wall:.1f} s wall, {len(timed) / wall:.2f} requests/s, "
          f"mean latency {statistics.fmean(s for s, _, _ in answers):.3f} s", file=sys.stderr)
    results: dict[str, list[tuple[float, int, int]]] = defaultdict(list)
    for r, (seconds, prompt, new) in zip(timed, answers):
        results[r.scenario].append((seconds * share, prompt, new))
    return results


def project(results, totals: dict[str, int], step_s: float, gpu: tuple[float, float]) -> dict[str, tuple[float, float]]:
    """Per scenario: (seconds for the whole conf here, the same on a 4090)."""
    bw_ratio, flops_ratio = gpu[0] / RTX_4090[0], gpu[1] / RTX_4090[1]
    out = {}
    for scenario, rows in results.items():
        mean = statistics.fmean(s for s, _, _ in rows)
        decode = statistics.fmean(min(s, max(n - 1, 0) * step_s) for s, _, n in rows)
        count = totals.get(scenario, 0)
        out[scenario] = (mean * count, ((mean - decode) * flops_ratio + decode * bw_ratio) * count)
    return out


def gpu_figures() -> tuple[str, tuple[float, float]]:
    import torch

    if not torch.cuda.is_available():
        return "cpu (figures of an H100 assumed for the projection)", GPUS["H100"]
    name = torch.cuda.get_device_name()
    for key, figures in GPUS.items():
        if key in name:
            return name, figures
    return name, GPUS["H100"]


def decode_rate(engine, prompt_ids: list[int], new: int) -> float:
    """Seconds per decode step: (time for 1 + new tokens - time for 1 token) / new, best of three."""
    from helm_server.engine import SamplingParams

    def timed(n: int) -> float:
        best = float("inf")
        for _ in range(3):
            params = SamplingParams(max_new_tokens=n, temperature=0.0, min_new_tokens=n)
            sync()
            started = time.perf_counter()
            engine.generate(prompt_ids, params, lambda ids: False)
            sync()
            best = min(best, time.perf_counter() - started)
        return best

    return (timed(1 + new) - timed(1)) / new


def reference_decode_rate(model, prompt_ids: list[int], new: int) -> float:
    import torch

    ids = torch.tensor([prompt_ids], device=model.device)

    def timed(n: int) -> float:
        sync()
        started = time.perf_counter()
        out = model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=True, top_k=200, temperature=1.0,
                             pad_token_id=EOS, return_dict_in_generate=True, output_scores=True)
        torch.log(torch.stack(out.scores, dim=1).softmax(-1)).amax(-1).tolist()
        sync()
        return time.perf_counter() - started

    timed(2)
    return (timed(1 + new) - timed(1)) / new


ENGINES = ("reference", "hf", "static", "static-noreuse")  # and static-batchN, static-batchN-serial, -dense


BATCH_FLAGS = ("serial", "dense", "nogather")  # in this order after static-batchN


def batch_engine(name: str) -> tuple[int, frozenset[str]] | None:
    """static-batchN[-serial][-dense][-nogather]: N rows (2 to 16); requests opened one at a time; long prefills
    dense; an idle scheduler not waiting for the clients it answered (batching.py's gather)."""
    rows, *flags = name.removeprefix("static-batch").split("-") if name.startswith("static-batch") else ("",)
    if not rows.isdigit() or not 2 <= int(rows) <= 16 or flags != [f for f in BATCH_FLAGS if f in flags]:
        return None
    return int(rows), frozenset(flags)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", help="a running submission instead of in-process engines")
    ap.add_argument("--conf", type=Path, default=CHALLENGE_SAMPLE)
    ap.add_argument("--runs", type=int, default=2, help="runs timed per scenario")
    ap.add_argument("--instances", type=int, default=3, help="instances timed per run")
    ap.add_argument("--shape", default="qwen-14b", help="random-weight model shape (benchmarks/decode_speed.py)")
    ap.add_argument("--gptq", type=Path, help="an 8-bit GPTQ model folder (built if missing, random weights)")
    ap.add_argument("--vocab", type=Path, default=REPO / ".devcarry" / "qwen.tiktoken")
    ap.add_argument("--lora", type=int, default=0, help="add an unmerged LoRA of this rank on every linear")
    ap.add_argument("--context", type=int, default=2048, help="the static engine's cache length")
    ap.add_argument("--engines", default="reference,hf,static,static-noreuse")
    ap.add_argument("--decode", action="store_true", help="also measure decode speed against the bandwidth bound")
    ap.add_argument("--device", default="cuda", help="cpu: a smoke run of this script (--shape tiny)")
    ap.add_argument("--emulate-4090", action="store_true", help="cap this process at 24 GiB of GPU memory")
    ap.add_argument("--profile", action="store_true", help="print the static engine's top CUDA kernels")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    ap.add_argument("--dense-from", type=int, help="the -dense engines run passes of this many positions or more on "
                    "dense weights (helm_server/dense_prefill.py); every other engine here runs Marlin throughout")
    ap.add_argument("--concurrency", type=int, default=1,
                    help="with --url or the static-batchN engines: requests in flight at once (HELM sends up to 4)")
    args = ap.parse_args()
    for name in args.engines.split(","):
        if name not in ENGINES and batch_engine(name) is None:
            ap.error(f"--engines: {name!r} is not one of {', '.join(ENGINES)}, static-batchN, static-batchN-serial, "
                     "static-batchN-dense or static-batchN-nogather (N cache slots, 2 to 16; flags in that order)")
        if "dense" in (batch_engine(name) or (0, ()))[1] and args.dense_from is None:
            ap.error(f"--engines {name}: give --dense-from N, the positions per pass from which it runs dense")
    if args.dense_from is not None and args.dense_from < 1:
        ap.error(f"--dense-from {args.dense_from}: give a positive number of positions per pass")
    if not 1 <= args.concurrency <= 64:
        ap.error(f"--concurrency {args.concurrency}: give 1 to 64 (HELM sends up to 4 at once)")
    if args.concurrency > 1 and not args.url and "static-batch" not in args.engines:
        ap.error("--concurrency applies to --url or to the static-batchN engines: the others decode one request "
                 "at a time (time them alone, beside a static-batchN in the same run)")

    if args.url and not re.match(r"https?://[^/\s]+", args.url):
        ap.error(f"--url {args.url!r}: give the server's base URL, e.g. http://127.0.0.1:8080")
    try:
        timed, totals = the_mix(args.conf, args.runs, args.instances)
    except ConfError as e:
        ap.error(str(e))
    total_requests = sum(totals.values())
    print(f"conf {args.conf.name}: {total_requests} requests in the whole mix; timing {len(timed)} "
          f"({args.runs} runs x {args.instances} instances per scenario)")
    if args.url:
        results = run_mix(http_server(args.url.rstrip("/")), timed, args.concurrency)
        report({"server": results}, totals, {"server": 0.0}, None)
        return 0
    return on_device(args, timed, totals)


def on_device(args, timed, totals) -> int:
    import torch
    from helm_server.batching import GATHER_S, Batcher
    from helm_server.hf_engine import HFEngine
    from helm_server.settings import GenerationSettings
    from helm_server.static_engine import StaticEngine
    from pipeline.convert.tokenizer import fast_tokenizer

    if args.emulate_4090:
        from pipeline.device import emulate_4090

        emulate_4090(torch.device("cuda"), 24)
    device = torch.device(args.device)
    name, gpu = gpu_figures()
    tokenizer = fast_tokenizer(args.vocab)
    if args.gptq:
        from gptq_kernels import load
        from train_shape import build_gptq
        from decode_speed import SHAPES

        build_gptq(args.gptq, SHAPES[args.shape], SHAPES[args.shape]["num_hidden_layers"], args.vocab, device)
        model = load(args.gptq, "marlin")
        kind = "8-bit GPTQ (Marlin)"
    else:
        from decode_speed import build_model

        model = build_model(args.shape, torch.float16 if device.type == "cuda" else torch.float32, device)
        kind = "fp16"
    if args.lora:
        from peft import LoraConfig, get_peft_model

        targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
        model = get_peft_model(model, LoraConfig(r=args.lora, lora_alpha=16, target_modules=targets)).eval()
        kind += f" + unmerged LoRA r={args.lora}"
    read = bytes_per_token(model)
    print(f"{name}: {kind}, {args.shape} shape, {read / 2**30:.2f} GiB read per decode step, "
          f"{gpu[0] / 1e12:.2f} TB/s spec bandwidth -> bound {gpu[0] / read:.1f} tokens/s")

    settings = GenerationSettings(eos_token_ids=[EOS], context_length=args.context, min_new_tokens=0,
                                  default_max_new_tokens=min(128, args.context))
    engines: dict[str, object] = {}
    serves: dict[str, Serve] = {}
    for engine_name in args.engines.split(","):
        started = time.perf_counter()
        if engine_name == "reference":
            serves[engine_name] = reference_path(model, tokenizer)
            continue
        if engine_name == "hf":
            engine = HFEngine(model, tokenizer, [EOS], device)
        elif engine_name.startswith("static-batch"):
            rows, flags = batch_engine(engine_name)  # checked in main
            engine = StaticEngine(model, tokenizer, [EOS], device, args.context, rows=rows, share="serial" not in flags,
                                  dense=args.dense_from if "dense" in flags else 0)
            engines[engine_name] = engine
            gather = 0.0 if "nogather" in flags else GATHER_S
            serves[engine_name] = in_process(engine, settings, Batcher(engine, rows, max_queue=64, gather_s=gather))
            print(f"{engine_name}: ready in {time.perf_counter() - started:.1f} s (graph capture included)")
            continue
        else:
            engine = engines.get("static") or StaticEngine(model, tokenizer, [EOS], device, args.context, dense=0)
            engines.setdefault("static", engine)
            if engine_name == "static-noreuse":
                engine = _NoReuse(engine)
        engines[engine_name] = engine
        serves[engine_name] = in_process(engine, settings)
        print(f"{engine_name}: ready in {time.perf_counter() - started:.1f} s (graph capture included)")

    steps = {}
    figures: dict = {"device": name, "model": kind, "read_bytes": read}
    if args.decode:
        prompt_ids = tokenizer(words(512, random.Random(0)))["input_ids"][:512]
        kv_per_token = _kv_bytes_per_token(model)
        for engine_name in serves:
            if engine_name == "static-noreuse" or engine_name.startswith("static-batch"):
                continue
            step = (reference_decode_rate(model, prompt_ids, 64) if engine_name == "reference"
                    else decode_rate(engines[engine_name], prompt_ids, 128))
            steps[engine_name] = step
            step_bytes = read + kv_per_token * (len(prompt_ids) + 64)
            print(f"decode {engine_name:>15}: {step * 1e3:7.2f} ms/token  {1 / step:7.1f} tokens/s  "
                  f"{step_bytes / step / 1e9:7.0f} GB/s = {100 * step_bytes / step / gpu[0]:5.1f}% of the bandwidth bound")
        figures["decode_ms"] = {k: v * 1e3 for k, v in steps.items()}
    steps.setdefault("static-noreuse", steps.get("static", 0.0))
    for engine_name in serves:
        if engine_name.startswith("static-batch"):  # a batched step reads the weights once for every row
            steps.setdefault(engine_name, steps.get("static", 0.0))

    results = {}
    for engine_name, serve in serves.items():
        cuda = device.type == "cuda"
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated() if cuda else 0
        print(f"mix on {engine_name}", file=sys.stderr)
        batched = engine_name.startswith("static-batch")
        results[engine_name] = run_mix(serve, timed, args.concurrency if batched else 1)
        if batched:
            e = engines[engine_name]
            print(f"{engine_name}: prompt positions reused in their slot {e.reused_tokens}, copied from another "
                  f"{e.copied_tokens}, computed {e.prefilled_tokens}; {e.batched_passes} side-by-side prefill passes")
        if cuda:
            print(f"{engine_name}: peak {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB allocated, "
                  f"{(torch.cuda.memory_allocated() - before) / 2**20:+.1f} MiB after the mix")
    figures["mix"] = report(results, totals, steps, gpu)
    if "static" in engines:
        five_shot(engines["static"], tokenizer, figures)
        if args.profile:
            profile(engines["static"], tokenizer)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    return 0


class _NoReuse:
    """The static engine with prefix reuse switched off (same cache and graphs)."""

    def __init__(self, engine) -> None:
        self.engine = engine
        self.eos_token_ids, self.vocab_size = engine.eos_token_ids, engine.vocab_size
        self.encode, self.decode = engine.encode, engine.decode

    def generate(self, prompt_ids, params, should_stop):
        self.engine.reuse = False
        try:
            return self.engine.generate(prompt_ids, params, should_stop)
        finally:
            self.engine.reuse = True


def _kv_bytes_per_token(model) -> int:
    config = (model.get_base_model() if hasattr(model, "get_base_model") else model).config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * 2


def five_shot(engine, tokenizer, figures: dict) -> None:
    """A 5-shot scenario (MMLU-shaped, 10 questions sharing their prefix): prefix reuse on against off."""
    from helm_server.engine import SamplingParams

    entry = RunEntry("mmlu:model=neurips/local,subject=five_shot,data_augmentation=canonical", 1)
    prompts = [tokenizer(r.prompt)["input_ids"] for r in requests_of(entry, SCENARIOS["mmlu"], 2, "mmlu")]
    params = SamplingParams(max_new_tokens=1, temperature=0.0)
    seconds = {}
    for reuse in (False, True):
        engine.reuse = reuse
        engine.generate(tokenizer(words(600, random.Random(1)))["input_ids"], params, lambda ids: False)  # another run's
        sync()
        started = time.perf_counter()
        for ids in prompts:
            engine.generate(ids, params, lambda ids: False)
        sync()
        seconds[reuse] = time.perf_counter() - started
    engine.reuse = True
    print(f"5-shot scenario, {len(prompts)} requests of ~{len(prompts[0])} tokens: {seconds[False] * 1e3:.1f} ms without "
          f"prefix reuse, {seconds[True] * 1e3:.1f} ms with it: {seconds[False] / seconds[True]:.2f}x")
    figures["five_shot_ms"] = {"no_reuse": seconds[False] * 1e3, "reuse": seconds[True] * 1e3}


def profile(engine, tokenizer) -> None:
    """Top kernels of a 634-token prefill and of 32 decode steps (graph replays show as one entry each)."""
    from torch.profiler import ProfilerActivity, profile as torch_profile
    from helm_server.engine import SamplingParams

    prompt = tokenizer(words(634, random.Random(7)))["input_ids"]
    for label, params in (("prefill", SamplingParams(max_new_tokens=1, temperature=0.0)),
                          ("32 decode steps", SamplingParams(max_new_tokens=33, temperature=0.0, min_new_tokens=33))):
        engine.reuse = False
        with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            engine.generate(prompt, params, lambda ids: False)
            sync()
        engine.reuse = True
        print(f"--- profile: {label}")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=60))


def report(results, totals, steps, gpu) -> dict:
    """Per scenario and engine: measured mean per request, projected whole-conf time here and on a 4090."""
    engines = list(results)
    projected = {e: project(results[e], totals, steps.get(e, 0.0), gpu or RTX_4090) for e in engines}
    print(f"\n{'scenario':<22}{'requests':>9}" + "".join(f"{e:>22}" for e in engines))
    print(f"{'':<22}{'(conf)':>9}" + "".join(f"{'mean s | conf s':>22}" for _ in engines))
    scenarios = sorted({s for e in engines for s in results[e]}, key=lambda s: (s not in totals, s))
    table = {}
    for s in scenarios:
        cells = []
        for e in engines:
            rows = results[e].get(s, [])
            mean = statistics.fmean(x for x, _, _ in rows) if rows else 0.0
            cells.append(f"{mean:10.3f} | {projected[e].get(s, (0, 0))[0]:9.0f}")
            table.setdefault(s, {})[e] = {"mean_s": mean, "conf_s": projected[e].get(s, (0, 0))[0]}
        print(f"{s:<22}{totals.get(s, 0):>9}" + "".join(f"{c:>22}" for c in cells))
    sums = {e: sum(v[0] for s, v in projected[e].items() if s in totals) for e in engines}
    sums_4090 = {e: sum(v[1] for s, v in projected[e].items() if s in totals) for e in engines}
    print(f"{'whole conf':<22}{sum(totals.values()):>9}" + "".join(f"{sums[e]:>20.0f} s" for e in engines))
    if gpu is not None:
        print(f"{'on an RTX 4090':<22}{'':>9}" + "".join(f"{sums_4090[e]:>20.0f} s" for e in engines))
        base = "reference" if "reference" in engines else engines[0]
        for e in engines:
            print(f"  {e}: {sums[base] / sums[e]:.2f}x faster than {base}; 4090 projection {sums_4090[e] / 3600:.2f} h "
                  f"of the {BUDGET_S / 3600:.0f} h budget ({100 * sums_4090[e] / BUDGET_S:.0f}%)")
    return {"per_scenario": table, "whole_conf_s": sums, "whole_conf_4090_s": sums_4090}


if __name__ == "__main__":
    raise SystemExit(main())
