"""Reliability figures: runs killed and resumed, fuzzed inputs, memory over a long run; one JSON object.

- **Kills.** A reference run trains uninterrupted; then the same run is started again and killed with SIGKILL
  ``--kills`` times at random moments, each inside a chosen phase of a random epoch (sampling, reward, training,
  checkpoint writing, in turn), and resumed (``--resume RUN``; a run killed before its first checkpoint is started
  again). The finished run's trainable weights (the LoRA and every extra module of the method), optimizer state and
  metrics (but the ``time/*`` ones) must equal the reference's bit for bit. The DDPO run is on ShapesWorld;
  ``--methods`` adds one kill of a tiny run of each other trained method (value and flow networks, trackers,
  coefficients all resume from the checkpoint).
- **Fuzz.** The hypothesis suite (``tests/fuzz``) is run; ``fuzz_cases`` counts the examples it tried and
  ``fuzz_passed`` those that passed.
- **Memory.** A ShapesWorld DDPO run of ``--rss-epochs`` epochs (checkpoints every 20, two kept); the resident set
  size is read at the start of every epoch and ``rss_slope_mb_per_100_epochs`` is the least-squares slope over the
  epochs after the first 10 %.

To know the phase it kills in, each training process is this script in ``--child`` mode: it wraps the loop's
collect/score/train/checkpoint functions to append ``<time> <phase> <epoch>`` lines to a log, then runs the CLI.

    python benchmarks/bench_reliability.py                       # the whole report (about 25 min on 2 cores)
    python benchmarks/bench_reliability.py --kills 4 --methods --no-fuzz --rss-epochs 0
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import tyro

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
PHASES = ("sampling", "reward", "training", "checkpoint")
#: The killed ShapesWorld run: the demo's preset, shortened (16 samples an epoch, a checkpoint every epoch).
SHAPES_RUN = ["--preset", "ddpo-shapes", "--epochs", "6", "--save-freq", "1", "--eval.samples", "16",
              "--eval.freq", "0", "--eval.diversity-prompts", "0", "--sample.batch-size-per-device", "16",
              "--sample.num-batches-per-epoch", "1", "--train.batch-size-per-device", "16",
              "--train.gradient-accumulation-steps", "1", "--log-with", "none"]
#: One tiny run per other trained method (each with its own state to resume).
TINY_METHODS = {"reinforce": "reinforce-tiny", "raft": "raft-tiny", "draft": "draft-tiny", "dag": "dag-tiny",
                "dav": "dav-tiny", "trpo": "trpo-tiny", "actor-critic": "actor-critic-tiny", "sdpo": "sdpo-tiny"}
TINY_RUN = ["--epochs", "4", "--save-freq", "1", "--log-with", "none"]


@dataclass
class Args:
    kills: int = 20
    """Kills of the ShapesWorld DDPO run (the phases in turn)."""
    methods: bool = True
    """Also kill and resume one tiny run of every other trained method."""
    fuzz: bool = True
    """Run the hypothesis suite (tests/fuzz) and count its examples."""
    rss_epochs: int = 200
    """Epochs of the memory run (0: skip it)."""
    seed: int = 0
    """Seed of the kill moments."""
    threads: int = 2
    """torch threads of each training process."""
    out: str | None = None
    """Folder for the runs (default: a temporary folder, deleted at the end)."""


# --- the training process ------------------------------------------------------------------------------------

def child(log_path: str, argv: list[str]) -> None:
    """Runs ``diffalign <argv>`` with the loop's phases logged to ``log_path`` (and the RSS at every epoch)."""
    from diffalign import cli
    from diffalign.train import loop

    log = open(log_path, "a", buffering=1)  # noqa: SIM115 (open for the process's life)

    def mark(phase: str, epoch) -> None:
        log.write(f"{time.time():.6f} {phase} {epoch} {_rss_mb():.2f}\n")

    def wrap(name: str, phase: str, epoch_of):
        inner = getattr(loop, name)

        def wrapped(*args, **kwargs):
            mark(phase, epoch_of(*args, **kwargs))
            return inner(*args, **kwargs)

        setattr(loop, name, wrapped)

    epoch = {"now": -1}

    def collect_epoch(*args, **kwargs):  # the loop collects once per epoch
        epoch["now"] += 1
        return epoch["now"]

    wrap("collect", "sampling", collect_epoch)
    wrap("_score", "reward", lambda *a, **k: epoch["now"])
    wrap("train_epoch", "training", lambda *a, **k: a[7] if len(a) > 7 else k["epoch"])
    wrap("save_checkpoint", "checkpoint", lambda directory, *a, **k: int(directory.name) - 1)
    wrap("evaluate", "evaluation", lambda *a, **k: epoch["now"])
    inner_load = loop.load_checkpoint

    def load(*args, **kwargs):
        state = inner_load(*args, **kwargs)
        epoch["now"] = state.epochs_done - 1
        return state

    loop.load_checkpoint = load
    mark("start", -1)
    cli.main(argv)
    mark("done", epoch["now"])


