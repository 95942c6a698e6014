"""Export-time stand-ins for :class:`~bitconvert.bitlinear.PackedBitLinear`, one per ONNX operator choice.

Both keep the packed weights as buffers (they become 2-bit initializers) and call one custom torch op that the
exporter translates to one ONNX node (:mod:`bitconvert.export.ops`). Shapes: x (..., in) -> y (..., out), fp32.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..bitlinear import PackedBitLinear, fake_quantize_activations
from . import ops  # noqa: F401  (registers torch.ops.bitconvert_export)
from .matmulnbits import block_size_for, to_matmulnbits

OPS = ("ternary", "matmulnbits")


class _ExportLinear(nn.Module):
    """Shared parts: the optional sub-norm before and bias after the matmul, as in PackedBitLinear.forward."""

    def __init__(self, module: PackedBitLinear):
        super().__init__()
        self.in_features = module.in_features
        self.out_features = module.out_features
        self.sub_norm = module.sub_norm
        self.register_buffer("bias", None if module.bias is None else module.bias.detach().float())

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.sub_norm is not None:
            x = self.sub_norm(x)
        y = self.matmul(x)
        return y if self.bias is None else y + self.bias


class TernaryMatMulLinear(_ExportLinear):
    """One ``com.bitconvert::TernaryMatMul`` node: exactly BitLinear (activation quantization inside the op)."""

    def __init__(self, module: PackedBitLinear):
        super().__init__(module)
        self.register_buffer("weight", module.weight.detach().clone())
        self.register_buffer("weight_scale", module.weight_scale.detach().float().reshape(1).clone())

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.bitconvert_export.ternary_matmul(x, self.weight, self.weight_scale, self.out_features)


class MatMulNBitsLinear(_ExportLinear):
    """Per-token int8 fake quantization in standard ONNX ops, then ``com.microsoft::MatMulNBits`` (bits=2).

    At ``accuracy_level`` 0 MatMulNBits multiplies the dequantized activations ``x_q / s`` in fp32, so
    ``y = sum_k (x_q/s) * T * g`` equals BitLinear's ``acc / weight_scale / s`` up to fp32 rounding. At level 4 it
    re-quantizes them to int8 per block of ``block_size`` columns (scale 127 / block max), which rounds a block's
    values again whenever its max is below the token's: a small, input-dependent error on top of BitLinear.
    """

    def __init__(self, module: PackedBitLinear, accuracy_level: int = 0):
        super().__init__(module)
        self.block_size = block_size_for(module.in_features)
        self.accuracy_level = accuracy_level
        b, scales, zero_points = to_matmulnbits(module.weight, module.weight_scale, module.out_features,
                                                self.block_size)
        self.register_buffer("b", b)
        self.register_buffer("scales", scales)
        self.register_buffer("zero_points", zero_points)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.bitconvert_export.matmul_nbits(
            fake_quantize_activations(x.float()), self.b, self.scales, self.zero_points, self.in_features,
            self.out_features, self.block_size, self.accuracy_level)


def replace_bitlinears(model: nn.Module, op: str, accuracy_level: int = 0) -> int:
    """Swap every PackedBitLinear of ``model`` for its export stand-in (in place); returns how many."""
    if op not in OPS:
        raise ValueError(f"op must be one of {OPS}, got {op!r}")
    names = [name for name, module in model.named_modules() if isinstance(module, PackedBitLinear)]
    for name in names:
        module = model.get_submodule(name)
        stand_in = TernaryMatMulLinear(module) if op == "ternary" else MatMulNBitsLinear(module, accuracy_level)
        model.set_submodule(name, stand_in)
    return len(names)
