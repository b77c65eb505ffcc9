"""The serving app: generate from, steer and compare base and aligned models over HTTP, with a web page.

``diffalign serve --model base=shapes --model aligned=runs/x/checkpoints/60/lora`` (:func:`serve`) builds
:func:`create_app`: every base model loaded once, aligned variants as LoRA adapters on it
(:mod:`~diffalign.serve.models`), generation in one worker thread with a bounded queue and batching
(:mod:`~diffalign.serve.worker`). Endpoints:

- ``GET /health``: status, queue depth, jobs running and counters (never guarded by the token);
- ``GET /models``: the served models, rewards and steering methods, the defaults and the limits;
- ``POST /generate``: a :class:`GenerateBody` → :class:`GenerateResult` (base64 PNGs, their rewards and, for the
  ``shapes`` reward, which constraints held);
- ``POST /generate/stream``: the same as server-sent events: ``started``, ``preview`` (x̂0 images every
  ``preview_every`` steps), then ``result`` (the :class:`GenerateResult`) or ``error`` (``{status, detail}``);
- ``GET /``: the web page; ``GET /openapi.json`` and ``/docs``: the schema.

Bad input answers 4xx with a message, never 500: 400 malformed JSON, 413 a body over 64 KiB, 422 anything
else wrong (every problem of a request listed at once), 503 with Retry-After when the queue is full, 504 when a
request outlives ``request_timeout``. With a token set, every endpoint but ``/health`` needs
``Authorization: Bearer TOKEN``; a browser opens ``/?token=TOKEN`` once and gets it as a same-site cookie.

Where this differs from the seed's demo (spec/ddpo_sdpo.md §2.7): generation never runs on the event loop (there,
``/health`` stalled and requests serialised); out-of-range values are rejected with a message instead of being
silently replaced by defaults; previews decode x̂0, not the noisy x_t; aligned models are LoRA adapters on one
base pipeline rather than four full pipelines; the page is one HTML file served by the app (no Node proxy).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import tyro
from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from diffalign import rewards as reward_registry
from diffalign.rewards.base import Reward
from diffalign.rewards.shapes import ShapesReward
from diffalign.serve import running
from diffalign.serve.models import ModelSpec, ServedModels
from diffalign.serve.worker import Event, GenerationRequest, Job, QueueFull, Worker
from diffalign.world.captions import parse_caption

#: The steering methods steered by a registered image reward (``rcgd`` steers by a latent reward model, which the
#: server does not load).
SERVED_STEERING = ("best-of-n", "fk", "svdd", "guidance")
#: Rewards that score ShapesWorld captions: a prompt outside the grammar is a 422 before anything runs.
GRAMMAR_REWARDS = ("shapes", "shapes_learned")
DEFAULT_MODELS = ("base=shapes",)
DEFAULT_REWARDS = ("shapes", "jpeg_compressibility")
DEFAULT_STEPS, DEFAULT_GUIDANCE, DEFAULT_ETA = 20, 3.0, 1.0
MAX_GUIDANCE, MAX_IMAGES, MAX_PARTICLES = 20.0, 4, 16
MAX_BODY_BYTES = 64 * 1024
TOKEN_COOKIE = "diffalign_token"
TOKEN_ENV = "DIFFALIGN_SERVE_TOKEN"
#: Seconds between checks of a waiting request's deadline and connection.
POLL_S = 0.2
PAGE = Path(__file__).parent / "page.html"


@dataclass
class ServeConfig:
    """Serve models over HTTP with a web page (``diffalign serve``); binds 127.0.0.1 unless told otherwise."""

    models: Annotated[tuple[str, ...], tyro.conf.arg(name="model"), tyro.conf.UseAppendAction] = ()
    """A served model NAME=SOURCE, repeatable: SOURCE a base model (tiny, shapes, a pipeline folder, a hub id) or a
    LoRA (RUN_DIR, RUN_DIR/checkpoints/N/lora, or LORA_DIR@BASE). None given: base=shapes."""
    rewards: Annotated[tuple[str, ...], tyro.conf.arg(name="reward"), tyro.conf.UseAppendAction] = ()
    """A registered reward to score and steer with, repeatable. None given: shapes and jpeg_compressibility."""
    host: str = "127.0.0.1"
    """Interface to listen on (0.0.0.0 exposes the server to the network)."""
    port: int = 8000
    """Port to listen on."""
    concurrency: int = 8
    """Requests generated together in one batch (requests whose settings match are batched)."""
    queue_length: int = 32
    """Requests that may wait for the worker; one more gets 503 with Retry-After."""
    request_timeout: float = 120.0
    """Seconds a request may wait and run before it gets 504 (and its generation is stopped)."""
    token: str | None = None
    """Bearer token guarding every endpoint but /health (default: the DIFFALIGN_SERVE_TOKEN variable, else none)."""
    max_steps: int = 100
    """Most denoising steps a request may ask for."""
    max_prompt_chars: int = 300
    """Longest prompt accepted, in characters."""
    device: str = "cpu"
    """Device the models and rewards run on."""

    @property
    def model_specs(self) -> tuple[str, ...]:
        return self.models or DEFAULT_MODELS

    @property
    def reward_names(self) -> tuple[str, ...]:
        return self.rewards or DEFAULT_REWARDS

    @property
    def bearer_token(self) -> str | None:
        return self.token or os.environ.get(TOKEN_ENV) or None

    def validate(self) -> list[str]:
        errors = []
        if self.concurrency < 1:
            errors.append(f"concurrency must be >= 1, got {self.concurrency}")
        if self.queue_length < 0:
            errors.append(f"queue_length must be >= 0, got {self.queue_length}")
        if not self.request_timeout > 0:
            errors.append(f"request_timeout must be > 0 seconds, got {self.request_timeout}")
        if self.max_steps < 1:
            errors.append(f"max_steps must be >= 1, got {self.max_steps}")
        if self.max_prompt_chars < 1:
            errors.append(f"max_prompt_chars must be >= 1, got {self.max_prompt_chars}")
        if not 0 <= self.port < 65536:
            errors.append(f"port must be in [0, 65535], got {self.port}")
        unknown = [name for name in self.reward_names if name not in reward_registry.names()]
        if unknown:
            errors.append(f"rewards {unknown} are not registered; choose from {', '.join(reward_registry.names())}")
        return errors


class GenerateBody(BaseModel):
    """What to generate (``POST /generate``, ``POST /generate/stream``); limits in ``GET /models``."""

    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(description="The text to draw (for the shapes reward: a ShapesWorld caption).")
    model: str | None = Field(None, description="A served model's name (GET /models); default: the first one.")
    steps: int = Field(DEFAULT_STEPS, description="DDIM steps.")
    guidance_scale: float = Field(DEFAULT_GUIDANCE, description="Classifier-free guidance scale w (1: none).")
    eta: float = Field(DEFAULT_ETA, description="DDIM stochasticity η in [0, 1] (1: DDPM variance, 0: DDIM).")
    seed: int = Field(0, description="Seed of the images: the same request and seed give the same images.")
    num_images: int = Field(1, description="Images of the prompt (image 0 uses the seed itself).")
    steer: str | None = Field(None, description="Test-time steering method by `reward` (none: plain sampling).")
    particles: int = Field(4, description="Steering width: samples, particles or candidates per step.")
    reward: str | None = Field(None, description="A served reward to score (and steer) with.")
    preview_every: int | None = Field(None, description="Stream: an x̂0 preview every this many steps "
                                                        "(default: steps / 5).")


class Check(BaseModel):
    constraint: str
    ok: bool


class GeneratedImage(BaseModel):
    png: str = Field(description="The image as base64 PNG.")
    reward: float | None = Field(description="Its reward, when a reward was asked for.")
    strict: bool | None = Field(description="Verifiable rewards: every constraint met.")
    constraints: list[Check] | None = Field(description="The shapes reward: each constraint and whether it held.")


class GenerateResult(BaseModel):
    prompt: str
    model: str
    seed: int
    steps: int
    guidance_scale: float
    eta: float
    steer: str | None
    particles: int | None
    reward: str | None
    images: list[GeneratedImage]
    denoiser_passes: int = Field(description="Latent rows through the denoiser for this request's images.")
    reward_calls: int = Field(description="Images scored by the reward (steering and the final scores).")
    batch_size: int = Field(description="Requests generated in the same batch as this one.")
    generation_s: float
    queued_s: float


def check_request(body: GenerateBody, config: ServeConfig, models: ServedModels, rewards: dict[str, Reward],
                  stream: bool) -> GenerationRequest:
    """The validated request, or HTTP 422 listing every problem of ``body``."""
    errors = []
    prompt = body.prompt.strip()
    if not prompt:
        errors.append("prompt is empty: give the text to draw")
    elif len(prompt) > config.max_prompt_chars:
        errors.append(f"prompt has {len(prompt)} characters; at most {config.max_prompt_chars} are accepted")
    model = models.names[0] if body.model is None else body.model
    if model not in models.variants:
        errors.append(f"model {model!r} is not served; served models: {', '.join(models.names)}")
    errors += _range_errors(body, config)
    steer = None if body.steer in (None, "none") else body.steer
    if steer is not None and steer not in SERVED_STEERING:
        errors.append(f"steer {steer!r} is not a served steering method; choose none, {', '.join(SERVED_STEERING)}")
    if body.reward is not None and body.reward not in rewards:
        errors.append(f"reward {body.reward!r} is not served; served rewards: {', '.join(rewards)}")
    if steer is not None and body.reward is None:
        errors.append(f"steer {steer!r} needs a reward to steer by; served rewards: {', '.join(rewards)}")
    if errors:
        raise HTTPException(422, "; ".join(errors))
    preview_every = (body.preview_every or max(1, body.steps // 5)) if stream else 0
    request = GenerationRequest(prompt, model, body.steps, body.guidance_scale, body.eta, body.seed,
                                body.num_images, steer, body.particles, body.reward, preview_every)
    if steer is not None:
        errors += [f"steer {steer!r}: {e}" for e in request.steering_config().validate(request.settings,
                                                                                       rewards[body.reward])]
    if body.reward in GRAMMAR_REWARDS:
        try:
            parse_caption(prompt)
        except ValueError as error:
            errors.append(f"reward {body.reward!r} scores ShapesWorld captions: {error}")
    if errors:
        raise HTTPException(422, "; ".join(errors))
    return request


def _range_errors(body: GenerateBody, config: ServeConfig) -> list[str]:
    """The numeric fields outside their ranges (``GET /models`` lists the limits)."""
    ranges = [("steps", body.steps, 1, config.max_steps), ("guidance_scale", body.guidance_scale, 0, MAX_GUIDANCE),
              ("eta", body.eta, 0, 1), ("seed", body.seed, 0, 2**63 - 1),
              ("num_images", body.num_images, 1, MAX_IMAGES), ("particles", body.particles, 1, MAX_PARTICLES)]
    if body.preview_every is not None:
        ranges.append(("preview_every", body.preview_every, 1, body.steps))
    return [f"{name} must be in [{low}, {high:g}], got {value!r}" if isinstance(high, float) else
            f"{name} must be in [{low}, {high}], got {value!r}"
            for name, value, low, high in ranges if not (low <= value <= high)]  # NaN compares False: out of range


class Guard:
    """ASGI middleware: 413 for a body over :data:`MAX_BODY_BYTES`; with a token, 401 for every request but
    ``/health`` that carries neither ``Authorization: Bearer TOKEN`` nor the token cookie (``/?token=TOKEN`` sets
    the cookie and redirects to ``/``, so a browser can open the page)."""

    def __init__(self, app, token: str | None):
        self.app, self.token = app, token

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        request = Request(scope)
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > MAX_BODY_BYTES:
            response = JSONResponse({"detail": f"request body of {length} bytes; at most {MAX_BODY_BYTES}"}, 413)
        elif self.token is None or scope["path"] == "/health" or self._carries_token(request):
            return await self.app(scope, receive, send)
        elif scope["path"] == "/" and self._matches(request.query_params.get("token", "")):
            response = RedirectResponse("/", status_code=303)
            response.set_cookie(TOKEN_COOKIE, self.token, httponly=True, samesite="strict")
        else:
            response = JSONResponse(
                {"detail": "missing or wrong bearer token: send 'Authorization: Bearer TOKEN' "
                           "(in a browser, open /?token=TOKEN once)"}, 401, headers={"WWW-Authenticate": "Bearer"})
        await response(scope, receive, send)

    def _matches(self, given: str) -> bool:
        return hmac.compare_digest(given.encode(), self.token.encode())

    def _carries_token(self, request: Request) -> bool:
        scheme, _, credentials = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer" and self._matches(credentials.strip()):
            return True
        return self._matches(request.cookies.get(TOKEN_COOKIE, ""))


def create_app(config: ServeConfig, models: ServedModels | None = None,
               rewards: dict[str, Reward] | None = None) -> FastAPI:
    """The app (module docstring). ``models`` and ``rewards`` default to loading ``config``'s; the worker thread
    starts and stops with the app's lifespan, and owns ``models`` while it runs."""
    errors = config.validate()
    if errors:
        raise ValueError("invalid serve config:\n  - " + "\n  - ".join(errors))
    if models is None:
        models = ServedModels([ModelSpec.parse(text) for text in config.model_specs], config.device)
    if rewards is None:
        rewards = {name: reward_registry.get(name, device=config.device) for name in config.reward_names}
    worker = Worker(models, rewards, config.concurrency, config.queue_length)
    page = PAGE.read_text(encoding="utf-8")

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        worker.start()
        try:
            yield
        finally:
            await asyncio.to_thread(worker.stop)

    app = FastAPI(title="diffalign", summary="Generate from, steer and compare base and aligned diffusion models.",
                  lifespan=lifespan)
    app.state.worker = worker
    app.add_middleware(Guard, token=config.bearer_token)

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request: Request, error: RequestValidationError) -> JSONResponse:
        problems = error.errors()
        broken = [p for p in problems if p["type"] == "json_invalid"]
        if broken:
            return JSONResponse({"detail": f"malformed JSON body: {broken[0].get('ctx', {}).get('error', '')}"}, 400)
        listed = "; ".join(f"{'.'.join(str(x) for x in p['loc'][1:]) or 'body'}: {p['msg']}" for p in problems)
        return JSONResponse({"detail": f"invalid request: {listed}"}, 422)

    def submit(body: GenerateBody, stream: bool) -> Job:
        job = Job(check_request(body, config, models, rewards, stream), config.request_timeout,
                  asyncio.get_running_loop())
        try:
            worker.submit(job)
        except QueueFull as full:
            raise HTTPException(503, str(full), headers={"Retry-After": str(full.retry_after_s)}) from None
        return job

    async def events_of(job: Job, request: Request) -> AsyncIterator[Event]:
        """The job's events up to its result or error; a 504 error past its deadline. Stops (and cancels the job)
        when the client disconnects, or when the stream is cancelled (Starlette cancels a left stream)."""
        finished = False
        try:
            while True:
                remaining = job.deadline - time.monotonic()
                if remaining <= 0:
                    yield Event("error", {"status": 504, "detail": f"the request took longer than the server's "
                                                                   f"request_timeout of {config.request_timeout:g} s"})
                    return
                try:
                    event = await asyncio.wait_for(job.events.get(), timeout=min(POLL_S, remaining))
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        return
                    continue
                finished = event.kind in ("result", "error")
                yield event
                if finished:
                    return
        finally:
            if not finished:
                worker.withdraw(job)

    @app.get("/health")
    async def health() -> dict:
        """Liveness and load: queue depth, jobs running, batches run and how jobs ended."""
        return {"status": "ok", "models": models.names, **worker.snapshot()}

    @app.get("/models")
    async def list_models() -> dict:
        """The served models, rewards and steering methods, the request defaults and limits."""
        return {
            "models": [variant.describe() for variant in models.variants.values()],
            "rewards": [{"name": name, "differentiable": reward.differentiable,
                         "verifiable": isinstance(reward, ShapesReward)} for name, reward in rewards.items()],
            "steering": list(SERVED_STEERING),
            "defaults": {"model": models.names[0], "steps": DEFAULT_STEPS, "guidance_scale": DEFAULT_GUIDANCE,
                         "eta": DEFAULT_ETA, "particles": 4},
            "limits": {"steps": [1, config.max_steps], "guidance_scale": [0, MAX_GUIDANCE], "eta": [0, 1],
                       "num_images": [1, MAX_IMAGES], "particles": [1, MAX_PARTICLES],
                       "prompt_chars": config.max_prompt_chars, "queue_length": config.queue_length,
                       "concurrency": config.concurrency, "request_timeout_s": config.request_timeout},
        }

    @app.post("/generate", response_model=GenerateResult,
              responses={422: {"description": "bad input"}, 503: {"description": "queue full (Retry-After)"},
                         504: {"description": "request_timeout passed"}})
    async def generate(body: GenerateBody, request: Request):
        """Generates the images (and their rewards) and answers when they are done."""
        job = submit(body, stream=False)
        async for event in events_of(job, request):
            if event.kind == "result":
                return event.data
            if event.kind == "error":
                raise HTTPException(event.data["status"], event.data["detail"])
        return Response(status_code=499)  # the client went away; nobody reads this

    @app.post("/generate/stream", response_class=StreamingResponse,
              responses={200: {"content": {"text/event-stream": {}},
                               "description": "events: started, preview {step, total, images}, then result or "
                                              "error {status, detail}"}})
    async def generate_stream(body: GenerateBody, request: Request) -> StreamingResponse:
        """Like /generate, as server-sent events with x̂0 previews; leaving the stream cancels the request."""
        job = submit(body, stream=True)

        async def sse() -> AsyncIterator[str]:
            async for event in events_of(job, request):
                yield f"event: {event.kind}\ndata: {json.dumps(event.data)}\n\n"

        return StreamingResponse(sse(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index() -> HTMLResponse:
        return HTMLResponse(page)

    return app


def serve(config: ServeConfig) -> None:
    """Loads the models and serves them with uvicorn until interrupted (blocking)."""
    running.run(create_app(config), host=config.host, port=config.port)
