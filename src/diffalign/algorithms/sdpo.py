"""SDPO: stepwise diffusion policy optimisation by dense reward difference learning (Zhang et al. 2024, "Aligning
Few-Step Diffusion Models with Dense Reward Difference Learning", arXiv 2411.11727; spec/ddpo_sdpo.md §3).

- **Paired trajectories** (:meth:`SDPO.collect`): each prompt is sampled twice from the same x_T; the two chains
  differ only through the step noise (η > 0). x̂0 is recorded at every step.
- **Three reward queries** per trajectory (:meth:`SDPO.score`): x̂0 at the first step, at the anchor step
  k = argmin_i s(x̂0_i, x̂0_0) + s(x̂0_i, x̂0_{N−1}) (s: cosine similarity of flattened latents; the prediction
  least like both ends, :func:`anchor_steps`) and at the last step; the final image is x̂0 of the last step.
- **Dense rewards** (:func:`dense_rewards`): r̂_i = (R_f s^f_i + R_a s^a_i + R_l s^l_i) / (s^f_i + s^a_i + s^l_i),
  the three queried values written back exactly at steps 0, k and N−1.
- **Stepwise advantages** (:meth:`SDPO.targets`): returns G_i = r̂_i + γ G_{i+1} (:func:`discounted_returns`),
  normalised per (prompt, step) with the whole batch's step statistics as fallback (``PerPromptStepStatTracker``).
- **Loss** (:func:`reward_difference_loss`), per pair at step position j, with temporal weights
  w = λ^i / log_scale (i the step's index; early, noisy steps weigh more):

      L = (w (Δℓ¹ − Δℓ²) − (clip(A¹) − clip(A²)))²,   Δℓ = log π_θ(x_{t−1}|x_t) − log π_old(x_{t−1}|x_t)

  and, with clip_range ε > 0, the pessimistic mean(max(L, L_clip)), L_clip with each log π_θ clamped to
  log π_old ± ε.
- **Updates** (:meth:`SDPO.minibatches`): per inner epoch the pairs are shuffled and each pair's steps permuted;
  the loop runs step position outer, minibatch inner, so an optimizer step accumulates ``accumulation`` minibatches
  at one position (not × the number of steps, unlike DDPO). Sample counts are prompts, i.e. pairs: a sampling batch
  of b prompts holds 2b trajectories, a training micro-batch of b pairs re-scores 2b transitions.
- **Metrics**: ``policy/loss``, ``policy/approx_kl`` (k3, both trajectories), ``sdpo/clipfrac`` (pairs whose clamped
  regression is the larger), ``sdpo/adv_clipfrac``; the loop logs ``reward/*`` of the final images (R_l) and
  ``reward/first_step_mean`` (R_f: the reward of the one-step prediction, the reference's ``{reward}_1s``).

Differences from ZiyiZhang27/sdpo (``scripts/train_sdpo.py``), on purpose:
- log-probs are recomputed in fp32, both trajectories in one denoiser pass (the reference: two passes in the
  inference dtype), so the ratio is exactly 1 before the first update;
- the first trajectory is the plain sample of its seed; the second draws its step noise from a named stream of the
  same seed (:func:`second_seed`), so either can be regenerated alone;
- an anchor that falls on an end step (always when N ≤ 2) reuses that end's reward, and with N = 1 the first and
  last image (the same x̂0) are scored once: the reference scores the same image again;
- ``sdpo/adv_clipfrac`` counts advantages clipped at either bound (the reference counts only the lower one);
- the tracker keys prompts by their string (not a token round trip) and is checkpointed as JSON; a resume needs no
  replay of earlier epochs' sampling (every draw comes from named streams);
- ``cfg`` re-scores with guidance exactly as sampled (the reference's ``train.cfg=False`` equals this at its
  guidance 1; at guidance > 1 it would make the ratio ≠ 1).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from diffalign.algorithms.advantages import AdvantageConfig, RewardNormaliser
from diffalign.algorithms.base import Algorithm, GeneratorFor, MethodConfig, Minibatching, trained_steps
from diffalign.models.policy import Policy
from diffalign.rollout import (Rollout, StepSettings, Transitions, derive_seed, initial_noise, sample,
                               transition_log_prob, transitions)

if TYPE_CHECKING:
    from diffalign.rewards import Reward, RewardOutput

#: The stream of a sample seed that seeds its pair's second trajectory (0 and 1 are its x_T and step noise).
SECOND_TRAJECTORY_STREAM = 2


@dataclass
class SDPOConfig(MethodConfig):
    """SDPO's settings (defaults from the reference's ``config/base_sdpo.py``)."""

    gamma: float = 0.99
    """γ: discount of the dense rewards over the steps (returns G_i = r̂_i + γ G_{i+1}; 0: the rewards alone)."""
    lam: float = 0.99
    """λ: temporal importance weight λ^i of step i (0: the first) in the loss; 1 weighs every step alike."""
    log_scale: float = 1.0
    """Divides the temporal weights (the regression's log-ratio scale, REBEL's η)."""
    clip_range: float = 1e-4
    """ε: clamp each log π_θ to log π_old ± ε in the pessimistic term (0: the plain regression)."""
    adv_clip_max: float = 5.0
    """Advantages are clipped to [−adv_clip_max, adv_clip_max]."""
    num_inner_epochs: int = 1
    """Passes over each epoch's pairs."""
    timestep_fraction: float = 1.0
    """Fraction of the step positions trained per inner epoch, in (0, 1]."""
    shuffle_steps: bool = True
    """Permute each pair's steps, so a step position mixes timesteps (False: position j is step j for all)."""
    cfg: bool = True
    """Use classifier-free guidance when re-scoring transitions (as when sampling; the few-step presets sample
    without guidance)."""
    advantages: AdvantageConfig = field(default_factory=lambda: AdvantageConfig(buffer_size=32, min_count=16))
    """Normalisation of the returns: per (prompt, step) with a tracker (``per_prompt``), both trajectories of a
    pair in the same buffer; below ``min_count`` values, the whole batch's statistics at that step."""

    def validate(self, settings: StepSettings | None = None) -> list[str]:
        errors = [f"method.{name} must be {rule}, got {value}" for name, value, ok, rule in [
            ("gamma", self.gamma, 0 <= self.gamma <= 1, "in [0, 1]"),
            ("lam", self.lam, 0 < self.lam <= 1, "in (0, 1]"),
            ("log_scale", self.log_scale, self.log_scale > 0, "> 0"),
            ("clip_range", self.clip_range, self.clip_range >= 0, ">= 0"),
            ("adv_clip_max", self.adv_clip_max, self.adv_clip_max > 0, "> 0"),
            ("num_inner_epochs", self.num_inner_epochs, self.num_inner_epochs >= 1, ">= 1"),
            ("timestep_fraction", self.timestep_fraction, 0 < self.timestep_fraction <= 1, "in (0, 1]"),
        ] if not ok]
        if settings is not None and settings.eta <= 0:
            errors.append(f"sample.eta must be > 0 for sdpo (a pair diverges through the step noise, and its "
                          f"log-probs need a stochastic sampler), got {settings.eta}")
        return errors + self.advantages.validate("method.advantages")


