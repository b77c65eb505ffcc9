"""The HTTP reward contract: a real uvicorn server on 127.0.0.1, exact parity, retries and clear errors."""

from __future__ import annotations

import socket
import time

import pytest
import torch

from diffalign.rewards import Reward, RewardError, get
from diffalign.rewards.http import HttpReward, decode_images, encode_images

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("httpx")

from diffalign.serve.reward_server import serve_in_thread  # noqa: E402  (needs fastapi)


class Counting(Reward):
    """Brightness that counts its calls and fails with an exception on the calls listed in ``fail_on``."""

    name = "counting"
    needs_prompts = True

    def __init__(self, fail_on=()):
        super().__init__()
        self.calls = 0
        self.fail_on = set(fail_on)

    def score(self, images, prompts):
        self.calls += 1
        if self.calls in self.fail_on:
            raise RuntimeError("transient failure")
        return images.mean(dim=(1, 2, 3))


@pytest.fixture(scope="module")
def jpeg_server():
    server = serve_in_thread(get("jpeg_compressibility"))
    yield server
    server.stop()


def _images(n, seed=0, size=24):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_float32_encoding_is_lossless():
    images = _images(3)
    assert torch.equal(decode_images(encode_images(images)), images)
    quantised = (images * 255).round() / 255
    assert torch.equal(decode_images(encode_images(quantised, "png")), quantised)
    with pytest.raises(ValueError, match=r"holds 0 bytes, but shape \[2, 3, 1, 1\] needs 24"):
        decode_images({"encoding": "float32", "shape": [2, 3, 1, 1], "data": ""})


@pytest.mark.parametrize("encoding,chunk_size", [("float32", 2), ("png", 16)])
def test_remote_equals_local_exactly(jpeg_server, encoding, chunk_size):
    local = get("jpeg_compressibility")
    remote = HttpReward(jpeg_server.url, chunk_size=chunk_size, encoding=encoding)
    images = _images(5)
    prompts = [f"p{i}" for i in range(5)]
    expected = local(images, prompts)
    got = remote(images, prompts)
    assert got.dtype == torch.float32 and got.shape == (5,)
    assert torch.equal(got, expected)  # bit-exact: JPEG rounds to uint8 the same way on both sides
    assert remote.health() == {
        "status": "ok", "reward": "jpeg_compressibility", "differentiable": False, "needs_prompts": False,
    }


def test_chunking_and_float_parity_on_a_float_reward():
    reward = Counting()
    server = serve_in_thread(reward)
    try:
        images = _images(5, seed=3)
        got = HttpReward(server.url, chunk_size=2)(images, ["a"] * 5)
        assert reward.calls == 3  # 2 + 2 + 1
        assert torch.equal(got, images.mean(dim=(1, 2, 3)))  # float32 values survive JSON exactly
    finally:
        server.stop()


def test_5xx_is_retried_then_succeeds():
    reward = Counting(fail_on={1})
    server = serve_in_thread(reward)
    try:
        got = HttpReward(server.url, max_retries=2, backoff=0.01)(_images(2), ["a", "b"])
        assert reward.calls == 2 and got.shape == (2,)
        failing = Counting(fail_on={1, 2, 3})
        server.stop()
        server = serve_in_thread(failing)
        with pytest.raises(RewardError, match=r"failed after 3 attempts \(HTTP 500: .*transient failure"):
            HttpReward(server.url, max_retries=2, backoff=0.01)(_images(2), ["a", "b"])
        assert failing.calls == 3
    finally:
        server.stop()


def test_4xx_carries_the_server_message_without_retry():
    reward = Counting()
    server = serve_in_thread(reward)
    try:
        client = HttpReward(server.url, max_retries=3, backoff=5.0)  # a retry would take seconds
        start = time.monotonic()
        with pytest.raises(RewardError, match=r"HTTP 422.*reward 'counting' scores images against their prompts"):
            client(_images(2), ["a", ""])
        with pytest.raises(RewardError, match=r"HTTP 422.*must lie in \[0, 1\]"):
            client.score(_images(1) + 1.5, ["a"])  # bypass the local check: the server's check answers
        assert time.monotonic() - start < 2.0 and reward.calls == 0
    finally:
        server.stop()


def test_unreachable_server_fails_after_retries_naming_the_url():
    with socket.socket() as sock:  # a port that was free a moment ago: nothing listens there
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    client = HttpReward(url, max_retries=2, backoff=0.01, timeout=1.0)
    start = time.monotonic()
    message = rf"reward server {url}/score failed after 3 attempts \(ConnectError.*serve\("
    with pytest.raises(RewardError, match=message):
        client(_images(1), ["a"])
    assert time.monotonic() - start < 3.0  # backoff 0.01 + 0.02 s, refused connections return at once


def test_client_argument_errors():
    with pytest.raises(ValueError, match="chunk_size >= 1"):
        HttpReward("http://127.0.0.1:1", chunk_size=0)
    with pytest.raises(ValueError, match="encoding must be one of"):
        HttpReward("http://127.0.0.1:1", encoding="jpeg")
