"""The quantization warm-up schedule (lambda) of QAT.

``lambda(step) = min(step / warmup_steps, 1)`` where ``step`` counts optimizer steps already taken (0 for the first
one), so the first step runs the full-precision forward and every step from ``warmup_steps`` on is fully ternary;
``warmup_steps = 0`` means ternary from the start. Every BitLinear computes
``W_eff = W + lambda (quant(W) - W)`` and the same for activations (see :mod:`bitconvert.bitlinear`).
"""

from __future__ import annotations


def quant_lambda(step: int, warmup_steps: int) -> float:
    """lambda in [0, 1] for the optimizer step ``step`` (0-based)."""
    if warmup_steps <= 0:
        return 1.0
    return min(step / warmup_steps, 1.0)
