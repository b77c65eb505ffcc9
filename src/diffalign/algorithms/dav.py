"""DAV: diffusion alignment as variational EM (Lee et al. 2026, "Diffusion Alignment as Variational
Expectation-Maximization"; spec/dag_dav_rcgd.md §2).

**E-step** (:meth:`Dav.collect`): a test-time search approximates the posterior over trajectories
q(τ) ∝ p_base(τ) exp(r(x_0)/α). At every step M children are drawn from the proposal's transition (one batched
step), each is valued by the reward of its x̂_0, and one is kept, drawn with importance weights
(:func:`search_log_weights`)

    log w_m = γ^k · r_m / α + log p_base(x_m | x_t) − log q(x_m | x_t)

where k counts the steps left (T at the first, 1 at the last): early steps are sampled almost uniformly, late
ones almost greedily. With ``value_gradient`` the children's mean is shifted by σ_t² γ^k ∇_{x_t} r(x̂_0(x_t)) / α
(the soft-optimal policy's Gaussian mean shift; needs a differentiable reward) and q is that shifted Gaussian.
The proposal is the current model (``hill_climbing``, each EM round tilts the latest model) or the frozen one.
The search is the steering core SVDD also runs on (:mod:`diffalign.steering.search`).

**M-step** (:meth:`Dav.loss`): maximum likelihood of the searched transitions under the policy plus an anchor,

    L = −log π_θ(x_{t-1} | x_t) + train_kl · MSE(o_θ(x_t), o_base(x_t))

on the first ``timestep_fraction`` of each trajectory's steps in order (the high-noise ones), o the guided
denoiser output, ``improve_steps`` passes per epoch.

Where this differs from the reference code, on purpose:

- the kept child is the importance-sampled one; the reference commits to the child with the largest *summed*
  subtree value, which for negative rewards (JPEG compressibility) picks the best unexpanded sibling instead;
- log p_base comes from the frozen reference model (one more pass per step when the proposal is the current
  model); the reference evaluates it with the proposal model, so its correction vanishes without value
  gradients;
- weights are importance weights in every configuration (the reference's ``importance_sampling=False`` crashes);
- the log-densities use the sampler's ``reduction`` (the reference's per-pixel mean shrinks the density
  correction by the number of pixels; ``sample.reduction sum`` gives the exact weights).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from diffalign.algorithms.base import Algorithm, GeneratorFor, MethodConfig, Minibatching, trained_steps
from diffalign.models.policy import Policy
from diffalign.rollout import Rollout, StepSettings, Transitions, denoise_step, guided_output, transitions
from diffalign.steering.base import Meter, Particles
from diffalign.steering.search import search


def search_log_weights(rewards: torch.Tensor, log_p_base: torch.Tensor, log_q: torch.Tensor, remaining_steps: int,
                       gamma: float, alpha: float) -> torch.Tensor:
    """Unnormalised log importance weights ``[..., M]`` of M children: γ^k · r / α + log p_base − log q with
    k = ``remaining_steps`` (NaN rewards count as 0, as in the reference)."""
    return gamma**remaining_steps * torch.nan_to_num(rewards, nan=0.0) / alpha + log_p_base - log_q


@dataclass
class DavConfig(MethodConfig):
    """DAV's settings (defaults: the reference's)."""

    children: int = 4
    """M: children drawn per search step (``duplicate``)."""
    alpha: float = 0.005
    """α: the KL temperature of the tilted target (``search_kl``)."""
    gamma: float = 0.9
    """γ: the discount of the reward weight over the remaining steps."""
    value_gradient: bool = False
    """Shift the children by the reward's gradient through x̂_0 (needs a differentiable reward)."""
    hill_climbing: bool = True
    """Search from the current model (True) or the frozen one."""
    initial_search: bool = False
    """Draw M candidates for x_T and keep one by the weights, instead of one."""
    train_kl: float = 0.01
    """Weight of the MSE between the policy's and the frozen model's guided outputs in the M-step."""
    improve_steps: int = 1
    """Passes over the epoch's searched trajectories."""
    timestep_fraction: float = 1.0
    """Fraction of each trajectory's steps trained on: the first (noisiest) ones, in order."""

    @property
    def needs_differentiable_reward(self) -> bool:
        return self.value_gradient

    def validate(self, settings: StepSettings | None = None) -> list[str]:
        errors = []
        if self.children < 1:
            errors.append(f"method.children must be >= 1, got {self.children}")
        if self.alpha <= 0:
            errors.append(f"method.alpha must be > 0, got {self.alpha}")
        if not 0 < self.gamma <= 1:
            errors.append(f"method.gamma must be in (0, 1], got {self.gamma}")
        if self.train_kl < 0:
            errors.append(f"method.train_kl must be >= 0, got {self.train_kl}")
        if self.improve_steps < 1:
            errors.append(f"method.improve_steps must be >= 1, got {self.improve_steps}")
        if not 0 < self.timestep_fraction <= 1:
            errors.append(f"method.timestep_fraction must be in (0, 1], got {self.timestep_fraction}")
        if settings is not None and settings.eta <= 0:
            errors.append(f"sample.eta must be > 0 for dav (its search draws children from the stochastic "
                          f"transition), got {settings.eta}")
        return errors


