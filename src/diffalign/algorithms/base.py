"""The method protocol: what a training method declares, and what the online loop does with it.

A method is a config dataclass (its knobs, with ``validate``) and an :class:`Algorithm` subclass saying

- how it **collects** a batch (:meth:`Algorithm.collect`; default: plain rollouts from :func:`~diffalign.rollout.sample`)
  and how it **scores** it (:meth:`Algorithm.score`; default: the reward of the final images, ``[B]``; a method that
  queries the reward along the chain returns per-step rewards ``[B, T]``),
- how gathered rewards become **targets** (:meth:`Algorithm.targets`: advantages ``[B]`` or per-step ``[B, T]``),
- how a batch splits into **minibatches** (:meth:`Algorithm.minibatches`: optimizer steps, each a list of
  micro-batches whose gradients are accumulated),
- its **loss** on one micro-batch (:meth:`Algorithm.loss`),
- optionally, an optimizer step it takes itself (:meth:`Algorithm.update`, e.g. a trust-region line search),
- its extra **trainable modules** (value or flow networks, each with its own learning rate; built in
  :meth:`Algorithm.attach` when the model sizes them) and its **state** for checkpoints (trackers, coefficients).

Every method receives the reward at construction (a search scores with it); one whose config backpropagates
through it (``MethodConfig.needs_differentiable_reward``) given a non-differentiable reward is an error before
anything runs.

The loop (``diffalign.train.loop``) owns accelerate, gathering across processes, gradient accumulation, clipping,
checkpoints, logging and evaluation, and never names a method. A method never imports accelerate.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import nn

from diffalign.models.policy import Policy
from diffalign.rollout import Rollout, StepSettings, Transitions, sample, transitions

if TYPE_CHECKING:  # annotations only: importing the reward zoo is not needed to declare a method
    from diffalign.rewards import Reward, RewardOutput

#: ``generator_for(k)`` gives the k-th independent shuffle generator of this epoch on this process.
GeneratorFor = Callable[[int], torch.Generator]


@dataclass
class MethodConfig:
    """Base of every method's config: ``validate`` sees the sampler settings the method will run with."""

    def validate(self, settings: StepSettings) -> list[str]:
        """Every problem with these settings for this method, each naming the field, the value and the rule."""
        return []

    @property
    def needs_differentiable_reward(self) -> bool:
        """Whether the method, with these settings, backpropagates through the reward."""
        return False


@dataclass
class ExtraModule:
    """A trainable network a method adds beside the policy (a value or flow network) with its learning rate."""

    module: nn.Module
    learning_rate: float


@dataclass(frozen=True)
class Minibatching:
    """How the loop asks a method to split its batch: ``batch_size`` samples per micro-batch (per device) and
    ``accumulation`` micro-batches of samples per optimizer step."""

    batch_size: int
    accumulation: int


