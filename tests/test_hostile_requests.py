"""Requests that once reached a 500 or held the model for minutes: each answered fast, the server healthy.

The three from the server-hardening issue, against the tiny stand-in on the CPU.
"""

from __future__ import annotations

import json
import math
import time

import pytest
import requests

from conftest import make_config, serving


@pytest.fixture(scope="module")
def base_url(every_server_url):
    """Every engine, one request at a time and batched (conftest's SERVERS)."""
    return every_server_url


def _post(base_url: str, body: dict) -> tuple[requests.Response, float]:
    start = time.perf_counter()
    response = requests.post(f"{base_url}/process", json=body, timeout=60)
    return response, time.perf_counter() - start


def _healthy(base_url: str) -> bool:
    return requests.get(f"{base_url}/health", timeout=5).status_code == 200


def test_an_astronomical_temperature_is_clamped_not_a_500(base_url):
    response, seconds = _post(base_url, {"prompt": "hi", "max_new_tokens": 3, "temperature": 1e308})
    assert response.status_code == 200, response.text
    assert all(math.isfinite(t["logprob"]) for t in response.json()["tokens"])
    assert seconds < 1 and _healthy(base_url)


def test_a_seed_past_64_bits_is_reduced_not_an_overflow(base_url):
    body = {"prompt": "hi", "max_new_tokens": 3, "temperature": 0.7, "seed": 99999999999999999999999}
    first, seconds = _post(base_url, body)
    again, _ = _post(base_url, body)
    assert first.status_code == 200, first.text
    assert first.json()["text"] == again.json()["text"]  # still a seed: the same answer twice
    assert seconds < 1 and _healthy(base_url)


def test_a_huge_top_k_per_token_is_refused_at_once_naming_the_limit(base_url):
    body = {"prompt": "word " * 421, "max_new_tokens": 0, "echo_prompt": True, "top_k_per_token": 151936}
    response, seconds = _post(base_url, body)
    assert response.status_code == 422
    assert "top_k_per_token 151936" in response.json()["detail"] and "max_top_k_per_token" in response.json()["detail"]
    assert seconds < 1 and _healthy(base_url)


def test_an_oversized_prompt_is_refused_naming_the_limit(base_url):
    response, seconds = _post(base_url, {"prompt": "x" * 100_001, "max_new_tokens": 1})
    assert response.status_code == 422 and "max_prompt_chars" in response.json()["detail"]
    assert seconds < 1


def test_a_lone_surrogate_is_refused_naming_the_field_not_a_500(base_url):
    bad = "\u0000\ud800 bad surrogate"  # valid JSON (an escaped UTF-16 half), not a Unicode character
    for route, body, field in (("process", {"prompt": bad, "max_new_tokens": 1}, "prompt"),
                               ("process", {"prompt": "hi", "max_new_tokens": 1, "stop_sequences": ["ok", bad]},
                                "stop_sequences"),
                               ("tokenize", {"text": bad}, "text")):
        raw = json.dumps(body)  # keeps the escape: requests' own encoder would fail on it before sending
        response = requests.post(f"{base_url}/{route}", data=raw, headers={"Content-Type": "application/json"},
                                 timeout=30)
        assert response.status_code == 422, (route, response.text)
        assert response.json()["detail"].startswith(field) and "lone surrogate (U+D800" in response.json()["detail"]
    assert _healthy(base_url)


@pytest.mark.parametrize("max_batch", [1, 2])
def test_a_full_queue_is_answered_503_at_once_and_health_stays_up(tiny_model_dir, max_batch):
    import threading

    from helm_server.app import create_app

    # the holders' deadline ends them (200, shorter) soon after the test is done with them
    config = make_config(tiny_model_dir, context_length=2048, min_new_tokens=1900,
                         server={"max_queue": 0, "max_batch": max_batch, "request_timeout_s": 3})
    with serving(create_app(config)) as url:
        long = {"prompt": "hi", "max_new_tokens": 1900, "temperature": 0}
        holders = [threading.Thread(target=lambda: requests.post(f"{url}/process", json=long, timeout=300))
                   for _ in range(max_batch)]
        for holder in holders:
            holder.start()
        try:
            time.sleep(0.5)  # the long requests fill the batch; max_queue = 0: nobody may wait
            response, seconds = _post(url, {"prompt": "hi", "max_new_tokens": 1})
            assert all(h.is_alive() for h in holders), "a long request ended before the test could queue behind it"
            assert response.status_code == 503 and response.headers["Retry-After"] == "2"
            assert "server.max_queue" in response.json()["detail"] and seconds < 1
            start = time.perf_counter()
            assert _healthy(url) and time.perf_counter() - start < 1
        finally:
            for holder in holders:
                holder.join(timeout=300)
        assert _post(url, {"prompt": "hi", "max_new_tokens": 1})[0].status_code == 200  # free again


