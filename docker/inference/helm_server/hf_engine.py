"""The plain Hugging Face engine: one prefill, then a token-at-a-time decode loop.

Written as small functions a reader follows top to bottom (`prefill`,
`decode_one_token`, `sample`, `score`). Prompt logprobs and the first new
token come from the single prefill pass; logprobs are gathered on the device
and copied to the host once per request, never a full-vocabulary softmax per
step.
"""

from __future__ import annotations

import functools
import inspect
import logging
import time
import threading
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache, PretrainedConfig

from . import kernels as prebuilt
from .engine import LOGPROB_FLOOR, Generation, SamplingParams, ScoredToken, StopCheck
from .settings import ModelSource, ServeConfig, ServedModel

log = logging.getLogger("helm_server.engine")

# Rows of the prompt scored per log-softmax, to bound memory for long echoed prompts.
_SCORE_CHUNK = 512

_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}

# GPTQ kernels per device when the spec says "auto", tried in order (docs/measurements.md: on an H100
# Marlin reads 8-bit weights at 1353 GB/s at batch 1, GPTQModel's torch and Triton kernels at 250
# and 285 against fp16's 2138). Marlin is compiled by the image build (kernels.py); torch needs nothing.
# CPU: the torch kernel dequantizes exactly.
GPTQ_KERNELS = {"cpu": ["torch"], "cuda": ["marlin", "torch"]}


