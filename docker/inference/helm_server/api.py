"""The HTTP API of HELM's `neurips/local` model.

Field names and meanings follow crfm-helm's `HTTPModelClient` and
`HTTPModelTokenizer` (0.5.16). Requests ignore unknown fields, so a newer
HELM that sends more does not break a submission; values that cannot be
honoured are answered with 422 and a message that names the field.
"""

from __future__ import annotations

import math

from pydantic import BaseModel, ConfigDict, Field, field_validator


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")


def _unicode(value: str) -> str:
    """JSON can escape a lone UTF-16 surrogate (`\\ud800`) that is no character: no tokenizer encodes it."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"holds a lone surrogate (U+{ord(value[e.start]):04X} at character {e.start}), "
                         f"which is not a Unicode character; send valid Unicode text") from None
    return value


class ProcessRequest(_Request):
    prompt: str
    temperature: float = Field(default=1.0, ge=0.0, description="HELM sends 1e-7 for temperature 0")
    num_return_sequences: int = Field(default=1, ge=1, description="one completion is returned regardless")
    max_new_tokens: int | None = Field(default=None, ge=0, description="None: the spec's default")
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=0, description="None: the spec's default_top_k; 0 disables")
    top_k_per_token: int = Field(default=1, ge=0, description="entries in each token's top_logprob (at least 1)")
    echo_prompt: bool = False
    stop_sequences: list[str] | None = None
    seed: int | None = None

    @field_validator("temperature", "top_p")
    @classmethod
    def _finite(cls, value: float) -> float:
        if not math.isfinite(value):
            raise ValueError("must be a finite number")
        return value

    @field_validator("prompt")
    @classmethod
    def _prompt_is_unicode(cls, value: str) -> str:
        return _unicode(value)

    @field_validator("echo_prompt", mode="before")
    @classmethod
    def _null_echo_is_false(cls, value: object) -> object:
        return False if value is None else value

    @field_validator("stop_sequences")
    @classmethod
    def _no_empty_stop(cls, value: list[str] | None) -> list[str]:
        if value is None:
            return []
        if any(s == "" for s in value):
            raise ValueError("an empty stop sequence would stop before the first token; remove it")
        return [_unicode(s) for s in value]


class Token(BaseModel):
    text: str
    logprob: float
    top_logprob: dict[str, float]


class ProcessResponse(BaseModel):
    text: str
    tokens: list[Token]
    logprob: float
    request_time: float


class TokenizeRequest(_Request):
    text: str
    truncation: bool = False
    max_length: int | None = Field(default=None, ge=1)

    @field_validator("text")
    @classmethod
    def _text_is_unicode(cls, value: str) -> str:
        return _unicode(value)


class TokenizeResponse(BaseModel):
    tokens: list[int]
    request_time: float


class DecodeRequest(_Request):
    tokens: list[int]


class DecodeResponse(BaseModel):
    text: str
    request_time: float


class HealthResponse(BaseModel):
    status: str
    submission: str
    model: str
    adapter: str | None


class ErrorResponse(BaseModel):
    """Every refusal: 422 (a field over a limit, or unservable), 503 (busy or timed out: see Retry-After),
    499 (the client disconnected), 500 (a bug: none is known to be reachable)."""

    detail: str
