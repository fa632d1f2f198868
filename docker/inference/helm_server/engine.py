"""The interface between the HTTP layer and whatever runs the model.

The HTTP layer speaks HELM; an engine speaks token ids. Keeping this seam
narrow lets a faster engine (static KV cache, CUDA graphs, prefix reuse)
replace the plain Hugging Face one without touching request handling.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Literal, Protocol

# JSON cannot carry -inf or NaN (Starlette answers 500 on them): a logprob
# that is not finite is reported as this floor instead.
LOGPROB_FLOOR = -1e30

FinishReason = Literal["eos", "stop", "length"]


@dataclass(frozen=True)
class SamplingParams:
    """A request's decoding settings, already resolved against the spec's defaults."""

    max_new_tokens: int
    temperature: float  # 0.0 means greedy
    top_k: int = 0  # 0 disables
    top_p: float = 1.0
    min_new_tokens: int = 0  # end-of-text ids are suppressed before this many tokens
    seed: int | None = None
    top_logprobs: int = 1  # alternatives reported per position, at least 1
    echo_prompt: bool = False  # also score the prompt's own tokens


@dataclass(frozen=True)
class ScoredToken:
    """One position: the token, its logprob and the most likely alternatives.

    Logprobs are the model's own distribution (log-softmax of the raw logits
    at temperature 1), independent of how the token was sampled.
    """

    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass(frozen=True)
class Generation:
    prompt: list[ScoredToken]  # empty unless echo_prompt
    completion: list[ScoredToken]  # end-of-text is never included
    finish_reason: FinishReason


StopCheck = Callable[[list[int]], bool]


class Engine(Protocol):
    """What the server needs from a model runner. Calls come one at a time."""

    eos_token_ids: frozenset[int]
    vocab_size: int  # ids in [0, vocab_size) are valid model outputs

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str: ...

    def generate(self, prompt_ids: list[int], params: SamplingParams, should_stop: StopCheck) -> Generation:
        """Score the prompt (with echo), then decode until eos, `should_stop` or max_new_tokens.

        `should_stop` gets the completion's ids after each new token.
        """
        ...
