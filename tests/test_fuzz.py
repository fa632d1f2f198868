"""Property-based tests of the server on the tiny model: no input reaches a 5xx, answers keep HELM's invariants.

schemathesis generates requests from the app's own OpenAPI schema (valid and invalid) and checks
every answer against it; hypothesis generates HELM-shaped requests (any unicode and control
characters, stop sequences, echo, top_k_per_token, temperatures, seeds) and checks what HELM
relies on. Both are bounded in examples so that `make test` stays quick. Each engine runs one request
at a time (the default); the static engine also batched (`max_batch = 4`), where a neighbour client
keeps sending greedy requests so that the fuzzed ones are decoded beside another row.
"""

from __future__ import annotations

import math

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error, response_schema_conformance, status_code_conformance

from conftest import ENGINES, make_config, serving

CONTEXT = 256
SERVERS = [(engine, 1) for engine in ENGINES]  # batched servers: the soak, contract and hostile tests (CI time)


@pytest.fixture(scope="module", params=SERVERS, ids=[f"{e}-batch{b}" for e, b in SERVERS])
def live(request, tiny_model_dir):
    import threading

    from helm_server.app import create_app

    engine, batch = request.param
    with serving(create_app(make_config(tiny_model_dir, server={"engine": engine, "max_batch": batch},
                                        context_length=CONTEXT, max_top_k_per_token=20, max_prompt_chars=2000))) as url:
        stop = threading.Event()
        neighbour_errors: list[str] = []

        def neighbour() -> None:  # a second client: the fuzzed requests share the batch with it
            body = {"prompt": "The capital of France is ", "temperature": 0.0, "max_new_tokens": 6}
            while not stop.wait(0.01):
                response = requests.post(f"{url}/process", json=body, timeout=60)
                if response.status_code != 200:
                    neighbour_errors.append(response.text)

        thread = threading.Thread(target=neighbour, daemon=True)
        if batch > 1:
            thread.start()
        try:
            yield url
        finally:
            stop.set()
            if batch > 1:
                thread.join(timeout=60)
        assert not neighbour_errors, neighbour_errors[:3]


@pytest.fixture(scope="module")
def api_schema(live):
    return schemathesis.openapi.from_url(f"{live}/openapi.json")


@pytest.mark.parametrize("path, mode", [(p, m) for p in ("/process", "/tokenize", "/decode") for m in ("positive", "negative")]
                         + [("/health", "positive")])  # /health takes nothing that could be invalid
def test_no_request_the_schema_allows_or_forbids_reaches_a_5xx(api_schema, path, mode, request):
    # schemathesis' own pytest plugin does not run under this pytest; its strategies and checks do.
    if "batch4" in request.node.name and (path, mode) == ("/process", "positive"):
        pytest.skip("the schema's valid /process bodies are fuzzed at batch 1 (70 s); batched: the HELM-shaped test")
    method = "get" if path == "/health" else "post"
    operation = api_schema[path][method]
    strategy = operation.as_strategy(generation_mode=schemathesis.GenerationMode(mode))

    @given(case=strategy)
    @settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
    def run(case):
        response = case.call(timeout=60)
        case.validate_response(response, checks=[not_a_server_error, response_schema_conformance,
                                                 status_code_conformance])

    run()


TEXT = st.text(st.characters(codec="utf-8"), max_size=120)  # any code point: unicode, controls, U+FFFD


@given(prompt=TEXT, stops=st.lists(st.text(st.characters(codec="utf-8"), min_size=1, max_size=4), max_size=3),
       echo=st.booleans(), k=st.integers(1, 20), max_new=st.integers(0, 24),
       temperature=st.sampled_from([0.0, 1e-7, 0.3, 1.0, 7.5, 1e308]), seed=st.none() | st.integers(0, 2**80),
       top_p=st.floats(0.01, 1.0))
@settings(max_examples=80, deadline=None, suppress_health_check=list(HealthCheck))
def test_helm_shaped_requests_keep_helm_s_invariants(live, prompt, stops, echo, k, max_new, temperature, seed, top_p):
    body = {"prompt": prompt, "stop_sequences": stops, "echo_prompt": echo, "top_k_per_token": k,
            "max_new_tokens": max_new, "temperature": temperature, "top_p": top_p, "seed": seed}
    response = requests.post(f"{live}/process", json=body, timeout=60)
    if response.status_code == 422:  # only for a prompt that cannot fit the context with its new tokens
        assert "exceeds the context length" in response.json()["detail"], response.text
        return
    assert response.status_code == 200, response.text
    out = response.json()
    joined = "".join(t["text"] for t in out["tokens"])
    completion = out["text"][len(prompt):] if echo else out["text"]
    if echo:
        assert out["text"].startswith(prompt)
    # text is the joined tokens; a token straddling a stop sequence is dropped, its prefix kept in text
    assert out["text"].startswith(joined)
    if not stops:
        assert out["text"] == joined
    assert not any(s in completion for s in stops)
    assert all(math.isfinite(t["logprob"]) and len(t["top_logprob"]) <= k for t in out["tokens"])
    assert math.isfinite(out["logprob"])
