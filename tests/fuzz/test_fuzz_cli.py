"""Fuzzed command lines: unknown flags, bad numbers, missing values, bad preset and method names, odd model and
prompt arguments. ``diffalign.cli.run`` either does its job or stops with SystemExit: a usage message naming the
argument (tyro, exit status 2) or a message naming the flag, the value and the rule; never a traceback."""

from __future__ import annotations

import contextlib
import io
import json
import tempfile
from pathlib import Path

from fuzz_helpers import assert_complete_run, fuzz
from hypothesis import event, given
from hypothesis import strategies as st

from diffalign import cli
from diffalign.config import config_from_dict

NUMBERS = st.sampled_from(["0", "1", "-1", "2", "3", "1.5", "-0.5", "1e3", "nan", "inf", "-inf", "", "abc", "0x10",
                           "99999999999999999999999", "1_000", "4 ", " 2"])
FLAGS = {  # flag → the values it is fuzzed with
    "--epochs": NUMBERS, "--seed": NUMBERS, "--save-freq": NUMBERS, "--keep-last": NUMBERS,
    "--sample.num-inference-steps": NUMBERS, "--sample.eta": NUMBERS, "--sample.guidance-scale": NUMBERS,
    "--sample.batch-size-per-device": NUMBERS, "--sample.samples-per-prompt": NUMBERS,
    "--train.learning-rate": NUMBERS, "--train.max-grad-norm": NUMBERS, "--train.adam-beta1": NUMBERS,
    "--train.batch-size-per-device": NUMBERS, "--model.lora-rank": NUMBERS, "--model.lora-alpha": NUMBERS,
    "--method.timestep-fraction": NUMBERS, "--method.clip-range": NUMBERS, "--eval.samples": NUMBERS,
    "--time-budget-minutes": NUMBERS,
    "--preset": st.sampled_from(["ddpo-tiny", "reinforce-tiny", "raft-tiny", "nope", "", "DDPO-TINY"]),
    "--algorithm": st.sampled_from(["ddpo", "reinforce", "dag", "nope", ""]),
    "--model.name": st.sampled_from(["tiny", "shapes", "/nonexistent/model", "not a hub id", "org/name", "", "."]),
    "--prompts": st.sampled_from(["simple_animals", "nope", "/nonexistent.txt", "", "shapes"]),
    "--reward.name": st.sampled_from(["brightness", "jpeg_compressibility", "nope", ""]),
    "--model.mixed-precision": st.sampled_from(["no", "fp8", "bf16"]),
    "--log-with": st.sampled_from(["none", "tensorboard", "slack"]),
    "--model.use-lora": st.sampled_from(["True", "False", "maybe"]),
    "--reward.kwargs": st.sampled_from(["seed 3", "nonsense 1", "seed"]),
}
NOISE = st.sampled_from(["--bogus", "-x", "--", "--epochs=3", "--preset=ddpo-tiny", "positional", "--help-me",
                         "--sample.eta=", "--epochs", "--model.name"])


@st.composite
def argument_lists(draw):
    args = []
    for _ in range(draw(st.integers(0, 4))):
        if draw(st.integers(0, 4)) == 0:
            args.append(draw(NOISE))
        else:
            flag = draw(st.sampled_from(sorted(FLAGS)))
            value = draw(FLAGS[flag])
            args += [flag, *value.split(" ")] if flag == "--reward.kwargs" else [flag, value]
    return args


