"""The serving worker under concurrent load, on a real uvicorn server on 127.0.0.1: the event loop stays free,
matching requests are batched without changing their images, a full queue answers 503, a client that leaves or
a request that times out stops its generation."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest

BODY = {"prompt": "a red circle", "model": "base", "steps": 4, "seed": 0}
#: Long enough to still be running while a test looks (every such request is cancelled, never waited for).
LONG = {**BODY, "steps": 400, "preview_every": 1}


def wait_for(url: str, predicate, timeout: float = 20.0) -> dict:
    """Polls /health until ``predicate(health)`` holds; returns that health answer."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        health = httpx.get(f"{url}/health").json()
        if predicate(health):
            return health
        time.sleep(0.02)
    raise AssertionError(f"/health never satisfied the condition; last: {health}")


class Blocker:
    """A long streamed request that holds the worker until :meth:`release` leaves it (which cancels it)."""

    def __init__(self, url: str, **changes):
        self.client = httpx.Client(timeout=60)
        self.context = self.client.stream("POST", f"{url}/generate/stream", json={**LONG, **changes})
        self.response = self.context.__enter__()
        assert self.response.status_code == 200
        self.lines = self.response.iter_lines()
        while next(self.lines) != "event: preview":  # it is running: the worker is busy
            pass

    def release(self) -> None:
        self.context.__exit__(None, None, None)
        self.client.close()


def post_in_threads(url: str, bodies: list[dict]) -> list:
    """Starts one POST /generate per body in its own thread; returns the futures."""
    pool = ThreadPoolExecutor(len(bodies))
    return [pool.submit(httpx.post, f"{url}/generate", json=body, timeout=60) for body in bodies]


def test_health_answers_during_generation_and_concurrent_requests_both_succeed(start_server):
    url = start_server().url
    blocker = Blocker(url)
    try:
        started = time.monotonic()
        health = httpx.get(f"{url}/health").json()
        assert time.monotonic() - started < 0.5 and health["running"] == 1
        futures = post_in_threads(url, [{**BODY, "model": "base"}, {**BODY, "model": "aligned"}])
        wait_for(url, lambda h: h["queued"] == 2)
    finally:
        blocker.release()
    base, aligned = (f.result().json() for f in futures)
    assert base["model"] == "base" and aligned["model"] == "aligned"
    assert base["images"][0]["png"] != aligned["images"][0]["png"]
    health = wait_for(url, lambda h: h["running"] == 0 and h["completed"] == 2)
    assert health["cancelled"] == 1 and health["failed"] == 0


def test_matching_requests_run_as_one_batch_with_their_solo_images(start_server, png_pixels):
    url = start_server(concurrency=4).url
    seeds = [1, 2, 3]
    blocker = Blocker(url)
    try:
        futures = post_in_threads(url, [{**BODY, "seed": s} for s in seeds])
        wait_for(url, lambda h: h["queued"] == 3)
    finally:
        blocker.release()
    batched = [f.result().json() for f in futures]
    assert [r["batch_size"] for r in batched] == [3, 3, 3] and [r["seed"] for r in batched] == seeds
    for result, seed in zip(batched, seeds):
        solo = httpx.post(f"{url}/generate", json={**BODY, "seed": seed}, timeout=60).json()
        assert solo["batch_size"] == 1
        # a sample does not depend on its batch: the same pixels up to float rounding in the batched convolutions
        difference = png_pixels(solo["images"][0]["png"]).astype(int) - png_pixels(result["images"][0]["png"])
        assert np.abs(difference).max() <= 1
    assert wait_for(url, lambda h: h["batches"] == 5)["mean_batch_size"] == pytest.approx(7 / 5)  # 1 + 3 + 1 + 1 + 1


def test_a_full_queue_answers_503_with_retry_after(start_server):
    url = start_server(concurrency=1, queue_length=1).url
    blocker = Blocker(url)
    try:
        (waiting,) = post_in_threads(url, [BODY])
        wait_for(url, lambda h: h["queued"] == 1)
        refused = httpx.post(f"{url}/generate", json=BODY)
        assert refused.status_code == 503 and int(refused.headers["retry-after"]) >= 1
        assert "queue is full (1 requests waiting)" in refused.json()["detail"]
        assert httpx.post(f"{url}/generate/stream", json=BODY).status_code == 503
    finally:
        blocker.release()
    assert waiting.result().status_code == 200


def test_a_client_that_leaves_stops_its_generation(start_server):
    url = start_server().url
    blocker = Blocker(url)
    started = time.monotonic()
    blocker.release()
    health = wait_for(url, lambda h: h["running"] == 0 and h["cancelled"] == 1, timeout=5)
    assert health["completed"] == 0 and time.monotonic() - started < 5  # 400 steps would take far longer


def test_a_request_over_the_timeout_gets_504_and_is_stopped(start_server):
    url = start_server(request_timeout=1.0).url
    started = time.monotonic()
    response = httpx.post(f"{url}/generate", json=LONG, timeout=30)
    assert response.status_code == 504 and "request_timeout of 1 s" in response.json()["detail"]
    assert time.monotonic() - started < 3
    wait_for(url, lambda h: h["running"] == 0 and h["cancelled"] == 1, timeout=5)
    assert httpx.post(f"{url}/generate", json=BODY).status_code == 200  # the worker is free again


def test_a_waiting_request_whose_client_leaves_frees_its_queue_slot(start_server):
    url = start_server(concurrency=1, queue_length=1).url
    blocker = Blocker(url)
    try:
        outcome = []
        leaving = threading.Thread(target=_post_and_leave, args=(url, outcome))
        leaving.start()
        wait_for(url, lambda h: h["queued"] == 1)
        leaving.join()
        assert outcome == ["gave up"]
        wait_for(url, lambda h: h["queued"] == 0 and h["cancelled"] == 1)
    finally:
        blocker.release()


def _post_and_leave(url: str, outcome: list) -> None:
    """Posts a request and gives up on it after a second (closing the connection)."""
    try:
        response = httpx.post(f"{url}/generate", json=BODY, timeout=httpx.Timeout(5, read=1.0))
        outcome.append(response.status_code)
    except httpx.ReadTimeout:
        outcome.append("gave up")
