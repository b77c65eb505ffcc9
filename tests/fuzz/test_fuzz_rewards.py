"""Fuzzed reward outputs and reward servers: NaN, inf, wrong shape or dtype, exceptions, garbage answers, a
server that never answers. Each gives the scores as float32 ``[B]``, or a RewardError naming the reward (and for
non-finite scores, how many); a run whose reward fails leaves a folder a resume completes."""

from __future__ import annotations

import http.server
import json
import math
import socket
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from fuzz_helpers import assert_clear_error, assert_complete_run, fuzz, registered_reward, tiny_config
from hypothesis import event, example, given
from hypothesis import strategies as st

from diffalign import rewards
from diffalign.rewards import Reward, RewardError
from diffalign.rewards.http import HttpReward
from diffalign.train.checkpoint import latest_checkpoint
from diffalign.train.loop import train

IMAGES = torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(0))
PROMPTS = ["a cat", "a dog", "a fox"]

FLOAT_DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
OTHER_DTYPES = [torch.int32, torch.int64, torch.uint8, torch.bool, torch.complex64]
SPECIAL = [math.nan, math.inf, -math.inf, 1e39, -1e39, 7e4]


@st.composite
def tensors(draw, batch: int):
    shape = draw(st.sampled_from([(batch,)] * 4 + [(batch, 1), (), (batch + 1,), (0,), (1, batch)]))
    dtype = draw(st.sampled_from(FLOAT_DTYPES + OTHER_DTYPES))
    n = math.prod(shape)
    if dtype.is_floating_point or dtype.is_complex:
        values = draw(st.lists(st.one_of(st.floats(-1e3, 1e3), st.sampled_from(SPECIAL)), min_size=n, max_size=n))
    else:
        values = draw(st.lists(st.integers(0, 1) if dtype == torch.bool else st.integers(0, 200), min_size=n,
                               max_size=n))
    return torch.tensor(values, dtype=torch.float64 if dtype.is_floating_point else None).to(dtype).reshape(shape)


def torch_internal_error():
    return torch.ones(2, 3) @ torch.ones(2, 3)  # a RuntimeError raised inside torch


def raising(error_type: type[BaseException], message: str):
    def score():
        raise error_type(message)

    score.__name__ = f"raises {error_type.__name__}"
    return score


def outputs(batch: int):
    return st.one_of(
        tensors(batch),
        st.sampled_from([None, 0.5, "high", [0.1] * batch, np.ones(batch, dtype=np.float32), {"scores": 1}]),
        st.sampled_from([raising(ValueError, "bad value"), raising(KeyError, "missing"), torch_internal_error,
                         raising(ZeroDivisionError, "division by zero"), raising(AssertionError, "invariant")]),
    )


def fuzzed_reward(output, name: str = "fuzzed"):
    class Fuzzed(Reward):
        def score(self, images, prompts):
            return output() if callable(output) else output

    Fuzzed.name = name
    return Fuzzed()


@fuzz(250)
@given(data=st.data(), batch=st.integers(1, 3), via_output=st.booleans())
def test_any_reward_output_is_scores_or_a_named_error(data, batch, via_output):
    output = data.draw(outputs(batch), label="output")
    reward = fuzzed_reward(output)
    call = (lambda: reward.output(IMAGES[:batch], PROMPTS[:batch]).scores) if via_output else (
        lambda: reward(IMAGES[:batch], PROMPTS[:batch]))
    good = isinstance(output, torch.Tensor) and output.shape == (batch,) and not output.is_complex()
    expected = output.float() if good else None
    if good and torch.isfinite(expected).all():
        event("scores")
        scores = call()
        assert scores.dtype == torch.float32 and torch.equal(scores, expected)
        return
    event("error")
    with pytest.raises(RewardError) as raised:
        call()
    assert_clear_error(raised.value, "reward 'fuzzed'", types=(RewardError,))
    if good:  # finite in its own dtype or not, some scores are not finite as float32: say how many
        bad = int((~torch.isfinite(expected)).sum())
        assert_clear_error(raised.value, "non-finite", f"{bad} of {batch}", types=(RewardError,))


@fuzz(60)
@given(poison=st.sampled_from([math.nan, math.inf, -math.inf, 2.0, -0.5]), count=st.integers(1, 5),
       name=st.sampled_from(["brightness", "jpeg_compressibility", "random_classifier"]))
