"""HELM conformance requests against a running submission server.

The same checks run in the test suite (against the in-process server) and in
`make validate-N` (against the container). They need no reference model:
each compares the server with itself through HELM's real `HTTPModelClient`
and `HTTPModelTokenizer` (greedy is deterministic, echo scores what
tokenize counts, stop sequences cut what greedy produced, ...), so they hold
for a 14B GPTQ model on a GPU as for a tiny one on a CPU.

    python -m packager.conformance http://127.0.0.1:8080 [--json]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from typing import Callable

import requests

MODEL = "neurips/local"
PROMPT = "The capital of France is "
SCORED_TEXT = "Question: What is two plus two?\nAnswer: four"


@dataclass
class CheckResult:
    name: str
    passed: bool
    seconds: float
    detail: str = ""


class Server:
    """HELM's client classes pointed at one base URL."""

    def __init__(self, base_url: str, timeout: int = 600) -> None:
        from helm.clients.http_model_client import HTTPModelClient
        from helm.common.cache import BlackHoleCacheConfig
        from helm.tokenizers.http_model_tokenizer import HTTPModelTokenizer

        self.url = base_url.rstrip("/")
        self.client = HTTPModelClient(cache_config=BlackHoleCacheConfig(), base_url=self.url, timeout=timeout)
        self.tokenizer = HTTPModelTokenizer(cache_config=BlackHoleCacheConfig(), base_url=self.url)
        self.timeout = timeout

    def complete(self, prompt: str, **kwargs):
        from helm.common.request import Request

        result = self.client.make_request(Request(model=MODEL, model_deployment=MODEL, prompt=prompt, **kwargs))
        assert result.success, f"HELM request failed: {result.error}"
        return result.completions[0]

    def tokenize(self, text: str, **kwargs) -> list[int]:
        from helm.common.tokenization_request import TokenizationRequest

        result = self.tokenizer.tokenize(TokenizationRequest(text=text, tokenizer=MODEL, encode=True, **kwargs))
        assert result.success, f"HELM tokenize failed: {result.error}"
        return [t.value for t in result.tokens]

    def decode(self, tokens: list[int]) -> str:
        from helm.common.tokenization_request import DecodeRequest

        result = self.tokenizer.decode(DecodeRequest(tokens=tokens, tokenizer=MODEL))
        assert result.success, f"HELM decode failed: {result.error}"
        return result.text


def organizers_probe(s: Server) -> str:
    """The challenge's first request: a bare prompt with every other field defaulted."""
    response = requests.post(f"{s.url}/process", json={"prompt": PROMPT}, timeout=s.timeout)
    assert response.status_code == 200, f"status {response.status_code}: {response.text[:300]}"
    body = response.json()
    assert {"text", "tokens", "logprob", "request_time"} <= set(body), f"fields: {sorted(body)}"
    return f"{len(body['tokens'])} tokens: {body['text'][:40]!r}"


def greedy_is_deterministic(s: Server) -> str:
    first = s.complete(PROMPT, temperature=0.0, max_tokens=16)
    second = s.complete(PROMPT, temperature=0.0, max_tokens=16)
    assert first.text == second.text, f"{first.text!r} != {second.text!r}"
    assert [t.logprob for t in first.tokens] == [t.logprob for t in second.tokens], "logprobs differ"
    assert first.tokens, "no tokens generated"
    assert all(math.isfinite(t.logprob) and t.logprob <= 1e-6 for t in first.tokens), "logprobs not finite / > 0"
    assert math.isclose(first.logprob, sum(t.logprob for t in first.tokens), abs_tol=1e-3), "logprob != sum"
    return f"{len(first.tokens)} tokens"


def echo_scores_the_prompt(s: Server) -> str:
    ids = s.tokenize(SCORED_TEXT)
    out = s.complete(SCORED_TEXT, echo_prompt=True, max_tokens=0, temperature=0.0)
    assert out.text == SCORED_TEXT, f"echoed text {out.text!r}"
    assert len(out.tokens) == len(ids), f"{len(out.tokens)} tokens echoed, /tokenize counts {len(ids)}"
    assert out.tokens[0].logprob == 0.0, "the first prompt token has no context: logprob 0.0"
    assert all(math.isfinite(t.logprob) and t.logprob <= 1e-6 for t in out.tokens), "prompt logprobs not finite"
    return f"{len(ids)} prompt tokens, logprob {out.logprob:.2f}"


