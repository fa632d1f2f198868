"""A bounded soak: several HELM clients in parallel on loopback, valid and hostile requests mixed.

Afterwards: no 5xx, every valid request answered, the process's memory flat after warm-up, and the
last greedy answers identical to a fresh server's. `SOAK_SECONDS` sets the length (default 20 s,
the CI profile; a few minutes for a longer run). Each engine is soaked one request at a time
(`max_batch = 1`, the default) and batched (`max_batch = 4`: the 4 HELM clients decode together,
for half the time, and the fresh server the answers are compared with runs at batch 1).
"""

from __future__ import annotations

import os
import random
import threading
import time

import pytest
import requests

from conftest import ENGINES, make_config, rss_mib, serving
from helm_requests import completion, decoding, tokenization

SECONDS = float(os.environ.get("SOAK_SECONDS", "20"))
CLIENTS = 4
PROMPTS = ["The capital of France is ", "Once upon a time", "HELM evaluates language models ", "Élan, naïve café: 東京 "]
HOSTILE = [
    {"prompt": "hi", "max_new_tokens": 3, "temperature": 1e308},
    {"prompt": "hi", "max_new_tokens": 3, "temperature": 0.7, "seed": 99999999999999999999999},
    {"prompt": "word " * 421, "max_new_tokens": 0, "echo_prompt": True, "top_k_per_token": 151936},
    {"prompt": "x" * 100_001, "max_new_tokens": 1},
    {"prompt": "hi", "max_new_tokens": 100_000},
    {"prompt": "hi", "top_p": 5e-324, "temperature": 1.0, "max_new_tokens": 2},
    {"prompt": ["not", "a", "string"]},
]


def _greedy(client, prompt: str):
    result = client.make_request(completion(prompt, temperature=0.0, max_tokens=8, top_k_per_token=3))
    assert result.success, result.error
    return result.completions[0].text, [round(t.logprob, 4) for t in result.completions[0].tokens]


@pytest.mark.parametrize("max_batch", [1, CLIENTS])
@pytest.mark.parametrize("engine", ENGINES)
def test_parallel_helm_clients_with_hostile_requests(tiny_model_dir, engine, max_batch):
    from helm.clients.http_model_client import HTTPModelClient
    from helm.common.cache import BlackHoleCacheConfig
    from helm.tokenizers.http_model_tokenizer import HTTPModelTokenizer

    from helm_server.app import create_app

    statuses: list[int] = []
    failures: list[str] = []
    answered = [0]
    lock = threading.Lock()

    seconds = SECONDS if max_batch == 1 else SECONDS / 2
    with serving(create_app(make_config(tiny_model_dir, server={"engine": engine, "max_batch": max_batch}))) as url:
        client = HTTPModelClient(cache_config=BlackHoleCacheConfig(), base_url=url)
        tokenizer = HTTPModelTokenizer(cache_config=BlackHoleCacheConfig(), base_url=url)

        def valid_loop(seed: int, until: float) -> None:
            rng = random.Random(seed)
            while time.monotonic() < until:
                prompt = rng.choice(PROMPTS)
                try:
                    kind = rng.random()
                    if kind < 0.6:
                        result = client.make_request(completion(prompt, temperature=rng.choice([0.0, 0.7]),
                                                                max_tokens=rng.randint(0, 12), echo_prompt=kind < 0.1,
                                                                stop_sequences=rng.choice([[], ["\n"], ["e"]])))
                        assert result.success, result.error
                    elif kind < 0.8:
                        tokens = tokenizer.tokenize(tokenization(prompt)).raw_tokens
                        assert tokenizer.decode(decoding(tokens)).text == prompt
                    else:
                        _greedy(client, prompt)
                    with lock:
                        answered[0] += 1
                except Exception as e:  # noqa: BLE001 - every failure is collected and reported
                    with lock:
                        failures.append(f"{type(e).__name__}: {e}")

        def hostile_loop(until: float) -> None:
            rng = random.Random(99)
            while time.monotonic() < until:
                response = requests.post(f"{url}/process", json=rng.choice(HOSTILE), timeout=60)
                with lock:
                    statuses.append(response.status_code)

        def soak(seconds: float) -> None:
            until = time.monotonic() + seconds
            threads = [threading.Thread(target=valid_loop, args=(i, until)) for i in range(CLIENTS)]
            threads.append(threading.Thread(target=hostile_loop, args=(until,)))
            for t in threads:
                t.start()
            for t in threads:
                t.join()

        soak(min(5.0, seconds / 4))  # warm-up: allocator and caches settle
        before = rss_mib()
        soak(seconds)
        after = rss_mib()
        last = {p: _greedy(client, p) for p in PROMPTS}
        assert requests.get(f"{url}/health", timeout=5).status_code == 200

    assert not failures, failures[:5]
    assert answered[0] > CLIENTS and statuses and all(s < 500 for s in statuses), sorted(set(statuses))
    assert after - before < 150, f"RSS grew {after - before:.0f} MiB over the soak"

    with serving(create_app(make_config(tiny_model_dir, server={"engine": engine}))) as fresh_url:
        fresh = HTTPModelClient(cache_config=BlackHoleCacheConfig(), base_url=fresh_url)
        assert {p: _greedy(fresh, p) for p in PROMPTS} == last
    print(f"soak (max_batch {max_batch}): {answered[0]} valid requests answered, {len(statuses)} hostile ones ({sorted(set(statuses))}), "
          f"RSS {before:.0f} -> {after:.0f} MiB")
