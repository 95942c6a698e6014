"""Ternary projection weights as GGUF blocks, written from their codes with the tensor's one scale in every block.

A projection is ``W = g * T`` with ``T`` in {-1, 0, +1}, shape ``(out, in)``. GGUF stores it row by row (one output
row of ``in`` values each), every row cut into blocks of ``B`` values, each block its codes plus an fp16 scale ``d``.
Here every block gets ``d = fp16(g)``, so llama.cpp dequantizes each weight to ``T * fp16(g)``: the model's own codes,
the scale rounded once to fp16 (relative error at most 2^-11). No block is re-quantized from floats.

Layouts (llama.cpp ``ggml/src/ggml-common.h`` and ``ggml-quants.c``):

    type    id  B    bytes  layout of one block
    TQ2_0   35  256  66     qs[64], then d; value e in byte 32*(e//128) + e%32, bits 2*((e%128)//32); code T+1
    TQ1_0   34  256  54     qs[48] (5 trits per byte) + qh[4] (4 trits per byte), then d; code T+1
    Q2_0    42  64   18     d, then qs[16]; value j in byte j//4, bits 2*(j%4); code T+1
    Q8_0     8  32   34     d, then 32 int8 values (here T itself)
    F16      1  1    2      T * fp16(g) as a half float (exact: fp16(g) times -1, 0 or 1)

TQ1_0 and TQ2_0 are packed by ``gguf.quants`` from the codes as small floats (exact: each block's max is 1 or 0, so
the quantizer's rounding returns the codes unchanged), then each block's ``d`` is overwritten with ``fp16(g)``.
gguf-py (<= 0.19) has no Q2_0, and its Q8_0 quantizer would store ``max/127`` rather than ``g``; both are packed here.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from gguf import GGMLQuantizationType, quants

from ..errors import BitconvertError


@dataclass(frozen=True)
class BlockType:
    """One GGUF tensor type that holds a ternary matrix exactly: its name, type id and values per block."""

    name: str
    type_id: int
    block_size: int
    block_bytes: int


# In the order ``auto`` tries them: the fastest ternary layouts first, the exact fallbacks last.
BLOCK_TYPES = {
    "tq2_0": BlockType("TQ2_0", int(GGMLQuantizationType.TQ2_0), 256, 66),
    "q2_0": BlockType("Q2_0", 42, 64, 18),  # GGML_TYPE_Q2_0 in ggml.h; not in gguf-py <= 0.19
    "q8_0": BlockType("Q8_0", int(GGMLQuantizationType.Q8_0), 32, 34),
    "f16": BlockType("F16", int(GGMLQuantizationType.F16), 1, 2),
    "tq1_0": BlockType("TQ1_0", int(GGMLQuantizationType.TQ1_0), 256, 54),
}
AUTO_ORDER = ("tq2_0", "q2_0", "q8_0", "f16")
TYPE_CHOICES = ("auto", "tq2_0", "tq1_0", "q2_0", "q8_0")


def choose_type(name: str, in_features: int, requested: str = "auto") -> BlockType:
    """The block type for a projection with rows of ``in_features`` values: ``requested``, or under ``auto`` the first
    of TQ2_0, Q2_0, Q8_0, F16 whose block size divides the row. A forced type that does not fit is an error."""
    if requested == "auto":
        return next(BLOCK_TYPES[key] for key in AUTO_ORDER if in_features % BLOCK_TYPES[key].block_size == 0)
    if requested not in BLOCK_TYPES:
        raise BitconvertError(f"unknown --type {requested!r}; choose one of {', '.join(TYPE_CHOICES)}")
    block = BLOCK_TYPES[requested]
    if in_features % block.block_size:
        raise BitconvertError(
            f"--type {requested} needs rows that are a multiple of {block.block_size} values, but {name} has rows of "
            f"{in_features}; use --type auto (which picks an exact type per tensor)"
        )
    return block


def fp16_scale(scale: float) -> np.ndarray:
    """``g`` rounded to the nearest fp16, as the 2 little-endian bytes every block stores."""
    return np.array([scale], dtype=np.float16).view(np.uint8)


def ternary_blocks(ternary: np.ndarray, scale: float, block: BlockType) -> np.ndarray:
    """Blocks of ``g * T`` for ``T`` = ``ternary`` (int8 ``(out, in)`` in {-1, 0, 1}): uint8 ``(out, in/B * bytes)``.

    Every block's ``d`` is ``fp16(scale)``; the codes are ``T + 1`` (Q8_0: ``T``; F16: the product itself).
    """
    out_features, in_features = ternary.shape
    if in_features % block.block_size:
        raise ValueError(f"{block.name} needs rows that are a multiple of {block.block_size}, got {in_features}")
    if block.name == "F16":
        return (ternary.astype(np.float16) * np.float16(scale)).view(np.uint8)
    d = fp16_scale(scale)
    rows = out_features * (in_features // block.block_size)
    values = ternary.reshape(rows, block.block_size)
    if block.name == "Q8_0":
        blocks = np.concatenate([np.broadcast_to(d, (rows, 2)), values.view(np.uint8)], axis=1)
    elif block.name == "Q2_0":
        codes = (values + 1).astype(np.uint8).reshape(rows, block.block_size // 4, 4)
        packed = codes[..., 0] | codes[..., 1] << 2 | codes[..., 2] << 4 | codes[..., 3] << 6
        blocks = np.concatenate([np.broadcast_to(d, (rows, 2)), packed], axis=1)
    else:  # TQ1_0, TQ2_0: gguf.quants packs the codes (block max 1, or 0 for an all-zero block); d goes last
        qtype = GGMLQuantizationType(block.type_id)
        blocks = quants.quantize(values.astype(np.float32), qtype).reshape(rows, block.block_bytes)
        blocks[:, -2:] = d
    return np.ascontiguousarray(blocks).reshape(out_features, -1)
