"""TRPO over the denoising chain (Schulman et al. 2015), and PPO's adaptive-KL penalty (Schulman et al. 2017 §4).

Both modes maximise DDPO's per-step importance-weighted surrogate (no ratio clipping) under the exact KL between
two Gaussian steps that share σ_t (spec/ddpo_sdpo.md §2.4 [design]):

    L(θ) = mean_b clip(A, ±A_max) · r,   r = exp(log π_θ(x_{t−1}|x_t) − log π_old(x_{t−1}|x_t))
    KL_t = ‖μ_old − μ_θ‖² / 2σ_t²   (reduced over pixels as the log-probs are, averaged over transitions)

- ``mode="trust_region"`` (TRPO, the default): the method sets the trainable (LoRA) weights itself, one step per
  optimizer step (:meth:`TRPO.update`). g = ∇L; s ≈ (F + λI)⁻¹ g by ``cg_iters`` steps of conjugate gradient,
  where F v is the Hessian of the mean KL at the current θ times v, by double backprop through the closed form
  (the Fisher of the Gaussian step, since the KL's gradient vanishes there); full step Δ = √(2δ / sᵀ(F+λI)s) · s;
  backtracking Δ ← ρ^k Δ until the measured mean KL between the policy before and after the step is ≤ δ =
  ``max_kl`` and L improves. With no acceptable step within ``max_backtracks`` the weights stay where they were.
- ``mode="penalty"``: the loss −L + β·KL against the means recorded at sampling time, stepped by the loop's
  optimizer; after each optimizer step the same KL is measured for the updated policy on that step's transitions
  (d) and β ← 2β if d > 1.5 δ, β ← β/2 if d < δ/1.5 (PPO §4). β is checkpointed.

The multi-algorithm seed's ``TrpoAlgorithm`` (spec/ddpo_sdpo.md §2.4) is the penalty mode alone, with the k1
estimate mean(log p_old − log p_θ) for the KL (noisy, negative at times, zero expected gradient at θ_old), a
``damping`` it never used, β halved below max_kl/2 (not δ/1.5) and lost on resume; no natural gradient, no line search.

With several processes the trust-region step's gradient, Fisher-vector products and trials are averaged over them
(all take the same step); in penalty mode each process adapts β on the KL of its own share of the batch.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from typing import Literal

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from diffalign.algorithms.advantages import AdvantageConfig, RewardNormaliser
from diffalign.algorithms.base import Algorithm, MethodConfig, shuffled_transitions
from diffalign.models.policy import Policy
from diffalign.rollout import Rollout, StepSettings, Transitions, sample, transition_log_prob
from diffalign.samplers import DDIMStepOutput, gaussian_kl

#: β stays within these bounds (a long run of halvings must not underflow to 0).
BETA_RANGE = (1e-8, 1e8)


@dataclass
class TRPOConfig(MethodConfig):
    """TRPO's settings (trust region by default; ``mode="penalty"`` for the adaptive-β variant)."""

    mode: Literal["trust_region", "penalty"] = "trust_region"
    """trust_region: natural-gradient step with a KL line search (TRPO); penalty: −L + β·KL with adaptive β (PPO §4)."""
    max_kl: float = 1e-5
    """δ: the mean KL per transition (per pixel with mean log-probs) a step may reach, or β's target (penalty)."""
    damping: float = 1e-3
    """λ in the solve (F + λI) s = g (trust_region). On ShapesWorld's LoRA, gᵀFg/gᵀg ≈ 0.1 and vᵀFv/vᵀv ≈ 2e-5 along
    random v: λ = 0.1 (the usual TRPO value, for F of nats per state) would make the step a plain gradient step."""
    cg_iters: int = 10
    """Conjugate-gradient iterations per step, each one Fisher-vector product (trust_region)."""
    max_backtracks: int = 10
    """Line-search trials after the full step before the step is abandoned (trust_region)."""
    backtrack_ratio: float = 0.5
    """ρ: each line-search trial shrinks the step by this factor, in (0, 1) (trust_region)."""
    fisher_fraction: float = 1.0
    """Fraction of each micro-batch's transitions the Fisher-vector products use, in (0, 1] (cheaper, noisier)."""
    init_beta: float = 1.0
    """β at the start of training (penalty)."""
    adv_clip_max: float = 5.0
    """Advantages are clipped to [−adv_clip_max, adv_clip_max]."""
    num_inner_epochs: int = 1
    """Passes over each epoch's samples."""
    timestep_fraction: float = 1.0
    """Fraction of each trajectory's steps trained on (a random subset per sample), in (0, 1]."""
    cfg: bool = True
    """Use classifier-free guidance when re-scoring transitions (as when sampling)."""
    advantages: AdvantageConfig = field(default_factory=AdvantageConfig)

    def validate(self, settings: StepSettings | None = None) -> list[str]:
        errors = [f"method.{name} must be {rule}, got {value}" for name, value, ok, rule in [
            ("max_kl", self.max_kl, self.max_kl > 0, "> 0"),
            ("damping", self.damping, self.damping >= 0, ">= 0"),
            ("cg_iters", self.cg_iters, self.cg_iters >= 1, ">= 1"),
            ("max_backtracks", self.max_backtracks, self.max_backtracks >= 0, ">= 0"),
            ("backtrack_ratio", self.backtrack_ratio, 0 < self.backtrack_ratio < 1, "in (0, 1)"),
            ("fisher_fraction", self.fisher_fraction, 0 < self.fisher_fraction <= 1, "in (0, 1]"),
            ("init_beta", self.init_beta, self.init_beta > 0, "> 0"),
            ("adv_clip_max", self.adv_clip_max, self.adv_clip_max > 0, "> 0"),
            ("num_inner_epochs", self.num_inner_epochs, self.num_inner_epochs >= 1, ">= 1"),
            ("timestep_fraction", self.timestep_fraction, 0 < self.timestep_fraction <= 1, "in (0, 1]"),
        ] if not ok]
        if self.mode not in ("trust_region", "penalty"):
            errors.append(f"method.mode must be 'trust_region' or 'penalty', got {self.mode!r}")
        if settings is not None and settings.eta <= 0:
            errors.append(f"sample.eta must be > 0 for trpo (its log-probs and KL need a stochastic sampler), "
                          f"got {settings.eta}")
        return errors + self.advantages.validate("method.advantages")


