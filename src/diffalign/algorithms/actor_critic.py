"""A KL-regularised actor-critic over the denoising chain: PPO-clip on per-step advantages from a learned,
time-conditioned value network, plus α·KL to the base model (spec/ddpo_sdpo.md §2.5 [design]).

The MDP is DDPO's: the state at step j is s_j = (x_t, t, c), the action is x_{t−1}, and the chain ends with the
reward R(x_0, c) (normalised per prompt as the other methods do). Each step also pays α times the exact KL of the
sampling policy's step to the base model's, KL_j = Σ_pixels (μ_old − μ_base)² / 2σ_t², so with γ = 1

    r_j = −α·KL_j (+ R at the last step),   G_j = R − α Σ_{k≥j} KL_k,   i.e. E[G_0] = E[R] − α·KL(p_θ(τ) ‖ p_base(τ))

(KL_j depends on s_j only, so counting it in G_j shifts A_j by a function of the state: no bias). The returns use
the KL summed over pixels whatever the log-prob reduction: with per-pixel means both actor terms below are the
same gradient divided by the number of pixels, so α weighs the same KL in the returns and in the loss.
- **Critic** V_φ(x_t, t, c) (:class:`ValueNetwork`, its own module and learning rate, checkpointed) regresses the
  λ-returns G^λ_j = A_j + V_φ(s_j) by MSE.
- **Advantages**: GAE (Schulman et al. 2016, eq. 16) over the chain with V(s_T) = 0, from the critic before the
  epoch's updates; with γ = λ = 1 (the default) A_j = G_j − V_φ(s_j), Monte-Carlo returns with a learned
  per-step baseline, so the steps of one sample get different advantages.
- **Actor**: L = mean_b max(−A r, −A clip(r, 1 ± ε)) + α·KL(π_θ(·|x_t) ‖ π_base(·|x_t)) — DDPO's surrogate on the
  per-step advantages, plus the pathwise gradient of the KL at the visited states (the returns carry the KL's
  effect on the states that follow).

Why this replaces the multi-algorithm seed's ``SacAlgorithm`` (spec/ddpo_sdpo.md §2.5): σ_t is fixed by the
schedule and η, so the entropy SAC maximises is constant in θ and its α·log π term only pushes μ_θ away from the
policy's own samples; its critic Q(x_t, x_{t−1}, t) takes the *stored* x_{t−1}, so Q has no gradient path to the
UNet and the reward never reached the actor; and its target A + γ·Q_targ(same transition) is no Bellman backup
(its fixed point is A/(1−γ)). Here the critic enters the actor's gradient only as the baseline of a score-function
estimator, which needs no path through the action, and it regresses the return of the chain actually sampled.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from diffalign.algorithms.advantages import AdvantageConfig, RewardNormaliser
from diffalign.algorithms.base import Algorithm, ExtraModule, MethodConfig, shuffled_transitions
from diffalign.algorithms.ddpo import ppo_clip_loss
from diffalign.models.features import TIME_FEATURES, timestep_features
from diffalign.models.policy import Policy
from diffalign.rollout import (Rollout, StepSettings, Transitions, kl_to_reference, reference_mean, sample,
                               transition_log_prob, transitions)
from diffalign.samplers import gaussian_kl

#: Sizes of the value network's timestep and text features (the text embedding is resized to this without
#: parameters, so one network fits any text encoder).
TEXT_FEATURES = 64


@dataclass
class ActorCriticConfig(MethodConfig):
    """The actor-critic's settings."""

    kl_coef: float = 0.01
    """α: the weight of the KL of the chain to the base model's (in nats, summed over pixels), as a per-step cost in
    the returns and in the actor's loss (0: no KL, and no extra denoiser passes)."""
    gamma: float = 1.0
    """γ: discount over the denoising steps (1: the reward at the end counts fully at every step)."""
    gae_lambda: float = 1.0
    """λ of GAE, in [0, 1] (1: Monte-Carlo returns minus V; smaller trusts the critic's bootstrap more)."""
    clip_range: float = 1e-4
    """PPO clip range ε on the per-step likelihood ratio (as DDPO's)."""
    adv_clip_max: float = 5.0
    """Advantages are clipped to [−adv_clip_max, adv_clip_max] in the actor's loss."""
    num_inner_epochs: int = 1
    """Passes over each epoch's samples."""
    timestep_fraction: float = 1.0
    """Fraction of each trajectory's steps trained on (a random subset per sample), in (0, 1]."""
    cfg: bool = True
    """Use classifier-free guidance when re-scoring transitions (as when sampling)."""
    value_learning_rate: float = 1e-3
    """AdamW learning rate of the value network."""
    value_width: int = 64
    """Channels of the value network's convolutions and hidden layer."""
    advantages: AdvantageConfig = field(default_factory=AdvantageConfig)
    """How the final rewards are normalised before they enter the returns."""

    def validate(self, settings: StepSettings | None = None) -> list[str]:
        errors = [f"method.{name} must be {rule}, got {value}" for name, value, ok, rule in [
            ("kl_coef", self.kl_coef, self.kl_coef >= 0, ">= 0"),
            ("gamma", self.gamma, 0 < self.gamma <= 1, "in (0, 1]"),
            ("gae_lambda", self.gae_lambda, 0 <= self.gae_lambda <= 1, "in [0, 1]"),
            ("clip_range", self.clip_range, self.clip_range > 0, "> 0"),
            ("adv_clip_max", self.adv_clip_max, self.adv_clip_max > 0, "> 0"),
            ("num_inner_epochs", self.num_inner_epochs, self.num_inner_epochs >= 1, ">= 1"),
            ("timestep_fraction", self.timestep_fraction, 0 < self.timestep_fraction <= 1, "in (0, 1]"),
            ("value_learning_rate", self.value_learning_rate, self.value_learning_rate > 0, "> 0"),
            ("value_width", self.value_width, self.value_width >= 1, ">= 1"),
        ] if not ok]
        if settings is not None and settings.eta <= 0:
            errors.append(f"sample.eta must be > 0 for actor_critic (its log-probs and KL need a stochastic "
                          f"sampler), got {settings.eta}")
        return errors + self.advantages.validate("method.advantages")


