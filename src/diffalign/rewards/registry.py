"""Name → reward factory. ``get("jpeg_compressibility", device="cuda")`` builds a registered reward.

Keyword arguments given as strings (from the command line: ``--reward.kwargs relation_margin_px 3``) are
converted to the types the factory declares (int, float, bool, str or paths); an unknown keyword or a value
that does not convert is an error naming the reward, the keyword and what it accepts.
"""

from __future__ import annotations

import inspect
import typing
from collections.abc import Callable
from pathlib import Path

from diffalign.rewards.base import Reward

_FACTORIES: dict[str, Callable[..., Reward]] = {}
_BOOLEANS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


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


def parameters(name: str) -> dict[str, object]:
    """The keyword arguments reward ``name`` declares, with their types (``inspect.Parameter.empty`` if none)."""
    factory = _FACTORIES[name]
    target = factory.__init__ if inspect.isclass(factory) else factory
    try:
        hints = typing.get_type_hints(target)
    except Exception:  # an annotation that does not resolve: keep the values as given
        hints = {}
    params = inspect.signature(factory).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return {}
    return {k: hints.get(k, inspect.Parameter.empty) for k, p in params.items() if k != "self"}


def _convert(reward: str, key: str, value: str, annotation) -> object:
    """``value`` as the first of int, float, bool, Path or str that ``annotation`` admits."""
    options = typing.get_args(annotation) or (annotation,)
    for kind in (bool, int, float, Path):
        if kind in options:
            try:
                if kind is bool:
                    return _BOOLEANS[value.strip().lower()]
                return kind(value)
            except (KeyError, ValueError):
                raise ValueError(f"reward {reward!r}: keyword {key!r} takes {annotation}, got {value!r}") from None
    return value


def declared_differentiable(name: str) -> bool | None:
    """Whether reward ``name`` declares itself differentiable (None when only building it can tell, e.g. a
    composite, whose answer depends on its members)."""
    factory = _FACTORIES[name]
    return factory.differentiable if inspect.isclass(factory) else None


def converted_kwargs(name: str, kwargs: dict) -> dict:
    """``kwargs`` of reward ``name`` with string values converted to the declared types; ValueError naming the
    reward and the keyword for an unknown reward or keyword, or a value that does not convert (nothing is built)."""
    if name not in _FACTORIES:
        raise ValueError(f"unknown reward {name!r}; registered rewards: {', '.join(names())}")
    declared = parameters(name)
    if not declared:
        return dict(kwargs)
    unknown = sorted(set(kwargs) - set(declared))
    if unknown:
        raise ValueError(f"reward {name!r} takes no keyword {', '.join(map(repr, unknown))}; "
                         f"it accepts {', '.join(sorted(declared))}")
    return {k: _convert(name, k, v, declared[k]) if isinstance(v, str) else v for k, v in kwargs.items()}


def get(name: str, **kwargs) -> Reward:
    """Builds the reward registered as ``name`` with the factory's keyword arguments (e.g. ``device``)."""
    kwargs = converted_kwargs(name, kwargs)
    return _FACTORIES[name](**kwargs)