def run_cli(args: list[str]) -> tuple[object, str, str, BaseException | None]:
    """(returned value, stdout, stderr, the SystemExit or None)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            result = cli.run(args)
        except SystemExit as stop:
            return None, out.getvalue(), err.getvalue(), stop
    return result, out.getvalue(), err.getvalue(), None


def assert_clear_exit(stop: SystemExit, stderr: str, args: list[str]) -> None:
    """A usage error (status 2, tyro's message on stderr naming a flag given) or diffalign's own message (the exit
    code is the text: the command, then what is wrong and with which flag or field)."""
    if isinstance(stop.code, str):
        assert stop.code.startswith("diffalign"), stop.code
        return
    assert stop.code == 2, f"exit status {stop.code!r}; stderr: {stderr[-500:]}"
    flags = {a.split("=")[0] for a in args if a.startswith("-")} | {a for a in args if not a.startswith("-")}
    named = [f for f in flags if f and f.lstrip("-") and f.lstrip("-") in stderr]
    assert named or "required" in stderr or "Unrecognized" in stderr, f"stderr names no argument of {args}: {stderr}"


@fuzz(120)
@given(command=st.sampled_from([["config", "validate"], ["config", "show"]]), args=argument_lists())
def test_config_commands_succeed_or_exit_with_a_clear_message(command, args):
    result, out, err, stop = run_cli(command + args)
    if stop is not None:
        event("exit: usage (tyro)" if stop.code == 2 else "exit: diffalign's message")
        assert_clear_exit(stop, err, args)
        return
    event("ran")
    assert result is None
    if command[1] == "validate":
        assert out.strip() == "config is valid"
    else:  # the shown config is a config.json that loads back
        config_from_dict(json.loads(out))


@fuzz(30)
@given(args=argument_lists())
def test_train_rejects_before_creating_its_run_folder(args):
    """Flags that do not validate stop `train` before any file is written (valid ones are `config validate`'s)."""
    _, _, _, stop = run_cli(["config", "validate", *args])
    if stop is None:
        event("valid: not trained here")
        return
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "run"
        result, _, err, stop = run_cli(["train", "--run-dir", str(run_dir), "--log-with", "none", *args])
        assert stop is not None and result is None
        assert_clear_exit(stop, err, args)
        assert not run_dir.exists()
        event("rejected")


SMALL = ["--sample.num-inference-steps", "2", "--sample.batch-size-per-device", "2", "--sample.num-batches-per-epoch",
         "1", "--train.batch-size-per-device", "2", "--eval.samples", "2", "--eval.kl-samples", "0",
         "--log-with", "none", "--method.advantages.min-count", "2", "--reward.name", "brightness"]


@fuzz(2)
@given(preset=st.sampled_from(["ddpo-tiny", "reinforce-tiny"]), epochs=st.integers(1, 2))
def test_train_from_the_command_line_writes_a_complete_run(preset, epochs):
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "run"
        result, out, _, stop = run_cli(["train", "--preset", preset, "--epochs", str(epochs), *SMALL,
                                        "--run-dir", str(run_dir)])
        assert stop is None and result == run_dir and f"run folder: {run_dir}" in out
        assert_complete_run(run_dir, epochs)


MODELS = st.sampled_from(["tiny", "/nonexistent/model", "not a hub id", "", ".", "/", "x" * 300])


@fuzz(12)
@given(model=MODELS, prompts=st.lists(st.sampled_from(["a cat", "", " ", "\u00e9\U0001f431", "x" * 2000]),
                                      min_size=1, max_size=2),
       steps=st.sampled_from(["1", "2", "0", "-1", "1000", "abc"]), out_is_file=st.booleans())
def test_sample_writes_its_images_or_exits_naming_the_argument(model, prompts, steps, out_is_file):
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out"
        if out_is_file:
            out.write_text("a file, not a folder")
        args = ["sample", "--prompts", *prompts, "--model", model, "--num-inference-steps", steps, "--out", str(out)]
        result, _, err, stop = run_cli(args)
        if stop is not None:
            event("exit")
            assert_clear_exit(stop, err, args[1:])
            if isinstance(stop.code, str) and model != "tiny":
                assert "--model" in stop.code or "--out" in stop.code or "num_inference_steps" in stop.code, stop.code
            if isinstance(stop.code, str) and steps in ("0", "-1", "1000"):
                assert "num_inference_steps" in stop.code or "--num-inference-steps" in stop.code or (
                    "--model" in stop.code or "--out" in stop.code), stop.code
            return
        event("sampled")
        assert result == out and (out / "grid.png").is_file()
        record = json.loads((out / "sample.json").read_text())
        assert record["prompts"] == prompts and len(list(out.glob("0*.png"))) == len(prompts)


@fuzz(40)
@given(words=st.lists(st.one_of(st.sampled_from(["config", "train", "sample", "eval", "pretrain", "serve", "show",
                                                 "reward-model", "nope", "-h"]), st.text(max_size=6)),
                      min_size=1, max_size=2))
def test_unknown_commands_print_the_usage(words):
    known = any(words[: len(c.name.split())] == c.name.split() for c in cli.COMMANDS)
    if known or words[0] in ("-h", "--help"):
        event("a command: not run here")
        return
    result, _, _, stop = run_cli(words)
    assert stop is not None and isinstance(stop.code, str)
    assert stop.code.startswith("diffalign: unknown command") and "usage: diffalign COMMAND" in stop.code
