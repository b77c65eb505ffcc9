"""Weighted sums of rewards, and proxy/gold pairs for reward-hacking curves.

:class:`CompositeReward` is ``Σ_i w_i · r_i``; every member's value of the last call is kept in
``last_components`` (detached, per member name), :meth:`CompositeReward.output` returns them with the total in
one :class:`~diffalign.rewards.base.RewardOutput` (what the training loop logs), and
:meth:`CompositeReward.score_components` returns them directly. A combined reward is the usual answer to "aesthetic + alignment" requests (``jannerm/ddpo#12``).

:class:`ProxyGold` pairs the reward a run trains on (proxy) with the one it is judged by (gold), as in Gao et al.
2023, "Scaling Laws for Reward Model Overoptimization": plotting gold against proxy over training shows where
optimising the proxy stops helping.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from diffalign.rewards.base import Reward, RewardError, RewardOutput
from diffalign.rewards.registry import get, register


class CompositeReward(Reward):
    """``Σ_i w_i · r_i(images, prompts)`` over member rewards, each validated by its own ``__call__``.

    Differentiable when every member with a non-zero weight is; needs prompts when any member does.
    Member names must be distinct (they key ``last_components``).
    """

    name = "composite"

    def __init__(self, terms: Sequence[tuple[Reward, float]], device: str | torch.device = "cpu"):
        super().__init__(device)
        if not terms:
            raise ValueError("a composite reward needs at least one (reward, weight) term")
        names = [reward.name for reward, _ in terms]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"composite reward members must have distinct names; repeated: {duplicates}")
        self.terms = [(reward, float(weight)) for reward, weight in terms]
        self.name = "composite(" + " + ".join(f"{w:g}*{r.name}" for r, w in self.terms) + ")"
        self.differentiable = all(r.differentiable for r, w in self.terms if w != 0)
        self.needs_prompts = any(r.needs_prompts for r, _ in self.terms)
        self.last_components: dict[str, torch.Tensor] = {}

    @classmethod
    def from_names(
        cls,
        weights: Mapping[str, float],
        member_kwargs: Mapping[str, Mapping] | None = None,
        device: str | torch.device = "cpu",
    ) -> CompositeReward:
        """Builds the members from the registry: ``weights={"aesthetic": 1.0, "jpeg_compressibility": 0.1}``;
        ``member_kwargs`` gives each member's keyword arguments (``device`` is passed to all)."""
        member_kwargs = dict(member_kwargs or {})
        unknown = sorted(set(member_kwargs) - set(weights))
        if unknown:
            raise ValueError(f"member_kwargs names rewards {unknown} that are not in weights {sorted(weights)}")
        terms = [(get(name, device=device, **dict(member_kwargs.get(name, {}))), w) for name, w in weights.items()]
        return cls(terms, device=device)

    def score_components(self, images: torch.Tensor, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Each member's reward ``[B]`` by name (with graph, for differentiable members)."""
        return {reward.name: reward(images, prompts).to(self.device) for reward, _ in self.terms}

    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        components = self.score_components(images, prompts)
        self.last_components = {name: value.detach() for name, value in components.items()}
        return sum(weight * components[reward.name] for reward, weight in self.terms)

    def output(self, images: torch.Tensor, prompts: Sequence[str]) -> RewardOutput:
        """The weighted sum with each member's values (members validate their own output)."""
        self.check_inputs(images, prompts)
        with torch.set_grad_enabled(self.differentiable and torch.is_grad_enabled()):
            components = self.score_components(images, list(prompts))
            total = sum(weight * components[reward.name] for reward, weight in self.terms)
        total = self.check_output(total, len(prompts))
        return RewardOutput(total, {name: value.detach() for name, value in components.items()})


def parse_weights(text: str) -> dict[str, float]:
    """``"aesthetic=1, jpeg_compressibility=0.1"`` → ``{"aesthetic": 1.0, "jpeg_compressibility": 0.1}``."""
    weights = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, sep, value = item.partition("=")
        try:
            weights[name.strip()] = float(value)
        except ValueError:
            sep = ""
        if not sep or not name.strip():
            raise ValueError(f"composite weights: {item!r} is not of the form name=number (in {text!r})")
    return weights


@register("composite")
def composite(
    weights: Mapping[str, float] | str,
    member_kwargs: Mapping[str, Mapping] | None = None,
    device: str | torch.device = "cpu",
) -> CompositeReward:
    """Registry factory: ``get("composite", weights={...}, member_kwargs={...})``, or from the command line
    ``--reward composite --reward-kwargs weights "shapes=1,brightness=0.1"``.

    See :meth:`CompositeReward.from_names`.
    """
    if isinstance(weights, str):
        weights = parse_weights(weights)
    return CompositeReward.from_names(weights, member_kwargs, device)


@dataclass(frozen=True)
class ProxyGoldScores:
    """The two rewards of one batch: ``proxy`` ``[B]`` (with graph if differentiable), ``gold`` ``[B]`` (detached)."""

    proxy: torch.Tensor
    gold: torch.Tensor


@dataclass(frozen=True)
class ProxyGold:
    """A reward to optimise (``proxy``) and one to evaluate by (``gold``) for reward-hacking curves.

    The gold reward never contributes gradients. :meth:`metrics` gives the logged means under namespaced keys.
    """

    proxy: Reward
    gold: Reward

    def __post_init__(self):
        if self.proxy is self.gold:
            raise ValueError("proxy and gold are the same reward object; a hacking curve needs two rewards")

    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> ProxyGoldScores:
        proxy = self.proxy(images, prompts)
        with torch.no_grad():
            gold = self.gold(images, prompts)
        if proxy.shape != gold.shape:
            raise RewardError(f"proxy {self.proxy.name!r} and gold {self.gold.name!r} returned different shapes")
        return ProxyGoldScores(proxy=proxy, gold=gold.detach())

    def metrics(self, scores: ProxyGoldScores) -> dict[str, float]:
        """``{"reward/proxy_mean", "reward/gold_mean"}`` of one batch's scores."""
        return {"reward/proxy_mean": scores.proxy.mean().item(), "reward/gold_mean": scores.gold.mean().item()}
