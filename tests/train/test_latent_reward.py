"""The latent reward model trainer and the RCGD commands, end to end on the tiny pipeline."""

import json

import pytest
import torch
from safetensors.torch import load_file

from diffalign.cli import main
from diffalign.train.latent_reward import LatentRewardTrainingConfig, train_latent_reward

SMALL = dict(model="tiny", labels="brightness", label_noise=0.05, num_images=24, sample_steps=2, epochs=3,
             batch_size=8, channels=(8, 16))


def test_training_reports_heldout_mse_and_resumes_bit_identically(tmp_path):
    straight = train_latent_reward(LatentRewardTrainingConfig(out=str(tmp_path / "a"), **SMALL))
    metrics = json.loads((straight / "metrics.json").read_text())
    assert [row["epoch"] for row in metrics["history"]] == [1, 2, 3]
    assert metrics["train_images"] == 21 and metrics["heldout_images"] == 3
    final = metrics["final"]
    assert final["mse"] >= 0 and final["label_variance"] > 0 and len(final["mse_by_noise"]) >= 1

    interrupted = tmp_path / "b"
    train_latent_reward(LatentRewardTrainingConfig(out=str(interrupted), **(SMALL | {"epochs": 1})))
    resumed = train_latent_reward(LatentRewardTrainingConfig(out=str(interrupted), **SMALL))
    a, b = load_file(straight / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((resumed / "metrics.json").read_text())["history"] == metrics["history"]


def test_labels_are_the_reward_plus_seeded_noise(tmp_path):
    out = train_latent_reward(LatentRewardTrainingConfig(out=str(tmp_path / "rm"), **(SMALL | {"epochs": 1})))
    data = torch.load(out / "data.pt", weights_only=False)
    noise = data["labels"] - data["clean_labels"]
    assert data["latents"].shape == (24, 4, 16, 16) and len(data["prompts"]) == 24
    assert 0.01 < noise.std().item() < 0.1  # std 0.05 from 24 draws
    config = json.loads((out / "config.json").read_text())
    train_labels = data["labels"]
    assert train_labels.min().item() <= config["label_min"] < config["label_max"] <= train_labels.max().item()
    with pytest.raises(ValueError, match="other data settings"):
        train_latent_reward(LatentRewardTrainingConfig(out=str(out), **(SMALL | {"label_noise": 0.2})))


def test_the_time_agnostic_variant_trains_and_ignores_t(tmp_path):
    from diffalign.models.latent_reward import LatentRewardModel

    out = train_latent_reward(LatentRewardTrainingConfig(out=str(tmp_path / "agnostic"), time_conditioning=False,
                                                         **(SMALL | {"epochs": 1})))
    model = LatentRewardModel.load(out)
    assert model.config.time_conditioning is False
    z = torch.randn(2, 4, 16, 16)
    torch.testing.assert_close(model(z, torch.tensor([0, 0])), model(z, torch.tensor([999, 999])))


def test_cli_train_then_guided_sample_and_tracking(tmp_path, capsys):
    rm = tmp_path / "rm"
    main(["reward-model", "train", "--model", "tiny", "--out", str(rm), "--labels", "brightness", "--num-images",
          "16", "--sample-steps", "2", "--epochs", "1", "--batch-size", "8", "--channels", "8", "16"])
    assert "held-out MSE" in capsys.readouterr().out
    low, high = json.loads((rm / "config.json").read_text())["label_min"], \
        json.loads((rm / "config.json").read_text())["label_max"]
    target = (low + high) / 2
    out = tmp_path / "guided"
    main(["sample", "--model", "tiny", "--prompts", "a cat", "a dog", "--num-inference-steps", "3",
          "--guide", "rcgd", "--reward-model", str(rm), "--target", str(target), "--guidance", "10",
          "--reward", "brightness", "--out", str(out)])
    record = json.loads((out / "sample.json").read_text())
    assert len(record["predicted_rewards"]) == 2 and len(record["rewards"]) == 2
    assert record["guidance"]["target"] == target and record["reward_model"] == str(rm)
    assert (out / "0000.png").is_file() and (out / "grid.png").is_file()

    track = tmp_path / "track"
    main(["reward-model", "track", "--reward-model", str(rm), "--out", str(track), "--targets", str(low), str(high),
          "--guidances", "0", "10", "--num-prompts", "2", "--steps", "2"])
    rows = json.loads((track / "tracking.json").read_text())["rows"]
    assert [(r["guidance"], r["target"]) for r in rows] == [(0, low), (0, high), (10, low), (10, high)]
    assert rows[0]["reward_mean"] == rows[1]["reward_mean"]  # G = 0 ignores the target
    assert (track / "tracking.png").stat().st_size > 0
    assert (track / "grid_guidance_0.png").is_file() and (track / "grid_guidance_10.png").is_file()


def test_cli_bad_rcgd_input_names_the_input(tmp_path):
    rm = tmp_path / "rm"
    main(["reward-model", "train", "--model", "tiny", "--out", str(rm), "--labels", "brightness", "--num-images",
          "16", "--sample-steps", "2", "--epochs", "1", "--batch-size", "8", "--channels", "8"])
    base = ["sample", "--model", "tiny", "--prompt", "a cat", "--num-inference-steps", "2", "--out",
            str(tmp_path / "x"), "--guide", "rcgd"]
    with pytest.raises(SystemExit, match="target 5 is outside the reward model's label range"):
        main(base + ["--reward-model", str(rm), "--target", "5"])
    with pytest.raises(SystemExit, match="--reward-model: reward model folder '.*nowhere' does not exist"):
        main(base + ["--reward-model", str(tmp_path / "nowhere")])
    with pytest.raises(SystemExit, match="--guide rcgd needs --reward-model"):
        main(base)
    with pytest.raises(SystemExit, match=r"--reward-model .*rm: reward model was trained on latents \(4, 16, 16\)"):
        main(["sample", "--model", "shapes", "--prompt", "a red circle", "--num-inference-steps", "2", "--out",
              str(tmp_path / "y"), "--guide", "rcgd", "--reward-model", str(rm), "--target", "0.5",
              "--allow-extrapolation"])
    main(base + ["--reward-model", str(rm), "--target", "5", "--allow-extrapolation"])


def test_renders_and_folder_sources(tmp_path):
    from PIL import Image

    from diffalign.world.captions import scene_for_caption
    from diffalign.world.render import render_batch

    tiny = SMALL | {"num_images": 8, "epochs": 1}
    out = train_latent_reward(LatentRewardTrainingConfig(out=str(tmp_path / "renders"), source="renders",
                                                         prompts="shapes", **tiny))
    data = torch.load(out / "data.pt", weights_only=False)
    # the renders are the captions' own scenes, labelled by their brightness
    images = render_batch([scene_for_caption(p, 0) for p in data["prompts"][:1]])
    assert data["latents"].shape == (8, 4, 16, 16) and images.shape == (1, 3, 32, 32)

    folder = tmp_path / "images"
    folder.mkdir()
    for i, value in enumerate((0, 80, 160, 240)):
        Image.new("RGB", (40, 40), (value, value, value)).save(folder / f"{i}.png")
    (folder / "prompts.txt").write_text("a\nb\nc\n")
    with pytest.raises(ValueError, match="has 3 lines for 4 images"):
        train_latent_reward(LatentRewardTrainingConfig(out=str(tmp_path / "f1"), source=str(folder), **tiny))
    (folder / "prompts.txt").write_text("a\nb\nc\nd\n")
    out = train_latent_reward(LatentRewardTrainingConfig(out=str(tmp_path / "f2"), source=str(folder),
                                                         **(tiny | {"label_noise": 0.0})))
    data = torch.load(out / "data.pt", weights_only=False)
    # uniform grey images resized to 32×32: brightness = value / 255 exactly
    torch.testing.assert_close(data["clean_labels"], torch.tensor([0, 80, 160, 240]) / 255)
    assert data["prompts"] == ["a", "b", "c", "d"]
