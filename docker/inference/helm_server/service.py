"""HELM requests in, HELM responses out, with an `Engine` in between.

This is the part of the server that knows HELM's conventions (temperature
1e-7 means greedy, stop sequences are cut, echo returns the prompt's tokens)
and the spec's generation settings. It knows nothing of HTTP or of how the
model runs.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable

from .deadline import Cancelled, Ticket, unlimited
from .api import DecodeRequest, DecodeResponse, ProcessRequest, ProcessResponse, Token, TokenizeRequest, TokenizeResponse
from .engine import Engine, Generation, SamplingParams, ScoredToken, StopCheck
from .settings import GenerationSettings
from .stopping import StopMatcher

log = logging.getLogger("helm_server.service")


class RequestError(ValueError):
    """A request that cannot be served as asked (answered 422, the server stays healthy)."""


SEED_MODULUS = 2**64  # torch seeds are 64-bit: a larger seed is reduced, never an overflow


def check_limits(req: ProcessRequest, settings: GenerationSettings) -> None:
    """Refuse, before any model work, what would hold the model for minutes or cannot be honoured."""
    if req.top_k_per_token > settings.max_top_k_per_token:
        raise RequestError(f"top_k_per_token {req.top_k_per_token} is over this server's limit of "
                           f"{settings.max_top_k_per_token} (generation.max_top_k_per_token)")
    if len(req.prompt) > settings.max_prompt_chars:
        raise RequestError(f"prompt of {len(req.prompt)} characters is over this server's limit of "
                           f"{settings.max_prompt_chars} (generation.max_prompt_chars)")


def resolve_params(req: ProcessRequest, settings: GenerationSettings, vocab_size: int) -> SamplingParams:
    """HELM's request -> the engine's parameters; temperatures clamped to max_temperature, seeds reduced to 64 bits."""
    max_new = settings.default_max_new_tokens if req.max_new_tokens is None else req.max_new_tokens
    top_k = settings.default_top_k if req.top_k is None else req.top_k
    greedy = req.temperature < settings.min_temperature
    return SamplingParams(
        max_new_tokens=max_new,
        temperature=0.0 if greedy else min(req.temperature, settings.max_temperature),
        top_k=top_k,
        top_p=req.top_p,
        min_new_tokens=min(settings.min_new_tokens, max_new),
        seed=None if req.seed is None else req.seed % SEED_MODULUS,
        top_logprobs=min(max(1, req.top_k_per_token), vocab_size),
        echo_prompt=req.echo_prompt,
    )


def fit_context(prompt_ids: list[int], max_new_tokens: int, settings: GenerationSettings) -> list[int]:
    """Apply the spec's overflow policy when prompt + new tokens exceed the context."""
    limit = settings.context_length
    if len(prompt_ids) + max_new_tokens <= limit:
        return prompt_ids
    if max_new_tokens >= limit or settings.overflow == "reject":
        raise RequestError(
            f"prompt of {len(prompt_ids)} tokens + max_new_tokens {max_new_tokens} exceeds the context length "
            f"of {limit} tokens; shorten the prompt (POST /tokenize with truncation) or lower max_new_tokens"
        )
    return prompt_ids[len(prompt_ids) + max_new_tokens - limit :]


MAX_CHAR_TOKENS = 4  # a UTF-8 character spans at most 4 bytes, so at most 4 byte-level tokens


def token_texts(decode, ids: list[int], skip_special_tokens: bool) -> list[str]:
    """Each token's share of the decoded text, joining to exactly `decode(ids)`.

    Byte-level tokens can end inside a multi-byte character (decoded alone: U+FFFD); such a token
    gets "" and the token completing the character carries all of it.
    """
    texts: list[str] = []
    start = 0
    for i in range(len(ids)):
        piece = decode(ids[start : i + 1], skip_special_tokens=skip_special_tokens)
        if piece.endswith("\ufffd") and i + 1 < len(ids) and i + 1 - start < MAX_CHAR_TOKENS:
            texts.append("")
            continue
        texts.append(piece)
        start = i + 1
    return texts


