"""Serve any registered reward over HTTP, for :class:`~diffalign.rewards.http.HttpReward` clients.

Use it to keep a big reward model on its own GPU or machine (DDPO's LLaVA server, spec/ddpo_sdpo.md §1.7). The
wire format (``POST /score``, ``GET /health``, status codes) is documented in :mod:`diffalign.rewards.http`,
beside the client; this module is the server side (``diffalign reward-server --reward NAME``).
"""

from __future__ import annotations

import threading

import fastapi
import torch

from diffalign.rewards.base import Reward, RewardError
from diffalign.rewards.http import decode_images
from diffalign.serve import running
from diffalign.serve.running import RunningServer


def make_app(reward: Reward) -> fastapi.FastAPI:
    """A FastAPI app serving ``reward`` at ``POST /score`` and ``GET /health`` (wire format in rewards/http.py)."""
    app = fastapi.FastAPI(title=f"diffalign reward server: {reward.name}")
    lock = threading.Lock()  # one batch at a time: reward models need not be thread-safe

    @app.get("/health")
    def health() -> dict:
        return {
            "status": "ok",
            "reward": reward.name,
            "differentiable": reward.differentiable,
            "needs_prompts": reward.needs_prompts,
        }

    @app.post("/score")
    def score(payload: dict = fastapi.Body(...)) -> dict:
        try:
            images = decode_images(payload.get("images"))
            prompts = payload.get("prompts")
            if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
                raise ValueError("'prompts' must be a list of strings")
        except (ValueError, TypeError, OSError) as error:
            raise fastapi.HTTPException(status_code=400, detail=f"bad request body: {error}") from error
        try:
            reward.check_inputs(images, prompts)
        except RewardError as error:
            raise fastapi.HTTPException(status_code=422, detail=str(error)) from error
        try:
            with lock, torch.no_grad():
                rewards = reward(images, prompts)
        except Exception as error:
            raise fastapi.HTTPException(status_code=500, detail=f"{type(error).__name__}: {error}") from error
        return {"rewards": [float(r) for r in rewards.detach().cpu().tolist()], "reward": reward.name}

    return app


def serve(reward: Reward, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> None:
    """Serves ``reward`` with uvicorn until interrupted (blocking)."""
    running.run(make_app(reward), host=host, port=port, log_level=log_level)


def serve_in_thread(reward: Reward, host: str = "127.0.0.1", port: int = 0,
                    startup_timeout: float = 20.0) -> RunningServer:
    """Serves ``reward`` from a daemon thread (``port=0`` picks a free port); returns once it accepts connections."""
    return running.serve_in_thread(make_app(reward), host, port, startup_timeout, name=f"reward-server-{reward.name}")
