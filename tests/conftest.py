"""Shared fixtures. Tests run offline, single-threaded per process where it matters, on tiny models."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

import pytest  # noqa: E402
import torch  # noqa: E402

# Two threads (these machines have two cores), unless OMP_NUM_THREADS asks for another count (e.g. 1 while other
# torch work shares the cores, where two threads are several times slower).
_requested = os.environ.get("OMP_NUM_THREADS", "")
torch.set_num_threads(int(_requested) if _requested.isdigit() and int(_requested) >= 1 else min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def tiny_pipeline():
    """The tiny random SD-format pipeline (seed 0); treat as read-only."""
    from diffalign.models import build_tiny_pipeline

    return build_tiny_pipeline(seed=0)


@pytest.fixture()
def tiny_policy():
    """A fresh Policy on a tiny pipeline (tests may modify it)."""
    from diffalign.models import Policy, build_tiny_pipeline

    return Policy.from_pipeline(build_tiny_pipeline(seed=0))