class Algorithm:
    """Base class of the methods; subclasses set ``name`` and ``config_class`` and implement :meth:`loss`."""

    name: ClassVar[str]
    config_class: ClassVar[type[MethodConfig]]
    #: Whether :meth:`loss` takes :class:`~diffalign.rollout.Transitions` (any denoising steps) whose advantages are
    #: :meth:`targets` and has no side effect, so the loop may measure the gradient of one step
    #: (``eval.step_grad_norms``).
    trains_on_transitions: ClassVar[bool] = False

    def __init__(self, config: MethodConfig, settings: StepSettings, reward=None):
        if config.needs_differentiable_reward and (reward is None or not reward.differentiable):
            name = "no reward" if reward is None else f"reward {reward.name!r}, which is not differentiable"
            raise ValueError(f"{self.name} backpropagates through the reward, but was given {name}; choose a "
                             "differentiable one (e.g. shapes_learned, aesthetic, pickscore, clipscore, brightness)")
        self.config = config
        self.settings = settings
        self.reward = reward
        self.modules: dict[str, ExtraModule] = {}

    def attach(self, policy: Policy) -> None:
        """Called once with the policy before training (before the optimizer and any checkpoint): methods whose
        extra modules are sized by the model (its latents, its text embeddings) add them to ``modules`` here."""

    def collect(self, policy: Policy, prompts: Sequence[str], seeds: Sequence[int]) -> Rollout:
        """One sampling batch of trajectories (no rewards yet). Default: plain rollouts."""
        return sample(policy, prompts, seeds, self.settings)

    def score(self, policy: Policy, reward: Reward, rollout: Rollout) -> RewardOutput:
        """Scores one collected batch, without gradients (the loop may call it in a worker thread while the next
        batch samples). Default: the reward of the rollout's images, ``scores`` ``[B]``. A method that queries the
        reward along the chain returns per-step ``scores`` ``[B, T]`` whose last column is the final image's (the
        loop logs that column as ``reward/*``); ``components`` and ``strict`` stay the final image's ``[B]``."""
        return reward.output(rollout.images, rollout.prompts)

    def targets(self, rewards: torch.Tensor, prompts: Sequence[str], generator: torch.Generator) -> torch.Tensor:
        """Training targets ``[B]`` or ``[B, T]`` from the rewards (as :meth:`score` made them, ``[B]`` or
        ``[B, T]``) gathered over every process (the same on every process; ``generator`` is this epoch's, for
        methods whose targets are random)."""
        raise NotImplementedError

    def minibatches(self, rollout: Rollout, targets: torch.Tensor, plan: Minibatching,
                    generator_for: GeneratorFor) -> Iterator[list]:
        """This process's optimizer steps over its part of the batch, each a list of micro-batches."""
        raise NotImplementedError

    def loss(self, policy: Policy, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor | float]]:
        """The scalar loss of one micro-batch (to be averaged over the step's micro-batches) and its metrics."""
        raise NotImplementedError

    def update(self, policy: Policy, params: list[nn.Parameter], group: list,
               mean_over_processes: Callable[[torch.Tensor], torch.Tensor]) -> dict[str, float] | None:
        """Optional: the method takes this optimizer step itself — sets ``params`` (the trainable weights the loop
        would clip and step) from the micro-batches ``group`` — and returns its metrics; the loop then skips
        backward, clipping and ``optimizer.step`` for it. For methods whose step is not a gradient step (TRPO's
        line search). ``mean_over_processes`` averages a tensor over the processes, so that every process takes
        the same step; the loop calls this with gradient synchronisation off and under its autocast.
        Default: None, the loop's gradient step on :meth:`loss`."""
        return None

    def after_optimizer_step(self) -> dict[str, float]:
        """Called after every optimizer step (adaptive coefficients); returns metrics to log."""
        return {}

    def state_dict(self) -> dict:
        """JSON-serialisable state besides module weights (trackers, coefficients) for an exact resume."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        if state:
            raise ValueError(f"{self.name}: unexpected checkpoint state {sorted(state)}")


def trained_steps(num_steps: int, timestep_fraction: float) -> int:
    """Steps trained per trajectory: int(num_steps × timestep_fraction), at least 1."""
    return max(1, int(num_steps * timestep_fraction))


def shuffled_transitions(rollout: Rollout, targets: torch.Tensor, plan: Minibatching, generator_for: GeneratorFor,
                         num_inner_epochs: int, timestep_fraction: float,
                         min_timestep: int = 0) -> Iterator[list[Transitions]]:
    """DDPO's minibatches: per inner epoch, shuffled rows × a random ``timestep_fraction`` of each row's steps
    (of those with t ≥ ``min_timestep``); an optimizer step is ``plan.accumulation`` row-minibatches × every
    trained step."""
    n = len(rollout)
    eligible = (rollout.timesteps[0] >= min_timestep).nonzero().flatten()
    if len(eligible) == 0:
        raise ValueError(f"no denoising step has t >= min_timestep = {min_timestep} "
                         f"(timesteps {rollout.timesteps[0].tolist()})")
    trained = trained_steps(len(eligible), timestep_fraction)
    for inner in range(num_inner_epochs):
        generator = generator_for(inner)
        order = torch.randperm(n, generator=generator)
        step_order = torch.stack([eligible[torch.randperm(len(eligible), generator=generator)]
                                  for _ in range(n)])[:, :trained]
        group = []
        for first in range(0, n, plan.batch_size):
            rows = order[first : first + plan.batch_size]
            group += [transitions(rollout, rows, step_order[rows, j], targets) for j in range(trained)]
            if len(group) == plan.accumulation * trained:
                yield group
                group = []
        if group:
            yield group
