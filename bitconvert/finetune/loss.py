"""Training losses: next-token cross-entropy, optionally mixed with logit distillation from a frozen teacher.

Shapes: ``logits`` (B, T, V) predict ``ids`` (B, T) shifted by one, so positions ``0..T-2`` are scored.
    ce  = mean over scored tokens of -log softmax(student)[next token]
    kl  = tau^2 * mean over scored tokens of KL(softmax(teacher / tau) || softmax(student / tau))
    loss = (1 - alpha) * ce + alpha * kl + beta * hidden
    hidden = mean over the L decoder layers' outputs and the tokens of 1 - cos(h_student, h_teacher)   (TernaryLLM)
The ``tau^2`` factor keeps the gradient scale of the soft term independent of the temperature (Hinton et al., 2015).
The temperature ~5 follows BitDistill (logit distillation part only; its attention-relation term is not used).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def cross_entropy(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy (fp32)."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())


def distillation_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``tau^2 * KL(teacher || student)`` at temperature ``tau``, averaged over the scored tokens (fp32)."""
    student = F.log_softmax(student_logits[:, :-1].flatten(0, 1).float() / temperature, dim=-1)
    teacher = F.log_softmax(teacher_logits[:, :-1].flatten(0, 1).float() / temperature, dim=-1)
    return F.kl_div(student, teacher, log_target=True, reduction="batchmean") * temperature**2


def hidden_cosine(student_hidden, teacher_hidden) -> torch.Tensor:
    """Mean over layers and tokens of ``1 - cos(h_s, h_t)``; inputs are the models' ``hidden_states`` tuples of
    (B, T, H) tensors (embeddings first, skipped: they are the same float tensor in both models)."""
    pairs = list(zip(student_hidden[1:], teacher_hidden[1:]))
    return torch.stack([(1 - F.cosine_similarity(s.float(), t.float(), dim=-1)).mean() for s, t in pairs]).mean()
