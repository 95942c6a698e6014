"""Shared fixtures: tiny random LLaMA folders (made once per session) and their conversions."""

from __future__ import annotations

import os
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