def echo_agrees_with_generation(s: Server) -> str:
    """Prefill-time logprobs of the prompt's continuation match decode-time ones."""
    gen = s.complete(PROMPT, temperature=0.0, max_tokens=4)
    both = s.complete(PROMPT, echo_prompt=True, temperature=0.0, max_tokens=4)
    assert both.text == PROMPT + gen.text, f"{both.text!r} != prompt + {gen.text!r}"
    tail = both.tokens[len(both.tokens) - len(gen.tokens) :]
    for a, b in zip(tail, gen.tokens):
        assert math.isclose(a.logprob, b.logprob, abs_tol=1e-3), f"{a.logprob} != {b.logprob}"
    return "ok"


def stop_sequences_are_cut(s: Server) -> str:
    full = s.complete(PROMPT, temperature=0.0, max_tokens=16)
    text = full.text
    pairs = [
        (i, full.tokens[i].text[-1:] + full.tokens[i + 1].text[:1])
        for i in range(len(full.tokens) - 1)
        if full.tokens[i].text and full.tokens[i + 1].text
    ]
    assert pairs, f"greedy output {text!r} has no two adjacent non-empty tokens to build a stop sequence from"
    _, stop = pairs[len(pairs) // 2]
    cut = s.complete(PROMPT, temperature=0.0, max_tokens=16, stop_sequences=[stop])
    assert cut.text == text[: text.index(stop)], f"cut at {stop!r}: got {cut.text!r}"
    assert stop not in cut.text and "".join(t.text for t in cut.tokens) in text
    return f"stop {stop!r} spanning two tokens"


def tokenize_truncates_and_decode_round_trips(s: Server) -> str:
    text = "Once upon a time, there was a small language model that answered questions."
    ids = s.tokenize(text)
    cut = s.tokenize(text, truncation=True, max_length=4)
    assert cut == ids[:4], f"truncated to {cut}, expected {ids[:4]}"
    assert s.decode(ids) == text, "decode(tokenize(text)) != text"
    return f"{len(ids)} tokens"


def bad_request_is_a_clear_422(s: Server) -> str:
    response = requests.post(f"{s.url}/process", json={"prompt": PROMPT, "max_new_tokens": -1}, timeout=60)
    assert response.status_code == 422, f"status {response.status_code}"
    assert "max_new_tokens" in response.json().get("detail", ""), response.text[:300]
    assert requests.get(f"{s.url}/health", timeout=30).status_code == 200, "unhealthy after a bad request"
    return "422 names the field; still healthy"


CHECKS: list[Callable[[Server], str]] = [
    organizers_probe,
    greedy_is_deterministic,
    echo_scores_the_prompt,
    echo_agrees_with_generation,
    stop_sequences_are_cut,
    tokenize_truncates_and_decode_round_trips,
    bad_request_is_a_clear_422,
]


def run_checks(base_url: str, timeout: int = 600) -> list[CheckResult]:
    server = Server(base_url, timeout)
    results = []
    for check in CHECKS:
        start = time.perf_counter()
        try:
            detail, passed = check(server), True
        except Exception as e:  # a failed check is reported, the others still run
            detail, passed = f"{type(e).__name__}: {e}", False
        results.append(CheckResult(check.__name__, passed, time.perf_counter() - start, detail))
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="run HELM conformance requests against a submission server")
    p.add_argument("url")
    p.add_argument("--json", action="store_true", help="print results as JSON lines")
    args = p.parse_args(argv)
    results = run_checks(args.url)
    for r in results:
        if args.json:
            print(json.dumps(asdict(r)))
        else:
            print(f"{'PASS' if r.passed else 'FAIL'}  {r.name:45s} {r.seconds * 1000:8.0f} ms  {r.detail}")
    return 0 if all(r.passed for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
