"""Training recipes: the online loop, pretraining and distillation of the ShapesWorld models, reward models.

Importing this package registers how the cached built-in ``shapes-turbo`` model is made on first use
(:func:`diffalign.models.loading.register_builder`; models/ sits below train/ and cannot import the recipe).
"""

from pathlib import Path

from diffalign.models.loading import register_builder


def _build_shapes_turbo(path: Path) -> Path:
    from diffalign.train.distill_shapes import build_cached

    return build_cached(path)


register_builder("shapes-turbo", _build_shapes_turbo)
