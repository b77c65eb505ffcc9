"""The benchmark scripts run and print the numbers they promise (tiny sizes; timings are not asserted)."""

import importlib.util
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_bench_ddpo_reports_the_epoch_split_and_floor():
    bench = _load("bench_ddpo")
    result = bench.main(bench.Args(samples=4, sample_batch=2, train_batch=2, steps=2, threads=1))
    for key in ["epoch_s", "sample_s", "reward_wait_s", "train_s", "floor_s", "ratio_epoch_to_floor", "peak_rss_mb"]:
        assert result[key] > 0 or key == "reward_wait_s", key
    # the ratio is computed before epoch_s and floor_s are rounded to 4 decimals
    assert result["ratio_epoch_to_floor"] == pytest.approx(result["epoch_s"] / result["floor_s"], rel=1e-2)


def test_bench_async_rewards_overlaps_a_slow_reward():
    bench = _load("bench_async_rewards")
    result = bench.main(bench.Args(latency_s=0.3, batches=3, batch_size=1, steps=2, threads=1))
    # three 0.3 s reward calls: inline pays all of them, async hides all but the last behind sampling
    assert result["inline_s"] > 0.9 and result["async_s"] < result["inline_s"]


def test_bench_step_gradients_reports_each_step():
    bench = _load("bench_step_gradients")
    result = bench.main(bench.Args(model="tiny", captions=2, group=2, steps=3, threads=1))
    assert len(result["grad_norm"]) == len(result["split_half_cosine"]) == 3
    assert all(v > 0 for v in result["grad_norm"]) and all(-1 <= c <= 1 for c in result["split_half_cosine"])
    assert sum(result["squared_norm_share"]) == pytest.approx(1, abs=1e-3)


def test_trials_table_summarises_a_run_folder(tmp_path):
    import json

    bench = _load("bench_ddpo_shapes_trials")
    rewards = [0.5 + 0.01 * e for e in range(20)]  # slope 0.01 per epoch = 1.0 per 100 epochs
    (tmp_path / "metrics.jsonl").write_text("".join(
        json.dumps({"epoch": e, "reward/mean": r, "train/weight_drift": 0.01 * e, "kl/to_base": 0.001,
                    "train/zero_advantage_groups": 0.25}) + "\n" for e, r in enumerate(rewards)))
    (tmp_path / "summary.json").write_text(json.dumps({
        "base": {"train_strict_accuracy": 0.4, "heldout_strict_accuracy": 0.2},
        "final": {"train_strict_accuracy": 0.5, "heldout_strict_accuracy": 0.3}}))
    row = bench.summarise(tmp_path)
    assert row["reward_first"] == pytest.approx(0.505) and row["reward_last"] == pytest.approx(0.685)
    assert row["reward_slope_per_100"] == pytest.approx(1.0) and row["drift"] == pytest.approx(0.19)
    assert row["heldout_final"] == 0.3 and row["zero_groups"] == 0.25
    assert "| x | 0.505 → 0.685 | +1.0 | — |" in bench.markdown({"x": {**row, "minutes": 1.0}})
    control = tmp_path / "control"
    control.mkdir()
    (control / "metrics.jsonl").write_text("".join(json.dumps({"reward/mean": r - 0.1 * (e % 2)}) + "\n"
                                                   for e, r in enumerate(rewards)))
    mean, error, block_error = bench.paired_gain(tmp_path, control)  # differences 0, .1, 0, .1, ... (epochs 10..19)
    assert mean == pytest.approx(0.05) and error == pytest.approx(0.0527 / 10**0.5, abs=1e-3)
    # Blocks of round(sqrt(10)) = 3 alternating values have means 1/30 or 2/30 from the mean 0.05: less spread
    # than independent draws, so a smaller error than the one that treats epochs as independent.
    assert 0 < block_error < error
    assert set(bench.VARIANTS) >= {"reference", "placebo", "no_last_two_steps", "epsilon_weighting"}


def test_block_bootstrap_error_widens_for_correlated_epochs():
    bench = _load("bench_ddpo_shapes_trials")
    assert bench.block_bootstrap_se([0.3] * 16) == pytest.approx(0.0, abs=1e-12)
    step = [0.0] * 8 + [1.0] * 8  # a slow drift: neighbouring epochs alike
    independent = (sum((v - 0.5) ** 2 for v in step) / 15) ** 0.5 / 16**0.5
    correlated = bench.block_bootstrap_se(step)
    assert correlated > 1.3 * independent
    assert correlated == bench.block_bootstrap_se(step)  # a fixed seed: the same table every time