def surrogate(log_prob: torch.Tensor, log_prob_old: torch.Tensor, advantages: torch.Tensor,
              adv_clip_max: float) -> torch.Tensor:
    """L = mean_b clip(A) · exp(log π_θ − log π_old) over ``[b]`` transitions (to be maximised)."""
    return (advantages.clamp(-adv_clip_max, adv_clip_max) * (log_prob - log_prob_old).exp()).mean()


def adapt_beta(beta: float, kl: float, target: float) -> float:
    """PPO's rule (Schulman et al. 2017 §4): 2β if kl > 1.5·target, β/2 if kl < target/1.5, else β (kept within
    :data:`BETA_RANGE`)."""
    beta = 2 * beta if kl > 1.5 * target else beta / 2 if kl < target / 1.5 else beta
    return min(max(beta, BETA_RANGE[0]), BETA_RANGE[1])


def conjugate_gradient(matrix_vector: Callable[[torch.Tensor], torch.Tensor], b: torch.Tensor, iterations: int,
                       tolerance: float = 1e-10) -> torch.Tensor:
    """x ≈ A⁻¹ b for a symmetric positive-definite A given as ``matrix_vector(v) = A v`` (Hestenes & Stiefel 1952,
    as in TRPO's appendix C), from x = 0; stops early once ‖r‖² < tolerance · ‖b‖²."""
    x, r, p = torch.zeros_like(b), b.clone(), b.clone()
    rr, stop = r @ r, tolerance * (b @ b)
    for _ in range(iterations):
        if rr <= stop:
            break
        ap = matrix_vector(p)
        alpha = rr / (p @ ap)
        x, r = x + alpha * p, r - alpha * ap
        rr, rr_old = r @ r, rr
        p = r + (rr / rr_old) * p
    return x


def flat_grad(value: torch.Tensor, params: Sequence[nn.Parameter], **kwargs) -> torch.Tensor:
    """∂value/∂params as one flat vector (zeros for parameters ``value`` does not use)."""
    grads = torch.autograd.grad(value, params, allow_unused=True, **kwargs)
    return torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1) for p, g in zip(params, grads)])


def fisher_vector_product(kl_grad: torch.Tensor, params: Sequence[nn.Parameter], vector: torch.Tensor) -> torch.Tensor:
    """H v of the KL whose gradient ``kl_grad`` (flat, built with ``create_graph=True``) was taken at the point the
    KL is measured from: the Fisher-vector product, by double backprop (Pearlmutter 1994)."""
    return flat_grad(kl_grad @ vector, params, retain_graph=True)


def mean_kl(mean_from: torch.Tensor, step: DDIMStepOutput, reduction: str) -> torch.Tensor:
    """Mean closed-form KL between the Gaussian steps with means ``mean_from`` and ``step.mean`` (shared σ_t)."""
    return gaussian_kl(mean_from, step.mean, step.std, reduction=reduction).mean()


