"""The schedules of QAT: quantization warm-up (lambda) and learning rate.

``lambda(step) = min(step / warmup_steps, 1)`` where ``step`` counts optimizer steps already taken (0 for the first
one), so the first step runs the full-precision forward and every step from ``warmup_steps`` on is fully ternary;
``warmup_steps = 0`` means ternary from the start. Every BitLinear computes
``W_eff = W + lambda (quant(W) - W)`` and the same for activations (see :mod:`bitconvert.bitlinear`).
"""

from __future__ import annotations

import math


def quant_lambda(step: int, warmup_steps: int) -> float:
    """lambda in [0, 1] for the optimizer step ``step`` (0-based)."""
    if warmup_steps <= 0:
        return 1.0
    return min(step / warmup_steps, 1.0)


def lr_multiplier(step: int, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """Factor on the peak LR for optimizer step ``step`` (0-based), nanoGPT style:
    linear warm-up ``(step + 1) / (warmup_steps + 1)`` (never 0, so no step is wasted), then cosine decay from 1 to
    ``min_ratio`` at ``total_steps``, and ``min_ratio`` after that."""
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    progress = min((step - warmup_steps) / max(1, total_steps - warmup_steps), 1.0)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