# --- deadlines and cancellation ------------------------------------------------------------


def _long_serving(tiny_model_dir, **server):
    """The tiny model forced to generate for a long time: 1,900 tokens before end-of-text may come."""
    from helm_server.app import create_app

    return serving(create_app(make_config(tiny_model_dir, server=server, context_length=2048, min_new_tokens=1900)))


LONG = {"prompt": "Once upon a time", "max_new_tokens": 1900, "temperature": 1e-7}


@pytest.mark.parametrize("max_batch", [1, 4])
def test_a_request_past_its_deadline_is_answered_with_what_was_generated(tiny_model_dir, caplog, max_batch):
    import logging

    caplog.set_level(logging.INFO, logger="helm_server")
    with _long_serving(tiny_model_dir, request_timeout_s=0.5, max_batch=max_batch) as url:
        response, seconds = _post(url, LONG)
        assert response.status_code == 200, response.text
        body = response.json()
        assert 0 < len(body["tokens"]) < 1900 and body["text"] == "".join(t["text"] for t in body["tokens"])
        assert seconds < 5 and _healthy(url)
    assert any("(deadline)" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("max_batch", [1, 4])
def test_a_client_that_disconnects_frees_the_model_at_the_next_token(tiny_model_dir, caplog, max_batch):
    import logging

    caplog.set_level(logging.INFO, logger="helm_server")
    with _long_serving(tiny_model_dir, request_timeout_s=600, max_batch=max_batch) as url:
        try:
            requests.post(f"{url}/process", json=LONG, timeout=0.5)
            raise AssertionError("the long request finished within half a second")
        except requests.exceptions.ReadTimeout:
            pass  # the client gives up and closes its connection
        deadline = time.monotonic() + 30
        while not any("request cancelled" in r.getMessage() for r in caplog.records):
            assert time.monotonic() < deadline, "the generation was not cancelled"
            time.sleep(0.05)
        stopped = next(r.getMessage() for r in caplog.records if "request cancelled" in r.getMessage())
        assert "stopped after" in stopped and int(stopped.split("stopped after ")[1].split()[0]) < 1900
        quick, seconds = _post(url, {"prompt": "hi", "max_new_tokens": 0, "echo_prompt": True})
        assert quick.status_code == 200 and _healthy(url)


def test_a_request_whose_deadline_passes_while_waiting_never_runs():
    import threading

    import pytest

    from helm_server.app import ModelGate
    from helm_server.deadline import Cancelled, Ticket, WaitedTooLong

    gate = ModelGate(max_queue=4)
    gate.model_lock.acquire()  # another request holds the model
    try:
        with pytest.raises(WaitedTooLong, match="request_timeout_s"):
            with gate.admit(Ticket(timeout_s=0.2)):
                raise AssertionError("ran past its deadline")
        ticket = Ticket(timeout_s=60)
        threading.Timer(0.1, ticket.cancelled.set).start()
        with pytest.raises(Cancelled):
            with gate.admit(ticket):
                raise AssertionError("ran after its client left")
    finally:
        gate.model_lock.release()
    assert gate.inside == 0  # neither holds a place in the queue


def test_a_top_p_below_float32_s_range_still_samples(base_url):
    # found by the fuzz test: 5e-324 is 0 in float32, which once emptied the nucleus (a 500)
    response, seconds = _post(base_url, {"prompt": "hi", "max_new_tokens": 3, "temperature": 1.0, "top_p": 5e-324})
    assert response.status_code == 200, response.text
    assert seconds < 1 and _healthy(base_url)
