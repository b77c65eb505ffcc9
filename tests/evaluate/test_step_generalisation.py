"""`diffalign eval --steps`: the same prompts and seeds at several step counts, for run folders and base models."""

import json

import pytest

from diffalign.cli import main
from diffalign.config import PRESETS, config_from_dict, preset, replace
from diffalign.evaluate.evaluation import evaluate_policy
from diffalign.evaluate.step_generalisation import markdown_table, parse_steps
from diffalign.models import load_policy
from diffalign.train.loop import evaluation_sets, train


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_a_saved_config_reads_back_equal(name):
    config = PRESETS[name]
    assert config_from_dict(json.loads(json.dumps(config.to_dict()))) == config


def test_config_from_dict_names_what_is_wrong():
    data = preset("ddpo-tiny").to_dict()
    with pytest.raises(ValueError, match="algorithm 'nope' is not registered"):
        config_from_dict(data | {"algorithm": "nope"})
    with pytest.raises(ValueError, match="SampleConfig has no field"):
        config_from_dict(data | {"sample": data["sample"] | {"bogus": 1}})


def test_parse_steps():
    assert parse_steps("4,1,2,2") == [1, 2, 4]
    for bad in ("", "0,1", "a,b"):
        with pytest.raises(ValueError, match="steps must be"):
            parse_steps(bad)


def test_markdown_table():
    table = markdown_table({"base": [{"steps": 1, "x": 0.25}, {"steps": 2, "x": 0.5}], "run": [{"steps": 2, "x": 1.0}]},
                           "x")
    assert table.splitlines() == ["| x | 1 steps | 2 steps |", "|---|---|---|", "| base | 0.250 | 0.500 |",
                                  "| run | — | 1.000 |"]


def test_eval_of_a_run_and_a_base_model(tmp_path):
    config = replace(preset("ddpo-tiny"), run_dir=str(tmp_path / "run"), epochs=1, save_freq=1, log_with="none",
                     **{"sample.num_inference_steps": 2, "sample.batch_size_per_device": 2,
                        "sample.num_batches_per_epoch": 1, "train.batch_size_per_device": 2,
                        "train.gradient_accumulation_steps": 1, "method.advantages.min_count": 2,
                        "reward.name": "brightness", "eval.samples": 3, "eval.freq": 0})
    run = train(config).run_dir
    main(["eval", "--run-dir", str(run), "--model", "tiny", "--steps", "1,3", "--samples", "3",
          "--out", str(tmp_path / "eval")])
    record = json.loads((tmp_path / "eval" / "step_generalisation.json").read_text())
    assert record["steps"] == [1, 3] and set(record["results"]) == {"run", "tiny (base)"}
    base_rows = record["results"]["tiny (base)"]
    assert [row["steps"] for row in base_rows] == [1, 3]
    # the base model's row at N steps is evaluate_policy at N steps on the run's own evaluation sets
    from diffalign import prompts

    saved = config_from_dict(json.loads((run / "config.json").read_text()))
    policy, judge = load_policy("tiny"), saved.reward.build("cpu")[0]
    sets = evaluation_sets(replace(saved, **{"eval.samples": 3}), prompts.get(saved.prompts))
    direct = evaluate_policy(policy, sets, replace(saved.sample, num_inference_steps=3).settings(), {"reward": judge},
                             batch_size=2)
    assert base_rows[1]["train_reward_mean"] == pytest.approx(direct.metrics["train_reward_mean"], abs=1e-6)
    assert (tmp_path / "eval" / "step_generalisation.png").stat().st_size > 0
    main(["eval", "--run-dir", str(run), "--steps", "2", "--samples", "2"])  # one run: written into the run
    assert (run / "step_generalisation.json").is_file()
    with pytest.raises(SystemExit, match="has no config.json"):
        main(["eval", "--run-dir", str(tmp_path), "--steps", "2"])