def test_methods_table_reads_a_run_folder(tmp_path):
    import json

    bench = _load("bench_methods_shapes")
    records = [{"epoch": e, "kl/to_base": 0.1 * e, "train/weight_drift": 0.01 * e, "reward/mean": 0.1 * e,
                "time/epoch_s": 6.0} for e in range(10)]
    records[4].update({"eval/heldout_strict_accuracy": 0.25, "eval/diversity_diversity": 0.2})
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (tmp_path / "summary.json").write_text(json.dumps({
        "algorithm": "draft", "reward": "shapes_learned", "epochs": 10,
        "base": {"heldout_strict_accuracy": 0.2, "heldout_reward_mean": 0.5, "heldout_gold_mean": 0.4},
        "final": {"heldout_strict_accuracy": 0.3, "heldout_reward_mean": 0.7, "heldout_gold_mean": 0.45}}))
    (tmp_path / "config.json").write_text(json.dumps({"reward": {"gold": "shapes"},
                                                       "sample": {"batch_size_per_device": 32,
                                                                  "num_batches_per_epoch": 2}}))
    row = bench.row(tmp_path)
    assert row["samples"] == 640 and row["kl"] == pytest.approx(0.9) and row["drift"] == pytest.approx(0.09)
    # first and last 10 % of 10 epochs: epoch 0 (0.0) and epoch 9 (0.9); 10 epochs × 6 s
    assert row["train_reward"] == pytest.approx([0.0, 0.9]) and row["wall_s"] == pytest.approx(60.0)
    assert [(p["epoch"], p["heldout_strict"]) for p in row["evaluations"]] == [(0, 0.2), (5, 0.25), (10, 0.3)]
    assert row["evaluations"][1]["diversity_diversity"] == 0.2
    assert bench.variant("draft-shapes@train.learning_rate=3e-3,method.truncation=1").train.learning_rate == 3e-3
    with pytest.raises(ValueError, match="key=value"):
        bench.variant("draft-shapes@oops")
    table = bench.markdown({"draft-shapes": row})
    assert ("| draft-shapes | 0.000 → 0.900 | 0.200 → 0.300 | — → — | 0.500 → 0.700 | 0.400 → 0.450 | — → — | 0.9 | "
            "0.0900 | 10 | 640 | 1.0 min |") in table


def test_steering_table_counts_compute_per_image():
    bench = _load("bench_steering_shapes")
    result = bench.main(bench.Args(methods=("best-of-n", "svdd"), particles=(2,), captions=2, chunk=2))
    rows = {(r["method"], r["k"]): r for r in result["rows"]}
    assert rows[("base", 1)]["denoiser_passes_per_image"] == 40  # 20 guided steps, 2 rows each
    assert rows[("best-of-n", 2)]["denoiser_passes_per_image"] == 80
    assert rows[("svdd", 2)]["denoiser_passes_per_image"] == 78  # x_T once, 19 steps × 2 candidates, 2 rows
    assert rows[("best-of-n", 2)]["reward_calls_per_image"] == 2 and "| svdd | 2 |" in result["markdown"]


def test_bench_vs_trl_reports_medians_of_epochs_two_on():
    bench = _load("bench_vs_trl")

    def run(epochs, peak_rss_mb):  # (epoch_s, cpu_s) per epoch
        return {"epochs": [{"epoch_s": e, "sample_s": e / 2, "train_s": e / 4, "cpu_s": c, "wall_s": e}
                           for e, c in epochs], "peak_rss_mb": peak_rss_mb}

    runs = {"diffalign": [run([(9.0, 9.0), (2.0, 4.0), (4.0, 6.0)], 300.0), run([(9.0, 9.0), (3.0, 3.0)], 310.0)],
            "trl": [run([(20.0, 20.0), (4.0, 8.0), (6.0, 6.0)], 500.0), run([(20.0, 20.0), (8.0, 8.0)], 480.0)]}
    result = bench.summarise(runs)
    # epoch 1 of each run (9 s, 20 s) is a warm-up: medians of {2, 4, 3} and {4, 6, 8}
    assert result["diffalign_epoch_s"] == 3.0 and result["trl_epoch_s"] == 6.0
    assert result["ratio_diffalign_to_trl"] == 0.5
    assert result["diffalign_sample_s"] == 1.5 and result["trl_train_s"] == 1.5
    # CPU over wall of the measured epochs: (4 + 6 + 3) / (2 + 4 + 3) and (8 + 6 + 8) / (4 + 6 + 8)
    assert result["diffalign_cores_busy"] == pytest.approx(13 / 9, abs=1e-4)
    assert result["trl_cores_busy"] == pytest.approx(22 / 18, abs=1e-4)
    assert result["diffalign_peak_rss_mb"] == 310.0 and result["trl_peak_rss_mb"] == 500.0
    without_trl = bench.summarise({"diffalign": runs["diffalign"], "trl": []})
    assert without_trl["trl_epoch_s"] is None and without_trl["ratio_diffalign_to_trl"] is None


