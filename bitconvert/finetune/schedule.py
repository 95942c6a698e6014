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


# Warm-ups scaled to the run when the user leaves them out: a fraction of the steps, capped at the long-run values
# (HF's Llama3-8B 1.58-bit recipe: 1000 lambda steps; nanoGPT-style 100 LR steps).
AUTO_QUANT_WARMUP_FRACTION, AUTO_QUANT_WARMUP_CAP = 0.1, 1000
AUTO_LR_WARMUP_FRACTION, AUTO_LR_WARMUP_CAP = 0.05, 100
# Peak LR when the user leaves it out. From a converted folder (ternary from step 0, learned scales): 3e-3. Measured on
# SmolLM2-135M from the block-reconstructed folder, distillation, 4 x 256-token batches, bf16, the written model's
# held-out perplexity (docs/finetune.md): 237.6 at 3e-3 against 251.5 at 1e-3 and 322.8 at 3e-4 after 30,720 tokens;
# 176.3 against 206.1 at 1e-3 after 100,352 tokens. From a full-precision model (lambda warm-up): 3e-4, the rate the
# README's QAT runs used (1e-3 diverged there once lambda reached 1).
DEFAULT_LR_CONVERTED, DEFAULT_LR_FULL_PRECISION = 3e-3, 3e-4


def resolve_lr(lr: float | None, student_is_ternary: bool) -> float:
    """The peak learning rate: ``lr`` if given, else the default for the kind of start (see the constants above)."""
    if lr is not None:
        return lr
    return DEFAULT_LR_CONVERTED if student_is_ternary else DEFAULT_LR_FULL_PRECISION


def resolve_warmups(total_steps: int, quant_warmup: int | None, lr_warmup: int | None,
                    student_is_ternary: bool) -> tuple[int, int]:
    """``(lambda warm-up, LR warm-up)`` in steps for a run of ``total_steps``.

    ``None`` means "fit the run": lambda warm-up ``min(round(0.1 * total), 1000)`` (0 when the student is already a
    ternary model, i.e. starts from a converted folder), LR warm-up ``max(1, min(round(0.05 * total), 100))``.
    Given values are kept, but a run whose warm-up does not finish before its last step is refused: its written
    ternary model would never have been trained at lambda = 1 (or at the peak LR). Raises ``ValueError`` with the
    user-facing sentence.
    """
    if quant_warmup is None:
        quant_warmup = 0 if student_is_ternary else min(round(AUTO_QUANT_WARMUP_FRACTION * total_steps),
                                                        AUTO_QUANT_WARMUP_CAP)
    elif student_is_ternary and quant_warmup > 0:
        raise ValueError("a converted folder is ternary from the start: leave out --warmup-quant-steps (or give 0)")
    elif quant_warmup >= total_steps:
        raise ValueError(f"--warmup-quant-steps {quant_warmup} does not finish within the run's {total_steps} steps, "
                         f"so the written ternary model would never be trained fully ternary; leave it out (auto: "
                         f"{min(round(AUTO_QUANT_WARMUP_FRACTION * total_steps), AUTO_QUANT_WARMUP_CAP)}) or give less")
    if lr_warmup is None:
        lr_warmup = max(1, min(round(AUTO_LR_WARMUP_FRACTION * total_steps), AUTO_LR_WARMUP_CAP))
    elif lr_warmup >= total_steps:
        raise ValueError(f"--lr-warmup-steps {lr_warmup} does not finish within the run's {total_steps} steps; leave it "
                         f"out (auto: {max(1, min(round(AUTO_LR_WARMUP_FRACTION * total_steps), AUTO_LR_WARMUP_CAP))}) "
                         f"or give less")
    return quant_warmup, lr_warmup
