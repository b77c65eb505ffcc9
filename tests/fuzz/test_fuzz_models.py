"""Fuzzed model folders: files missing or corrupted, configs edited (shapes, schedules, class names), pipelines
that are not Stable Diffusion. ``load_policy`` gives a policy that samples finite images, or a ValueError naming the
folder raised by diffalign; a run on such a folder stops before its run folder exists."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from fuzz_helpers import assert_clear_error, fuzz, tiny_config
from hypothesis import event, example, given
from hypothesis import strategies as st

from diffalign.config import preset, replace
from diffalign.models import load_policy, resolve_model
from diffalign.models.tiny import build_tiny_pipeline
from diffalign.rollout import StepSettings, sample
from diffalign.train.loop import train


#: The files of a saved tiny pipeline.
FILES = ["model_index.json", "scheduler/scheduler_config.json", "text_encoder/config.json",
         "text_encoder/model.safetensors", "tokenizer/tokenizer.json", "tokenizer/tokenizer_config.json",
         "unet/config.json", "unet/diffusion_pytorch_model.safetensors", "vae/config.json",
         "vae/diffusion_pytorch_model.safetensors"]


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("models") / "tiny"
    build_tiny_pipeline(seed=0).save_pretrained(folder)
    assert sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()) == FILES
    return folder


def load_or_clear_error(folder: Path) -> str:
    """Loads ``folder`` and samples 2 steps with it (finite images), or checks the error: loading, a ValueError
    naming the folder; sampling, a ValueError naming the steps. Returns which happened."""
    try:
        policy = load_policy(str(folder))
    except ValueError as error:
        assert_clear_error(error, str(folder))
        return "rejected"
    try:
        rollout = sample(policy, ["a cat"], [0], StepSettings(2, 2.0, 1.0))
    except ValueError as error:  # a schedule that cannot take 2 steps (e.g. its steps_offset overshoots)
        assert_clear_error(error, "2 steps")
        return "loaded, but not for 2 steps"
    assert rollout.images.shape[:2] == (1, 3) and torch.isfinite(rollout.images).all()
    return "loaded"


CONFIG_EDITS = {
    "unet/config.json": {"in_channels": [1, 8], "out_channels": [8], "cross_attention_dim": [16, 64],
                         "sample_size": [3, 5, 8, 24], "block_out_channels": [[16, 32], [32]],
                         "_class_name": ["UNet2DModel", "UNet2DConditionModel", None, 3],
                         "addition_embed_type": ["text_time"], "attention_head_dim": [3]},
    "vae/config.json": {"latent_channels": [8], "block_out_channels": [[32]], "_class_name": ["AutoencoderTiny"],
                        "scaling_factor": [0.0, -1.0]},
    "text_encoder/config.json": {"hidden_size": [64], "max_position_embeddings": [10], "vocab_size": [100]},
    "scheduler/scheduler_config.json": {"num_train_timesteps": [0, -5, 10, "x"], "prediction_type": ["foo", "sample"],
                                        "beta_schedule": ["weird", "linear"], "timestep_spacing": ["nope"],
                                        "thresholding": [True], "steps_offset": [0, 500]},
    "model_index.json": {"_class_name": ["StableDiffusionXLPipeline", "FluxPipeline", "DDPMPipeline", None, [1],
                                         "StableDiffusionImg2ImgPipeline"]},
}
EDITS = st.sampled_from([(f, key, value) for f, keys in CONFIG_EDITS.items() for key, values in keys.items()
                         for value in values])


@st.composite
def damages(draw, files: list[str]):
    kind = draw(st.sampled_from(["delete", "corrupt", "truncate", "json"] + ["edit"] * 4))
    if kind == "edit":
        return ("edit", *draw(EDITS))
    if kind == "json":
        name = draw(st.sampled_from([f for f in files if f.endswith(".json")]))
        return ("json", name, draw(st.sampled_from(["[]", "null", "3", "{", "\"text\"", ""])))
    return (kind, draw(st.sampled_from(files)), draw(st.binary(min_size=1, max_size=64)))


def damage(folder: Path, change: tuple) -> None:
    kind, name, *rest = change
    path = folder / name
    if not path.exists():  # deleted by an earlier change
        return
    if kind == "delete":
        path.unlink()
    elif kind == "corrupt":
        path.write_bytes(rest[0])
    elif kind == "truncate":
        path.write_bytes(path.read_bytes()[: max(1, path.stat().st_size // 2)])
    elif kind == "json":
        path.write_text(rest[0])
    else:
        key, value = rest
        data = json.loads(path.read_text())
        data[key] = value
        path.write_text(json.dumps(data))


@fuzz(24)
@given(changes=st.lists(damages(FILES), min_size=1, max_size=2))
@example(changes=[("delete", "tokenizer/tokenizer_config.json", b"")])  # the tokenizer fell back to 10**30 tokens
@example(changes=[("edit", "vae/config.json", "block_out_channels", [32])])  # an IndexError inside diffusers
@example(changes=[("edit", "vae/config.json", "scaling_factor", 0.0)])  # NaN images
@example(changes=[("edit", "scheduler/scheduler_config.json", "steps_offset", 500)])  # timestep 1000 of [0, 999]
def test_a_damaged_model_folder_loads_and_samples_or_names_the_folder(tiny_folder, changes):
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "model"
        shutil.copytree(tiny_folder, folder)
        for change in changes:
            damage(folder, change)
        event(f"{changes[0][0]}: {load_or_clear_error(folder)}")


@fuzz(40)
@given(kind=st.one_of(st.text(max_size=30), st.sampled_from(["DDPMPipeline", "StableDiffusionXLPipeline",
                                                               "KandinskyPipeline", "FluxPipeline"])),
       drop=st.sampled_from([None, "text_encoder", "vae", "unet", "tokenizer"]))
def test_a_folder_holding_another_pipeline_is_named_before_loading(tiny_folder, kind, drop):
    """Another pipeline class (or a folder missing a component of SD's): the config check names the folder, so a
    run stops before loading anything."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "model"
        shutil.copytree(tiny_folder, folder, ignore=shutil.ignore_patterns("*.safetensors"))
        index = json.loads((folder / "model_index.json").read_text())
        index["_class_name"] = kind
        (folder / "model_index.json").write_text(json.dumps(index))
        if drop:
            shutil.rmtree(folder / drop)
        if kind in ("StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline") and drop in (None, "tokenizer"):
            assert resolve_model(str(folder)) == str(folder)
            return
        with pytest.raises(ValueError) as raised:
            resolve_model(str(folder))
        assert_clear_error(raised.value, str(folder))
        errors = replace(preset("ddpo-tiny"), **{"model.name": str(folder)}).validate()
        assert len(errors) == 1 and errors[0].startswith("model.name: ") and str(folder) in errors[0], errors


VARIANTS = {  # pipelines whose parts load but do not fit together as Stable Diffusion's
    "vae latents 8, unet 4": lambda p: p.register_modules(
        vae=type(p.vae).from_config({**p.vae.config, "latent_channels": 8})),
    "text states 64 wide, unet attends to 32": lambda p: p.register_modules(text_encoder=type(p.text_encoder)(
        type(p.text_encoder.config)(**{**p.text_encoder.config.to_dict(), "hidden_size": 64}))),
}


@fuzz(2)
@given(variant=st.sampled_from(sorted(VARIANTS)))
def test_parts_that_do_not_fit_together_are_named(variant):
    pipeline = build_tiny_pipeline(seed=0)
    VARIANTS[variant](pipeline)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "model"
        pipeline.save_pretrained(folder)
        with pytest.raises(ValueError) as raised:
            load_policy(str(folder))
        assert_clear_error(raised.value, str(folder), "not a consistent Stable-Diffusion pipeline")


@fuzz(3)
@given(change=st.sampled_from([("delete", "unet/diffusion_pytorch_model.safetensors", b""),
                               ("edit", "unet/config.json", "in_channels", 8),
                               ("edit", "model_index.json", "_class_name", "FluxPipeline"),
                               ("delete", "scheduler/scheduler_config.json", b"")]))
def test_a_run_on_a_broken_model_stops_before_its_run_folder_exists(tiny_folder, change):
    with tempfile.TemporaryDirectory() as tmp:
        folder, run_dir = Path(tmp) / "model", Path(tmp) / "run"
        shutil.copytree(tiny_folder, folder)
        damage(folder, change)
        with pytest.raises(ValueError) as raised:
            train(tiny_config(run_dir, **{"model.name": str(folder)}))
        assert_clear_error(raised.value, str(folder))
        assert not run_dir.exists()
