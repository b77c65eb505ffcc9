"""Fuzzed prompt files and prompts: empty, binary, huge, non-UTF-8, very long lines, odd names. A file either
gives exactly its non-blank lines as prompts (which the model then encodes), or a ValueError naming the file."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import torch
from fuzz_helpers import assert_clear_error, fuzz
from hypothesis import event, given
from hypothesis import strategies as st

from diffalign import prompts
from diffalign.config import preset, replace
from diffalign.models import Policy


@pytest.fixture(scope="module")
def policy(tiny_pipeline):
    return Policy.from_pipeline(tiny_pipeline)


def expected_prompts(data: bytes) -> tuple[str, ...] | None:
    """What a prompt file holding ``data`` means: its stripped non-blank lines, or None when it is not a usable
    text file (not UTF-8, binary with NUL characters, or no prompt at all). A leading byte-order mark is dropped."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        return None
    if "\0" in text:
        return None
    lines = tuple(line.strip() for line in text.splitlines() if line.strip())
    return lines or None


TEXT = st.text(st.characters(codec="utf-8"), max_size=200)
LINES = st.lists(st.text(st.characters(codec="utf-8", exclude_characters="\0"), max_size=40), max_size=12)
FILE_CONTENTS = st.one_of(
    st.binary(max_size=300),                                                     # anything, mostly not UTF-8
    TEXT.map(lambda t: t.encode("utf-8")),                                       # UTF-8, NULs and all
    LINES.map(lambda ls: "\n".join(ls).encode("utf-8")),                         # clean prompt lines
    LINES.map(lambda ls: ("\ufeff" + "\r\n".join(ls)).encode("utf-8")),          # BOM and CRLF (Windows)
    LINES.map(lambda ls: "\n".join(ls).encode("utf-16")),                        # another encoding
    LINES.map(lambda ls: "\n".join(ls).encode("latin-1", errors="replace")),     # a legacy 8-bit encoding
    st.sampled_from([b"", b"\n\n", b"  \t \r\n", b"\x00", b"cat\x00dog", b"\xff\xfe", b"\xed\xa0\x80"]),
    st.tuples(st.sampled_from(["a ", "cat ", "\u00e9", "\U0001f431"]), st.integers(1_000, 60_000))
    .map(lambda t: (t[0] * t[1]).encode("utf-8")),                               # one very long line
)


@fuzz(200)
@given(data=FILE_CONTENTS, suffix=st.sampled_from([".txt", ".prompts", ""]))
def test_a_prompt_file_gives_its_lines_or_an_error_naming_it(data, suffix):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"prompts{suffix}"
        path.write_bytes(data)
        expected = expected_prompts(data)
        event("usable" if expected else "rejected")
        if expected is None:
            with pytest.raises(ValueError) as raised:
                prompts.get(str(path))
            assert_clear_error(raised.value, str(path))
            errors = replace(preset("ddpo-tiny"), prompts=str(path)).validate()
            assert len(errors) == 1 and errors[0].startswith("prompts: ") and str(path) in errors[0], errors
            return
        source = prompts.get(str(path))
        assert source.prompts == expected
        drawn = source.draw(5, torch.Generator().manual_seed(0))
        assert len(drawn) == 5 and set(drawn) <= set(expected)
        assert replace(preset("ddpo-tiny"), prompts=str(path)).validate() == []


@fuzz(10)
@given(lines=st.lists(st.text(st.characters(codec="utf-8", exclude_characters="\0"), min_size=1, max_size=30)
                      .filter(str.strip), min_size=1, max_size=4),
       long=st.integers(0, 10_000))
def test_every_usable_prompt_encodes_to_finite_embeddings(lines, long, policy):
    """Whatever a file holds (emoji, control characters, a 10k-character line), the model reads it: CLIP
    truncates to its 77 tokens."""
    lines = [*lines, "x" * long] if long else lines
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "p.txt"
        path.write_text("\n".join(lines), encoding="utf-8")
        source = prompts.get(str(path))
    embeddings = policy.encode_prompts(list(source.prompts))
    assert embeddings.shape == (len(source.prompts), 77, 32) and torch.isfinite(embeddings).all()


def test_a_huge_prompt_file_loads():
    """8 MB of prompts: read whole, every line a prompt."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "huge.txt"
        path.write_text("".join(f"prompt number {i}\n" for i in range(400_000)), encoding="utf-8")
        source = prompts.get(str(path))
    assert len(source.prompts) == 400_000 and source.prompts[-1] == "prompt number 399999"


@fuzz(100)
@given(name=st.one_of(st.text(max_size=30), st.sampled_from(["\0", "a\0b.txt", "x" * 300, "y" * 5000 + ".txt",
                                                               "/", ".", "..", "~", "~/nothing.txt", "/dev/null",
                                                               "simple_animals", "shapes_heldout"])))
def test_any_prompt_source_name_is_a_source_or_a_value_error(name):
    """Registered names load; anything else (a missing file, a folder, a name the file system refuses) is a
    ValueError naming it, never an OSError from the file system."""
    try:
        source = prompts.get(name)
    except ValueError as error:
        assert_clear_error(error)
        assert repr(name)[1:-1][:100] in str(error) or str(Path(name).expanduser())[:100] in str(error), str(error)
        event("rejected")
        return
    event("loaded")
    drawn = source.draw(3, torch.Generator().manual_seed(0))
    assert len(drawn) == 3 and all(isinstance(p, str) and p.strip() for p in drawn)


@fuzz(60)
@given(batch=st.lists(st.one_of(
    st.tuples(st.text(max_size=10), st.sampled_from(["", "\udcff", "\ud83d"]), st.text(max_size=5)).map("".join),
    st.none(), st.integers(), st.binary(max_size=4)), min_size=1, max_size=3))
def test_prompts_that_are_not_text_are_named(batch, policy):
    """Prompts given in code (a surrogate from undecodable bytes, None, bytes): a ValueError naming the prompt."""
    clean = all(isinstance(p, str) for p in batch) and all(
        not any(0xD800 <= ord(c) <= 0xDFFF for c in p) for p in batch)
    if clean:
        assert policy.encode_prompts(batch).shape == (len(batch), 77, 32)
        return
    with pytest.raises(ValueError) as raised:
        policy.encode_prompts(batch)
    bad = next(i for i, p in enumerate(batch) if not isinstance(p, str) or any(0xD800 <= ord(c) <= 0xDFFF for c in p))
    assert_clear_error(raised.value, f"prompt {bad}")
