"""A bounded load test of ``diffalign serve`` on loopback: N requests, C at a time, against a server in a subprocess.

Starts ``diffalign serve --model base=MODEL`` on a free 127.0.0.1 port, warms it with one round of C concurrent
requests (so the batch shapes have been allocated once), then sends ``--requests`` POST /generate requests with
``--concurrency`` in flight (varied prompts and seeds, one reward) and prints one JSON object:

- ``server_errors``: 5xx answers and failed connections (must be 0); ``client_errors``: 4xx answers (0 expected);
- ``latency_s``: p50 / p95 / p99 / max of the requests' wall time; ``throughput_rps``: requests per second;
- ``mean_batch_size``: requests the worker generated together on average (from /health);
- ``rss_mb``: the server's resident memory after loading, before the run (after the warm-up), after it, and its
  peak (VmHWM); ``rss_growth_mb`` = after − before (the loaded models are in ``before``).

The client side imports no torch, so the only torch process is the server.

    python benchmarks/bench_serve.py                       # tiny model, 200 requests, 16 concurrent
    python benchmarks/bench_serve.py --model shapes --steps 20
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import tyro

#: ShapesWorld captions (any model takes them; the shapes reward needs them).
PROMPTS = ("a red circle", "two blue squares", "a green triangle left of a yellow circle", "three yellow squares",
           "a small red triangle above a green square")


@dataclass
class Args:
    model: str = "tiny"
    """Model the server loads (as base=MODEL)."""
    requests: int = 200
    """Requests sent in the measured run."""
    concurrency: int = 16
    """Requests in flight at once."""
    steps: int = 10
    """DDIM steps per request."""
    reward: str = "jpeg_compressibility"
    """Reward every request asks for."""
    server_concurrency: int = 8
    """The server's --concurrency (requests batched together)."""
    queue_length: int = 64
    """The server's --queue-length (at least --concurrency, so no request is refused)."""
    startup_timeout: float = 180.0
    """Seconds to wait for the server to load its models."""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _memory_mb(pid: int) -> dict[str, float]:
    """VmRSS (resident now) and VmHWM (peak resident) of a process, in MB."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = round(int(value.split()[0]) / 1024, 1)
    return fields


def _percentile(sorted_values: list[float], q: float) -> float:
    """The q-quantile by linear interpolation between order statistics."""
    position = q * (len(sorted_values) - 1)
    low = int(position)
    high = min(low + 1, len(sorted_values) - 1)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (position - low)


async def _run(url: str, count: int, concurrency: int, steps: int, reward: str, first_seed: int) -> dict:
    """Sends ``count`` requests with ``concurrency`` in flight; their latencies and status counts."""
    gate = asyncio.Semaphore(concurrency)
    latencies: list[float] = []
    statuses: dict[str, int] = {}

    async def one(client: httpx.AsyncClient, i: int) -> None:
        body = {"prompt": PROMPTS[i % len(PROMPTS)], "model": "base", "steps": steps, "seed": first_seed + i,
                "reward": reward}
        async with gate:
            started = time.perf_counter()
            try:
                response = await client.post(f"{url}/generate", json=body)
                status = str(response.status_code)
                if response.status_code == 200 and not response.json()["images"][0]["png"]:
                    status = "empty image"
            except httpx.HTTPError as error:
                status = type(error).__name__
            latencies.append(time.perf_counter() - started)
            statuses[status] = statuses.get(status, 0) + 1

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=httpx.Timeout(300.0), limits=limits) as client:
        started = time.perf_counter()
        await asyncio.gather(*(one(client, i) for i in range(count)))
        wall = time.perf_counter() - started
    return {"latencies": sorted(latencies), "statuses": statuses, "wall_s": wall}


def _wait_for_health(url: str, server: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"the server exited with code {server.returncode} before answering /health")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"the server did not answer {url}/health within {timeout} s")


def main(args: Args) -> dict:
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "diffalign.cli", "serve", "--model", f"base={args.model}", "--port", str(port),
               "--reward", args.reward, "--concurrency", str(args.server_concurrency),
               "--queue-length", str(args.queue_length), "--max-steps", str(max(args.steps, 100))]
    with tempfile.TemporaryFile("w+") as log:
        server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                  env={**os.environ, "HF_HUB_OFFLINE": "1"})
        try:
            _wait_for_health(url, server, args.startup_timeout)
            loaded = _memory_mb(server.pid)["VmRSS"]
            warm = asyncio.run(_run(url, args.concurrency, args.concurrency, args.steps, args.reward, 10**6))
            before = _memory_mb(server.pid)["VmRSS"]
            run = asyncio.run(_run(url, args.requests, args.concurrency, args.steps, args.reward, 0))
            memory = _memory_mb(server.pid)
            health = httpx.get(f"{url}/health").json()
        except Exception:
            log.seek(0)
            print(log.read()[-4000:], file=sys.stderr)
            raise
        finally:
            server.terminate()
            server.wait(30)
    statuses = run["statuses"]
    latencies = run["latencies"]
    return {
        "model": args.model, "requests": args.requests, "concurrency": args.concurrency, "steps": args.steps,
        "reward": args.reward, "server_concurrency": args.server_concurrency,
        "server_errors": sum(n for s, n in statuses.items() if not (s.isdigit() and int(s) < 500)),
        "client_errors": sum(n for s, n in statuses.items() if s.isdigit() and 400 <= int(s) < 500),
        "ok": statuses.get("200", 0), "statuses": statuses, "warmup_ok": warm["statuses"].get("200", 0),
        "latency_s": {name: round(_percentile(latencies, q), 4)
                      for name, q in (("p50", 0.5), ("p95", 0.95), ("p99", 0.99), ("max", 1.0))},
        "throughput_rps": round(args.requests / run["wall_s"], 2), "wall_s": round(run["wall_s"], 2),
        "mean_batch_size": health["mean_batch_size"], "batches": health["batches"],
        "rss_mb": {"loaded": loaded, "before": before, "after": memory["VmRSS"], "peak": memory["VmHWM"]},
        "rss_growth_mb": round(memory["VmRSS"] - before, 1),
    }


if __name__ == "__main__":
    print(json.dumps(main(tyro.cli(Args)), indent=2))
