"""Sliding-window perplexity of a causal LM on a text.

Each step scores the next ``stride`` tokens not yet scored, in a window of up to ``seq_len`` tokens that ends with
them, so every token after the first is predicted exactly once, with at least ``seq_len - stride`` tokens of context
(except at the start). ``ppl = exp(sum(nll) / count)``.
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
    progress_bar = tqdm(total=total - 1, desc="perplexity", unit="token", disable=not progress)
    while scored_until < total:
        end = min(scored_until + stride, total)
        begin = max(0, end - seq_len)
        logits = model(token_ids[begin:end].unsqueeze(0)).logits[0].float()
        # position j of the window predicts token begin + j + 1; score the targets [scored_until, end)
        targets = torch.arange(scored_until, end)
        log_probs = F.log_softmax(logits[targets - begin - 1], dim=-1)
        nll_sum -= log_probs.gather(1, token_ids[targets].unsqueeze(1)).sum().item()
        counted += targets.numel()
        progress_bar.update(targets.numel())
        scored_until = end
    progress_bar.close()
    nll = nll_sum / counted
    return PerplexityResult(math.exp(nll), nll, counted, seq_len, stride)