def _rss_mb() -> float:
    """This process's resident set size now (Linux /proc; the peak elsewhere)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# --- the benchmark ------------------------------------------------------------------------------------------

def _events(log_path: Path) -> list[tuple[float, str, int, float]]:
    if not log_path.exists():
        return []
    events = []
    for line in log_path.read_text().splitlines():
        parts = line.split()
        if len(parts) == 4:
            events.append((float(parts[0]), parts[1], int(parts[2]), float(parts[3])))
    return events


def _launch(train_args: list[str], log_path: Path, threads: int) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, str(Path(__file__).resolve()), "--child", str(log_path), "--", "train", *train_args]
    return subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _finish(process: subprocess.Popen, what: str) -> None:
    _, err = process.communicate()
    if process.returncode != 0:
        raise RuntimeError(f"{what} failed (exit {process.returncode}):\n{err[-3000:]}")


def phase_durations(events) -> dict[str, float]:
    """The median time each phase lasted (until the next logged phase) in a run's event log."""
    spans: dict[str, list[float]] = {}
    for (t, phase, _, _), (t_next, _, _, _) in zip(events, events[1:]):
        spans.setdefault(phase, []).append(t_next - t)
    return {phase: sorted(v)[len(v) // 2] for phase, v in spans.items()}


def _has_checkpoint(run: Path) -> bool:
    return any(p.name.isdigit() for p in (run / "checkpoints").glob("*")) if (run / "checkpoints").is_dir() else False


def kill_and_resume(train_args: list[str], run: Path, phase: str, epoch: int, delay_s: float,
                    threads: int) -> dict:
    """Starts the run, SIGKILLs it ``delay_s`` after it enters ``phase`` of ``epoch``, then resumes it to the end."""
    log_path = run.parent / f"{run.name}.log"
    process = _launch([*train_args, "--run-dir", str(run)], log_path, threads)
    killed_in, partial_left = None, False
    while process.poll() is None:
        events = _events(log_path)
        hit = [e for e in events if e[1] == phase and e[2] == epoch]
        if hit:
            time.sleep(max(0.0, hit[0][0] + delay_s - time.time()))
            process.send_signal(signal.SIGKILL)
            process.wait()
            last = _events(log_path)[-1]
            killed_in = {"phase": last[1], "epoch": last[2]}
            partial_left = any((run / "checkpoints").glob(".partial-*"))
            break
        time.sleep(0.002)
    if killed_in is None:  # the run ended before the moment came: no kill
        _finish(process, f"run {run}")
        return {"killed": False, "target": f"{phase}@{epoch}"}
    resume = ["--resume", str(run)] if _has_checkpoint(run) else []
    _finish(_launch([*train_args, "--run-dir", str(run), *resume], log_path, threads), f"resumed run {run}")
    return {"killed": True, "target": f"{phase}@{epoch}", "killed_in": killed_in, "delay_s": round(delay_s, 3),
            "partial_checkpoint_left": partial_left, "resumed_from_checkpoint": bool(resume)}


def identical(reference: Path, run: Path) -> list[str]:
    """What differs between two finished runs: trainable weights, extra modules, optimizer state, metrics (but
    ``time/*``) and the final evaluation. Empty when the runs agree bit for bit."""
    import torch
    from safetensors.torch import load_file

    from diffalign.train.checkpoint import checkpoint_folders

    differences = []
    last_a, last_b = checkpoint_folders(reference / "checkpoints")[-1], checkpoint_folders(run / "checkpoints")[-1]
    if last_a.name != last_b.name:
        return [f"last checkpoint {last_a.name} vs {last_b.name}"]
    for name in ["trainable.safetensors", *(p.relative_to(last_a).as_posix() for p in last_a.glob("modules/*"))]:
        a, b = load_file(last_a / name), load_file(last_b / name)
        if a.keys() != b.keys() or not all(torch.equal(a[k], b[k]) for k in a):
            differences.append(name)
    opt_a = torch.load(last_a / "optimizer.pt", weights_only=True)["state"]
    opt_b = torch.load(last_b / "optimizer.pt", weights_only=True)["state"]
    if opt_a.keys() != opt_b.keys() or not all(
            torch.equal(opt_a[k][s], opt_b[k][s]) for k in opt_a for s in opt_a[k] if torch.is_tensor(opt_a[k][s])):
        differences.append("optimizer.pt")
    if json.loads((last_a / "trainer_state.json").read_text()) != json.loads((last_b / "trainer_state.json").read_text()):
        differences.append("trainer_state.json")

    def metrics(path: Path) -> list[dict]:
        return [{k: v for k, v in json.loads(line).items() if not k.startswith("time/")}
                for line in (path / "metrics.jsonl").read_text().splitlines() if line]

    if metrics(reference) != metrics(run):
        differences.append("metrics.jsonl")
    if json.loads((reference / "summary.json").read_text())["final"] != json.loads((run / "summary.json").read_text())["final"]:
        differences.append("summary.json final")
    return differences


def kills(args: Args, out: Path, rng: random.Random) -> list[dict]:
    """The ShapesWorld DDPO kills (the phases in turn) and one kill of each other method's tiny run."""
    plans = [("ddpo", SHAPES_RUN, PHASES[k % len(PHASES)]) for k in range(args.kills)]
    if args.methods:
        plans += [(method, ["--preset", preset, *TINY_RUN], rng.choice(PHASES)) for method, preset in TINY_METHODS.items()]
    references, results = {}, []
    for k, (method, train_args, phase) in enumerate(plans):
        if method not in references:
            reference = out / f"{method}-reference"
            start = time.perf_counter()
            _finish(_launch([*train_args, "--run-dir", str(reference)], out / f"{reference.name}.log", args.threads),
                    f"reference run {reference}")
            events = _events(out / f"{reference.name}.log")
            epochs = max(e[2] for e in events if e[1] == "training") + 1
            references[method] = (reference, phase_durations(events), epochs, time.perf_counter() - start)
            print(f"[reliability] {method}: reference run {references[method][3]:.0f} s", file=sys.stderr)
        reference, durations, epochs, _ = references[method]
        first = 0 if method == "ddpo" else min(1, epochs - 1)  # the tiny runs are killed after their first checkpoint
        epoch = rng.randrange(first, epochs)
        delay = rng.uniform(0, durations.get(phase, 0.05))
        run = out / f"{method}-kill-{k:02d}"
        result = {"method": method, **kill_and_resume(train_args, run, phase, epoch, delay, args.threads)}
        result["differences"] = identical(reference, run)
        result["bit_identical"] = not result["differences"]
        results.append(result)
        print(f"[reliability] kill {k + 1}/{len(plans)} {method} {result.get('killed_in', result['target'])}: "
              f"{'identical' if result['bit_identical'] else result['differences']}", file=sys.stderr)
        shutil.rmtree(run)
    return results


def fuzz() -> dict:
    """Runs tests/fuzz with hypothesis's statistics; counts the examples tried and passed."""
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--hypothesis-show-statistics",
               str(ROOT / "tests" / "fuzz")]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    counts = re.findall(r"(\d+) passing, (\d+) failing", done.stdout)  # one line per test and phase
    passing, failing = sum(int(p) for p, _ in counts), sum(int(f) for _, f in counts)
    tail = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else done.stderr[-500:]
    return {"fuzz_cases": passing + failing, "fuzz_passed": passing,
            "fuzz_pytest": tail, "fuzz_exit_code": done.returncode}


def rss_slope(events, skip_fraction: float = 0.1) -> tuple[float, list[float]]:
    """Least-squares slope (MB per 100 epochs) of the RSS at each epoch's start, after the first ``skip_fraction``."""
    per_epoch: dict[int, float] = {}
    for _, phase, epoch, rss in events:
        if phase == "sampling":
            per_epoch.setdefault(epoch, rss)
    epochs = sorted(per_epoch)[int(len(per_epoch) * skip_fraction):]
    if len(epochs) < 2:
        raise ValueError("the memory run logged fewer than 2 epochs")
    xs, ys = epochs, [per_epoch[e] for e in epochs]
    mean_x, mean_y = sum(xs) / len(xs), sum(ys) / len(ys)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys)) / sum((x - mean_x) ** 2 for x in xs)
    return 100 * slope, [per_epoch[e] for e in sorted(per_epoch)]