def _cosine(flat: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """s(x̂0_i, reference) ``[B, N]`` of flattened predictions ``[B, N, D]`` and one latent per row ``[B, D]``."""
    return F.cosine_similarity(flat, reference[:, None], dim=2)


def anchor_steps(x0_preds: torch.Tensor) -> torch.Tensor:
    """The anchor step ``[B]`` of each chain of predictions ``[B, N, C, h, w]``: argmin_i s(x̂0_i, x̂0_0) +
    s(x̂0_i, x̂0_{N−1}) (the first index on ties)."""
    flat = x0_preds.flatten(2).float()
    return (_cosine(flat, flat[:, 0]) + _cosine(flat, flat[:, -1])).argmin(dim=1)


def dense_rewards(x0_preds: torch.Tensor, r_first: torch.Tensor, r_anchor: torch.Tensor, r_last: torch.Tensor,
                  anchor: torch.Tensor) -> torch.Tensor:
    """Per-step rewards ``[B, N]``: the similarity-weighted mean of the three queried rewards ``[B]``
    (R_f s^f_i + R_a s^a_i + R_l s^l_i) / (s^f_i + s^a_i + s^l_i), with R_f, R_a, R_l written back at steps 0,
    ``anchor`` ``[B]`` and N−1 (the anchor's last, as the reference)."""
    flat = x0_preds.flatten(2).float()
    rows = torch.arange(len(flat), device=flat.device)
    s_first, s_last = _cosine(flat, flat[:, 0]), _cosine(flat, flat[:, -1])
    s_anchor = _cosine(flat, flat[rows, anchor])
    r_first, r_anchor, r_last = (r.float().to(flat.device) for r in (r_first, r_anchor, r_last))
    dense = (r_first[:, None] * s_first + r_anchor[:, None] * s_anchor + r_last[:, None] * s_last) / (
        s_first + s_anchor + s_last)
    dense[:, 0], dense[:, -1] = r_first, r_last
    dense[rows, anchor] = r_anchor
    return dense


def discounted_returns(rewards: torch.Tensor, gamma: float) -> torch.Tensor:
    """G ``[B, N]`` of per-step rewards ``[B, N]``: G_i = r_i + γ G_{i+1}, G_N = 0 (step 0 the first, noisiest)."""
    returns = rewards.float().clone()
    for i in reversed(range(returns.shape[1] - 1)):
        returns[:, i] += gamma * returns[:, i + 1]
    return returns


def temporal_weights(num_steps: int, lam: float, log_scale: float = 1.0) -> torch.Tensor:
    """w_i = λ^i / log_scale ``[N]`` for step indices i = 0 … N−1."""
    return torch.full((num_steps,), lam).pow(torch.arange(num_steps)) / log_scale


def pair_regressions(log_prob_1, log_prob_old_1, adv_1, log_prob_2, log_prob_old_2, adv_2, weights, clip_range,
                     adv_clip_max) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(L, L_clip) ``[b]`` of b pairs: L = (w Δℓ − ΔA)² with Δℓ the difference of the two log-ratios and ΔA of the
    clipped advantages; L_clip the same with each log π_θ clamped to log π_old ± ``clip_range`` (None at 0)."""
    target = adv_1.clamp(-adv_clip_max, adv_clip_max) - adv_2.clamp(-adv_clip_max, adv_clip_max)

    def regression(new_1: torch.Tensor, new_2: torch.Tensor) -> torch.Tensor:
        return (weights * ((new_1 - log_prob_old_1) - (new_2 - log_prob_old_2)) - target).square()

    unclipped = regression(log_prob_1, log_prob_2)
    if clip_range <= 0:
        return unclipped, None
    clamped = [torch.clamp(new, old - clip_range, old + clip_range)
               for new, old in ((log_prob_1, log_prob_old_1), (log_prob_2, log_prob_old_2))]
    return unclipped, regression(*clamped)


def reward_difference_loss(log_prob_1, log_prob_old_1, adv_1, log_prob_2, log_prob_old_2, adv_2, weights,
                           clip_range, adv_clip_max) -> torch.Tensor:
    """The scalar loss of b pairs ``[b]`` each: mean(L), or the pessimistic mean(max(L, L_clip)) when
    ``clip_range`` > 0 (:func:`pair_regressions`)."""
    unclipped, clipped = pair_regressions(log_prob_1, log_prob_old_1, adv_1, log_prob_2, log_prob_old_2, adv_2,
                                          weights, clip_range, adv_clip_max)
    return (unclipped if clipped is None else torch.maximum(unclipped, clipped)).mean()


def second_seed(seed: int) -> int:
    """The seed of a pair's second trajectory (its step noise; the pair's x_T comes from ``seed``)."""
    return derive_seed(int(seed), 0, 0, SECOND_TRAJECTORY_STREAM)


@dataclass(frozen=True)
class PairBatch:
    """b pairs at one step position: ``transitions`` of 2b rows (pair k: rows 2k, 2k+1, at the same step, each
    with its own per-step advantage) and the temporal weights ``weights`` ``[b]`` of their steps."""

    transitions: Transitions
    weights: torch.Tensor


class SDPO(Algorithm):
    """Paired collection, three reward queries and dense rewards, per-(prompt, step) advantages, the reward
    difference loss on step-outer minibatches."""

    name = "sdpo"
    config_class = SDPOConfig
    config: SDPOConfig

    def __init__(self, config: SDPOConfig, settings: StepSettings, reward=None):
        super().__init__(config, settings, reward)
        self.normaliser = RewardNormaliser(config.advantages, per_step=True)

    def collect(self, policy: Policy, prompts: Sequence[str], seeds: Sequence[int]) -> Rollout:
        """Two trajectories per prompt (rows 2i and 2i+1) from seed i's x_T, with x̂0 recorded; the images are
        x̂0 of the last step (as the reference scores)."""
        seeds = [int(s) for s in seeds]
        x_T = initial_noise([s for s in seeds for _ in range(2)], policy.latent_shape, policy.device)
        rollout = sample(policy, [p for p in prompts for _ in range(2)],
                         [s for seed in seeds for s in (seed, second_seed(seed))], self.settings, x_T=x_T,
                         record_x0_preds=True)
        with torch.no_grad():
            return dataclasses.replace(rollout, images=policy.decode(rollout.x0_preds[:, -1]))

    def score(self, policy: Policy, reward: Reward, rollout: Rollout) -> RewardOutput:
        """Dense rewards ``[B, N]`` from the rewards of x̂0 at the first, anchor and last steps (the final
        image's output keeps its components and strict flag)."""
        x0, prompts, n = rollout.x0_preds, rollout.prompts, rollout.num_steps
        final = reward.output(rollout.images, prompts)
        r_last = final.scores.to(x0.device)
        r_first = r_last if n == 1 else reward(policy.decode(x0[:, 0]), prompts).to(x0.device)
        anchor = anchor_steps(x0)
        r_anchor = torch.where(anchor == 0, r_first, r_last)  # an anchor at an end step: that end's reward
        inner = ((anchor > 0) & (anchor < n - 1)).nonzero().flatten()
        if len(inner):
            r_anchor[inner] = reward(policy.decode(x0[inner, anchor[inner]]),
                                     [prompts[i] for i in inner.tolist()]).to(x0.device)
        return dataclasses.replace(final, scores=dense_rewards(x0, r_first, r_anchor, r_last, anchor))

    def targets(self, rewards: torch.Tensor, prompts: Sequence[str], generator: torch.Generator) -> torch.Tensor:
        """Advantages ``[B, N]``: the discounted returns of the dense rewards, normalised per (prompt, step)."""
        if rewards.ndim != 2:
            raise ValueError(f"sdpo: expected per-step rewards [B, N] (from SDPO.score), got {tuple(rewards.shape)}")
        return self.normaliser(discounted_returns(rewards, self.config.gamma), prompts, generator)

    def minibatches(self, rollout: Rollout, targets: torch.Tensor, plan: Minibatching,
                    generator_for: GeneratorFor) -> Iterator[list[PairBatch]]:
        """Per inner epoch: pairs shuffled, each pair's steps permuted; step position outer, minibatches of
        ``plan.batch_size`` pairs inner, ``plan.accumulation`` minibatches per optimizer step."""
        c = self.config
        assert len(rollout) % 2 == 0, "an sdpo rollout holds pairs"
        pairs, num_steps = len(rollout) // 2, rollout.num_steps
        weights = temporal_weights(num_steps, c.lam, c.log_scale).to(targets.device)
        for inner in range(c.num_inner_epochs):
            generator = generator_for(inner)
            order = torch.randperm(pairs, generator=generator)
            step_order = torch.stack([torch.randperm(num_steps, generator=generator) if c.shuffle_steps
                                      else torch.arange(num_steps) for _ in range(pairs)])
            for j in range(trained_steps(num_steps, c.timestep_fraction)):
                group = []
                for first in range(0, pairs, plan.batch_size):
                    chosen = order[first : first + plan.batch_size]
                    steps = step_order[chosen, j]
                    rows = torch.stack([2 * chosen, 2 * chosen + 1], dim=1).flatten()
                    group.append(PairBatch(transitions(rollout, rows, steps.repeat_interleave(2), targets),
                                           weights[steps]))
                    if len(group) == plan.accumulation:
                        yield group
                        group = []
                if group:
                    yield group

    def loss(self, policy: Policy, batch: PairBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The reward difference loss of the micro-batch's pairs, both trajectories re-scored in one pass."""
        c, moves = self.config, batch.transitions
        log_prob = transition_log_prob(policy, moves, self.settings, c.cfg).log_prob
        terms = (log_prob[0::2], moves.log_prob_old[0::2], moves.advantages[0::2], log_prob[1::2],
                 moves.log_prob_old[1::2], moves.advantages[1::2], batch.weights, c.clip_range, c.adv_clip_max)
        loss = reward_difference_loss(*terms)
        with torch.no_grad():
            unclipped, clipped = pair_regressions(*terms)
            log_ratio = log_prob - moves.log_prob_old
            metrics = {
                "policy/loss": loss.detach(),
                "policy/approx_kl": ((log_ratio.exp() - 1) - log_ratio).mean(),
                "policy/ratio_max_dev": (log_ratio.exp() - 1).abs().max(),
                "sdpo/clipfrac": torch.zeros(()) if clipped is None else (clipped > unclipped).float().mean(),
                "sdpo/adv_clipfrac": (moves.advantages.abs() > c.adv_clip_max).float().mean(),
            }
        return loss, metrics

    def state_dict(self) -> dict:
        return self.normaliser.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.normaliser.load_state_dict(state)
