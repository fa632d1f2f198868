"""HELM requests as the `neurips/local` deployment builds them."""

from __future__ import annotations

from helm.common.request import Request
from helm.common.tokenization_request import DecodeRequest, TokenizationRequest

MODEL = "neurips/local"


def completion(prompt: str, **kwargs) -> Request:
    return Request(model=MODEL, model_deployment=MODEL, prompt=prompt, **kwargs)


def tokenization(text: str, **kwargs) -> TokenizationRequest:
    return TokenizationRequest(text=text, tokenizer=MODEL, encode=True, **kwargs)


def decoding(tokens: list[int]) -> DecodeRequest:
    return DecodeRequest(tokens=tokens, tokenizer=MODEL)