def memory(args: Args, out: Path) -> dict:
    run = out / "memory"
    train_args = ["--preset", "ddpo-shapes", "--epochs", str(args.rss_epochs), "--save-freq", "20", "--keep-last", "2",
                  "--eval.samples", "8", "--eval.freq", "0", "--eval.diversity-prompts", "0",
                  "--sample.batch-size-per-device", "8", "--sample.num-batches-per-epoch", "1",
                  "--train.batch-size-per-device", "8", "--train.gradient-accumulation-steps", "1", "--run-dir", str(run)]
    start = time.perf_counter()
    _finish(_launch(train_args, out / "memory.log", args.threads), "memory run")
    slope, series = rss_slope(_events(out / "memory.log"))
    step = max(1, len(series) // 20)
    return {"rss_slope_mb_per_100_epochs": round(slope, 3), "rss_epochs": len(series),
            "rss_mb_first": round(series[0], 1), "rss_mb_last": round(series[-1], 1),
            "rss_mb_every_tenth": [round(v, 1) for v in series[::step]],
            "rss_run_minutes": round((time.perf_counter() - start) / 60, 2)}


def main(args: Args) -> dict:
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="diffalign-reliability-"))
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(args.seed)
    result: dict = {}
    try:
        results = kills(args, out, rng)
        killed = [r for r in results if r["killed"]]
        result.update({
            "kills": len(killed), "kills_bit_identical": sum(r["bit_identical"] for r in killed),
            "kills_by_phase": {p: sum(r["killed_in"]["phase"] == p for r in killed)
                               for p in sorted({r["killed_in"]["phase"] for r in killed})},
            "kills_by_method": {m: sum(r["method"] == m for r in killed) for m in dict.fromkeys(r["method"] for r in killed)},
            "kills_leaving_partial_checkpoint": sum(r["partial_checkpoint_left"] for r in killed),
            "runs_not_killed": [r["target"] for r in results if not r["killed"]],
            "kill_details": results,
        })
        if args.fuzz:
            result.update(fuzz())
        if args.rss_epochs:
            result.update(memory(args, out))
    finally:
        if not args.out:
            shutil.rmtree(out, ignore_errors=True)
    return result


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        child(sys.argv[2], sys.argv[4:])
    else:
        print(json.dumps(main(tyro.cli(Args)), indent=1))
