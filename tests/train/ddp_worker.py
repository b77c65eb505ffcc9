"""Run by tests/train/test_distributed.py under `accelerate launch --cpu --num_processes 2`.

Trains the tiny model for two epochs and writes each rank's trained weights and stat-tracker buffers.
"""

import json
import sys
from pathlib import Path

import torch
from accelerate import PartialState
from safetensors.torch import save_file

from diffalign.config import preset, replace
from diffalign.train.checkpoint import trainable_state
from diffalign.train.loop import epoch_prompts_and_seeds, train

out = Path(sys.argv[1])
torch.set_num_threads(1)
config = replace(preset("ddpo-tiny"), run_dir=str(out / "run"), epochs=2, log_with="none",
                 **{"sample.num_inference_steps": 3, "sample.batch_size_per_device": 2,
                    "sample.num_batches_per_epoch": 1, "train.batch_size_per_device": 1,
                    "train.gradient_accumulation_steps": 2, "train.learning_rate": 1e-2, "method.advantages.min_count": 1,
                    "reward.name": "brightness"})
result = train(config)
rank = PartialState().process_index
save_file(trainable_state(result.policy.base_unet), out / f"rank{rank}.safetensors")


class _Acc:  # the two things epoch_prompts_and_seeds reads
    num_processes, process_index = PartialState().num_processes, rank


prompts = [epoch_prompts_and_seeds(config, __import__("diffalign.prompts").prompts.get(config.prompts), e, _Acc)[0]
           for e in range(2)]
(out / f"rank{rank}.json").write_text(json.dumps({"buffers": result.algorithm.normaliser.tracker.state_dict()["buffers"],
                                                  "prompts": prompts}))
