"""2-bit packing of ternary weights in the layout of HF transformers' BitNet integration.

A ternary matrix ``T`` of shape ``(out, in)`` with values in {-1, 0, +1} is stored as codes ``c = T + 1`` in {0, 1, 2},
four codes per byte, in a uint8 tensor of shape ``(R, in)`` with ``R = ceil(out / 4)``:

    row ``i * R + r`` of ``T`` lives in bits ``2i .. 2i+1`` of packed row ``r``   (i in 0..3, r in 0..R-1)

This is the layout that ``transformers.integrations.bitnet.unpack_weights`` reads, so a converted folder loads in stock
transformers. Rows past ``out`` (when ``out`` is not a multiple of 4) are padding and hold code 1 (weight 0), so a kernel
that reads them computes zeros; stock transformers itself only accepts ``out % 4 == 0``, which the converter checks.
"""

from __future__ import annotations

import torch

VALUES_PER_BYTE = 4


def packed_rows(out_features: int) -> int:
    """Number of packed uint8 rows for ``out_features`` ternary rows: ``ceil(out / 4)``."""
    return (out_features + VALUES_PER_BYTE - 1) // VALUES_PER_BYTE


def pack_ternary(ternary: torch.Tensor) -> torch.Tensor:
    """Pack an integer tensor ``(out, in)`` with values in {-1, 0, 1} into uint8 ``(ceil(out/4), in)``.

    Raises ``ValueError`` if a value lies outside {-1, 0, 1} (packing would silently corrupt it).
    """
    if ternary.dim() != 2:
        raise ValueError(f"pack_ternary expects a 2-D (out, in) tensor, got shape {tuple(ternary.shape)}")
    if ternary.numel() and (ternary.min() < -1 or ternary.max() > 1):
        raise ValueError("pack_ternary expects values in {-1, 0, 1}")
    out_features, in_features = ternary.shape
    rows = packed_rows(out_features)
    codes = torch.ones((VALUES_PER_BYTE * rows, in_features), dtype=torch.uint8, device=ternary.device)
    codes[:out_features] = (ternary.to(torch.int16) + 1).to(torch.uint8)
    codes = codes.view(VALUES_PER_BYTE, rows, in_features)
    packed = codes[0] | (codes[1] << 2) | (codes[2] << 4) | (codes[3] << 6)
    return packed.contiguous()


def unpack_ternary(packed: torch.Tensor, out_features: int) -> torch.Tensor:
    """Inverse of :func:`pack_ternary`: uint8 ``(ceil(out/4), in)`` -> int8 ``(out, in)`` in {-1, 0, 1}."""
    if packed.dtype != torch.uint8 or packed.dim() != 2:
        raise ValueError(f"unpack_ternary expects a 2-D uint8 tensor, got {packed.dtype} {tuple(packed.shape)}")
    if packed.shape[0] != packed_rows(out_features):
        raise ValueError(
            f"packed tensor has {packed.shape[0]} rows, expected ceil({out_features}/4) = {packed_rows(out_features)}"
        )
    shifts = torch.arange(0, 2 * VALUES_PER_BYTE, 2, dtype=torch.uint8, device=packed.device).view(-1, 1, 1)
    codes = (packed.unsqueeze(0) >> shifts) & 3  # (4, R, in)
    return (codes.reshape(-1, packed.shape[1])[:out_features].to(torch.int8) - 1).contiguous()