class Dav(Algorithm):
    """The searched trajectories as the batch, and the M-step's likelihood + anchor loss on them."""

    name = "dav"
    config_class = DavConfig
    config: DavConfig

    def __init__(self, config: DavConfig, settings: StepSettings, reward=None):
        if reward is None:
            raise ValueError("dav: the search scores children with the reward; build it with one")
        super().__init__(config, settings, reward)

    def collect(self, policy: Policy, prompts: Sequence[str], seeds: Sequence[int]) -> Rollout:
        """The E-step: one searched trajectory per prompt (child 0 of prompt i drawn from ``seeds[i]``'s noise)."""
        c = self.config
        shift = (lambda remaining, std: std**2 * c.gamma**remaining / c.alpha) if c.value_gradient else None
        with nullcontext() if c.hill_climbing else policy.reference():
            found = search(policy, Particles.from_seeds(prompts, c.children, seeds), self.reward, self.settings,
                           Meter(), greedy=False, shift_scale=shift, reference_density=c.hill_climbing,
                           initial_search=c.initial_search,
                           log_weights=lambda r, log_p, log_q, k: search_log_weights(r, log_p, log_q, k, c.gamma,
                                                                                     c.alpha))
        device = found.latents.device
        return Rollout(prompts=list(prompts), conditioning=found.conditioning,
                       seeds=torch.tensor([int(s) for s in seeds], dtype=torch.int64), latents=found.latents,
                       timesteps=found.timesteps.to(device), log_probs=found.log_probs.to(device),
                       images=found.images)

    def targets(self, rewards: torch.Tensor, prompts: Sequence[str], generator: torch.Generator) -> torch.Tensor:
        """The M-step weighs every searched transition alike: ones ``[B]``."""
        return torch.ones_like(rewards)

    def minibatches(self, rollout: Rollout, targets: torch.Tensor, plan: Minibatching,
                    generator_for: GeneratorFor) -> Iterator[list[Transitions]]:
        """Per improve step, rows in order × the first ``timestep_fraction`` of the steps; an optimizer step is
        ``plan.accumulation`` row-minibatches × every trained step."""
        trained = trained_steps(rollout.num_steps, self.config.timestep_fraction)
        n = len(rollout)
        for _ in range(self.config.improve_steps):
            group = []
            for first in range(0, n, plan.batch_size):
                rows = torch.arange(first, min(first + plan.batch_size, n))
                group += [transitions(rollout, rows, torch.full_like(rows, j), targets) for j in range(trained)]
                if len(group) == plan.accumulation * trained:
                    yield group
                    group = []
            if group:
                yield group

    def loss(self, policy: Policy, batch: Transitions) -> tuple[torch.Tensor, dict]:
        output = guided_output(policy, batch.x_t, batch.t, batch.conditioning, self.settings)
        step = denoise_step(policy, batch.x_t, batch.t, batch.conditioning, self.settings, prev_sample=batch.x_prev,
                            model_output=output)
        nll = -step.log_prob.mean()
        loss, metrics = nll, {"dav/nll": nll.detach()}
        if self.config.train_kl > 0:
            with torch.no_grad(), policy.reference():
                reference = guided_output(policy, batch.x_t, batch.t, batch.conditioning, self.settings)
            anchor = F.mse_loss(output.float(), reference.float())
            loss = loss + self.config.train_kl * anchor
            metrics["dav/anchor_mse"] = anchor.detach()
        metrics["policy/loss"] = loss.detach()
        return loss, metrics
