"""Error compensation across columns on a fixed ternary grid {-a, 0, a} (GPTQ, arXiv 2210.17323; OBQ).

Columns of ``W`` (out, in) are quantized one at a time, in order of decreasing ``diag(H)`` ("act order"); after column
``j`` is rounded to the grid, the rounding error ``e = (w_j - q_j) / [H^-1]_jj`` is spread over the columns not yet
quantized, ``W[:, k] -= e [H^-1]_jk``, which is the least-squares correction of the layer output ``X W^T`` for the
calibration inputs (``H = X^T X + damp``). ``[H^-1]`` is used through its upper Cholesky factor, as in GPTQ, and the
updates are applied lazily in blocks of columns. The grid scale ``a`` is fixed beforehand (from
:mod:`.scale_search`); afterwards the scale is re-fitted to the final codes (``a* = tr(W H T^T) / tr(T H T^T)``),
which can only lower the error further.
"""

from __future__ import annotations

import torch

from .scale_search import OutputError, TernaryFit

DAMP = 0.01  # fraction of mean(diag H) added to the diagonal (GPTQ's default)
BLOCK = 128


def _inverse_cholesky(h: torch.Tensor) -> torch.Tensor:
    """Upper Cholesky factor of ``H^-1`` (in, in), with ``DAMP`` (raised until ``H`` is positive definite).

    ``h`` is the caller's own copy and is damped in place: at 7B shapes (in = 11,008) each (in, in) fp32 matrix is
    485 MB, so no identity matrix or damped copy is made, and the factor is freed as soon as it is inverted."""
    damp = (DAMP * h.diagonal().mean().clamp(min=1e-8)).item()
    added = 0.0
    for attempt in range(6):
        h.diagonal().add_(damp * (10**attempt) - added)
        added = damp * (10**attempt)
        factor, info = torch.linalg.cholesky_ex(h)
        if info == 0:
            inverse = torch.cholesky_inverse(factor)
            del factor
            return torch.linalg.cholesky(inverse, upper=True)
    raise RuntimeError("calibration Hessian is not positive definite even after damping")


def gptq_codes(weight: torch.Tensor, h: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Ternary codes int8 (out, in) for ``weight`` on the grid ``scale * {-1, 0, 1}`` with GPTQ error compensation."""
    weight = weight.float().clone()
    diagonal = h.diagonal().float().clone()
    dead = diagonal == 0  # inputs that never fire: their columns do not matter, quantize them to zero
    diagonal[dead] = 1.0
    weight[:, dead] = 0.0
    order = torch.argsort(diagonal, descending=True)
    weight = weight[:, order]
    ordered = h.float()[order][:, order]  # the one (in, in) copy, damped and factored in place
    ordered.diagonal()[dead[order]] = 1.0
    inverse = _inverse_cholesky(ordered)
    del ordered
    scale = scale.float()
    codes = torch.zeros_like(weight, dtype=torch.int8)
    columns = weight.shape[1]
    for start in range(0, columns, BLOCK):
        end = min(start + BLOCK, columns)
        block = weight[:, start:end].clone()
        errors = torch.zeros_like(block)
        block_inverse = inverse[start:end, start:end]
        for i in range(end - start):
            column = block[:, i]
            code = (column / scale).round().clamp(-1, 1)
            codes[:, start + i] = code.to(torch.int8)
            error = (column - code * scale) / block_inverse[i, i]
            block[:, i:] -= error.unsqueeze(1) * block_inverse[i, i:].unsqueeze(0)
            errors[:, i] = error
        weight[:, end:] -= errors @ inverse[start:end, end:]
    result = torch.empty_like(codes)
    result[:, order] = codes
    return result


def gptq_fit(objective: OutputError, start: TernaryFit) -> TernaryFit:
    """GPTQ codes for ``objective``'s weight on ``start``'s grid (from ``H = X^T X`` of its inputs) with the scale
    re-fitted; ``start`` itself if that is not better."""
    codes = gptq_codes(objective.weight, objective.inputs.hessian(), start.scale)
    scale, error = objective.best_scale(codes)
    if not error < start.error:
        return start
    return TernaryFit(codes, scale, error, start.absmean_error, objective.base.item())
