"""Sliding-window perplexity of a causal LM on a text.

The token stream is cut into windows of ``seq_len`` tokens that start every ``stride`` tokens; each window scores
only the tokens not scored by the previous one, so every token after the first is predicted once, with at least
``seq_len - stride`` tokens of context (except at the start). ``ppl = exp(sum(nll) / count)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .errors import BitconvertError


@dataclass
class PerplexityResult:
    perplexity: float
    nll: float
    tokens: int
    seq_len: int
    stride: int


@torch.no_grad()
def perplexity(model, token_ids: torch.Tensor, seq_len: int = 1024, stride: int = 512, progress: bool = True) -> PerplexityResult:
    """Perplexity of ``model`` on the 1-D ``token_ids``; ``stride`` <= ``seq_len``."""
    if not 0 < stride <= seq_len:
        raise BitconvertError(f"--stride must lie in 1..--seq-len ({seq_len}), got {stride}")
    total = token_ids.numel()
    if total < 2:
        raise BitconvertError("the text has fewer than 2 tokens; give a longer --text")
    nll_sum, counted, scored_until = 0.0, 0, 1  # token 0 has no prediction
    starts = range(0, max(total - 1, 1), stride)
    for begin in tqdm(starts, desc="perplexity", unit="window", disable=not progress):
        end = min(begin + seq_len, total)
        window = token_ids[begin:end].unsqueeze(0)
        logits = model(window).logits[0].float()
        # position j predicts token begin + j + 1; score targets in [scored_until, end)
        targets = torch.arange(max(scored_until, begin + 1), end)
        if targets.numel():
            log_probs = F.log_softmax(logits[targets - begin - 1], dim=-1)
            nll_sum -= log_probs.gather(1, token_ids[targets].unsqueeze(1)).sum().item()
            counted += targets.numel()
        scored_until = end
        if end == total:
            break
    nll = nll_sum / counted
    return PerplexityResult(math.exp(nll), nll, counted, seq_len, stride)
