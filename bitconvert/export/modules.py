"""Export-time stand-ins for :class:`~bitconvert.bitlinear.PackedBitLinear`, one per ONNX operator choice.

Both keep the packed weights as buffers (they become 2-bit initializers) and call one custom torch op that the
exporter translates to one ONNX node (:mod:`bitconvert.export.ops`). Shapes: x (..., in) -> y (..., out), fp32.
Also: :func:`fuse_projections` stacks q/k/v and gate/up into one TernaryMatMul each (exact: per-segment scales),
and :class:`Int8LmHead` replaces the float ``lm_head`` by MatMulNBits bits=8 (the ``--lm-head int8`` option),
:class:`Int6LmHead` by bitconvert's Int6MatMul (``--lm-head int6``).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..bitlinear import PackedBitLinear, fake_quantize_activations
from ..packing import pack_ternary, unpack_ternary
from . import ops  # noqa: F401  (registers torch.ops.bitconvert_export)
from .matmulnbits import block_size_for, to_matmulnbits, to_matmulnbits_int8

OPS = ("ternary", "matmulnbits")


def rms_norm_epsilon(norm: nn.Module) -> float:
    """An RMSNorm module's epsilon (transformers' ``variance_epsilon``, else ``eps``)."""
    return getattr(norm, "variance_epsilon", None) or getattr(norm, "eps")


def is_bare_ternary(module: nn.Module | None) -> bool:
    """``module`` is a TernaryMatMulLinear without sub-norm or bias: y = its TernaryMatMul node's output alone."""
    return isinstance(module, TernaryMatMulLinear) and module.sub_norm is None and module.bias is None


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


