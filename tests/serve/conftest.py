"""Shared fixtures of the serving tests: the tiny model as base, a LoRA on it as aligned, the ShapesWorld model,
cheap rewards; apps built on them (models loaded once per session, one worker per app)."""

from __future__ import annotations

import base64
import io
import os

import numpy as np
import pytest
import torch
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("httpx")

from diffalign import rewards  # noqa: E402
from diffalign.models import Policy, build_tiny_pipeline  # noqa: E402
from diffalign.models.lora import add_lora, save_lora  # noqa: E402
from diffalign.serve.app import ServeConfig, create_app  # noqa: E402
from diffalign.serve.models import ModelSpec, ServedModels  # noqa: E402
from diffalign.serve.running import serve_in_thread  # noqa: E402

TOKEN = "s3cret-token"


@pytest.fixture(scope="session")
def tiny_lora(tmp_path_factory):
    """A LoRA on the tiny model with non-zero B weights, so the aligned model draws differently from the base."""
    unet = Policy.from_pipeline(build_tiny_pipeline(seed=0)).unet
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)  # peft draws A from the global generator; B (zero at init) is drawn here
        add_lora(unet, rank=4, alpha=4.0)
        with torch.no_grad():
            for parameter in (p for name, p in unet.named_parameters() if "lora_B" in name):
                parameter.copy_(0.5 * torch.randn(parameter.shape))
    return save_lora(unet, tmp_path_factory.mktemp("aligned") / "lora")


@pytest.fixture(scope="session")
def served_models(tiny_lora):
    return ServedModels([ModelSpec("base", "tiny"), ModelSpec("aligned", "tiny", str(tiny_lora)),
                         ModelSpec("shapes", "shapes")])


@pytest.fixture(scope="session")
def served_rewards():
    return {name: rewards.get(name) for name in ("shapes", "jpeg_compressibility", "brightness")}


@pytest.fixture(scope="session")
def make_app(served_models, served_rewards):
    """``make_app(**settings)``: an app on the session's models and rewards with ServeConfig ``settings``."""

    def build(**settings):
        return create_app(ServeConfig(**{"max_steps": 400, **settings}), served_models, served_rewards)

    return build


@pytest.fixture()
def start_server(make_app):
    """``start_server(**settings)``: a real uvicorn server on 127.0.0.1 (stopped after the test)."""
    servers = []

    def start(**settings):
        servers.append(serve_in_thread(make_app(**settings), name="serve-test"))
        return servers[-1]

    yield start
    for server in servers:
        server.stop()


@pytest.fixture(scope="session")
def png_pixels():
    """``png_pixels(b64)``: a base64 PNG's pixels ``[H, W, 3]`` uint8 (asserting it is a PNG)."""

    def pixels(b64: str) -> np.ndarray:
        with Image.open(io.BytesIO(base64.b64decode(b64))) as image:
            assert image.format == "PNG"
            return np.asarray(image.convert("RGB"))

    return pixels
