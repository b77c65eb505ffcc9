"""Training methods, one file each, on the protocol of :mod:`diffalign.algorithms.base`.

``ALGORITHMS`` maps a method's name to its class; adding a method is a new file and one entry here.
"""

from diffalign.algorithms.actor_critic import ActorCritic
from diffalign.algorithms.base import Algorithm, ExtraModule, MethodConfig, Minibatching
from diffalign.algorithms.dag import Dag
from diffalign.algorithms.dav import Dav
from diffalign.algorithms.ddpo import DDPO
from diffalign.algorithms.draft import Draft
from diffalign.algorithms.raft import Raft
from diffalign.algorithms.reinforce import Reinforce
from diffalign.algorithms.sdpo import SDPO
from diffalign.algorithms.trpo import TRPO

ALGORITHMS: dict[str, type[Algorithm]] = {cls.name: cls for cls in (DDPO, Reinforce, Raft, Draft, Dav, Dag, TRPO,
                                                                   ActorCritic, SDPO)}


def algorithm_name(config: MethodConfig) -> str:
    """The registered name of the method whose config ``config`` is."""
    for name, cls in ALGORITHMS.items():
        if type(config) is cls.config_class:
            return name
    raise ValueError(f"{type(config).__name__} is not the config of a registered method ({', '.join(ALGORITHMS)})")


def build(config: MethodConfig, settings, reward=None) -> Algorithm:
    """The method for ``config``, sampling with ``settings`` (and, for methods that need it, the reward)."""
    return ALGORITHMS[algorithm_name(config)](config, settings, reward)


__all__ = ["ALGORITHMS", "Algorithm", "ExtraModule", "MethodConfig", "Minibatching", "algorithm_name", "build"]
