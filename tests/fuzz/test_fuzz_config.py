"""Fuzzed configs: wrong types, out-of-range numbers and combinations. ``validate()`` never raises and every
error names its field; a config it accepts trains to a complete run folder, and one it rejects leaves none."""

from __future__ import annotations

import dataclasses
import json
import math
import tempfile
from pathlib import Path

import pytest
from fuzz_helpers import assert_clear_error, assert_complete_run, fuzz, tiny_config
from hypothesis import event, given
from hypothesis import strategies as st

from diffalign.config import PRESETS, Config, config_from_dict, preset, replace
from diffalign.train.loop import train

TINY_PRESETS = sorted(name for name in PRESETS if name.endswith("-tiny"))


def leaf_fields(config, prefix: str = "") -> dict[str, object]:
    """``{"sample.eta": 1.0, ...}``: every non-dataclass field of ``config`` by its dotted path, with its value."""
    leaves = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value):
            leaves.update(leaf_fields(value, f"{prefix}{f.name}."))
        else:
            leaves[prefix + f.name] = value
    return leaves


def foreign(value, default) -> bool:
    """Whether ``value`` is plainly not of the kind of the field whose default is ``default`` (None when the
    default does not tell: optional fields)."""
    if default is None:
        return False
    if isinstance(default, bool):
        return not isinstance(value, bool)
    if isinstance(default, int):
        return isinstance(value, bool) or not isinstance(value, int)
    if isinstance(default, float):
        return isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value)
    if isinstance(default, (str, dict)):
        return not isinstance(value, type(default))
    if isinstance(default, tuple):
        return not isinstance(value, (tuple, list))
    return False


ANY_VALUE = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20), st.lists(st.integers(-3, 3), max_size=3), st.dictionaries(st.text(max_size=5),
                                                                                   st.integers(), max_size=2),
    st.builds(object),
)
EDGE_NUMBERS = st.one_of(st.sampled_from([0, 1, -1, 2, 3, 7, 2**32, 2**63, 10**30]),
                         st.sampled_from([0.0, -0.0, 0.5, 1.0, 1.5, -1e-9, 1e30, math.inf, -math.inf, math.nan]),
                         st.integers(-5, 40), st.floats(-10, 10))


def field_names(config: Config) -> set[str]:
    return set(leaf_fields(config)) | {f.name for f in dataclasses.fields(config)} | {"method"}


def assert_errors_name_fields(errors: list[str], config: Config) -> None:
    known = field_names(config)
    for error in errors:
        assert isinstance(error, str)
        head = error.split()[0].rstrip(":")
        assert any(head == k or head.startswith(k + ".") for k in known), f"error names no field: {error}"


@fuzz(150)
@given(name=st.sampled_from(TINY_PRESETS), data=st.data(), value=ANY_VALUE)
def test_a_wrongly_typed_field_is_named_never_a_crash(name, data, value):
    config = preset(name)
    leaves = leaf_fields(config)
    path = data.draw(st.sampled_from(sorted(leaves)), label="field")
    broken = replace(config, **{path: value})
    errors = broken.validate()  # never raises, whatever the value
    assert_errors_name_fields(errors, broken)
    if foreign(value, leaves[path]):
        assert any(e.startswith(path + " ") for e in errors), (path, value, errors)
        with pytest.raises(ValueError) as raised:
            broken.check()
        assert_clear_error(raised.value, path)


@fuzz(120)
@given(name=st.sampled_from(TINY_PRESETS), data=st.data())
def test_numbers_out_of_range_and_in_combination_give_named_errors(name, data):
    config = preset(name)
    leaves = leaf_fields(config)
    numeric = sorted(p for p, v in leaves.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
                     and p != "seed")
    paths = data.draw(st.lists(st.sampled_from(numeric), min_size=1, max_size=4, unique=True), label="fields")
    changes = {p: data.draw(EDGE_NUMBERS, label=p) for p in paths}
    broken = replace(config, **changes)
    errors = broken.validate()
    assert_errors_name_fields(errors, broken)
    mistyped = [p for p, v in changes.items() if foreign(v, leaves[p])]
    for path in mistyped:  # a float for an int, or NaN: a type error, reported alone
        assert any(e.startswith(path + " ") for e in errors), (path, errors)
    if mistyped:
        return
    for path, value in changes.items():  # rules every config states, whatever the method
        if path in {"epochs", "save_freq", "sample.batch_size_per_device", "sample.num_batches_per_epoch",
                    "train.batch_size_per_device", "train.gradient_accumulation_steps", "model.lora_rank"} and (
                isinstance(value, int) and value < 1):
            assert any(e.startswith(path + " must be >= 1") for e in errors), (path, errors)
        if path in {"train.learning_rate", "sample.eta", "sample.guidance_scale"} and value in (math.inf, -math.inf):
            assert any(e.startswith(path + " must be") for e in errors), (path, errors)
        if path == "train.max_grad_norm" and value <= 0:
            assert any(e.startswith("train.max_grad_norm must be > 0") for e in errors), errors
        if path == "sample.num_inference_steps" and value >= 1000:  # SD's schedule: 1000 timesteps, offset 1
            assert any(e.startswith("sample.num_inference_steps (") for e in errors), errors