def kl_gradient(policy: Policy, batch: Transitions, settings: StepSettings, guidance: bool,
                params: Sequence[nn.Parameter]) -> torch.Tensor:
    """∇ of the mean KL of the policy's steps at ``batch`` to themselves at the current θ (zero in value), built
    with ``create_graph=True`` for :func:`fisher_vector_product`. Attention runs on the math kernel: the fused
    kernels have no double backward."""
    with sdpa_kernel(SDPBackend.MATH):
        step = transition_log_prob(policy, batch, settings, guidance)
        return flat_grad(mean_kl(step.mean.detach(), step, settings.reduction), params, create_graph=True)


@torch.no_grad()
def set_flat(params: Sequence[nn.Parameter], values: torch.Tensor) -> None:
    """Copies the flat vector ``values`` into ``params`` in place."""
    start = 0
    for p in params:
        p.copy_(values[start : start + p.numel()].view_as(p))
        start += p.numel()


@torch.no_grad()
def ratio_stats(step: DDIMStepOutput, batch: Transitions) -> tuple[torch.Tensor, torch.Tensor]:
    """Schulman's k3 estimate (r − 1) − log r of KL(π_old ‖ π_θ) and the mean ratio r over the transitions."""
    log_ratio = step.log_prob - batch.log_prob_old
    return ((log_ratio.exp() - 1) - log_ratio).mean(), log_ratio.exp().mean()


def first_rows(batch: Transitions, k: int) -> Transitions:
    """The first ``k`` transitions of ``batch``."""
    return Transitions(**{f.name: None if getattr(batch, f.name) is None else getattr(batch, f.name)[:k]
                          for f in fields(Transitions)})