@dataclass
class Outcome:
    response: ProcessResponse
    prompt_tokens: int
    new_tokens: int
    finish_reason: str


Generate = Callable[[list[int], SamplingParams, StopCheck, Ticket], Generation]


class CompletionService:
    """Serves /process, /tokenize and /decode on one engine.

    `generate` runs the model: by default the engine's own batch-1 `generate` (callers serialise);
    with batching, `Batcher.submit`, which is safe from any thread (the engine's tokenizer is locked).
    """

    def __init__(self, engine: Engine, settings: GenerationSettings, generate: Generate | None = None) -> None:
        self.engine = engine
        self.settings = settings
        self._generate = generate or (lambda ids, params, should_stop, _ticket: engine.generate(ids, params, should_stop))

    def process(self, req: ProcessRequest, ticket: Ticket | None = None) -> Outcome:
        """`ticket` stops generation at its deadline (a shorter answer) or on cancellation (`Cancelled`)."""
        ticket = ticket or unlimited()
        start = time.perf_counter()
        check_limits(req, self.settings)
        params = resolve_params(req, self.settings, self.engine.vocab_size)
        prompt_ids = self.engine.encode(req.prompt)
        fitted = fit_context(prompt_ids, params.max_new_tokens, self.settings)
        stops = StopMatcher(self._text, req.stop_sequences or [], self.settings.stop_sequences_in_output)

        if params.max_new_tokens == 0 and not params.echo_prompt:
            gen = Generation(prompt=[], completion=[], finish_reason="length")
        else:
            gen = self._generate(fitted, params, lambda ids: ticket.should_stop() or stops(ids), ticket)
        if ticket.cancelled.is_set():
            raise Cancelled(f"the client disconnected; stopped after {len(gen.completion)} new tokens")
        completion_ids = [t.token_id for t in gen.completion]
        finish = gen.finish_reason
        if finish == "stop" and ticket.expired() and not stops(completion_ids):
            finish = "deadline"
        text, kept = stops.cut(completion_ids)
        shares = token_texts(self.engine.decode, completion_ids[:kept], skip_special_tokens=True)
        tokens = [self._token(t, share) for t, share in zip(gen.completion[:kept], shares)]
        if params.echo_prompt:
            prompt_text = req.prompt if fitted is prompt_ids else self.engine.decode(fitted)
            shares = token_texts(self.engine.decode, [t.token_id for t in gen.prompt], skip_special_tokens=False)
            text = prompt_text + text
            tokens = [self._token(t, share) for t, share in zip(gen.prompt, shares)] + tokens
        elapsed = time.perf_counter() - start
        response = ProcessResponse(
            text=text, tokens=tokens, logprob=sum(t.logprob for t in tokens), request_time=elapsed
        )
        return Outcome(response, len(fitted), kept, finish)

    def tokenize(self, req: TokenizeRequest) -> TokenizeResponse:
        start = time.perf_counter()
        ids = self.engine.encode(req.text)
        if req.truncation and req.max_length is not None:
            ids = ids[: req.max_length]
        return TokenizeResponse(tokens=ids, request_time=time.perf_counter() - start)

    def decode(self, req: DecodeRequest) -> DecodeResponse:
        start = time.perf_counter()
        bad = [i for i in req.tokens if not 0 <= i < self.engine.vocab_size]
        if bad:
            raise RequestError(f"tokens {bad[:5]} are outside the vocabulary [0, {self.engine.vocab_size})")
        return DecodeResponse(text=self.engine.decode(req.tokens), request_time=time.perf_counter() - start)

    def _text(self, ids: list[int]) -> str:
        return self.engine.decode(ids, skip_special_tokens=True)

    def _token(self, scored: ScoredToken, text: str) -> Token:
        top: dict[str, float] = {}
        for token_id, logprob in scored.top:
            key = self.engine.decode([token_id])
            top[key] = max(logprob, top.get(key, logprob))
        return Token(text=text, logprob=scored.logprob, top_logprob=top)