def pick_device(setting: str) -> torch.device:
    if setting == "cuda" or (setting == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


def _dtype(model: ServedModel, device: torch.device) -> torch.dtype | str:
    if model.dtype != "auto":
        return _DTYPES[model.dtype]
    # Half precision on CPU is slow and poorly supported; "auto" means the checkpoint's dtype on GPU.
    return torch.float32 if device.type == "cpu" else "auto"


def _revision(source: ModelSource) -> str | None:
    # Local directories have no revisions; passing one makes hub code look online.
    return None if Path(source.repo_id).is_dir() else source.revision


class ModelLoadError(RuntimeError):
    """A served model that cannot be loaded as configured; the message names the fix."""


def gptq_bits(raw_config: dict) -> int | None:
    """Bit width of a GPTQ checkpoint's config, None for anything else."""
    quant = raw_config.get("quantization_config") or {}
    return int(quant["bits"]) if quant.get("quant_method") == "gptq" else None


def gptq_kernels(spec: ServedModel, device: torch.device) -> list[str]:
    """Kernels to try in order: the spec's choice, or the tested default chain for the device."""
    return GPTQ_KERNELS[device.type] if spec.gptq_kernel == "auto" else [spec.gptq_kernel]


def check_servable(raw_config: dict, config: ServeConfig) -> None:
    """Refuse what would serve wrong answers silently: remote code we no longer run, windows past the model's."""
    if raw_config.get("model_type") == "qwen":
        raise ModelLoadError(
            f"{config.model.repo_id} is a Qwen (v1) checkpoint, whose remote modeling code does not run correctly "
            "under transformers 5: convert it first (`make convert SRC=... OUT=...`, or let the image build do it)"
        )
    limit = raw_config.get("max_position_embeddings")
    if limit and config.generation.context_length > limit:
        raise ModelLoadError(
            f"generation.context_length {config.generation.context_length} exceeds the model's "
            f"max_position_embeddings {limit}: lower context_length in the spec"
        )


def load_model(config: ServeConfig, device: torch.device):
    """Load the served model (and adapter) for inference on `device`.

    A GPTQ checkpoint is loaded with a pinned kernel (GPTQModel's own choice on
    Hopper is Machete, which downloads CUTLASS at first use: fatal in a sealed
    container), trying the next kernel of the chain if one fails to build.
    """
    spec = config.model
    log.info("loading model %s (revision %s) on %s", spec.repo_id, _revision(spec), device)
    raw_config, _ = PretrainedConfig.get_config_dict(spec.repo_id, revision=_revision(spec))
    check_servable(raw_config, config)
    kwargs = dict(
        revision=_revision(spec),
        trust_remote_code=spec.trust_remote_code,
        dtype=_dtype(spec, device),
        device_map={"": str(device)},
    )
    bits = gptq_bits(raw_config)
    if bits is None:
        model = AutoModelForCausalLM.from_pretrained(spec.repo_id, **kwargs)
    else:
        model = _load_gptq(spec, device, bits, kwargs)
    if config.adapter is not None:
        from peft import PeftModel

        log.info("loading adapter %s (revision %s)", config.adapter.repo_id, _revision(config.adapter))
        model = PeftModel.from_pretrained(model, config.adapter.repo_id, revision=_revision(config.adapter))
    return model.eval()


def prebuilt_kernels(kernels: list[str], device: torch.device, dtype: torch.dtype | str = torch.float16) -> list[str]:
    """In the image, Marlin comes only from the kernels its build compiled (`kernels.py`), never from a compile at
    start: when those cannot serve this card, `auto` goes on to the next kernel, a spec that names marlin fails."""
    if "marlin" not in kernels:
        return kernels
    try:
        loaded = prebuilt.load(device, dtype)
    except prebuilt.KernelsMissing as e:
        if kernels == ["marlin"]:
            raise ModelLoadError(f"{e} (the spec names gptq_kernel = \"marlin\"; \"auto\" would fall back)") from None
        rest = [k for k in kernels if k != "marlin"]
        log.error("%s; serving with the %s kernel instead: nothing compiles at start", e, rest[0])
        return rest
    if loaded:
        log.info("GPTQ kernels prebuilt by the image build: %s", loaded)
    return kernels


def _load_gptq(spec: ServedModel, device: torch.device, bits: int, kwargs: dict):
    from transformers import GPTQConfig

    errors = []
    for kernel in prebuilt_kernels(gptq_kernels(spec, device), device, kwargs["dtype"]):
        started = time.perf_counter()
        log.info("GPTQ %d-bit checkpoint: loading with the %s kernel", bits, kernel)
        try:
            model = AutoModelForCausalLM.from_pretrained(
                spec.repo_id, quantization_config=GPTQConfig(bits=bits, backend=kernel), **kwargs
            )
        except Exception as e:  # noqa: BLE001 - a kernel that cannot build must not take the server down
            log.error("the %s kernel failed to load (%s: %s); trying the next", kernel, type(e).__name__, e)
            errors.append(f"{kernel}: {type(e).__name__}: {e}")
            continue
        log.info("GPTQ model loaded with the %s kernel in %.0f s", kernel, time.perf_counter() - started)
        return model
    raise ModelLoadError("no GPTQ kernel could load the model: " + "; ".join(errors))


def load_tokenizer(model: ServedModel):
    return AutoTokenizer.from_pretrained(
        model.repo_id, revision=_revision(model), trust_remote_code=model.trust_remote_code
    )


def cache_keyword(model) -> str:
    """transformers renamed `past_key_values` to `cache`; use what the installed version takes."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return _cache_keyword_of(type(base))


@functools.cache
def _cache_keyword_of(model_class: type) -> str:
    return "cache" if "cache" in inspect.signature(model_class.forward).parameters else "past_key_values"


@torch.inference_mode()
def prefill(model, input_ids: torch.Tensor, cache: DynamicCache, all_positions: bool) -> torch.Tensor:
    """Run the prompt through the model once, filling the KV cache.

    Returns logits for every position when the prompt itself must be scored,
    else only for the last one (a 2048 x 152k logit matrix is 1.2 GB in fp32).
    """
    keep = 0 if all_positions else 1
    out = model(input_ids=input_ids, **{cache_keyword(model): cache}, use_cache=True, logits_to_keep=keep)
    return out.logits[0]


@torch.inference_mode()
def decode_one_token(model, token: torch.Tensor, cache: DynamicCache) -> torch.Tensor:
    """Feed one token, return the next position's logits [vocab]."""
    out = model(input_ids=token.view(1, 1), **{cache_keyword(model): cache}, use_cache=True, logits_to_keep=1)
    return out.logits[0, -1]


def sample(
    logits: torch.Tensor,
    params: SamplingParams,
    generator: torch.Generator,
    banned: torch.Tensor | None = None,
) -> torch.Tensor:
    """Pick the next token: greedy at temperature 0, else top-k/top-p sampling."""
    logits = logits.float()
    if banned is not None:
        logits = logits.index_fill(0, banned, float("-inf"))
    if params.temperature == 0.0:
        return logits.argmax()
    logits = logits / params.temperature
    if 0 < params.top_k < logits.numel():
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop = cumulative - sorted_logits.softmax(-1) >= params.top_p  # keep the token that crosses top_p
        drop[0] = False  # and always the likeliest: a top_p below float32's range (5e-324) must not empty the set
        logits = logits.scatter(0, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator)[0]


def score(logits: torch.Tensor, chosen: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logprob of `chosen` and the top-k alternatives, on the device. Rows: [..., vocab]."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    logprobs = torch.nan_to_num(logprobs, nan=LOGPROB_FLOOR, neginf=LOGPROB_FLOOR, posinf=0.0)
    picked = logprobs.gather(-1, chosen.unsqueeze(-1)).squeeze(-1)
    top = torch.topk(logprobs, k, dim=-1)
    return picked, top.values, top.indices


def score_prompt(logits: torch.Tensor, prompt: torch.Tensor, k: int) -> list[ScoredToken]:
    """Teacher-forced logprobs of the prompt; the first token has no context (0.0, as HELM reports)."""
    first = int(prompt[0])
    scored = [ScoredToken(first, 0.0, [(first, 0.0)])]
    for start in range(0, prompt.numel() - 1, _SCORE_CHUNK):
        rows = logits[start : start + _SCORE_CHUNK]
        targets = prompt[start + 1 : start + 1 + rows.shape[0]]
        picked, top_v, top_i = score(rows[: targets.numel()], targets, k)
        scored += _to_host(targets, picked, top_v, top_i)
    return scored


def _to_host(ids, picked, top_v, top_i) -> list[ScoredToken]:
    ids, picked, top_v, top_i = (t.tolist() for t in (ids, picked, top_v, top_i))
    return [ScoredToken(i, p, list(zip(ti, tv))) for i, p, tv, ti in zip(ids, picked, top_v, top_i)]


def _generator(device: torch.device, seed: int | None) -> torch.Generator:
    gen = torch.Generator(device=device)
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed(seed)
    return gen


def checked_eos(eos_token_ids: list[int], vocab_size: int) -> frozenset[int]:
    bad = [i for i in eos_token_ids if i >= vocab_size]
    if bad:
        raise ValueError(
            f"generation.eos_token_ids {bad} are outside the model's vocabulary (size {vocab_size}); "
            "set the spec's eos_token_ids to the served model's end-of-text ids"
        )
    return frozenset(eos_token_ids)


class Decoding:
    """One request's decode loop as a state machine: `pick` samples and scores the next token from
    `next_logits`; whoever runs the model feeds it and sets `next_logits` again.

    `decode_loop` runs one to the end (batch 1); the batch scheduler (`batching.py`) runs several,
    one `pick` each per step. Each has its own generator: a row never depends on another.
    """

    def __init__(self, next_logits: torch.Tensor, params: SamplingParams, generator: torch.Generator,
                 eos: torch.Tensor, eos_ids: frozenset[int], should_stop: StopCheck) -> None:
        self.next_logits, self.params, self.generator = next_logits, params, generator
        self.eos, self.eos_ids, self.should_stop = eos, eos_ids, should_stop
        self.chosen: list[int] = []
        self.scores: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self.steps = 0
        self.finish: str | None = None  # None while running

    def pick(self) -> torch.Tensor | None:
        """The next token to feed, or None when the request is finished (eos, a stop, or its length)."""
        params = self.params
        if self.steps >= params.max_new_tokens:
            self.finish = "length"
            return None
        token = sample(self.next_logits, params, self.generator, self.eos if self.steps < params.min_new_tokens else None)
        self.steps += 1
        token_id = int(token)
        if token_id in self.eos_ids:
            self.finish = "eos"
            return None
        self.chosen.append(token_id)
        self.scores.append(score(self.next_logits, token, params.top_logprobs))
        if self.should_stop(self.chosen):
            self.finish = "stop"
            return None
        if self.steps >= params.max_new_tokens:
            self.finish = "length"
            return None
        return token

    def result(self, prompt: list[ScoredToken] | None = None) -> Generation:
        """Scores stay on the device until this one copy."""
        chosen, scores = self.chosen, self.scores
        completion = _to_host(torch.tensor(chosen), *(torch.stack(s) for s in zip(*scores))) if chosen else []
        return Generation(prompt=prompt or [], completion=completion, finish_reason=self.finish or "length")


def decode_loop(next_logits: torch.Tensor, params: SamplingParams, generator: torch.Generator, eos: torch.Tensor,
                eos_ids: frozenset[int], should_stop: StopCheck,
                feed: Callable[[torch.Tensor, int], torch.Tensor]) -> Generation:
    """sample -> score -> stop checks -> `feed` the token for the next logits, until eos, a stop or the length.

    Scores stay on the device until one copy at the end. Shared by both engines; `feed` is theirs.
    """
    decoding = Decoding(next_logits, params, generator, eos, eos_ids, should_stop)
    while (token := decoding.pick()) is not None:
        decoding.next_logits = feed(token, decoding.chosen[-1])
    return decoding.result()


@dataclass
class Row:
    """A request in the running batch: its decode state, its echoed prompt's scores, the engine's handle."""

    decoding: Decoding
    prompt: list[ScoredToken]
    state: object  # the engine's: a DynamicCache (hf), a cache slot index (static)

    def result(self) -> Generation:
        return self.decoding.result(self.prompt)


class Tokenizing:
    """The text side both engines share: the served model's tokenizer."""

    tokenizer: object
    # A fast tokenizer is not safe to call from two threads at once ("Already borrowed"); with batching
    # on, request threads encode and decode while the scheduler thread runs stop checks.
    _text_lock = threading.Lock()

    def encode(self, text: str) -> list[int]:
        with self._text_lock:
            return list(self.tokenizer(text)["input_ids"])

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        with self._text_lock:
            return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens,
                                         clean_up_tokenization_spaces=False)


class HFEngine(Tokenizing):
    """Batch-1 generation with a dynamic KV cache on any transformers causal LM."""

    def __init__(self, model, tokenizer, eos_token_ids: list[int], device: torch.device) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.device = device
        self.vocab_size = int(model.get_output_embeddings().weight.shape[0])
        self.eos_token_ids = checked_eos(eos_token_ids, self.vocab_size)
        self._eos = torch.tensor(sorted(self.eos_token_ids), device=device)

    @classmethod
    def from_config(cls, config: ServeConfig) -> "HFEngine":
        device = pick_device(config.server.device)
        return cls(load_model(config, device), load_tokenizer(config.model), config.generation.eos_token_ids, device)

    @torch.inference_mode()
    def generate(self, prompt_ids: list[int], params: SamplingParams, should_stop: StopCheck) -> Generation:
        # A model needs at least one token of context; an empty prompt starts from end-of-text.
        context = prompt_ids or [min(self.eos_token_ids)]
        input_ids = torch.tensor([context], device=self.device)
        cache = DynamicCache()
        logits = prefill(self.model, input_ids, cache, all_positions=params.echo_prompt and bool(prompt_ids))
        prompt_scored = score_prompt(logits, input_ids[0], params.top_logprobs) if params.echo_prompt and prompt_ids else []
        generated = decode_loop(logits[-1], params, _generator(self.device, params.seed), self._eos,
                                self.eos_token_ids, should_stop,
                                lambda token, _: decode_one_token(self.model, token, cache))
        return replace(generated, prompt=prompt_scored)

    # --- the batch scheduler's interface (batching.py): a row per request, fed a token per step ---------

    @torch.inference_mode()
    def open(self, prompt_ids: list[int], params: SamplingParams, should_stop: StopCheck) -> Row:
        """Prefill a request (and score its echoed prompt); its first token is picked from the row."""
        context = prompt_ids or [min(self.eos_token_ids)]
        input_ids = torch.tensor([context], device=self.device)
        cache = DynamicCache()
        logits = prefill(self.model, input_ids, cache, all_positions=params.echo_prompt and bool(prompt_ids))
        prompt_scored = score_prompt(logits, input_ids[0], params.top_logprobs) if params.echo_prompt and prompt_ids else []
        decoding = Decoding(logits[-1], params, _generator(self.device, params.seed), self._eos, self.eos_token_ids,
                            should_stop)
        return Row(decoding, prompt_scored, cache)

    def open_all(self, requests: list[tuple[list[int], SamplingParams, StopCheck]]) -> list[Row | Exception]:
        """`open` each in turn (a dynamic cache per row): a row, or that request's own error."""
        opened: list[Row | Exception] = []
        for prompt_ids, params, should_stop in requests:
            try:
                opened.append(self.open(prompt_ids, params, should_stop))
            except Exception as e:  # noqa: BLE001 - returned: the scheduler answers it to its request
                opened.append(e)
        return opened

    @torch.inference_mode()
    def feed(self, rows: list[Row], tokens: list[torch.Tensor]) -> None:
        """One step: each row's token in, its next logits out. Rows keep their own dynamic caches, of
        different lengths, so this engine runs them one after the other (results as at batch 1)."""
        for row, token in zip(rows, tokens):
            row.decoding.next_logits = decode_one_token(self.model, token, row.state)

    def close(self, row: Row) -> None:
        row.state = None
