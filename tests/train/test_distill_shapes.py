"""The few-step distillation recipe (``diffalign pretrain shapes-turbo``) and the ``shapes-turbo`` cache."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler

from diffalign.models import build_tiny_pipeline, load_policy, loading, save_tiny_pipeline
from diffalign.models.policy import Schedule
from diffalign.models.shapes import SCHEDULER_CONFIG
from diffalign.train.distill_shapes import (
    DistillConfig, distill, student_x0, teacher_trajectories, trailing_policy, training_pairs,
)


def _trailing_schedule() -> Schedule:
    return Schedule.from_scheduler_config(DDIMScheduler(**{**SCHEDULER_CONFIG, "timestep_spacing": "trailing"}).config)


def test_trailing_timesteps_of_1_2_4_8_steps_lie_on_the_40_step_trajectory():
    schedule = _trailing_schedule()
    assert schedule.timesteps(40).tolist() == list(range(999, 0, -25))  # 999, 974, …, 24
    assert schedule.timesteps(1).tolist() == [999]
    assert schedule.timesteps(2).tolist() == [999, 499]
    assert schedule.timesteps(4).tolist() == [999, 749, 499, 249]
    assert schedule.timesteps(8).tolist() == [999, 874, 749, 624, 499, 374, 249, 124]
    # Position k of the 40-step trajectory is t = 999 − 25 k: 499 → 20, 249 → 30, 874 → 5, 124 → 35.
    assert training_pairs(schedule, 40, (1, 2, 4, 8)).tolist() == [
        0, 0, 20, 0, 10, 20, 30, 0, 5, 10, 15, 20, 25, 30, 35]
    with pytest.raises(ValueError, match="timestep 666 of 3 trailing steps"):
        training_pairs(schedule, 40, (3,))


def test_config_validate_names_every_bad_field():
    errors = DistillConfig(student_steps=(1, 3), train_steps=0, teacher_guidance_scale=0.5, ema_decay=1.0,
                           teacher="/no/such/folder").validate()
    for name in ("student_steps [3]", "train_steps", "teacher_guidance_scale", "ema_decay", "teacher"):
        assert any(name in error for error in errors), (name, errors)
    assert DistillConfig().validate() == []


def test_distillation_on_the_tiny_pipeline_brings_the_one_step_student_to_the_teacher(tmp_path):
    teacher_dir = tmp_path / "teacher"
    build_tiny_pipeline(seed=0, prediction_type="sample").save_pretrained(teacher_dir)  # an x0-prediction model
    config = DistillConfig(output_dir=str(tmp_path / "student"), teacher=str(teacher_dir), num_threads=1,
                           teacher_steps=8, num_trajectories=8, teacher_batch_size=4, train_steps=60, batch_size=16,
                           learning_rate=2e-3, warmup_steps=2, ema_decay=0.8, eval_samples_per_family=1)
    out = distill(config)

    # The same teacher trajectories again (a pure function of the config), and both students at t = 999 on them.
    teacher = trailing_policy(load_policy(str(teacher_dir)))
    data = teacher_trajectories(config, teacher, training_pairs(teacher.schedule, 8, config.student_steps))
    x_T, t = data.x_t[:, 0], torch.full((8,), 999)
    assert data.timesteps[0] == 999
    student = load_policy(str(out))
    with torch.no_grad():
        untrained = F.mse_loss(student_x0(teacher, x_T, t, data.prompt_embeds), data.x0).item()  # student at init
        trained = F.mse_loss(student_x0(student, x_T, t, data.prompt_embeds), data.x0).item()
    # Measured: 0.0745 → 0.0198 (seed 0, one thread); untrained, or trained on a wrong target, it stays near 0.07.
    assert trained < 0.6 * untrained, (trained, untrained)

    assert student.schedule.timestep_spacing == "trailing" and student.schedule.prediction_type == "sample"
    report = json.loads((out / "eval.json").read_text())
    assert set(report["accuracy"]["student"]) == {"1", "2", "4", "8"} and "8" in report["accuracy"]["teacher"]
    assert report["timesteps"]["2"] == [999, 499]
    assert "Luhman" in (out / "README.md").read_text()
    assert not loading.missing_pipeline_files(out) and not (tmp_path / "student.partial").exists()


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    """An empty cache folder in tmp_path, with no builders registered."""
    monkeypatch.setenv(loading.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setattr(loading, "_builders", {})
    return tmp_path / "cache"


def _refuse(path):
    raise AssertionError(f"the builder ran although {path} should have been used")


def test_a_complete_cache_folder_is_loaded_without_building(cache):
    save_tiny_pipeline(loading.cached_model_path("shapes-turbo"))
    loading.register_builder("shapes-turbo", _refuse)
    assert loading.resolve_model("shapes-turbo") == "shapes-turbo"
    policy = load_policy("shapes-turbo")
    assert policy.latent_shape == (4, 16, 16)  # the tiny pipeline's, not the ShapesWorld model's 4×8×8


def test_an_incomplete_cache_folder_is_an_error_naming_the_missing_files(cache):
    save_tiny_pipeline(loading.cached_model_path("shapes-turbo"))
    (loading.cached_model_path("shapes-turbo") / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    loading.register_builder("shapes-turbo", _refuse)
    with pytest.raises(FileNotFoundError, match="incomplete.*unet/diffusion_pytorch_model.safetensors"):
        load_policy("shapes-turbo")


def test_a_missing_cache_folder_is_built_on_first_use_then_reused(cache):
    calls = []

    def build(path):
        calls.append(path)
        return save_tiny_pipeline(path)

    with pytest.raises(FileNotFoundError, match="diffalign pretrain shapes-turbo"):
        load_policy("shapes-turbo")  # no builder registered
    loading.register_builder("shapes-turbo", build)
    load_policy("shapes-turbo")
    load_policy("shapes-turbo")
    assert calls == [loading.cached_model_path("shapes-turbo")]


def test_the_cache_folder_is_named_after_the_base_it_is_made_from(cache, tmp_path, monkeypatch):
    """A student distilled from another base (an earlier shipped one) is not loaded for the current one."""
    from diffalign.models import shapes as shapes_model

    path = loading.cached_model_path("shapes-turbo")
    assert path.parent == cache and path.name == f"shapes-turbo-{loading.base_fingerprint()}"
    assert len(loading.base_fingerprint()) == 12
    other = tmp_path / "other-base"
    shutil.copytree(shapes_model.base_model_path(), other)
    weights = other / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes() + b" ")  # other weights: only their hash is read here
    monkeypatch.setattr(shapes_model, "BASE_MODEL_DIR", other)
    assert loading.cached_model_path("shapes-turbo") != path


def test_importing_train_registers_the_shapes_turbo_builder(monkeypatch):
    import diffalign.train  # noqa: F401  (registered on import; already imported above)

    assert "shapes-turbo" in loading._builders