def text_features(prompt_embeds: torch.Tensor) -> torch.Tensor:
    """The prompt's text embedding ``[b, L, D]`` averaged over tokens, layer-normalised and resized to
    ``[b, TEXT_FEATURES]`` by averaging neighbouring features (no parameters: any D fits)."""
    pooled = F.layer_norm(prompt_embeds.float().mean(dim=1), (prompt_embeds.shape[-1],))
    return F.adaptive_avg_pool1d(pooled[:, None], TEXT_FEATURES)[:, 0]


class ValueNetwork(nn.Module):
    """V(x_t, t, c) ``[b]`` over latents ``[b, C, h, w]`` of any size: two 3×3 convolutions, the second's input
    modulated (FiLM) by the timestep and text features, global average pooling and an MLP head whose last layer
    starts at zero (V ≡ 0 at first: the first advantages are the returns themselves)."""

    def __init__(self, width: int = 64, latent_channels: int = 4):
        super().__init__()
        self.latent_channels = latent_channels
        self.stem = nn.Conv2d(latent_channels, width, 3, padding=1)
        self.film = nn.Linear(TIME_FEATURES + TEXT_FEATURES, 2 * width)
        self.body = nn.Conv2d(width, width, 3, padding=1)
        self.head = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, 1))
        nn.init.zeros_(self.head[-1].weight)
        nn.init.zeros_(self.head[-1].bias)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, prompt_embeds: torch.Tensor) -> torch.Tensor:
        if x_t.shape[1] != self.latent_channels:
            raise ValueError(f"value network: built for {self.latent_channels} latent channels, given latents of "
                             f"shape {tuple(x_t.shape)}")
        scale, shift = self.film(torch.cat([timestep_features(t), text_features(prompt_embeds)], dim=1)).chunk(2, 1)
        h = F.silu(self.stem(x_t.float()))
        h = F.silu(self.body(h * (1 + scale[:, :, None, None]) + shift[:, :, None, None]))
        return self.head(h.mean(dim=(2, 3))).squeeze(1)


def step_rewards(final_rewards: torch.Tensor, kl: torch.Tensor, kl_coef: float) -> torch.Tensor:
    """Per-step rewards ``[B, T]``: −α·KL_j ``[B, T]`` at every step, plus the final reward ``[B]`` at the last."""
    rewards = -kl_coef * kl.float()
    rewards[:, -1] += final_rewards
    return rewards


def chain_kl_to_base(policy: Policy, rollout: Rollout, settings: StepSettings) -> torch.Tensor:
    """KL_j ``[B, T]``: the exact KL (summed over pixels) of each sampled step N(μ_old, σ_t²) to the base model's
    step at the same x_t (one guided pass of the base model per step)."""
    rows, zeros = torch.arange(len(rollout)), torch.zeros(len(rollout))
    return torch.stack([gaussian_kl(rollout.means[:, j], reference_mean(
        policy, transitions(rollout, rows, torch.full_like(rows, j), zeros), settings), rollout.stds[j],
        reduction="sum") for j in range(rollout.num_steps)], dim=1)


