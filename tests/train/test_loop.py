"""End-to-end runs of the online loop on the tiny model: the run folder and an exact resume."""

import json

import pytest
import torch
from safetensors.torch import load_file

from diffalign.config import preset, replace
from diffalign import prompts as prompt_sources
from diffalign.train.loop import epoch_prompts_and_seeds, train


def _tiny(tmp_path, name, **changes):
    config = replace(preset("ddpo-tiny"), run_dir=str(tmp_path / name), log_with="tensorboard", save_freq=1,
                     **{"sample.num_inference_steps": 4, "sample.batch_size_per_device": 2,
                        "sample.num_batches_per_epoch": 2, "train.batch_size_per_device": 2,
                        "train.gradient_accumulation_steps": 2, "method.timestep_fraction": 0.5,
                        "method.advantages.min_count": 2, "reward.name": "brightness"})
    return replace(config, **changes)


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("runs")
    return train(_tiny(tmp, "full", epochs=3)).run_dir, tmp


def test_run_folder_has_everything(full_run):
    run, _ = full_run
    for name in ["config.json", "metrics.jsonl", "summary.json", "report.html", "plots/reward.png",
                 "samples/before.png", "samples/after.png", "checkpoints/3/trainable.safetensors",
                 "checkpoints/3/optimizer.pt", "checkpoints/3/lora/pytorch_lora_weights.safetensors"]:
        assert (run / name).is_file(), name
    assert list(run.rglob("events.out.tfevents.*")), "no TensorBoard events"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [0, 1, 2]
    # 4 samples / train batch 2 = 2 minibatches per epoch, accumulated 2 → 1 optimizer step per epoch
    assert [r["global_step"] for r in records] == [1, 2, 3]
    assert all(abs(r["policy/ratio_mean"] - 1) < 1e-3 for r in records)
    # DESIGN.md: before the first update of an epoch the recomputed log-probs equal the sampler's (fp32)
    assert all(0 <= r["policy/first_step_ratio_error"] < 1e-6 for r in records)
    summary = json.loads((run / "summary.json").read_text())
    assert set(summary) >= {"base", "final"} and summary["epochs"] == 3
    state = json.loads((run / "checkpoints/3/trainer_state.json").read_text())
    assert state["epochs_done"] == 3 and sum(len(v) for v in state["algorithm"]["stat_tracker"]["buffers"].values()) == 12
    assert json.loads((run / "config.json").read_text())["sample"]["num_inference_steps"] == 4


def test_training_changes_the_lora(full_run):
    run, _ = full_run
    weights = load_file(run / "checkpoints/3/trainable.safetensors")
    assert any("lora_B" in k and v.abs().max() > 0 for k, v in weights.items())


