"""Name → reward factory. ``get("jpeg_compressibility", device="cuda")`` builds a registered reward."""

from __future__ import annotations

from collections.abc import Callable

from diffalign.rewards.base import Reward

_FACTORIES: dict[str, Callable[..., Reward]] = {}


def register(name: str) -> Callable[[Callable[..., Reward]], Callable[..., Reward]]:
    """Class or function decorator registering a reward factory under ``name``."""

    def decorate(factory: Callable[..., Reward]) -> Callable[..., Reward]:
        if name in _FACTORIES:
            raise ValueError(f"reward {name!r} is registered twice")
        _FACTORIES[name] = factory
        return factory

    return decorate


def names() -> list[str]:
    """The registered reward names, sorted."""
    return sorted(_FACTORIES)


def get(name: str, **kwargs) -> Reward:
    """Builds the reward registered as ``name`` with the factory's keyword arguments (e.g. ``device``)."""
    if name not in _FACTORIES:
        raise ValueError(f"unknown reward {name!r}; registered rewards: {', '.join(names())}")
    return _FACTORIES[name](**kwargs)
