"""Prompt sources: DDPO's sets shipped as package data, text files, and (world/) the ShapesWorld grammar.

A source draws prompts with an explicit generator: ``source.draw(n, generator)`` → n prompts, drawn uniformly
with replacement (as DDPO's prompt functions do). :func:`get` builds a source from a registered name or from the
path of a text file with one prompt per line.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch


@dataclass(frozen=True)
class PromptList:
    """A fixed list of prompts drawn uniformly with replacement."""

    name: str
    prompts: tuple[str, ...]

    def __post_init__(self):
        if not self.prompts:
            raise ValueError(f"prompt source {self.name!r} has no prompts")

    def draw(self, n: int, generator: torch.Generator) -> list[str]:
        """``n`` prompts drawn uniformly with replacement using ``generator``."""
        indices = torch.randint(len(self.prompts), (n,), generator=generator)
        return [self.prompts[i] for i in indices.tolist()]


def _asset_lines(name: str) -> list[str]:
    text = resources.files("diffalign.prompts").joinpath(f"assets/{name}.txt").read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip()]


def read_prompt_file(path: str | Path) -> PromptList:
    """Prompts from a UTF-8 text file, one per line (blank lines and a byte-order mark skipped); a missing, empty,
    unreadable, binary or non-UTF-8 file is an error naming it."""
    path = Path(path).expanduser()
    kind = _kind(path)
    if kind != "file":
        problem = "is a folder" if kind == "folder" else "does not exist"
        raise ValueError(f"prompt file {str(path)!r} {problem} (give a text file with one prompt per line)")
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except OSError as error:
        raise ValueError(f"prompt file {str(path)!r} cannot be read ({error.strerror or error})") from None
    except UnicodeDecodeError as error:
        raise ValueError(f"prompt file {str(path)!r} is not UTF-8 text (byte {error.start}: {error.reason}); save it "
                         "as UTF-8") from None
    if "\0" in text:
        raise ValueError(f"prompt file {str(path)!r} holds a NUL character (at character {text.index(chr(0))}): a "
                         "binary file, not text with one prompt per line")
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        raise ValueError(f"prompt file {str(path)!r} is empty (it needs one prompt per line)")
    return PromptList(str(path), tuple(lines))


def _kind(path: Path) -> str | None:
    """"file", "folder", or None for a missing path or a name the file system refuses (too long, a NUL character)."""
    try:
        return "file" if path.is_file() else "folder" if path.is_dir() else None
    except (OSError, ValueError):
        return None


def _article(noun: str) -> str:
    return f"an {noun}" if noun[0].lower() in "aeiou" else f"a {noun}"


def nouns_activities() -> PromptList:
    """DDPO's prompt-alignment set: "{a/an animal} {activity}", e.g. "a cat riding a bike" (45 × 3 prompts)."""
    prompts = [f"{_article(noun)} {activity}" for noun in _asset_lines("simple_animals") for activity in
               _asset_lines("activities")]
    return PromptList("nouns_activities", tuple(prompts))


def _shapes(split: str = "train"):
    from diffalign.prompts.shapes import ShapesPrompts

    return ShapesPrompts(split=split)


_SOURCES: dict[str, Callable[[], object]] = {
    "simple_animals": lambda: PromptList("simple_animals", tuple(_asset_lines("simple_animals"))),
    "imagenet_all": lambda: PromptList("imagenet_all", tuple(_asset_lines("imagenet_classes"))),
    "imagenet_animals": lambda: PromptList("imagenet_animals", tuple(_asset_lines("imagenet_classes")[:398])),
    "imagenet_dogs": lambda: PromptList("imagenet_dogs", tuple(_asset_lines("imagenet_classes")[151:269])),
    "nouns_activities": nouns_activities,
    "shapes": lambda: _shapes("train"),
    "shapes_heldout": lambda: _shapes("heldout"),
}


def names() -> list[str]:
    """The registered prompt-source names."""
    return sorted(_SOURCES)


def get(name: str):
    """The prompt source registered as ``name``, or the prompts of the text file at path ``name``."""
    if name in _SOURCES:
        return _SOURCES[name]()
    if _kind(Path(name).expanduser()) or name.endswith(".txt"):
        return read_prompt_file(name)
    raise ValueError(f"unknown prompt source {name!r}; use one of {', '.join(names())} or a path to a .txt file")


def check(name: str) -> None:
    """Raises ValueError unless ``name`` is a registered source or an existing, non-empty prompt file."""
    if name not in _SOURCES:
        get(name)


__all__: Sequence[str] = ["PromptList", "check", "get", "names", "read_prompt_file"]
