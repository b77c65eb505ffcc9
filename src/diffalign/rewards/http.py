"""Rewards over HTTP: score against a remote reward server with :class:`HttpReward`, and the wire format both use.

Use it to keep a big reward model on its own GPU or machine (DDPO's LLaVA server, spec/ddpo_sdpo.md §1.7). The
server is :mod:`diffalign.serve.reward_server` (``diffalign reward-server --reward NAME``); httpx (the client) is
imported lazily: ``import diffalign.rewards`` never needs it.

Wire format (version 1)
-----------------------
``POST /score`` with a JSON body::

    {"images": {"encoding": "float32", "shape": [B, 3, H, W], "data": "<base64>"},
     "prompts": ["a cat", ...]}

``data`` is the base64 of the images' little-endian float32 bytes in C order: lossless, so a remote reward sees
exactly the local tensor. ``{"encoding": "png", "data": ["<base64 PNG>", ...]}`` (8-bit RGB, one per image,
decoded as ``k / 255``) is 4–10x smaller but exact only for images already quantised to multiples of 1/255.
The answer is ``{"rewards": [r_0, ..., r_{B-1}], "reward": <name>}``: JSON numbers printed from float32 values,
which read back into float32 exactly. Status codes: 400 undecodable body; 422 the reward rejected the input
(``{"detail": <its message>}``); 500 the reward failed while scoring.

``GET /health`` answers ``{"status": "ok", "reward": <name>, "differentiable": <bool>, "needs_prompts": <bool>}``.
"""

from __future__ import annotations

import base64
import io
import math
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

from diffalign.images import to_uint8
from diffalign.rewards.base import Reward, RewardError
from diffalign.rewards.common import optional_import
from diffalign.rewards.registry import register

ENCODINGS = ("float32", "png")


# --- encoding ---------------------------------------------------------------------------------------------------


def encode_images(images: torch.Tensor, encoding: str = "float32") -> dict[str, Any]:
    """``[B, 3, H, W]`` floats → the ``images`` object of the wire format."""
    if encoding == "float32":
        array = images.detach().to(torch.float32).cpu().contiguous().numpy().astype("<f4", copy=False)
        return {"encoding": "float32", "shape": list(array.shape), "data": base64.b64encode(array.tobytes()).decode()}
    if encoding == "png":
        pngs = []
        for array in to_uint8(images).numpy():
            buffer = io.BytesIO()
            Image.fromarray(array).save(buffer, format="PNG")
            pngs.append(base64.b64encode(buffer.getvalue()).decode())
        return {"encoding": "png", "data": pngs}
    raise ValueError(f"unknown image encoding {encoding!r}; use one of {ENCODINGS}")


def decode_images(payload: Any) -> torch.Tensor:
    """The wire format's ``images`` object → ``[B, 3, H, W]`` float32; :class:`ValueError` saying what is wrong."""
    if not isinstance(payload, dict) or payload.get("encoding") not in ENCODINGS:
        raise ValueError(f"'images' must be an object with 'encoding' in {ENCODINGS}")
    if payload["encoding"] == "float32":
        shape = payload.get("shape")
        if not isinstance(shape, list) or not all(isinstance(n, int) and n >= 0 for n in shape):
            raise ValueError(f"'images.shape' must be a list of non-negative ints, got {shape!r}")
        data = base64.b64decode(payload.get("data", ""), validate=True)
        expected = 4 * int(np.prod(shape))
        if len(data) != expected:
            raise ValueError(f"'images.data' holds {len(data)} bytes, but shape {shape} needs {expected}")
        return torch.from_numpy(np.frombuffer(data, dtype="<f4").reshape(shape).astype(np.float32))
    arrays = []
    for item in payload.get("data", []):
        with Image.open(io.BytesIO(base64.b64decode(item, validate=True))) as image:
            arrays.append(np.asarray(image.convert("RGB"), dtype=np.uint8))
    if not arrays or len({a.shape for a in arrays}) != 1:
        raise ValueError("'images.data' must be a non-empty list of PNGs of one size")
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255


# --- client -----------------------------------------------------------------------------------------------------