def test_images_out_of_range_or_not_finite_are_named_before_scoring(poison, count, name):
    images = IMAGES.clone()
    images.view(-1)[:count] = poison
    reward = rewards.get(name)
    with pytest.raises(RewardError) as raised:
        reward(images, PROMPTS)
    assert_clear_error(raised.value, f"reward {name!r}", types=(RewardError,))
    if not math.isfinite(poison):
        assert_clear_error(raised.value, f"{count} NaN or infinite", types=(RewardError,))


KWARG_VALUES = st.one_of(st.sampled_from(["nan", "inf", "-inf", "-1", "0", "1", "0.5", "1e400", "abc", "", " true",
                                          "no", "99999999999999999999999", "1_000", "png", "jpeg", "float32"]),
                         st.text(max_size=8))


def _keywords(name: str) -> list[str]:
    return [k for k in sorted(rewards.registry.parameters(name)) if k not in ("device", "url")] * 4 + ["nonsense"]


KWARG_CASES = st.sampled_from(["brightness", "random_classifier", "http", "jpeg_incompressibility"]).flatmap(
    lambda name: st.tuples(st.just(name), st.dictionaries(st.sampled_from(_keywords(name)), KWARG_VALUES, max_size=3)))


@fuzz(120)
@given(case=KWARG_CASES)
@example(case=("random_classifier", {"seed": "99999999999999999999999"}))
@example(case=("http", {"timeout": "nan", "backoff": "inf"}))
def test_reward_keywords_from_the_command_line_build_or_name_the_keyword(case):
    name, kwargs = case
    kwargs = dict(kwargs)
    if name == "http":
        kwargs["url"] = "http://127.0.0.1:9"
    try:
        reward = rewards.get(name, **kwargs)
    except ValueError as error:
        event("rejected")
        assert_clear_error(error)
        message = str(error).lower()
        assert name.replace("_", "") in message.replace("_", "") and (
            any(k in message for k in kwargs) or "needs" in message), message
        return
    event("built")
    assert isinstance(reward, Reward) and reward.name == name
    if name == "http":
        assert 0 < reward._client.timeout.read < math.inf and reward.backoff >= 0 and not math.isnan(reward.backoff)
        reward.close()


class ScriptedServer(http.server.ThreadingHTTPServer):
    """A local HTTP server answering every request with ``self.answer`` = (status, body bytes)."""

    daemon_threads = True
    answer = (200, b"{}")


class _Handler(http.server.BaseHTTPRequestHandler):
    def _reply(self):
        length = int(self.headers.get("Content-Length") or 0)
        self.rfile.read(length)
        status, body = self.server.answer
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_POST = do_GET = _reply

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def scripted_server():
    server = ScriptedServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


JSON_SCALARS = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-(2**70), 2**70),
                         st.booleans(), st.none(), st.text(max_size=4))


@st.composite
def answers(draw, batch: int):
    status = draw(st.sampled_from([200] * 6 + [400, 422, 500, 503]))
    kind = draw(st.sampled_from(["rewards"] * 4 + ["length", "shape", "object", "text", "empty"]))
    if kind == "rewards":
        body = {"rewards": draw(st.lists(st.one_of(st.floats(-1e3, 1e3), JSON_SCALARS), min_size=batch,
                                         max_size=batch)), "reward": "remote"}
    elif kind == "length":
        body = {"rewards": draw(st.lists(st.floats(-1, 1), max_size=5).filter(lambda v: len(v) != batch))}
    elif kind == "shape":
        body = {"rewards": [[0.5]] * batch}
    elif kind == "object":
        body = draw(st.sampled_from([[], {}, {"detail": "overloaded"}, "ok", 3]))
    else:
        return status, (b"" if kind == "empty" else draw(st.binary(max_size=40)))
    return status, json.dumps(body).encode()


def expected_scores(status: int, body: bytes, batch: int) -> torch.Tensor | None:
    if status != 200:
        return None
    try:
        answer = json.loads(body)
        values = answer["rewards"]
        assert isinstance(values, list) and len(values) == batch
        scores = torch.tensor(values, dtype=torch.float32)
    except Exception:
        return None
    return scores if scores.shape == (batch,) and torch.isfinite(scores).all() else None