class TRPO(Algorithm):
    """Rollouts with their step means, DDPO's minibatches, and a trust-region step or an adaptive KL penalty."""

    name = "trpo"
    config_class = TRPOConfig
    config: TRPOConfig

    def __init__(self, config: TRPOConfig, settings: StepSettings, reward=None):
        super().__init__(config, settings, reward)
        self.normaliser = RewardNormaliser(config.advantages)
        self.beta = config.init_beta
        self._stepped: list[tuple[Policy, Transitions]] = []  # penalty mode: this optimizer step's micro-batches

    def collect(self, policy: Policy, prompts: Sequence[str], seeds: Sequence[int]) -> Rollout:
        """Plain rollouts that keep μ_old of every step (the penalty's KL is measured against it)."""
        return sample(policy, prompts, seeds, self.settings, record_means=True)

    def targets(self, rewards: torch.Tensor, prompts: Sequence[str], generator: torch.Generator) -> torch.Tensor:
        return self.normaliser(rewards, prompts, generator)

    def minibatches(self, rollout, targets, plan, generator_for):
        return shuffled_transitions(rollout, targets, plan, generator_for, self.config.num_inner_epochs,
                                    self.config.timestep_fraction)

    def loss(self, policy: Policy, batch: Transitions) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """−L (+ β·KL to the sampling-time means in penalty mode) on one micro-batch, re-scored under the policy."""
        if batch.mean_old is None:
            raise ValueError("trpo: the transitions carry no step means; collect with sample(record_means=True)")
        step = transition_log_prob(policy, batch, self.settings, self.config.cfg)
        value = surrogate(step.log_prob, batch.log_prob_old, batch.advantages, self.config.adv_clip_max)
        kl = mean_kl(batch.mean_old, step, self.settings.reduction)
        loss = -value + self.beta * kl if self.config.mode == "penalty" else -value
        if self.config.mode == "penalty":
            self._stepped.append((policy, batch))
        approx_kl, ratio = ratio_stats(step, batch)
        return loss, {"policy/loss": loss.detach(), "policy/approx_kl": approx_kl, "policy/ratio_mean": ratio,
                      "trpo/kl_to_old": kl.detach()}

    def after_optimizer_step(self) -> dict[str, float]:
        """Penalty mode: β adapted to the updated policy's KL to the sampling-time means on the step's transitions."""
        if self.config.mode != "penalty" or not self._stepped:
            return {}
        with torch.no_grad():
            kls = [mean_kl(batch.mean_old, transition_log_prob(policy, batch, self.settings, self.config.cfg),
                           self.settings.reduction) for policy, batch in self._stepped]
        self._stepped = []
        measured = float(torch.stack(kls).mean())
        self.beta = adapt_beta(self.beta, measured, self.config.max_kl)
        return {"trpo/beta": self.beta, "trpo/step_kl": measured}

    def update(self, policy: Policy, params: list[nn.Parameter], group: list[Transitions],
               mean_over_processes: Callable[[torch.Tensor], torch.Tensor]) -> dict[str, float] | None:
        """Trust-region mode: the natural-gradient step and line search over ``group``; penalty mode: None."""
        if self.config.mode != "trust_region":
            return None
        c, n = self.config, len(group)
        gradient, before, old_means = torch.zeros(sum(p.numel() for p in params), device=params[0].device), 0.0, []
        for batch in group:
            step = transition_log_prob(policy, batch, self.settings, c.cfg)
            value = surrogate(step.log_prob, batch.log_prob_old, batch.advantages, c.adv_clip_max) / n
            gradient += flat_grad(value, params)
            before += value.detach()
            old_means.append(step.mean.detach())
        gradient, before = mean_over_processes(gradient), mean_over_processes(before)
        metrics = {"policy/grad_norm": float(gradient.norm())}
        if not (math.isfinite(metrics["policy/grad_norm"]) and math.isfinite(float(before))):
            return metrics | self._no_step(float(before))  # never step along NaN/inf (the loop then stops or skips)
        kl_grads = [kl_gradient(policy, first_rows(batch, max(1, math.ceil(c.fisher_fraction * len(batch)))),
                                self.settings, c.cfg, params) for batch in group]

        def damped_fisher(vector: torch.Tensor) -> torch.Tensor:
            product = sum(fisher_vector_product(g, params, vector) for g in kl_grads) / n
            return mean_over_processes(product) + c.damping * vector

        direction = conjugate_gradient(damped_fisher, gradient, c.cg_iters)
        curvature = float(direction @ damped_fisher(direction))
        del kl_grads
        if not curvature > 0:  # a zero gradient (e.g. all advantages 0): nothing to step along
            return metrics | self._no_step(float(before))
        full_step = math.sqrt(2 * c.max_kl / curvature) * direction
        return metrics | self._line_search(policy, params, group, old_means, float(before), gradient, full_step,
                                           mean_over_processes)

    @torch.no_grad()
    def _line_search(self, policy: Policy, params: list[nn.Parameter], group: list[Transitions],
                     old_means: list[torch.Tensor], before: float, gradient: torch.Tensor, full_step: torch.Tensor,
                     mean_over_processes) -> dict[str, float]:
        """Tries θ + ρ^k Δ for k = 0 … max_backtracks and keeps the first whose mean KL to the step's old policy is
        ≤ max_kl and whose surrogate beats ``before``; else restores θ."""
        c, start = self.config, torch.cat([p.detach().reshape(-1) for p in params])
        for k in range(c.max_backtracks + 1):
            step_vector = c.backtrack_ratio**k * full_step
            set_flat(params, start + step_vector)
            measured = mean_over_processes(self._evaluate(policy, group, old_means))
            value, kl, approx_kl, ratio = measured.tolist()
            if kl <= c.max_kl and value > before:
                return {"policy/loss": -value, "policy/approx_kl": approx_kl, "policy/ratio_mean": ratio,
                        "trpo/step_kl": kl, "trpo/backtracks": float(k), "trpo/step_norm": float(step_vector.norm()),
                        "trpo/surrogate_gain": value - before, "trpo/expected_gain": float(gradient @ step_vector),
                        "trpo/accepted": 1.0}
        set_flat(params, start)
        return self._no_step(before)

    def _no_step(self, before: float) -> dict[str, float]:
        return {"policy/loss": -before, "trpo/step_kl": 0.0, "trpo/backtracks": float(self.config.max_backtracks + 1),
                "trpo/step_norm": 0.0, "trpo/surrogate_gain": 0.0, "trpo/accepted": 0.0}

    def _evaluate(self, policy: Policy, group: list[Transitions], old_means: list[torch.Tensor]) -> torch.Tensor:
        """[surrogate, mean KL to ``old_means``, k3 approx KL to the sampling policy, mean ratio] over ``group``."""
        totals = 0
        for batch, mean in zip(group, old_means):
            step = transition_log_prob(policy, batch, self.settings, self.config.cfg)
            value = surrogate(step.log_prob, batch.log_prob_old, batch.advantages, self.config.adv_clip_max)
            totals += torch.stack([value, mean_kl(mean, step, self.settings.reduction), *ratio_stats(step, batch)])
        return totals / len(group)

    def state_dict(self) -> dict:
        return {"beta": self.beta, **self.normaliser.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.beta = state.get("beta", self.config.init_beta)
        self.normaliser.load_state_dict(state)
