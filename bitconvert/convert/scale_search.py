"""Per-tensor ternary scale and rounding threshold chosen for the layer's output error on calibration activations.

For a projection ``W`` (out, in) fed inputs ``X`` (N, in), with ``H = X^T X`` (in, in), the output error of the
ternary weight ``a T`` (``T`` in {-1, 0, 1}, one scale ``a``) is

    E(T, a) = ||X W^T - X (a T)^T||_F^2 = tr(W H W^T) - 2 a tr(W H T^T) + a^2 tr(T H T^T),

minimised over ``a`` by ``a* = tr(W H T^T) / tr(T H T^T)``, leaving ``E(T) = tr(W H W^T) - tr(W H T^T)^2 / tr(T H T^T)``.
Candidates for ``T``: thresholds ``T = sign(W) [|W| > delta]`` on a grid of ``delta / mean|W|``, the absmean codes
(BitNet's ``clamp(round(W / mean|W|))``), and a TWN-style alternating fit started from the best of those
(``T = clamp(round(W / a))``, then ``a = a*(T)``, while ``E`` falls). The absmean pair is always a candidate, so the
choice never has a larger output error than absmean on the calibration batch (up to the fp32 rounding of the traces).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..bitlinear import EPS, ternarize, weight_scale

# delta / mean|W| tried; TWN's optimum for Gaussian weights is about 0.7 mean|W| (absmean rounding uses 0.5).
THRESHOLD_GRID = tuple(0.4 + 0.1 * i for i in range(6))
ALTERNATING_STEPS = 4


@dataclass
class TernaryFit:
    """Codes ``T`` int8 (out, in), scale ``a`` fp32 0-dim, and the output error ``E`` (and absmean's) as floats."""

    codes: torch.Tensor
    scale: torch.Tensor
    error: float
    absmean_error: float


def hessian(x: torch.Tensor) -> torch.Tensor:
    """``H = X^T X`` (in, in) in fp32 for inputs ``x`` (..., in)."""
    flat = x.reshape(-1, x.shape[-1]).float()
    return flat.t() @ flat


class OutputError:
    """Evaluates ``E(T)`` and ``a*(T)`` for one ``W`` and ``H`` (the traces in float64 from fp32 products)."""

    def __init__(self, weight: torch.Tensor, h: torch.Tensor):
        self.weight = weight.float()
        self.h = h.float()
        self.wh = self.weight @ self.h
        self.base = (self.wh * self.weight).sum(dtype=torch.float64)

    def best_scale(self, codes: torch.Tensor) -> tuple[torch.Tensor, float]:
        """``(a*, E)`` for ``codes``; all-zero codes give ``a = 1e-5`` and ``E = tr(W H W^T)``."""
        t = codes.float()
        cross = (self.wh * t).sum(dtype=torch.float64)
        power = ((t @ self.h) * t).sum(dtype=torch.float64)
        if power <= 0 or cross <= 0:
            return torch.tensor(EPS), self.base.item()
        scale = (cross / power).float().clamp(min=EPS)
        return scale, (self.base - 2 * scale.double() * cross + scale.double() ** 2 * power).item()

    def error(self, codes: torch.Tensor, scale: torch.Tensor) -> float:
        t = codes.float()
        cross = (self.wh * t).sum(dtype=torch.float64)
        power = ((t @ self.h) * t).sum(dtype=torch.float64)
        return (self.base - 2 * scale.double() * cross + scale.double() ** 2 * power).item()


def absmean_fit(weight: torch.Tensor, h: torch.Tensor | None = None) -> TernaryFit:
    """BitNet's round-to-nearest: ``g = mean|W|``, ``T = clamp(round(W / g))`` (errors NaN without ``h``)."""
    scale = weight_scale(weight)
    codes = ternarize(weight, scale)
    error = OutputError(weight, h).error(codes, scale) if h is not None else float("nan")
    return TernaryFit(codes, scale, error, error)


def search_scale(weight: torch.Tensor, h: torch.Tensor, thresholds: tuple[float, ...] = THRESHOLD_GRID,
                 alternating_steps: int = ALTERNATING_STEPS) -> TernaryFit:
    """The codes and scale of smallest output error among the candidates in the module docstring (``thresholds``:
    the grid of ``delta / mean|W|``)."""
    weight = weight.float()
    objective = OutputError(weight, h)
    absmean = absmean_fit(weight)
    absmean_error = objective.error(absmean.codes, absmean.scale)
    best = TernaryFit(absmean.codes, absmean.scale, absmean_error, absmean_error)
    magnitude = weight.abs()
    mean = magnitude.mean().clamp(min=EPS)
    sign = weight.sign().to(torch.int8)
    for ratio in thresholds:
        codes = sign * (magnitude > ratio * mean)
        scale, error = objective.best_scale(codes)
        if error < best.error:
            best = TernaryFit(codes, scale, error, absmean_error)
    for _ in range(alternating_steps):
        codes = ternarize(weight, best.scale)
        scale, error = objective.best_scale(codes)
        if not error < best.error:
            break
        best = TernaryFit(codes, scale, error, absmean_error)
    return best