def gae(rewards: torch.Tensor, values: torch.Tensor, gamma: float, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Advantages and λ-returns ``[B, T]`` of chains with step rewards and values ``[B, T]``, the state after the
    last step terminal (V = 0): δ_j = r_j + γ V_{j+1} − V_j, A_j = Σ_k (γλ)^k δ_{j+k} (GAE eq. 16), G_j = A_j + V_j."""
    advantages = torch.zeros_like(rewards)
    running = next_value = torch.zeros_like(rewards[:, 0])
    for j in reversed(range(rewards.shape[1])):
        delta = rewards[:, j] + gamma * next_value - values[:, j]
        running = delta + gamma * lam * running
        advantages[:, j] = running
        next_value = values[:, j]
    return advantages, advantages + values


def explained_variance(predicted: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """1 − Var(target − predicted) / Var(target) (1: perfect, 0: no better than the mean; 0 when Var(target) = 0)."""
    variance = target.var(unbiased=False)
    if variance <= 0:
        return torch.zeros((), device=target.device)
    return 1 - (target - predicted).var(unbiased=False) / variance


@dataclass(frozen=True)
class ActorCriticBatch:
    """A micro-batch of transitions (their ``advantages`` ``[b]`` are the per-step A_j) and the critic's targets,
    the λ-returns ``[b]``."""

    transitions: Transitions
    returns: torch.Tensor


class ActorCritic(Algorithm):
    """Rollouts with each step's KL to the base model, GAE advantages from the value network, PPO-clip + α·KL."""

    name = "actor_critic"
    config_class = ActorCriticConfig
    config: ActorCriticConfig

    def __init__(self, config: ActorCriticConfig, settings: StepSettings, reward=None):
        super().__init__(config, settings, reward)
        self.normaliser = RewardNormaliser(config.advantages)
        self.modules["value"] = ExtraModule(ValueNetwork(config.value_width), config.value_learning_rate)
        self._chain_kl: dict[int, torch.Tensor] = {}  # sample seed → KL_j [T], from collect until minibatches

    def collect(self, policy: Policy, prompts: Sequence[str], seeds: Sequence[int]) -> Rollout:
        """Plain rollouts, and (α > 0) each step's KL to the base model, kept by sample seed (unique in an epoch)
        until :meth:`minibatches` turns them into returns."""
        rollout = sample(policy, prompts, seeds, self.settings, record_means=self.config.kl_coef > 0)
        if self.config.kl_coef > 0:
            self._chain_kl.update(zip(rollout.seeds.tolist(), chain_kl_to_base(policy, rollout, self.settings)))
        return rollout

    def targets(self, rewards: torch.Tensor, prompts: Sequence[str], generator: torch.Generator) -> torch.Tensor:
        """The normalised final rewards ``[B]`` (the per-step advantages need the latents: :meth:`minibatches`)."""
        return self.normaliser(rewards, prompts, generator)

    @torch.no_grad()
    def values(self, rollout: Rollout) -> torch.Tensor:
        """V_φ(s_j) ``[B, T]`` at every step's input state."""
        value = self.modules["value"].module
        return torch.stack([value(rollout.latents[:, j], rollout.timesteps[:, j], rollout.prompt_embeds)
                            for j in range(rollout.num_steps)], dim=1)

    def chain_kl(self, rollout: Rollout) -> torch.Tensor:
        """KL_j ``[B, T]`` of the rollout's samples as measured by :meth:`collect` (zeros when α = 0)."""
        if self.config.kl_coef == 0:
            return torch.zeros(rollout.timesteps.shape, device=rollout.latents.device)
        missing = [s for s in rollout.seeds.tolist() if s not in self._chain_kl]
        if missing:
            raise ValueError(f"actor_critic: no KL to the base model for {len(missing)} samples (seeds "
                             f"{missing[:3]}…); the rollout must come from this method's collect")
        return torch.stack([self._chain_kl.pop(s) for s in rollout.seeds.tolist()])

    def advantages_and_returns(self, rollout: Rollout, rewards: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """GAE advantages and λ-returns ``[B, T]`` of the rollout given its normalised final rewards ``[B]``."""
        per_step = step_rewards(rewards.float(), self.chain_kl(rollout), self.config.kl_coef)
        return gae(per_step, self.values(rollout), self.config.gamma, self.config.gae_lambda)

    def minibatches(self, rollout, targets, plan, generator_for) -> Iterator[list[ActorCriticBatch]]:
        """DDPO's minibatches, each transition with its own step's advantage and return."""
        advantages, returns = self.advantages_and_returns(rollout, targets)
        packed = torch.stack([advantages, returns], dim=-1)  # [B, T, 2]: rides through the per-step indexing
        for group in shuffled_transitions(rollout, packed, plan, generator_for, self.config.num_inner_epochs,
                                          self.config.timestep_fraction):
            yield [ActorCriticBatch(dataclasses.replace(b, advantages=b.advantages[:, 0]), b.advantages[:, 1])
                   for b in group]

    def loss(self, policy: Policy, batch: ActorCriticBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The actor's PPO-clip + α·KL on the micro-batch, plus the critic's MSE to the returns."""
        c, moves = self.config, batch.transitions
        step = transition_log_prob(policy, moves, self.settings, c.cfg)
        actor, metrics = ppo_clip_loss(step.log_prob, moves.log_prob_old, moves.advantages, c.clip_range,
                                       c.adv_clip_max)
        if c.kl_coef > 0:
            kl = kl_to_reference(policy, moves, step, self.settings, c.cfg)
            actor = actor + c.kl_coef * kl.mean()
            metrics["kl/to_base_step"] = kl.detach().mean()
        value = self.modules["value"].module(moves.x_t, moves.t, moves.conditioning.prompt_embeds)
        value_loss = (value - batch.returns).square().mean()
        metrics.update({"value/loss": value_loss.detach(), "value/mean": value.detach().mean(),
                        "value/explained_variance": explained_variance(value.detach(), batch.returns)})
        return actor + value_loss, metrics

    def state_dict(self) -> dict:
        return self.normaliser.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.normaliser.load_state_dict(state)
