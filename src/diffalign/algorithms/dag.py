"""DAG and DAG-KL: the denoising chain as a GFlowNet (Zhang et al. 2024, "Improving GFlowNets for Text-to-Image
Diffusion Alignment"; spec/dag_dav_rcgd.md §1; reference: apple/ml-diffusion-alignment-gflownet).

States are (x_t, t, c); the forward policy P_F is the trained model's DDIM step (η = 1, with CFG), the backward
policy P_B the fixed noising kernel between strided timesteps (:func:`~diffalign.samplers.backward_log_prob`).
The target is ∝ exp(β r(x_0)). A learned flow network F̃_φ (:class:`FlowNetwork`) gives the forward-looking
log-flow of a state

    log F(x_t) = log F̃_φ(x_t, t, c) + β r(decode(x̂_0(x_t)))     (x̂_0 from the current model without CFG, no
                                                                  gradient through r)
    log F(x_0) = β r(x_0)                                         (terminal: the sample's reward)

and every trained transition x_t → x_prev has the detailed-balance residual (:func:`detailed_balance_residual`)

    δ = log F(x_t) + log P_F(x_prev | x_t) − log P_B(x_t | x_prev) − log F(x_prev).

**DAG** (``klpf`` ≤ 0): L = δ², into the LoRA through log P_F and into φ. **DAG-KL** (``klpf`` > 0): the flow
is trained by δ² with the policy terms stopped, and the policy by the gradient of KL(P_F ‖ P_B F(x_prev)/F(x_t)):
ρ = −δ (stopped), leave-one-out baseline and normalisation within the micro-batch
(:func:`leave_one_out_advantages`), PPO's clipped ratio to the sampling-time log-prob; L = δ²_flow + klpf·L_KL.
``unetreg`` adds the MSE between the policy's guided output and the sampling-time one (a proximal term).

β (``reward_exp``) grows linearly from 0 to its value over the first ``anneal_epochs`` epochs (the reference:
half of training). Log-probs use the sampler's ``reduction``: with ``mean`` (the reference's) β is in per-pixel
units; with ``sum`` divide it by the pixels of a latent (C·h·w) to weigh the reward the same.
Each trained transition costs two flow-network passes, one guided denoiser pass with gradient, two unguided ones,
two decodes and two reward calls (``dag/reward_calls``); ``timestep_fraction`` sub-samples the transitions.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.unets.unet_2d_blocks import get_down_block
from torch import nn

from diffalign.algorithms.base import (
    Algorithm, ExtraModule, GeneratorFor, MethodConfig, Minibatching, shuffled_transitions,
)
from diffalign.models.policy import Policy
from diffalign.rollout import Rollout, StepSettings, Transitions, denoise_step, guided_output, sample
from diffalign.samplers import backward_log_prob, previous_timestep


def detailed_balance_residual(log_flow_t: torch.Tensor, log_pf: torch.Tensor, log_pb: torch.Tensor,
                              log_flow_prev: torch.Tensor) -> torch.Tensor:
    """δ ``[B]`` = log F(x_t) + log P_F(x_prev | x_t) − log P_B(x_t | x_prev) − log F(x_prev); zero for every
    transition exactly when the flow and the policies satisfy detailed balance."""
    return log_flow_t + log_pf - log_pb - log_flow_prev


def leave_one_out_advantages(rho: torch.Tensor, adv_clip_max: float) -> torch.Tensor:
    """DAG-KL's advantages ``[B]`` of per-transition rewards ``rho`` ``[B]`` (B ≥ 2): the leave-one-out baseline
    b_i = (Σ_j ρ_j − ρ_i)/(B − 1), the leave-one-out variance v_i = (Σ_j (ρ_j − b_j)² − (ρ_i − b_i)²)/(B − 1),
    A_i = (ρ_i − b_i)/(√v_i + 1e-8) clipped to ±``adv_clip_max``."""
    n = rho.shape[0]
    if n < 2:
        raise ValueError(f"leave_one_out_advantages needs at least 2 transitions per micro-batch, got {n}")
    centred = rho - (rho.sum() - rho) / (n - 1)
    variance = (centred.square().sum() - centred.square()) / (n - 1)
    return (centred / (variance.clamp(min=0).sqrt() + 1e-8)).clamp(-adv_clip_max, adv_clip_max)


class FlowNetwork(nn.Module):
    """log F̃_φ(x_t, t, c): an encoder-only UNet (cross-attention down blocks, each downsampling) over latents
    ``[B, C, h, w]`` conditioned on the timestep and the prompt's hidden states ``[B, L, D]``, average-pooled to a
    scalar per sample. ``channels`` sets the blocks (as many as halve the latent down to 1×1, at most all of them);
    the reference's, for 64×64 SD latents, is (64, 128, 256, 256)."""

    def __init__(self, in_channels: int, sample_size: int, cross_attention_dim: int,
                 channels: Sequence[int] = (64, 128, 256, 256), heads: int = 8):
        super().__init__()
        blocks = max(1, min(len(channels), int(math.log2(sample_size))))
        channels = list(channels[:blocks])
        groups = 32 if all(c % 32 == 0 for c in channels) else math.gcd(*channels)
        self.time_proj = Timesteps(channels[0], flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embedding = TimestepEmbedding(channels[0], 4 * channels[0])
        self.conv_in = nn.Conv2d(in_channels, channels[0], 3, padding=1)
        self.blocks = nn.ModuleList(
            get_down_block("CrossAttnDownBlock2D" if i < len(channels) - 1 or len(channels) == 1 else "DownBlock2D",
                           num_layers=1, in_channels=channels[max(i - 1, 0)], out_channels=c,
                           temb_channels=4 * channels[0], add_downsample=True, resnet_eps=1e-5, resnet_act_fn="silu",
                           resnet_groups=groups, cross_attention_dim=cross_attention_dim, num_attention_heads=heads,
                           attention_head_dim=max(1, c // heads), downsample_padding=1)
            for i, c in enumerate(channels))
        self.head = nn.Linear(channels[-1], 1)

    def forward(self, x: torch.Tensor, t: torch.Tensor, prompt_embeds: torch.Tensor) -> torch.Tensor:
        embedding = self.time_embedding(self.time_proj(t.reshape(-1)).to(x.dtype))
        h = self.conv_in(x)
        for block in self.blocks:
            if getattr(block, "has_cross_attention", False):
                h, _ = block(h, embedding, encoder_hidden_states=prompt_embeds)
            else:
                h, _ = block(h, embedding)
        return self.head(h.mean(dim=(2, 3))).squeeze(-1)


@dataclass
class DagConfig(MethodConfig):
    """DAG / DAG-KL settings (defaults: the reference's, ``config/sd.yaml``)."""

    reward_exp: float = 100.0
    """β: the inverse temperature of the target exp(β r), reached after ``anneal_epochs``."""
    anneal_epochs: int = 50
    """Epochs over which β grows linearly from 0 (the reference: half of its 100 epochs)."""
    klpf: float = -1.0
    """> 0: DAG-KL with this weight on the KL policy gradient; ≤ 0: DAG (detailed balance into the policy)."""
    clip_range: float = 1e-4
    """DAG-KL: PPO ratio clip."""
    adv_clip_max: float = 5.0
    """DAG-KL: advantage clip."""
    unetreg: float = 1.0
    """Weight of the MSE to the sampling-time guided output (a proximal term; 0: off)."""
    timestep_fraction: float = 1.0
    """Fraction of each trajectory's steps trained per epoch (a random subset per sample)."""
    flow_learning_rate: float = 3e-4
    """Learning rate of the flow network."""
    flow_channels: tuple[int, ...] = (64, 128, 256, 256)
    """The flow network's block widths (see :class:`FlowNetwork`)."""

    def validate(self, settings: StepSettings | None = None) -> list[str]:
        errors = []
        for name, value in [("reward_exp", self.reward_exp), ("clip_range", self.clip_range),
                            ("adv_clip_max", self.adv_clip_max), ("flow_learning_rate", self.flow_learning_rate)]:
            if value <= 0:
                errors.append(f"method.{name} must be > 0, got {value}")
        if self.anneal_epochs < 0:
            errors.append(f"method.anneal_epochs must be >= 0, got {self.anneal_epochs}")
        if self.unetreg < 0:
            errors.append(f"method.unetreg must be >= 0, got {self.unetreg}")
        if not 0 < self.timestep_fraction <= 1:
            errors.append(f"method.timestep_fraction must be in (0, 1], got {self.timestep_fraction}")
        if not self.flow_channels or min(self.flow_channels) < 1:
            errors.append(f"method.flow_channels must be positive widths, got {self.flow_channels}")
        if settings is not None and settings.eta <= 0:
            errors.append(f"sample.eta must be > 0 for dag (P_F is the stochastic DDIM step), got {settings.eta}")
        return errors


class Dag(Algorithm):
    """Rollouts with their denoiser outputs, rewards as targets (the terminal flow), detailed-balance losses."""

    name = "dag"
    trains_on_transitions = True
    config_class = DagConfig
    config: DagConfig

    def __init__(self, config: DagConfig, settings: StepSettings, reward=None):
        if reward is None:
            raise ValueError("dag: the forward-looking flow scores x̂_0 with the reward; build it with one")
        super().__init__(config, settings, reward)
        self.epochs_seen = 0
        self.beta = 0.0

    def attach(self, policy: Policy) -> None:
        """Builds the flow network for ``policy``'s latents and text embeddings."""
        if "flow" not in self.modules:
            unet = policy.base_unet.config
            flow = FlowNetwork(unet.in_channels, unet.sample_size, unet.cross_attention_dim, self.config.flow_channels)
            self.modules["flow"] = ExtraModule(flow.to(policy.device), self.config.flow_learning_rate)

    def collect(self, policy: Policy, prompts: Sequence[str], seeds: Sequence[int]) -> Rollout:
        return sample(policy, prompts, seeds, self.settings, record_outputs=self.config.unetreg > 0)

    def targets(self, rewards: torch.Tensor, prompts: Sequence[str], generator: torch.Generator) -> torch.Tensor:
        """The rewards themselves (each trajectory's terminal flow is β r(x_0)); sets this epoch's β."""
        ramp = 1.0 if self.config.anneal_epochs == 0 else min(1.0, self.epochs_seen / self.config.anneal_epochs)
        self.beta = self.config.reward_exp * ramp
        self.epochs_seen += 1
        return rewards

    def minibatches(self, rollout: Rollout, targets: torch.Tensor, plan: Minibatching,
                    generator_for: GeneratorFor) -> Iterator[list[Transitions]]:
        return shuffled_transitions(rollout, targets, plan, generator_for, 1, self.config.timestep_fraction)

    def _log_flow(self, policy: Policy, x: torch.Tensor, t: torch.Tensor, batch: Transitions) -> torch.Tensor:
        """log F̃_φ(x, t, c) + β r(decode(x̂_0(x))) with x̂_0 from the current model without guidance."""
        with torch.no_grad():
            x0 = denoise_step(policy, x, t, batch.conditioning, self.settings.without_guidance(),
                              with_log_prob=False).x0_pred
            forward_reward = self.reward(policy.decode(x0), batch.prompts).float().to(x.device)
        return self.modules["flow"].module(x, t, batch.conditioning.prompt_embeds) + self.beta * forward_reward

    def loss(self, policy: Policy, batch: Transitions) -> tuple[torch.Tensor, dict]:
        c, schedule = self.config, policy.schedule
        t_prev = previous_timestep(batch.t, schedule.num_train_timesteps, self.settings.num_inference_steps)
        output = guided_output(policy, batch.x_t, batch.t, batch.conditioning, self.settings)
        log_pf = denoise_step(policy, batch.x_t, batch.t, batch.conditioning, self.settings,
                              prev_sample=batch.x_prev, model_output=output).log_prob
        log_pb = backward_log_prob(batch.x_t, batch.x_prev, batch.t, t_prev, schedule.alphas_cumprod,
                                   final_alpha_cumprod=schedule.final_alpha_cumprod, reduction=self.settings.reduction)
        log_flow_t = self._log_flow(policy, batch.x_t, batch.t, batch)
        terminal = t_prev < 0
        log_flow_prev = self._log_flow(policy, batch.x_prev, t_prev.clamp(min=0), batch)
        log_flow_prev = torch.where(terminal, self.beta * batch.advantages.float(), log_flow_prev)
        if c.klpf > 0:
            delta = detailed_balance_residual(log_flow_t, log_pf.detach(), log_pb, log_flow_prev)
            advantages = leave_one_out_advantages(-delta.detach(), c.adv_clip_max)
            ratio = torch.exp(log_pf - batch.log_prob_old)
            policy_loss = torch.maximum(-advantages * ratio,
                                        -advantages * ratio.clamp(1 - c.clip_range, 1 + c.clip_range)).mean()
            loss = delta.square().mean() + c.klpf * policy_loss
        else:
            delta = detailed_balance_residual(log_flow_t, log_pf, log_pb, log_flow_prev)
            loss = delta.square().mean()
        metrics = {"dag/delta_sq": delta.detach().square().mean(), "dag/beta": self.beta,
                   "dag/reward_calls": 2.0 * len(batch), "dag/log_flow": log_flow_t.detach().mean()}
        if c.unetreg > 0:
            proximal = F.mse_loss(output.float(), batch.output_old.float())
            loss = loss + c.unetreg * proximal
            metrics["dag/unetreg"] = proximal.detach()
        metrics["policy/loss"] = loss.detach()
        return loss, metrics

    def state_dict(self) -> dict:
        return {"epochs_seen": self.epochs_seen}

    def load_state_dict(self, state: dict) -> None:
        self.epochs_seen = int(state["epochs_seen"])
