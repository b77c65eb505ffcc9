"""Running an ASGI app with uvicorn: blocking (:func:`run`) or in a background thread (:func:`serve_in_thread`).

serve/ needs the ``serve`` extra (fastapi, uvicorn): ``pip install diffalign[serve]``.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any

import uvicorn


def run(app, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> None:
    """Serves ``app`` with uvicorn until interrupted (blocking)."""
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)


@dataclass
class RunningServer:
    """A server running in a background thread (see :func:`serve_in_thread`)."""

    url: str
    server: Any
    thread: threading.Thread

    def stop(self, timeout: float = 10.0) -> None:
        """Asks uvicorn to exit and waits for the thread."""
        self.server.should_exit = True
        self.thread.join(timeout)


def serve_in_thread(app, host: str = "127.0.0.1", port: int = 0, startup_timeout: float = 60.0,
                    name: str = "server") -> RunningServer:
    """Starts uvicorn in a daemon thread (``port=0`` picks a free port) and returns once it accepts connections."""
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, name=name, daemon=True)
    thread.start()
    deadline = time.monotonic() + startup_timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            raise RuntimeError(f"{name} did not start on {host}:{port}")
        time.sleep(0.01)
    bound_port = server.servers[0].sockets[0].getsockname()[1]
    return RunningServer(url=f"http://{host}:{bound_port}", server=server, thread=thread)