class FusedTernaryMatMulLinear(nn.Module):
    """Several TernaryMatMulLinear of one input stacked into one node: y = [y_1 | ... | y_m], each y_i bit for bit
    its own projection (one weight_scale per segment, see ``segments`` in :mod:`bitconvert.export.ops`)."""

    def __init__(self, parts: list[TernaryMatMulLinear]):
        super().__init__()
        self.segments = [part.out_features for part in parts]
        self.out_features = sum(self.segments)
        ternary = torch.cat([unpack_ternary(part.weight, part.out_features) for part in parts])
        self.register_buffer("weight", pack_ternary(ternary))
        self.register_buffer("weight_scale", torch.cat([part.weight_scale for part in parts]))

    @staticmethod
    def can_fuse(parts: list[nn.Module]) -> bool:
        """Same input, no sub-norm or bias, and every segment but the last a whole number of the op's 16-row tiles."""
        return all(map(is_bare_ternary, parts)) and all(part.out_features % 16 == 0 for part in parts[:-1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.bitconvert_export.ternary_matmul(x, self.weight, self.weight_scale, self.out_features,
                                                          self.segments)

    def normed(self, x: torch.Tensor, skip: torch.Tensor | None, norm: nn.Module,
               activation: str = "") -> tuple[torch.Tensor, torch.Tensor]:
        """(this product of norm(h), h) with h = x + skip (x without skip), ``norm`` an RMSNorm (weight, epsilon),
        in one node: the norm folded into the TernaryMatMul (``normed_ternary_matmul``). ``activation="swiglu"``
        (a fused (gate, up) pair): the product's output is silu(gate) * up, (..., N/2), computed in the same node."""
        y, total = torch.ops.bitconvert_export.normed_ternary_matmul(
            x, skip, norm.weight.float(), rms_norm_epsilon(norm), self.weight, self.weight_scale, self.out_features,
            self.segments, activation)
        return y, (x if skip is None else total)


def fuse_projections(model: nn.Module) -> int:
    """Give every decoder layer whose q/k/v (gate/up) can be fused a ``qkv_proj`` (``gate_up_proj``) module and
    drop the separate ones (in place); returns how many fused modules were made."""
    fused = 0
    for layer in model.model.layers:
        for owner, names, target in ((layer.self_attn, ("q_proj", "k_proj", "v_proj"), "qkv_proj"),
                                     (layer.mlp, ("gate_proj", "up_proj"), "gate_up_proj")):
            parts = [getattr(owner, name, None) for name in names]
            if FusedTernaryMatMulLinear.can_fuse(parts):
                setattr(owner, target, FusedTernaryMatMulLinear(parts))
                for name in names:
                    delattr(owner, name)
                fused += 1
    return fused


class Int8LmHead(nn.Module):
    """``lm_head`` as ``com.microsoft::MatMulNBits`` bits=8, accuracy_level 4: weights int8 per block of
    ``block_size`` columns (absmax scale, :func:`~bitconvert.export.matmulnbits.to_matmulnbits_int8`), and ORT
    quantizes the activations to int8 per block too, so the product is int8 x int8 with float scales. A quarter of
    the fp32 bytes (plus one fp32 scale per block); an approximation, measured in docs/export.md. A tied embedding
    keeps its float table for the input Gather: this module holds its own int8 copy."""

    ACCURACY_LEVEL = 4

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.out_features, self.in_features = linear.weight.shape
        self.block_size = block_size_for(self.in_features)
        b, scales, zero_points = to_matmulnbits_int8(linear.weight.detach(), self.block_size)
        self.register_buffer("b", b)
        self.register_buffer("scales", scales)
        self.register_buffer("zero_points", zero_points)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.ops.bitconvert_export.matmul_nbits(x.float(), self.b, self.scales, self.zero_points,
                                                     self.in_features, self.out_features, self.block_size,
                                                     self.ACCURACY_LEVEL, 8)
        return y if self.bias is None else y + self.bias


class _CoreLmHead(nn.Module):
    """``lm_head`` as one node of bitconvert's library on the kernels' own quantized rows: ``quantize_rows`` (a
    ``bitconvert.kernels`` function: float (N, K) -> codes, scales) at export, ``product`` (a
    ``torch.ops.bitconvert_export`` op: x, codes, scales, N -> (..., N)) in the graph. A tied embedding keeps its float
    table for the input Gather."""

    def __init__(self, linear: nn.Linear, quantize_rows, product):
        super().__init__()
        self.out_features = linear.weight.shape[0]
        self.product = product
        w_q, d = quantize_rows(linear.weight.detach().float().contiguous())
        self.register_buffer("w_q", w_q)
        self.register_buffer("d", d)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.product(x.float(), self.w_q, self.d, self.out_features)
        return y if self.bias is None else y + self.bias


class Int6LmHead(_CoreLmHead):
    """``lm_head`` as ``com.bitconvert::Int6MatMul``: codes in [-31, 31] with one fp16 scale per row and 32-column
    block (6.5 bits per weight, llama.cpp's Q6_K: 6.56), activations int8 per 32-column block: the int6 head of
    ``bitconvert.load(..., lm_head="int6")`` (:class:`bitconvert.kernels.lm_head.Int6LmHead`), the same codes and the
    same core, so ONNX Runtime's logits equal PyTorch's bit for bit on the same SIMD path. An approximation (SmolLM2:
    perplexity +1.1%, docs/kernels.md)."""

    def __init__(self, linear: nn.Linear):
        from ..kernels import int6_quantize_rows

        super().__init__(linear, int6_quantize_rows, torch.ops.bitconvert_export.int6_matmul)


class Int8RowLmHead(_CoreLmHead):
    """``lm_head`` as ``com.bitconvert::Int8MatMul``: int8 codes with one fp32 scale per row, activations int8 per
    32-column block: the int8 head of ``bitconvert.load(..., lm_head="int8")`` (the same codes and core, so ONNX
    Runtime's logits equal PyTorch's bit for bit on the same SIMD path; SmolLM2 perplexity +0.19%, docs/kernels.md).
    Against :class:`Int8LmHead` (MatMulNBits) it reads 8.06 bits per weight instead of 9 and streams each row in
    one pass."""

    def __init__(self, linear: nn.Linear):
        from ..kernels import int8_quantize_rows

        super().__init__(linear, int8_quantize_rows, torch.ops.bitconvert_export.int8_matmul)


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
