"""Shared fixtures: tiny random LLaMA folders (made once per session) and their conversions."""

from __future__ import annotations

import os
import random
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing in the tests may reach a hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from tiny import make_tiny_llama  # noqa: E402


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    """A tiny random LLaMA (GQA, untied embeddings) with a byte-level tokenizer."""
    return make_tiny_llama(tmp_path_factory.mktemp("tiny") / "src")


@pytest.fixture(scope="session")
def tiny_ternary(tiny_llama, tmp_path_factory) -> Path:
    """``tiny_llama`` converted with default options."""
    from bitconvert.convert import convert

    out = tmp_path_factory.mktemp("tiny-out") / "ternary"
    convert(tiny_llama, out, progress=False)
    return out


WORDS = "the cat sat on a mat and then it ran to the big red house where a dog was sleeping".split()


@pytest.fixture(scope="session")
def text_file(tmp_path_factory) -> Path:
    """A small training text: 300 lines of 12 words drawn (seeded) from WORDS."""
    rng = random.Random(0)
    path = tmp_path_factory.mktemp("text") / "train.txt"
    path.write_text("\n".join(" ".join(rng.choice(WORDS) for _ in range(12)) for _ in range(300)))
    return path


@pytest.fixture(scope="session")
def calib_text(tmp_path_factory) -> Path:
    """Byte-level calibration text for the tiny models: 1,600 tokens, enough for three 512-token sequences."""
    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_text("The quick brown fox jumps over the lazy dog while the cat sleeps.\n" * 25)
    return path
