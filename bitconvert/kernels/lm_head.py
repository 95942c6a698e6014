"""The output projection (``lm_head``) at inference: exact float, or int8 on the C++ core.

A ternary model keeps its ``lm_head`` in float; at batch 1 it is read whole for every token (vocab x hidden values:
113 MB in fp32 for SmolLM2, 805 MB for a 49K-vocab 7B-shaped model), often more bytes than all ternary layers.
:class:`Int8LmHead` stores it as int8 rows with one fp32 scale each and multiplies int8 activations quantized per
block of 32 columns (``csrc/int8_core.h`` states the math):

    y[t][o] = d[o] * sum_b e[t][b] * sum_{k in b} x_q[t][k] * W_q[o][k]

a quarter of the fp32 bytes. It is an inference option (``bitconvert.load(path, lm_head="int8")``): the saved folder
keeps the float weights. With tied embeddings the embedding table stays float for the lookup and the int8 copy adds
``vocab x stride`` bytes plus 4 bytes per row; untied, the float ``lm_head`` is released.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from . import int8_quantize_rows, int8_linear

LM_HEADS = ("exact", "int8")


class Int8LmHead(nn.Module):
    """``nn.Linear``'s replacement for the output projection: x float (..., in) -> fp32 (..., out), no bias.

    Buffers (not saved in state dicts): ``weight_q`` int8 (out, stride), ``row_scale`` fp32 (out,).
    """

    def __init__(self, weight: torch.Tensor, isa: int = -1, threads: int = 0):
        super().__init__()
        self.in_features = weight.shape[1]
        self.out_features = weight.shape[0]
        weight_q, row_scale = int8_quantize_rows(weight.detach())
        self.register_buffer("weight_q", weight_q, persistent=False)
        self.register_buffer("row_scale", row_scale, persistent=False)
        self.isa = isa
        self.threads = threads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        y = int8_linear(flat, self.weight_q, self.row_scale, self.isa, self.threads)
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 rows + per-row scale"


def replace_lm_head(model, kind: str) -> None:
    """Give ``model`` (a transformers causal LM) the ``kind`` lm_head from :data:`LM_HEADS`; "exact" keeps it."""
    if kind not in LM_HEADS:
        raise ValueError(f"unknown lm_head {kind!r}; choose one of {', '.join(LM_HEADS)}")
    if kind == "int8":
        model.lm_head = Int8LmHead(model.lm_head.weight)