@fuzz(40)
@given(seed=st.integers(-(2**65), 2**65), run_dir=st.sampled_from(["file", "file/sub", "new/nested", "\0x", "x" * 300]),
       resume=st.sampled_from([None, "missing", "\0", "y" * 5000]))
def test_seed_run_dir_and_resume_are_checked_before_anything_runs(seed, run_dir, resume, tmp_path_factory):
    base = tmp_path_factory.getbasetemp() / "paths"
    base.mkdir(exist_ok=True)
    (base / "file").write_text("not a folder")
    config = replace(preset("ddpo-tiny"), seed=seed, run_dir=str(base / run_dir),
                     resume=None if resume is None else str(base / resume))
    errors = config.validate()
    assert_errors_name_fields(errors, config)
    assert any(e.startswith("seed ") for e in errors) == (not 0 <= seed < 2**32)
    assert any(e.startswith("run_dir ") for e in errors) == (run_dir in ("file", "file/sub", "\0x", "x" * 300))
    assert any(e.startswith("resume: ") for e in errors) == (resume is not None)


JSON_VALUES = st.recursive(st.none() | st.booleans() | st.integers(-10, 10**12) | st.floats() | st.text(max_size=8),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner,
                                                                                       max_size=3), max_leaves=6)


def _paths(data, prefix=()):
    yield prefix
    if isinstance(data, dict):
        for key, value in data.items():
            yield from _paths(value, prefix + (key,))


@fuzz(150)
@given(name=st.sampled_from(TINY_PRESETS), data=st.data(), value=JSON_VALUES, delete=st.booleans())
def test_an_edited_config_json_loads_or_names_the_field(name, data, value, delete):
    """A run folder's config.json edited by hand (or cut short): config_from_dict raises ValueError naming the
    field, or validate() lists the problem; nothing else escapes."""
    document = json.loads(json.dumps(preset(name).to_dict()))
    path = data.draw(st.sampled_from(list(_paths(document))[1:]), label="path")
    parent = document
    for key in path[:-1]:
        parent = parent[key]
    if delete:
        del parent[path[-1]]
    else:
        parent[path[-1]] = value
    try:
        config = config_from_dict(document)
    except ValueError as error:
        assert_clear_error(error, "config")
        named = [str(k) for k in path if k != "algorithm"]
        assert path[0] == "algorithm" or any(k in str(error) for k in named), (path, error)
        return
    errors = config.validate()
    assert_errors_name_fields(errors, config)
    if not delete and path[0] != "algorithm":
        dotted = ".".join(map(str, path))
        default = leaf_fields(preset(name)).get(dotted)
        if isinstance(value, list):
            value = tuple(value)
        if default is not None and foreign(value, default):
            assert any(e.startswith(dotted + " ") for e in errors), (dotted, value, errors)


SMALL_COMBOS = st.fixed_dictionaries({
    "sample.batch_size_per_device": st.integers(1, 2), "sample.num_batches_per_epoch": st.integers(1, 2),
    "sample.samples_per_prompt": st.integers(1, 2), "train.batch_size_per_device": st.integers(1, 2),
    "train.gradient_accumulation_steps": st.integers(1, 2), "sample.num_inference_steps": st.integers(1, 3),
    "sample.eta": st.sampled_from([0.0, 0.5, 1.0]), "sample.guidance_scale": st.sampled_from([0.0, 1.0, 4.5]),
    "train.learning_rate": st.sampled_from([0.0, 1e-3]), "method.timestep_fraction": st.sampled_from([0.5, 1.0, 1.5]),
    "method.advantages.min_count": st.integers(1, 2), "epochs": st.integers(1, 2),
})


@fuzz(8)
@given(name=st.sampled_from(["ddpo-tiny", "reinforce-tiny"]), changes=SMALL_COMBOS)
def test_small_combinations_train_to_a_complete_run_or_are_rejected_before_any_folder(name, changes):
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "run"
        config = tiny_config(run_dir, name, **changes)
        errors = config.validate()
        event("rejected" if errors else "trained")
        if errors:
            with pytest.raises(ValueError) as raised:
                train(config)
            assert_clear_error(raised.value, "invalid config", *[e.split()[0] for e in errors])
            assert not run_dir.exists(), "a rejected config created its run folder"
            return
        result = train(config)
        assert result.run_dir == run_dir
        assert_complete_run(run_dir, config.epochs)