@fuzz(80)
@given(data=st.data(), batch=st.integers(1, 3), chunk_size=st.integers(1, 4))
def test_any_reward_server_answer_is_scores_or_a_named_error(scripted_server, data, batch, chunk_size):
    status, body = data.draw(answers(batch if chunk_size >= batch else min(chunk_size, batch)), label="answer")
    scripted_server.answer = (status, body)
    url = f"http://127.0.0.1:{scripted_server.server_address[1]}"
    reward = HttpReward(url, chunk_size=chunk_size, max_retries=0, backoff=0.0, timeout=5.0)
    try:
        chunks = math.ceil(batch / chunk_size)
        per_chunk = expected_scores(status, body, min(chunk_size, batch))
        # every chunk gets the same answer: it fits only when each chunk has the answer's length
        fits = per_chunk is not None and (batch % chunk_size == 0 or chunks == 1)
        if fits:
            event("scores")
            scores = reward(IMAGES[:batch], PROMPTS[:batch])
            assert torch.equal(scores, per_chunk.repeat(chunks)[:batch])
            return
        event(f"error (HTTP {status})")
        with pytest.raises(RewardError) as raised:
            reward(IMAGES[:batch], PROMPTS[:batch])
        assert_clear_error(raised.value, types=(RewardError,))
        assert url in str(raised.value) or "reward 'http'" in str(raised.value), str(raised.value)
    finally:
        reward.close()


@pytest.fixture(scope="module")
def silent_server():
    """A socket that accepts connections and never answers: the slowest possible reward server."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    sock.close()


@fuzz(3)
@given(timeout=st.sampled_from([0.05, 0.1, 0.2]), retries=st.integers(0, 1))
def test_a_server_that_never_answers_times_out_naming_the_url(silent_server, timeout, retries):
    reward = HttpReward(silent_server, timeout=timeout, max_retries=retries, backoff=0.0)
    start = time.monotonic()
    try:
        with pytest.raises(RewardError) as raised:
            reward(IMAGES[:1], PROMPTS[:1])
    finally:
        reward.close()
    assert_clear_error(raised.value, silent_server, "Timeout", f"after {retries + 1} attempts", types=(RewardError,))
    assert time.monotonic() - start < (retries + 1) * timeout + 2.0


class Switch:
    """Which reward call (counted from 0) starts failing, and how; ``healthy`` turns the failure off."""

    fail_from, kind, calls, healthy = 0, "nan", 0, False


def switched_reward(device="cpu"):
    class Switched(Reward):
        name = "switched"

        def score(self, images, prompts):
            call, Switch.calls = Switch.calls, Switch.calls + 1
            scores = images.mean(dim=(1, 2, 3))
            if Switch.healthy or call < Switch.fail_from:
                return scores
            return {"nan": scores * math.nan, "inf": scores / 0, "shape": scores[:, None], "int": "0.5",
                    "raise": scores[0] @ scores}[Switch.kind]

    return Switched(device)


# Reward calls of the run below: 0 the base evaluation, 1 epoch 0 (checkpoint 1 follows), 2 epoch 1 (checkpoint 2),
# 3 the final evaluation.
@fuzz(4)
@given(kind=st.sampled_from(["nan", "inf", "shape", "int", "raise"]), fail_from=st.sampled_from([2, 3]),
       async_scoring=st.booleans())
def test_a_reward_failing_mid_run_leaves_a_folder_that_resumes_to_a_complete_run(kind, fail_from, async_scoring):
    Switch.fail_from, Switch.kind, Switch.calls, Switch.healthy = fail_from, kind, 0, False
    with registered_reward("switched", switched_reward), tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "run"
        config = tiny_config(run_dir, epochs=2, **{"reward.name": "switched", "reward.async_scoring": async_scoring})
        with pytest.raises(RewardError) as raised:
            train(config)
        assert_clear_error(raised.value, "reward 'switched'", types=(RewardError,))
        assert latest_checkpoint(run_dir).name == str(fail_from - 1)
        Switch.healthy = True
        train(tiny_config(run_dir, epochs=2, resume=str(run_dir), **{"reward.name": "switched"}))
        assert_complete_run(run_dir, 2)


@pytest.mark.parametrize("fail_from", [0, 1])
def test_a_reward_failing_before_the_first_checkpoint_leaves_no_run_folder(fail_from):
    Switch.fail_from, Switch.kind, Switch.calls, Switch.healthy = fail_from, "nan", 0, False
    with registered_reward("switched", switched_reward), tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "run"
        with pytest.raises(RewardError):
            train(tiny_config(run_dir, epochs=2, **{"reward.name": "switched"}))
        assert not run_dir.exists(), sorted(p.name for p in run_dir.iterdir())
