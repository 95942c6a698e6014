"""The output projection (``lm_head``) at inference: exact float, or int8 / int6 / int4 on the C++ core.

A ternary model keeps its ``lm_head`` in float; at batch 1 it is read whole for every token (vocab x hidden values:
113 MB in fp32 for SmolLM2, 805 MB for a 49K-vocab 7B-shaped model), often more bytes than all ternary layers.
Both quantized heads multiply int8 activations quantized per block of 32 columns, ``(x_q, e)``, by quantized rows
(``csrc/int8_core.h`` states the math):

- :class:`Int8LmHead`: int8 rows, one fp32 scale per row, a quarter of the fp32 bytes (8.06 bits per weight):
  ``y[t][o] = d[o] * sum_b e[t][b] * sum_{k in b} x_q[t][k] * W_q[o][k]``
- :class:`Int6LmHead`: codes in [-31, 31] with one fp16 scale per row and 32-column block, 6.5 bits per weight (as
  llama.cpp's Q6_K, 6.56), 19% fewer bytes than int8:
  ``y[t][o] = sum_b d[o][b] * e[t][b] * sum_{k in b} x_q[t][k] * c[o][k]``
- :class:`Int4LmHead`: codes in [-7, 7] (two per byte) with one fp32 scale per row and 32-column block, 5 bits per
  weight, the same formula (lossy on real models: docs/kernels.md)

They are inference options (``bitconvert.load(path, lm_head="int8" | "int6" | "int4")``): the saved folder keeps
the float weights. With tied embeddings the embedding table stays float for the lookup and the quantized copy adds
its bytes (:meth:`QuantizedLmHead.weight_bytes`); untied, the float ``lm_head`` is released.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from . import int4_linear, int4_quantize_rows, int6_linear, int6_quantize_rows, int8_linear, int8_quantize_rows
from .pages import on_huge_pages

LM_HEADS = ("exact", "int8", "int6", "int4")


class QuantizedLmHead(nn.Module):
    """``nn.Linear``'s replacement for the output projection: x float (..., in) -> fp32 (..., out), no bias.

    Buffers (not saved in state dicts): ``weight_q`` (the codes) and ``scale`` (fp32; fp16 for int6), as the
    subclass's static ``quantize(weight)`` returns them; its static ``product(x, weight_q, scale, isa, threads)``
    is the kernel and ``kind`` its description.
    """

    def __init__(self, weight: torch.Tensor, isa: int = -1, threads: int = 0):
        super().__init__()
        self.in_features = weight.shape[1]
        self.out_features = weight.shape[0]
        weight_q, scale = self.quantize(weight.detach())
        self.register_buffer("weight_q", on_huge_pages(weight_q), persistent=False)
        self.register_buffer("scale", scale, persistent=False)
        self.isa = isa
        self.threads = threads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        y = self.product(flat, self.weight_q, self.scale, self.isa, self.threads)
        return y.reshape(*x.shape[:-1], self.out_features)

    def weight_bytes(self) -> int:
        """Bytes read per token: the codes and the scales."""
        return sum(t.numel() * t.element_size() for t in (self.weight_q, self.scale))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.kind}"


class Int8LmHead(QuantizedLmHead):
    """int8 rows (out, stride) + fp32 per-row scales (out,)."""

    kind = "int8 rows + per-row scale"
    quantize = staticmethod(int8_quantize_rows)
    product = staticmethod(int8_linear)


class Int6LmHead(QuantizedLmHead):
    """int6 codes (out, stride * 3 / 4) + fp16 scales per row and 32-column block (out, stride / 32).

    Per block of 32 columns, ``d = the smallest fp16 >= max|w| / 31`` and ``c = round(w / d)`` in [-31, 31], stored
    ``c + 32`` as Q6_K splits it: per 64 columns 32 bytes of low nibbles and 16 bytes of high 2-bit fields, the two
    blocks' 4-column runs alternating (``csrc/int8_core.h``), so that one broadcast scale pair serves a whole
    64-column integer dot product:
    ``y[t][o] = sum_b d[o][b] * e[t][b] * sum_{k in b} x_q[t][k] * c[o][k]``. fp16 scales, not fp32: 6.5 bits
    per weight instead of 7 (19% fewer bytes than int8 rather than 13%), and their 11 significant bits are far
    finer than the 6-bit codes; d rounded up keeps every code unclamped, so
    ``|w - d c| <= d / 2``. Weights beyond fp16's range for d (|w| > 31 * 65504) are refused.
    """

    kind = "int6 codes + fp16 per-32-column-block scale"
    quantize = staticmethod(int6_quantize_rows)
    product = staticmethod(int6_linear)


class Int4LmHead(QuantizedLmHead):
    """int4 codes, two per byte (out, stride / 2) + fp32 scales per row and 32-column block (out, stride / 32)."""

    kind = "int4 codes + per-32-column-block scale"
    quantize = staticmethod(int4_quantize_rows)
    product = staticmethod(int4_linear)


HEAD_CLASSES = {"int8": Int8LmHead, "int6": Int6LmHead, "int4": Int4LmHead}


def replace_lm_head(model, kind: str) -> None:
    """Give ``model`` (a transformers causal LM) the ``kind`` lm_head from :data:`LM_HEADS`; "exact" keeps it."""
    if kind not in LM_HEADS:
        raise ValueError(f"unknown lm_head {kind!r}; choose one of {', '.join(LM_HEADS)}")
    if kind in HEAD_CLASSES:
        model.lm_head = HEAD_CLASSES[kind](model.lm_head.weight)