def test_resume_continues_bit_identically(full_run):
    run, tmp = full_run
    first = train(_tiny(tmp, "part", epochs=1)).run_dir
    resumed = train(_tiny(tmp, "part", epochs=3, resume=str(first))).run_dir
    a = load_file(run / "checkpoints/3/trainable.safetensors")
    b = load_file(resumed / "checkpoints/3/trainable.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    full = (run / "metrics.jsonl").read_text().splitlines()
    again = (resumed / "metrics.jsonl").read_text().splitlines()
    strip = lambda line: {k: v for k, v in json.loads(line).items() if not k.startswith("time/")}  # noqa: E731
    assert [strip(x) for x in full] == [strip(x) for x in again]
    opt_a = torch.load(run / "checkpoints/3/optimizer.pt", weights_only=True)
    opt_b = torch.load(resumed / "checkpoints/3/optimizer.pt", weights_only=True)
    assert all(torch.equal(opt_a["state"][k]["exp_avg"], opt_b["state"][k]["exp_avg"]) for k in opt_a["state"])


def test_a_metrics_line_cut_short_by_a_kill_is_dropped_at_resume(tmp_path):
    from diffalign.train.run import RunFolder

    run = RunFolder(tmp_path / "run")
    run.metrics_path.write_text('{"epoch": 0, "reward/mean": 1.0}\n{"epoch": 1, "reward/mean": 2.0}\n{"epoch": 2, "rew')
    run.truncate_metrics(epochs_done=2)
    assert run.metrics() == [{"epoch": 0, "reward/mean": 1.0}, {"epoch": 1, "reward/mean": 2.0}]
    run.truncate_metrics(epochs_done=1)
    assert run.metrics() == [{"epoch": 0, "reward/mean": 1.0}]


def test_bf16_reports_the_first_step_ratio_drift(tmp_path):
    """Under bf16 the drift of the first step's ratio is reported; the prepared UNet autocasts when sampling and
    when training alike, so the recomputed log-probs stay those of the sampler."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)  # the process's accelerate state fixes the precision
    try:
        run = train(_tiny(tmp_path, "bf16", epochs=1, **{"model.mixed_precision": "bf16"})).run_dir
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    record = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    assert 0 <= record["policy/first_step_ratio_error"] < 1e-2 and record["policy/approx_kl"] < 1e-4


def test_exported_lora_reproduces_the_trained_policy(full_run):
    """The checkpoint's diffusers-format LoRA, loaded by diffusers, gives the trained UNet's outputs."""
    from diffalign.cli import _load_lora_into
    from diffalign.models import add_lora, load_policy

    run, _ = full_run
    trained = load_policy("tiny")
    add_lora(trained.unet, rank=4, alpha=4.0)
    params = dict(trained.unet.named_parameters())
    for name, value in load_file(run / "checkpoints/3/trainable.safetensors").items():
        params[name].data.copy_(value)
    exported = load_policy("tiny")
    _load_lora_into(exported, str(run / "checkpoints/3/lora"))
    x, t = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0)), torch.tensor([900, 50])
    emb = trained.encode_prompts(["a cat", "a dog"])
    with torch.no_grad():
        torch.testing.assert_close(exported.model_output(x, t, emb), trained.model_output(x, t, emb))
        assert (trained.model_output(x, t, emb) - load_policy("tiny").model_output(x, t, emb)).abs().max() > 0


def test_composite_members_and_gold_reward_are_logged(tmp_path):
    config = _tiny(tmp_path, "gold", epochs=1, **{"reward.name": "composite", "eval.prompts": "nouns_activities",
                                                  "eval.samples": 4,
                                                  "reward.kwargs": {"weights": "brightness=1, jpeg_compressibility=0.1"},
                                                  "reward.gold": "jpeg_incompressibility"})
    run = train(config).run_dir
    record = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    members = record["reward/components/brightness"] + 0.1 * record["reward/components/jpeg_compressibility"]
    assert record["reward/mean"] == pytest.approx(members, rel=1e-5)
    assert record["reward/gold_mean"] == pytest.approx(-record["reward/components/jpeg_compressibility"], rel=1e-5)
    summary = json.loads((run / "summary.json").read_text())
    for when in ("base", "final"):
        assert set(summary[when]) == {"train_reward_mean", "train_gold_mean", "heldout_reward_mean",
                                      "heldout_gold_mean"}
    assert (run / "plots" / "eval.png").is_file()


class _Process:
    def __init__(self, num_processes, process_index):
        self.num_processes, self.process_index = num_processes, process_index


def test_samples_per_prompt_groups_prompts_within_each_process():
    config = replace(preset("ddpo-tiny"), **{"sample.batch_size_per_device": 4, "sample.num_batches_per_epoch": 2,
                                             "sample.samples_per_prompt": 4})
    source = prompt_sources.get(config.prompts)
    ranks = [epoch_prompts_and_seeds(config, source, 3, _Process(2, r)) for r in range(2)]
    prompts = [p for rank_prompts, _ in ranks for p in rank_prompts]
    seeds = [s for _, rank_seeds in ranks for s in rank_seeds]
    assert len(prompts) == 16 and len(set(seeds)) == 16  # every sample keeps its own noise
    groups = [prompts[i : i + 4] for i in range(0, 16, 4)]
    assert all(len(set(group)) == 1 for group in groups)
    assert len({group[0] for group in groups}) > 1
    # k = 1 is DDPO's draw: the same seeds, one prompt each
    single = replace(config, **{"sample.samples_per_prompt": 1})
    assert epoch_prompts_and_seeds(single, source, 3, _Process(2, 0))[1] == ranks[0][1]


def test_samples_per_prompt_must_divide_the_samples_per_device():
    errors = replace(preset("ddpo-tiny"), **{"sample.samples_per_prompt": 3}).validate()
    assert any("sample.samples_per_prompt (3) must divide" in e for e in errors)


def test_instruments_are_logged_every_epoch(full_run):
    run, _ = full_run
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    drift = [r["train/weight_drift"] for r in records]
    assert all(d > 0 for d in drift) and drift == sorted(drift)  # LoRA B starts at 0; a few steps move it away
    assert all(r["kl/to_base"] > 0 for r in records)
    assert all(0 <= r["train/zero_advantage_groups"] <= 1 for r in records)
    assert (run / "plots" / "drift_kl.png").is_file()


def test_one_optimizer_step_moves_every_trained_weight_in_fp32(tmp_path):
    """Guards against an update that silently zeroes (an Adam ε or low-precision underflow)."""
    from accelerate import Accelerator

    from diffalign.algorithms import build
    from diffalign.rewards import get
    from diffalign.train.loop import build_policy, collect, compute_targets, train_epoch

    config = _tiny(tmp_path, "step", epochs=1)
    accelerator = Accelerator()
    policy = build_policy(config, accelerator)
    algorithm = build(config.method, config.sample.settings())
    optimizer = torch.optim.AdamW([p for p in policy.unet.parameters() if p.requires_grad], lr=1e-3)
    policy.unet, optimizer = accelerator.prepare(policy.unet, optimizer)
    prompts, seeds = ["a cat", "a cat", "a dog", "a dog"], [1, 2, 3, 4]
    rollout, _, _ = collect(config, algorithm, policy, get("brightness"), prompts, seeds)
    targets, _ = compute_targets(algorithm, rollout, accelerator, torch.Generator().manual_seed(0))
    # LoRA B starts at zero, so weight decay cannot move it: only the gradient step can
    before = {n: p.detach().clone() for n, p in policy.unet.named_parameters() if "lora_B" in n}
    assert before and all(v.abs().max() == 0 for v in before.values())
    _, steps = train_epoch(config, algorithm, policy, optimizer, rollout, targets, accelerator, epoch=0)
    after = dict(policy.unet.named_parameters())
    assert steps == 1 and all(after[n].dtype == torch.float32 for n in before)
    moved = [n for n in before if not torch.equal(before[n], after[n])]
    assert len(moved) == len(before), sorted(set(before) - set(moved))[:3]


def test_a_time_budget_stops_after_the_epoch_that_crosses_it(tmp_path):
    run = train(_tiny(tmp_path, "budget", epochs=5, save_freq=5, time_budget_minutes=1e-6)).run_dir
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 1 and json.loads((run / "summary.json").read_text())["epochs"] == 1
    assert (run / "checkpoints/1/trainable.safetensors").is_file() and (run / "samples/after.png").is_file()
    assert "time_budget_minutes must be > 0" in "\n".join(_tiny(tmp_path, "x", time_budget_minutes=0).validate())


def test_step_gradient_norms_are_each_steps_policy_gradient(tmp_path):
    """grad_norm/step_j is the norm of −mean_b A_b ∇ log π(x_{j+1} | x_j) (DDPO's gradient at ratio 1), computed
    here by hand; the weights and gradients are left as they were."""
    from accelerate import Accelerator

    from diffalign.algorithms import build
    from diffalign.rewards import get
    from diffalign.rollout import transition_log_prob, transitions
    from diffalign.train.loop import build_policy, collect, compute_targets, step_gradient_norms

    config = _tiny(tmp_path, "steps", epochs=1, **{"eval.step_grad_norms": True})
    accelerator = Accelerator()
    policy = build_policy(config, accelerator)
    with torch.no_grad():  # LoRA B = 0 gives A no gradient; a random adapter makes every weight count
        for name, p in policy.unet.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(0))
    algorithm = build(config.method, config.sample.settings())
    rollout, _, _ = collect(config, algorithm, policy, get("brightness"), ["a cat"] * 2 + ["a dog"] * 2, [1, 2, 3, 4])
    targets, _ = compute_targets(algorithm, rollout, accelerator, torch.Generator().manual_seed(0))
    weights = {n: p.detach().clone() for n, p in policy.unet.named_parameters() if p.requires_grad}
    norms = step_gradient_norms(config, algorithm, policy, rollout, targets, accelerator)
    assert list(norms) == [f"grad_norm/step_{j:02d}" for j in range(4)]
    params = [p for p in policy.unet.parameters() if p.requires_grad]
    assert all(p.grad is None for p in params)
    assert all(torch.equal(p, weights[n]) for n, p in policy.unet.named_parameters() if p.requires_grad)
    rows = torch.arange(4)
    for j in range(4):
        batch = transitions(rollout, rows, torch.full_like(rows, j), targets)
        log_prob = transition_log_prob(policy, batch, config.sample.settings()).log_prob
        grads = torch.autograd.grad(-(batch.advantages * log_prob).mean(), params)
        by_hand = torch.cat([g.flatten() for g in grads]).norm().item()
        assert by_hand > 0 and norms[f"grad_norm/step_{j:02d}"] == pytest.approx(by_hand, rel=1e-4)


def test_step_gradient_norms_are_logged_and_plotted_when_asked(tmp_path, full_run):
    from diffalign.config import with_algorithm

    run = train(_tiny(tmp_path, "asked", epochs=2, save_freq=2, **{"eval.step_grad_norms": True})).run_dir
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert all(sum(k.startswith("grad_norm/step_") for k in r) == 4 for r in records)
    assert (run / "plots" / "step_grad_norms.png").is_file()
    assert "plots/step_grad_norms.png" in (run / "report.html").read_text()
    # Not asked: not measured. A method that does not train on single steps: a named error before anything runs.
    plain, _ = full_run
    assert not (plain / "plots" / "step_grad_norms.png").exists()
    first_record = json.loads((plain / "metrics.jsonl").read_text().splitlines()[0])
    assert not any(k.startswith("grad_norm/") for k in first_record)
    with pytest.raises(ValueError, match="eval.step_grad_norms: raft does not train on single denoising steps"):
        with_algorithm(_tiny(tmp_path, "raft", **{"eval.step_grad_norms": True}), "raft").check()