@register("http")
class HttpReward(Reward):
    """A reward computed by a diffalign reward server at ``url``; not differentiable.

    Images are sent in chunks of ``chunk_size``. Connection errors, timeouts and 5xx answers are retried
    ``max_retries`` times with exponential backoff (``backoff · 2^attempt`` seconds); after that, or at once on
    a 4xx answer, a :class:`RewardError` names the URL and the server's message.

    Args:
        url: the server's base URL, e.g. ``"http://127.0.0.1:8000"``.
        chunk_size: images per request.
        timeout: seconds for connecting and for each response.
        max_retries: retries after the first attempt of a request.
        backoff: first retry delay in seconds; doubles each retry.
        encoding: ``"float32"`` (lossless) or ``"png"`` (8-bit) — see the wire format.
        needs_prompts: reject empty prompts locally (the server checks again with its own reward).
    """

    name = "http"
    differentiable = False

    def __init__(
        self,
        url: str,
        chunk_size: int = 16,
        timeout: float = 60.0,
        max_retries: int = 3,
        backoff: float = 1.0,
        encoding: str = "float32",
        needs_prompts: bool = False,
        device: str | torch.device = "cpu",
    ):
        super().__init__(device)
        if not (chunk_size >= 1 and max_retries >= 0 and 0 < timeout < math.inf and 0 <= backoff < math.inf):
            raise ValueError(
                f"HttpReward needs chunk_size >= 1, max_retries >= 0, a finite timeout > 0 and a finite backoff "
                f">= 0; got chunk_size={chunk_size}, max_retries={max_retries}, timeout={timeout}, backoff={backoff}"
            )
        if encoding not in ENCODINGS:
            raise ValueError(f"HttpReward encoding must be one of {ENCODINGS}, got {encoding!r}")
        httpx = optional_import("httpx", "httpx", self.name)
        self.url = url.rstrip("/")
        self.chunk_size, self.max_retries, self.backoff, self.encoding = chunk_size, max_retries, backoff, encoding
        self.needs_prompts = needs_prompts
        self._httpx = httpx
        self._client = httpx.Client(timeout=httpx.Timeout(timeout))

    def health(self) -> dict:
        """The server's ``GET /health`` answer (name, differentiability), with the same retries."""
        return self._request("GET", "/health")

    def _request(self, method: str, path: str, payload: dict | None = None) -> dict:
        url = self.url + path
        last_error = ""
        for attempt in range(self.max_retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            try:
                response = self._client.request(method, url, json=payload)
            except self._httpx.TransportError as error:  # connect/read errors and timeouts
                last_error = f"{type(error).__name__}: {error}"
                continue
            if response.status_code >= 500:
                last_error = f"HTTP {response.status_code}: {_detail(response)}"
                continue
            if response.status_code >= 400:
                raise RewardError(
                    f"reward server {url} rejected the request (HTTP {response.status_code}): {_detail(response)}"
                )
            try:
                return response.json()
            except ValueError:
                raise RewardError(f"reward server {url} answered HTTP {response.status_code} with a body that is not "
                                  f"JSON: {response.text[:200]!r}") from None
        raise RewardError(
            f"reward server {url} failed after {self.max_retries + 1} attempts ({last_error}); is the server "
            "running? Start one with `diffalign reward-server --reward NAME` or "
            "diffalign.serve.reward_server.serve(reward, host, port)"
        )

    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        rewards: list[float] = []
        for start in range(0, len(prompts), self.chunk_size):
            chunk = slice(start, start + self.chunk_size)
            payload = {"images": encode_images(images[chunk], self.encoding), "prompts": list(prompts[chunk])}
            answer = self._request("POST", "/score", payload)
            values = answer.get("rewards") if isinstance(answer, dict) else None
            if not isinstance(values, list) or len(values) != len(payload["prompts"]):
                raise RewardError(f"reward server {self.url} answered {answer!r}, expected {{'rewards': [...]}}")
            rewards.extend(values)
        return torch.tensor(rewards, dtype=torch.float32, device=self.device)

    def close(self) -> None:
        """Closes the HTTP connection pool."""
        self._client.close()


def _detail(response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text[:500]
    return str(body.get("detail", body)) if isinstance(body, dict) else str(body)
