"""Guard rails of the layout (DESIGN.md "Layout"): imports point down only.

    images ← samplers ← models ← rollout ← algorithms / steering ← evaluate ← train ← cli / serve

rewards, prompts and world sit beside the chain (rewards and prompts may import world; world imports nothing of
diffalign outside world/), and none of them imports train, cli or serve. ``diffalign.images`` (pure tensor helpers)
is the bottom layer everybody may import. Every module under src/diffalign is parsed with ``ast``, not imported:
lazy imports inside functions count too. Each failure names the module, the line and the import that breaks
the rule.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "diffalign"

#: Layers that sit below train/: they never import the recipes, the CLI or the server.
BELOW_TRAIN = ("samplers", "models", "rollout", "rewards", "prompts", "algorithms", "steering", "evaluate", "world")
TOP_LAYERS = ("train", "cli", "serve")
#: Layers whose code is pure method math: no distributed machinery.
NO_ACCELERATE = ("algorithms", "steering")
#: The diffalign layers a layer may import, for the layers with a closed list (itself is always allowed).
ALLOWED = {
    "images": (),
    "samplers": ("images",),
    "models": ("samplers", "images"),
    "world": ("images",),
}
#: Layers a layer must not import, for the ones whose rule is a ban (the chain above them, or a side layer).
FORBIDDEN = {
    "rollout": ("algorithms", "steering", "evaluate"),
    "algorithms": ("evaluate",),
    "steering": ("evaluate",),
    "evaluate": ("rewards",),
}
MAX_ALGORITHM_LINES = 300


def module_name(path: Path) -> str:
    """``src/diffalign/samplers/ddim.py`` → ``diffalign.samplers.ddim`` (a package's ``__init__`` → the package)."""
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer(module: str) -> str:
    """The layer of a diffalign module: ``diffalign.samplers.ddim`` → ``samplers``, ``diffalign.cli`` → ``cli``
    (``""`` for the root package)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def imports(source: str, module: str, is_package: bool = False) -> list[tuple[int, str]]:
    """``(line, imported module)`` for every import statement in ``source``, anywhere in it (functions, ``if``
    blocks), relative imports resolved against ``module``; ``from diffalign import x`` yields ``diffalign.x``
    (and ``from . import x`` the package's ``x``)."""
    package = module if is_package else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target == "diffalign" or (node.level and not node.module):  # names may be modules: keep them
                found += [(node.lineno, f"{target}.{alias.name}") for alias in node.names]
            else:
                found.append((node.lineno, target))
    return found


def violations(module: str, found: list[tuple[int, str]], lines: int | None = None) -> list[str]:
    """Every rule ``module`` breaks with the imports ``found`` (and its line count, for algorithms/)."""
    own = layer(module)
    broken = []
    for lineno, target in found:
        where = f"{module}:{lineno} imports {target}"
        top = target.split(".")[0]
        if own in NO_ACCELERATE and top == "accelerate":
            broken.append(f"{where}: {own}/ never imports accelerate (the loop in train/ owns it)")
        if top != "diffalign":
            continue
        other = layer(target)
        if not other or other == own or other == "images":
            continue
        if own in BELOW_TRAIN and other in TOP_LAYERS:
            broken.append(f"{where}: {own}/ sits below train/, cli and serve/ and must not import them")
        elif own in ALLOWED and other not in ALLOWED[own]:
            allowed = ", ".join([own, *ALLOWED[own]]) if ALLOWED[own] else own
            broken.append(f"{where}: {own}/ may import only {allowed} (and diffalign.images) from diffalign")
        elif other in FORBIDDEN.get(own, ()):
            broken.append(f"{where}: {own}/ must not import {other}/ (arrows point down only)")
    if own == "algorithms" and lines is not None and lines > MAX_ALGORITHM_LINES:
        broken.append(f"{module} has {lines} lines: a method file stays within {MAX_ALGORITHM_LINES} (STYLE.md 1)")
    return broken


def package_violations() -> list[str]:
    broken = []
    for path in sorted(SRC.rglob("*.py")):
        source = path.read_text(encoding="utf-8")
        module = module_name(path)
        broken += violations(module, imports(source, module, path.name == "__init__.py"), len(source.splitlines()))
    return broken


def test_every_module_respects_the_layering():
    broken = package_violations()
    assert not broken, "layering rules broken:\n  " + "\n  ".join(broken)


def test_the_scan_sees_the_package():
    """The scan finds the modules and their imports (so the test above cannot pass by reading nothing)."""
    modules = {module_name(path) for path in SRC.rglob("*.py")}
    assert {"diffalign.samplers.ddim", "diffalign.rollout", "diffalign.world.scenes", "diffalign"} <= modules
    rollout = SRC / "rollout.py"
    assert "diffalign.samplers" in {target for _, target in imports(rollout.read_text(), "diffalign.rollout")}


def test_imports_resolves_relative_lazy_and_root_imports():
    source = (
        "import accelerate\n"
        "from diffalign import prompts, rewards\n"
        "from . import ddim\n"
        "from ..train.loop import train\n"
        "def f():\n"
        "    from diffalign.cli import main\n"
    )
    assert imports(source, "diffalign.samplers.noising") == [
        (1, "accelerate"), (2, "diffalign.prompts"), (2, "diffalign.rewards"), (3, "diffalign.samplers.ddim"),
        (4, "diffalign.train.loop"), (6, "diffalign.cli"),
    ]
    assert imports("from .ddim import x\n", "diffalign.samplers", is_package=True) == [(1, "diffalign.samplers.ddim")]


@pytest.mark.parametrize(
    "module, target, rule",
    [
        ("diffalign.rewards.shapes", "diffalign.train.loop", "below train/"),
        ("diffalign.evaluate.report", "diffalign.cli", "below train/"),
        ("diffalign.world.scenes", "diffalign.serve.app", "below train/"),
        ("diffalign.algorithms.ddpo", "accelerate", "never imports accelerate"),
        ("diffalign.steering.fk", "accelerate.utils", "never imports accelerate"),
        ("diffalign.samplers.ddim", "diffalign.models.policy", "may import only samplers"),
        ("diffalign.models.loading", "diffalign.world.scenes", "may import only models, samplers"),
        ("diffalign.models.shapes", "diffalign.rollout", "may import only models, samplers"),
        ("diffalign.world.render", "diffalign.rewards.shapes", "may import only world"),
        ("diffalign.images", "diffalign.samplers", "may import only images"),
        ("diffalign.evaluate.plots", "diffalign.rewards.base", "must not import rewards/"),
        ("diffalign.rollout", "diffalign.algorithms.ddpo", "must not import algorithms/"),
        ("diffalign.algorithms.dav", "diffalign.evaluate.judges", "must not import evaluate/"),
    ],
)
def test_each_rule_names_the_module_and_the_import(module, target, rule):
    (message,) = violations(module, [(7, target)])
    assert message.startswith(f"{module}:7 imports {target}") and rule in message


@pytest.mark.parametrize(
    "module, target",
    [
        ("diffalign.samplers.noising", "diffalign.samplers.ddim"),
        ("diffalign.samplers.ddim", "diffalign.images"),
        ("diffalign.models.shapes", "diffalign.models.tiny"),
        ("diffalign.models.policy", "diffalign.samplers"),
        ("diffalign.rewards.shapes", "diffalign.world.detector"),
        ("diffalign.prompts.shapes", "diffalign.world.captions"),
        ("diffalign.evaluate.plots", "diffalign.images"),
        ("diffalign.algorithms.dav", "diffalign.steering.search"),
        ("diffalign.train.loop", "accelerate"),
        ("diffalign.train.loop", "diffalign.rewards"),
        ("diffalign.cli", "diffalign.train.loop"),
    ],
)
def test_allowed_imports_pass(module, target):
    assert violations(module, [(1, target)]) == []


def test_algorithm_files_stay_short():
    assert violations("diffalign.algorithms.ddpo", [], lines=MAX_ALGORITHM_LINES) == []
    (message,) = violations("diffalign.algorithms.ddpo", [], lines=MAX_ALGORITHM_LINES + 1)
    assert "diffalign.algorithms.ddpo has 301 lines" in message
