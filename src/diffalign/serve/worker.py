"""Generation off the event loop: one worker thread, a bounded queue, batches of requests whose settings match.

The web app never runs the model itself. Each request becomes a :class:`Job` that the app submits to the
:class:`Worker` and then awaits: the worker thread takes the oldest job, adds the waiting jobs whose
:attr:`GenerationRequest.batch_key` matches (up to ``concurrency`` of them), runs them as one batch and sends each
job its events (``started``, ``preview`` with x̂0 images every few steps, then ``result`` or ``error``) through an
``asyncio.Queue`` on the app's loop. So the event loop stays free (``/health`` answers during generation), and
everything stateful — the policy, its LoRA adapter selection, the rewards — is touched by this one thread only.

- **Seeds**: a request's images come from its own seed (:meth:`~diffalign.steering.base.Particles.from_seeds`), so
  the same request gives the same image alone or in any batch; a steered request runs alone, since its particles'
  seeds follow from its seed and position (:func:`~diffalign.steering.steerer`).
- **Cancellation**: a job whose client went away or whose deadline passed is dropped from the queue; in a running
  plain batch the worker checks between denoising steps and stops the batch once none of its jobs is wanted.
  A steered batch is checked only before it starts (the steering methods have no per-step hook).
- **Bounded queue**: :meth:`Worker.submit` raises :class:`QueueFull` (the app answers 503 with Retry-After)
  when ``queue_length`` jobs are already waiting.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import torch

from diffalign.rewards.base import Reward
from diffalign.rewards.http import encode_images
from diffalign.rewards.shapes import ShapesReward
from diffalign.rollout import StepSettings
from diffalign.serve.models import ServedModels
from diffalign.steering import Meter, steerer
from diffalign.steering.base import Particles, propagate

log = logging.getLogger("diffalign.serve")


@dataclass(frozen=True)
class GenerationRequest:
    """A validated request: ``num_images`` images of ``prompt`` from variant ``model``, seeded by ``seed``.

    ``steer`` (a :data:`~diffalign.steering.STEERERS` name) with ``particles`` steers by ``reward``; ``reward``
    alone only scores. ``preview_every`` > 0 asks for x̂0 previews every that many steps (plain sampling only).
    """

    prompt: str
    model: str
    steps: int
    guidance_scale: float
    eta: float
    seed: int
    num_images: int = 1
    steer: str | None = None
    particles: int = 4
    reward: str | None = None
    preview_every: int = 0

    @property
    def settings(self) -> StepSettings:
        return StepSettings(self.steps, self.guidance_scale, self.eta)

    @property
    def batch_key(self) -> tuple | None:
        """Requests with equal keys run in one batch; None (a steered request) runs alone."""
        if self.steer is not None:
            return None
        return (self.model, self.steps, self.guidance_scale, self.eta, self.num_images, self.reward)

    def steering_config(self):
        """The steering method's config at its defaults with this request's particle count."""
        return steerer(self.steer).config_class(particles=self.particles)


@dataclass(frozen=True)
class Event:
    """What a job hears from the worker: ``kind`` is started, preview, result or error; ``data`` is JSON-ready."""

    kind: str
    data: dict


class Job:
    """One submitted request, its deadline and the queue its events arrive on (on the app's event loop)."""

    def __init__(self, request: GenerationRequest, timeout_s: float, loop: asyncio.AbstractEventLoop):
        self.request = request
        self.submitted = time.monotonic()
        self.deadline = self.submitted + timeout_s
        self.events: asyncio.Queue[Event] = asyncio.Queue()
        self._loop = loop
        self._cancelled = threading.Event()

    def cancel(self) -> None:
        """Marks the job unwanted (client gone or timed out): the worker skips it or stops its batch."""
        self._cancelled.set()

    @property
    def live(self) -> bool:
        return not self._cancelled.is_set() and time.monotonic() < self.deadline

    def emit(self, kind: str, data: dict) -> None:
        """Sends an event from the worker thread to the job's queue (a no-op once the app's loop has closed)."""
        try:
            self._loop.call_soon_threadsafe(self.events.put_nowait, Event(kind, data))
        except RuntimeError:
            pass


class QueueFull(Exception):
    """The queue holds ``queue_length`` waiting jobs; try again after ``retry_after_s`` seconds."""

    def __init__(self, queued: int, retry_after_s: int):
        super().__init__(f"the generation queue is full ({queued} requests waiting); retry in {retry_after_s} s")
        self.retry_after_s = retry_after_s


class _Cancelled(Exception):
    """Every job of the running batch is unwanted."""


@dataclass
class WorkerStats:
    """Counters since start: batches run, jobs (and image rows) in them, and how jobs ended."""

    batches: int = 0
    jobs: int = 0
    rows: int = 0
    completed: int = 0
    cancelled: int = 0
    failed: int = 0
    batch_seconds: float = 0.0

    @property
    def mean_batch_seconds(self) -> float:
        return self.batch_seconds / self.batches if self.batches else 0.0


@dataclass
class Worker:
    """The generation thread (module docstring). ``concurrency``: most jobs run in one batch; ``queue_length``:
    most jobs waiting."""

    models: ServedModels
    rewards: dict[str, Reward]
    concurrency: int = 8
    queue_length: int = 32
    stats: WorkerStats = field(default_factory=WorkerStats)

    def __post_init__(self):
        if self.concurrency < 1 or self.queue_length < 0:
            raise ValueError(f"worker needs concurrency >= 1 and queue_length >= 0, got {self.concurrency}, "
                             f"{self.queue_length}")
        self._pending: deque[Job] = deque()
        self._running: list[Job] = []
        self._condition = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None

    # --- called from the app ------------------------------------------------------------------------------------

    def start(self) -> None:
        self._stopping = False
        self._thread = threading.Thread(target=self._serve_forever, name="diffalign-serve-worker", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Cancels the running batch, fails the waiting jobs with 503 and joins the thread."""
        with self._condition:
            self._stopping = True
            for job in self._running:
                job.cancel()
            while self._pending:
                self._pending.popleft().emit("error", {"status": 503, "detail": "the server is shutting down"})
            self._condition.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    def submit(self, job: Job) -> None:
        """Queues ``job``; raises :class:`QueueFull` when ``queue_length`` jobs are already waiting."""
        with self._condition:
            self._drop_dead()
            if self._stopping:
                raise QueueFull(len(self._pending), 5)
            if len(self._pending) >= self.queue_length:
                raise QueueFull(len(self._pending), self._retry_after())
            self._pending.append(job)
            self._condition.notify()

    def withdraw(self, job: Job) -> None:
        """Cancels ``job`` and frees its queue slot if it is still waiting."""
        job.cancel()
        with self._condition:
            if job in self._pending:
                self._pending.remove(job)
                self.stats.cancelled += 1

    def snapshot(self) -> dict[str, Any]:
        """Queue depth, jobs running and the counters, for ``/health``."""
        with self._condition:
            s = self.stats
            return {"queued": len(self._pending), "running": len(self._running), "batches": s.batches,
                    "jobs": s.jobs, "images": s.rows, "completed": s.completed, "cancelled": s.cancelled,
                    "failed": s.failed, "mean_batch_size": round(s.jobs / s.batches, 3) if s.batches else 0.0,
                    "mean_batch_seconds": round(s.mean_batch_seconds, 4)}

    def _retry_after(self) -> int:
        """Seconds until a queue slot is likely free: the batches ahead times the mean batch time."""
        batches_ahead = len(self._pending) / self.concurrency + 1
        return max(1, math.ceil(batches_ahead * self.stats.mean_batch_seconds))

    def _drop_dead(self) -> None:
        live = [job for job in self._pending if job.live]
        self.stats.cancelled += len(self._pending) - len(live)
        self._pending = deque(live)

    # --- the worker thread ----------------------------------------------------------------------------------------

    def _serve_forever(self) -> None:
        while True:
            batch = self._take_batch()
            if batch is None:
                return
            self._run(batch)

    def _take_batch(self) -> list[Job] | None:
        """The oldest live job and the waiting jobs that match it (None when stopping)."""
        with self._condition:
            while True:
                self._drop_dead()
                if self._stopping:
                    return None
                if self._pending:
                    break
                self._condition.wait()
            first = self._pending.popleft()
            batch, key = [first], first.request.batch_key
            if key is not None:
                for job in list(self._pending):
                    if len(batch) >= self.concurrency:
                        break
                    if job.request.batch_key == key:
                        self._pending.remove(job)
                        batch.append(job)
            self._running = batch
            return batch

    def _run(self, batch: list[Job]) -> None:
        started, request = time.monotonic(), batch[0].request
        for job in batch:
            job.emit("started", {"batch_size": len(batch), "queued_s": round(started - job.submitted, 4)})
        try:
            results = self._generate(batch)
        except _Cancelled:
            outcome = {"cancelled": len(batch)}
        except Exception as error:  # the app turns it into a 500 with the message; the traceback goes to the log
            log.exception("generation failed for %d request(s)", len(batch))
            for job in batch:
                job.emit("error", {"status": 500, "detail": f"generation failed: {type(error).__name__}: {error}"})
            outcome = {"failed": len(batch)}
        else:
            elapsed = round(time.monotonic() - started, 4)
            done = 0
            for job, result in zip(batch, results):
                if job.live:
                    job.emit("result", {**result, "batch_size": len(batch), "generation_s": elapsed,
                                        "queued_s": round(started - job.submitted, 4)})
                    done += 1
            outcome = {"completed": done, "cancelled": len(batch) - done}
        with self._condition:
            s = self.stats
            s.batches, s.jobs, s.rows = s.batches + 1, s.jobs + len(batch), s.rows + len(batch) * request.num_images
            s.batch_seconds += time.monotonic() - started
            s.completed += outcome.get("completed", 0)
            s.cancelled += outcome.get("cancelled", 0)
            s.failed += outcome.get("failed", 0)
            self._running = []

    def _generate(self, batch: list[Job]) -> list[dict]:
        """Images (and rewards) of every job of a batch; raises :class:`_Cancelled` once no job is wanted."""
        if not any(job.live for job in batch):
            raise _Cancelled
        request = batch[0].request
        policy = self.models.activate(request.model)
        reward = self.rewards[request.reward] if request.reward else None
        k = request.num_images
        prompts = [job.request.prompt for job in batch for _ in range(k)]
        meter = Meter()
        if request.steer is not None:
            result = steerer(request.steer).run(policy, prompts, reward, request.settings,
                                                request.steering_config(), request.seed)
            images, meter = result.images.detach(), result
        else:
            particles = Particles.from_seeds([job.request.prompt for job in batch], k,
                                             [job.request.seed for job in batch])
            x0 = propagate(policy, particles, request.settings, meter, after_step=self._previewer(batch, policy))
            with torch.no_grad():
                images = policy.decode(x0)
        scores = strict = checks = None
        if reward is not None:
            with torch.no_grad():
                scored = reward.output(images, prompts)
            scores, strict = scored.scores.tolist(), None if scored.strict is None else scored.strict.tolist()
            if isinstance(reward, ShapesReward):
                checks = reward.constraints(images, prompts)
        pngs = encode_images(images, "png")["data"]
        results = []
        for i, job in enumerate(batch):
            rows = range(i * k, (i + 1) * k)
            results.append({
                **_request_fields(job.request),
                "images": [{"png": pngs[r],
                            "reward": None if scores is None else scores[r],
                            "strict": None if strict is None else strict[r],
                            "constraints": None if checks is None else
                            [{"constraint": name, "ok": ok} for name, ok in checks[r]]} for r in rows],
                "denoiser_passes": meter.denoiser_passes // len(batch),
                "reward_calls": (meter.reward_calls + (len(prompts) if reward is not None else 0)) // len(batch),
            })
        return results

    def _previewer(self, batch: list[Job], policy):
        """The ``after_step`` hook of a plain batch: stops it when no job is wanted, sends x̂0 previews when due."""
        k, total = batch[0].request.num_images, batch[0].request.steps

        def after_step(s: int, step, x: torch.Tensor) -> torch.Tensor:
            if not any(job.live for job in batch):
                raise _Cancelled
            due = [i for i, job in enumerate(batch)
                   if job.request.preview_every and (s + 1) % job.request.preview_every == 0 and s + 1 < total
                   and job.live]
            if due:
                rows = [i * k + j for i in due for j in range(k)]
                pngs = encode_images(policy.decode(step.x0_pred[rows]), "png")["data"]
                for n, i in enumerate(due):
                    batch[i].emit("preview", {"step": s + 1, "total": total, "images": pngs[n * k:(n + 1) * k]})
            return x

        return after_step


def _request_fields(request: GenerationRequest) -> dict:
    """The request's settings, echoed in its result."""
    return {"prompt": request.prompt, "model": request.model, "seed": request.seed, "steps": request.steps,
            "guidance_scale": request.guidance_scale, "eta": request.eta, "steer": request.steer,
            "particles": request.particles if request.steer else None, "reward": request.reward}
