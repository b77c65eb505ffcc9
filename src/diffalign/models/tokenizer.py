"""OpenAI CLIP's BPE tokenizer, built offline from the vocabulary file shipped with the package.

``assets/bpe_simple_vocab_16e6.txt.gz`` is OpenAI CLIP's BPE merges file (MIT), the same file open_clip and
clip-anytorch ship. :func:`clip_tokenizer` converts it the way Hugging Face converted it for
``openai/clip-vit-*``: vocab = the 256 byte characters, their ``</w>`` forms, the first 48,894 merges joined,
then ``<|startoftext|>`` and ``<|endoftext|>`` (49,408 tokens; "a" = 320, BOS 49406, EOS 49407).
"""

from __future__ import annotations

import functools
import gzip
import json
from importlib import resources
from pathlib import Path

from transformers import CLIPTokenizer

_NUM_MERGES = 49152 - 256 - 2


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte → printable unicode character table."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars)))


@functools.lru_cache(maxsize=1)
def clip_vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """The CLIP vocabulary (token → id) and BPE merges, read from the packaged merges file."""
    data = resources.files("diffalign.models").joinpath("assets/bpe_simple_vocab_16e6.txt.gz").read_bytes()
    lines = gzip.decompress(data).decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : _NUM_MERGES + 1]]
    vocab = list(_bytes_to_unicode().values())
    vocab += [token + "</w>" for token in vocab]
    vocab += ["".join(merge) for merge in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    return {token: index for index, token in enumerate(vocab)}, merges


@functools.lru_cache(maxsize=4)
def clip_tokenizer(model_max_length: int = 77) -> CLIPTokenizer:
    """OpenAI CLIP's tokenizer (ids identical to ``openai/clip-vit-large-patch14``), built without a hub."""
    vocab, merges = clip_vocab_and_merges()
    return CLIPTokenizer(vocab=dict(vocab), merges=list(merges), model_max_length=model_max_length)


def save_clip_tokenizer(directory: str | Path, model_max_length: int = 77) -> Path:
    """Writes the CLIP tokenizer to ``directory`` in the layout ``CLIPTokenizer.from_pretrained`` reads.

    Besides ``tokenizer.json`` it writes ``vocab.json`` and ``merges.txt``, which older transformers need.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    clip_tokenizer(model_max_length).save_pretrained(directory)
    vocab, merges = clip_vocab_and_merges()
    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    lines = ["#version: 0.2"] + [" ".join(merge) for merge in merges]
    (directory / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return directory


