"""Ternary weights in the layout of ONNX Runtime's contrib op ``com.microsoft::MatMulNBits`` with ``bits=2``.

MatMulNBits computes ``Y = A @ W^T`` for A (..., K) and W (N, K) stored in blocks of ``block_size`` columns:

    B            uint8 (N, ceil(K/bs), bs/4)   code of W[n, j*bs + 4*i + l] in bits 2l..2l+1 of B[n, j, i]
    scales       fp32  (N * ceil(K/bs),)        one per block
    zero_points  uint8 (N * ceil(ceil(K/bs)/4),) 2-bit zero points, packed the same way per row
    W[n, k] = (code - zero_point) * scale

A ternary matrix maps onto it exactly: code = T + 1, zero point 1, every block's scale g = 1 / weight_scale; columns
past K (when bs does not divide K) hold code 1, weight 0. The difference to BitLinear lies in the activations:
MatMulNBits multiplies float activations (accuracy_level 0), or at accuracy_level 4 quantizes them to int8 per block
of ``bs`` columns, not per token; :class:`~bitconvert.export.modules.MatMulNBitsLinear` therefore quantizes per token
in the graph first and documents what level 4 changes.

``bits=8`` (:func:`to_matmulnbits_int8`, the ``--lm-head int8`` option) stores any float matrix: B uint8
(N, ceil(K/bs), bs) holds one code per byte, zero points one byte per block (128), and each block's scale is its
absmax / 127, so W[n, k] = (code - 128) * scale with |code - 128| <= 127 (symmetric, round half to even).
"""

from __future__ import annotations

import torch

from ..packing import unpack_ternary

BLOCK_SIZES = (128, 64, 32, 16)  # block sizes ONNX Runtime's 2-bit CPU kernels take, largest first
ZERO_POINT = 1


def block_size_for(in_features: int) -> int:
    """The largest supported block size dividing K (no padding), else 32."""
    return next((size for size in BLOCK_SIZES if in_features % size == 0), 32)


def _pack_codes(codes: torch.Tensor) -> torch.Tensor:
    """uint8 (..., 4m) codes in {0..3} -> uint8 (..., m), code 4i + l in bits 2l..2l+1 of byte i."""
    quads = codes.reshape(*codes.shape[:-1], -1, 4)
    return quads[..., 0] | (quads[..., 1] << 2) | (quads[..., 2] << 4) | (quads[..., 3] << 6)


def _unpack_codes(packed: torch.Tensor) -> torch.Tensor:
    shifts = torch.arange(0, 8, 2, dtype=torch.uint8)
    return ((packed.unsqueeze(-1) >> shifts) & 3).reshape(*packed.shape[:-1], -1)


def to_matmulnbits(weight: torch.Tensor, weight_scale: torch.Tensor, out_features: int, block_size: int):
    """HF BitNet packed ``weight`` uint8 (ceil(N/4), K) and ``weight_scale`` (1,) -> (B, scales, zero_points)."""
    ternary = unpack_ternary(weight, out_features)
    in_features = ternary.shape[1]
    blocks = -(-in_features // block_size)
    codes = torch.ones((out_features, blocks * block_size), dtype=torch.uint8)
    codes[:, :in_features] = (ternary + 1).to(torch.uint8)
    b = _pack_codes(codes.reshape(out_features, blocks, block_size))
    scales = (1.0 / weight_scale.float()).expand(out_features * blocks).contiguous()
    zero_codes = torch.full((out_features, -(-blocks // 4) * 4), ZERO_POINT, dtype=torch.uint8)
    zero_points = _pack_codes(zero_codes).reshape(-1)
    return b.contiguous(), scales, zero_points.contiguous()


INT8_ZERO_POINT = 128


def to_matmulnbits_int8(weight: torch.Tensor, block_size: int):
    """A float matrix (N, K) -> MatMulNBits bits=8 (B, scales, zero_points); see the module docstring."""
    out_features, in_features = weight.shape
    blocks = -(-in_features // block_size)
    padded = torch.zeros((out_features, blocks * block_size), dtype=torch.float32)
    padded[:, :in_features] = weight.float()
    padded = padded.reshape(out_features, blocks, block_size)
    scales = padded.abs().amax(-1) / 127
    safe = torch.where(scales > 0, scales, torch.ones(()))
    codes = (torch.round(padded / safe.unsqueeze(-1)).clamp(-127, 127) + INT8_ZERO_POINT).to(torch.uint8)
    zero_points = torch.full((out_features * blocks,), INT8_ZERO_POINT, dtype=torch.uint8)
    return codes.contiguous(), scales.reshape(-1).contiguous(), zero_points


def dequantize(b: torch.Tensor, scales: torch.Tensor, zero_points: torch.Tensor, k: int, n: int,
               block_size: int, bits: int = 2) -> torch.Tensor:
    """The float matrix W (N, K) that MatMulNBits multiplies by, from its 2-bit (or 8-bit) blocks."""
    blocks = b.shape[1]
    if bits == 8:
        codes, zeros = b.float(), zero_points.reshape(n, blocks).float()
    else:
        codes = _unpack_codes(b).float()  # (N, blocks, bs)
        zeros = _unpack_codes(zero_points.reshape(n, -1))[:, :blocks].float()
    weight = (codes - zeros.unsqueeze(-1)) * scales.reshape(n, blocks, 1)
    return weight.reshape(n, blocks * block_size)[:, :k]