@pytest.mark.parametrize("batch", [8, 32])
def test_bench_vs_trl_configures_both_sides_alike(batch):
    from diffalign.config import preset, replace

    bench = _load("bench_vs_trl")
    s = bench.settings(bench.Args(batch=batch))
    trl = bench.trl_config(s)
    config = replace(preset("ddpo-tiny"), **bench.diffalign_overrides(s)).check()
    # 32 samples per epoch; one optimizer step per epoch: the accumulation spans every training minibatch
    assert trl["sample_batch_size"] * trl["sample_num_batches_per_epoch"] == config.sample.samples_per_device == 32
    assert trl["train_batch_size"] * trl["train_gradient_accumulation_steps"] == 32
    assert config.train.batch_size_per_device * config.train.gradient_accumulation_steps == 32
    assert (config.sample.batch_size_per_device, config.train.batch_size_per_device) == (batch, batch)
    assert (config.sample.num_inference_steps, config.sample.eta, config.sample.guidance_scale) == (
        trl["sample_num_steps"], trl["sample_eta"], trl["sample_guidance_scale"]) == (20, 1.0, 5.0)
    assert (config.method.timestep_fraction, trl["train_timestep_fraction"]) == (1.0, 1.0)
    assert (config.method.clip_range, config.method.adv_clip_max) == (trl["train_clip_range"],
                                                                      trl["train_adv_clip_max"])
    assert config.train.learning_rate == trl["train_learning_rate"]
    # TRL's DefaultDDPOStableDiffusionPipeline: LoraConfig(r=4, lora_alpha=4, target_modules=[to_k, to_q, to_v,
    # to_out.0])
    assert (config.model.lora_rank, config.model.lora_alpha) == (4, 4.0)
    assert set(config.model.lora_target_modules) == {"to_k", "to_q", "to_v", "to_out.0"}
    assert not config.method.advantages.per_prompt and not trl["per_prompt_stat_tracking"]
    with pytest.raises(ValueError, match="--batch"):
        bench.settings(bench.Args(batch=12))


def test_bench_vs_trl_reward_and_pipeline_match_diffalign():
    import torch

    from diffalign import rewards

    bench = _load("bench_vs_trl")
    images = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    scores, _ = bench.jpeg_compressibility(images, ("a",) * 3, ({},) * 3)
    assert torch.equal(scores, rewards.get("jpeg_compressibility")(images, ["a"] * 3))
    unet = bench.build_pipeline(0).unet
    assert round(sum(p.numel() for p in unet.parameters()) / 1e6, 2) == 0.79  # the size the benchmark promises
    # torch first and without its local label (2.13.0+cpu → 2.13.0), then TRL, then this environment's versions
    requirements = bench.trl_requirements()
    assert requirements[:2] == [f"torch=={torch.__version__.split('+')[0]}", "trl==0.23.1"]
    assert {r.split("==")[0] for r in requirements[2:]} == set(bench.PINNED_PACKAGES)


def test_bench_reliability_reads_phases_and_the_memory_slope():
    bench = _load("bench_reliability")
    # (time, phase, epoch, rss MB): each phase lasts until the next line
    events = [(0.0, "start", -1, 100.0), (1.0, "sampling", 0, 100.0), (3.0, "reward", 0, 101.0),
              (3.5, "training", 0, 101.0), (4.5, "checkpoint", 0, 102.0), (4.6, "sampling", 1, 102.0),
              (6.6, "reward", 1, 102.0), (7.2, "training", 1, 102.0), (8.0, "done", 1, 102.0)]
    durations = bench.phase_durations(events)
    assert durations["sampling"] == pytest.approx(2.0) and durations["checkpoint"] == pytest.approx(0.1)
    assert durations["reward"] == pytest.approx(0.6)  # the median of 0.5 and 0.6 (upper of two)
    # RSS at each epoch's start grows 0.5 MB an epoch → 50 MB per 100 epochs (the first 10 % skipped)
    ramp = [(float(e), "sampling", e, 200.0 + 0.5 * e) for e in range(40)]
    slope, series = bench.rss_slope(ramp)
    assert slope == pytest.approx(50.0) and series[0] == 200.0 and len(series) == 40
    flat = [(float(e), "sampling", e, 300.0 + (e % 2)) for e in range(40)]
    assert abs(bench.rss_slope(flat)[0]) < 0.5  # a ±0.5 MB wobble is no trend
