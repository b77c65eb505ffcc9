"""Two processes (accelerate, gloo, CPU) end with identical weights and share per-prompt statistics."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file


def _launch_command(tmp_path: Path) -> list[str]:
    """``accelerate launch --cpu`` starts several CPU processes through mpirun (Debian's openmpi-bin, which
    .ci/run installs); where mpirun is absent, torchrun starts the same two gloo processes."""
    worker = [str(Path(__file__).with_name("ddp_worker.py")), str(tmp_path)]
    binaries = Path(sys.executable).parent
    if shutil.which("mpirun"):
        (tmp_path / "hostfile").write_text("localhost slots=2\n")
        return [str(binaries / "accelerate"), "launch", "--cpu", "--num_processes", "2", "--num_machines", "1",
                "--mpirun_hostfile", str(tmp_path / "hostfile"), "--mixed_precision", "no", "--dynamo_backend",
                "no", *worker]
    return [str(binaries / "torchrun"), "--nproc_per_node", "2", *worker]


@pytest.mark.slow
def test_two_processes_end_identical(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "ACCELERATE_USE_CPU": "true", "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}
    done = subprocess.run(_launch_command(tmp_path), env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]

    w0, w1 = load_file(tmp_path / "rank0.safetensors"), load_file(tmp_path / "rank1.safetensors")
    assert w0.keys() == w1.keys() and all(torch.equal(w0[k], w1[k]) for k in w0)
    assert any("lora_B" in k and w0[k].abs().max() > 0 for k in w0), "no update happened"

    s0, s1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert s0["buffers"] == s1["buffers"]
    # 2 epochs × 2 ranks × 2 samples: every rank's tracker holds all 8 gathered rewards
    assert sum(len(v) for v in s0["buffers"].values()) == 8
    everyone = {p for rank in (s0, s1) for epoch in rank["prompts"] for p in epoch}
    assert everyone == set(s0["buffers"])
