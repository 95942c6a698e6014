"""torchao-style entry point: ``quantize_(model, TernaryConfig(...))`` swaps LLaMA's projections for BitLinear in place.

Only the Linear layers of attention (q, k, v, o) and MLP (gate, up, down) inside the decoder layers are swapped;
``lm_head``, embeddings, norms and rotary stay in high precision. The config is data: ``mode="train"`` gives
:class:`~bitconvert.bitlinear.BitLinear` (latent weights + STE, for QAT), ``mode="packed"`` gives
:class:`~bitconvert.bitlinear.PackedBitLinear` (2-bit weights, for inference). :func:`pack_` turns a trained model
into the packed form.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch.nn as nn

from .bitlinear import BITLINEAR_SCALE_METHODS, BitLinear, PackedBitLinear

ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
TERNARY_PROJECTIONS = ATTENTION_PROJECTIONS + MLP_PROJECTIONS
# SubLN sits right before the output projection of each block (BitNet b1.58 2B4T, BitDistill).
SUB_NORM_PROJECTIONS = ("o_proj", "down_proj")

# "model.layers.3.self_attn.q_proj" -> projection "q_proj"
PROJECTION_PATH = re.compile(r"^(?:.*\.)?layers\.\d+\.(?:self_attn|mlp)\.(%s)$" % "|".join(TERNARY_PROJECTIONS))


@dataclass(frozen=True)
class TernaryConfig:
    """How to swap a model's projections.

    mode:          "train" (latent weights + straight-through estimator) or "packed" (2-bit inference weights)
    weight_scale:  "absmean" (BitNet b1.58), "absmedian" (BitNet b1.58 Reloaded), or "learned" (an fp32 parameter per
                   projection trained with LSQ gradients, initialised to absmean; train mode)
    sub_norm:      insert SubLN (RMSNorm, gain 1) before o_proj and down_proj
    sub_norm_eps:  that norm's epsilon (1e-5, as BitNet b1.58 2B4T)
    quant_lambda:  initial interpolation between full precision (0) and ternary (1), train mode only
    projections:   which projection names to swap
    """

    mode: str = "train"
    weight_scale: str = "absmean"
    sub_norm: bool = False
    sub_norm_eps: float = 1e-5
    quant_lambda: float = 1.0
    projections: tuple[str, ...] = field(default=TERNARY_PROJECTIONS)

    def __post_init__(self):
        if self.mode not in ("train", "packed"):
            raise ValueError(f"TernaryConfig.mode must be 'train' or 'packed', got {self.mode!r}")
        if self.weight_scale not in BITLINEAR_SCALE_METHODS:
            raise ValueError(f"TernaryConfig.weight_scale must be one of {BITLINEAR_SCALE_METHODS}")
        unknown = set(self.projections) - set(TERNARY_PROJECTIONS)
        if unknown:
            raise ValueError(f"unknown projections {sorted(unknown)}; known: {', '.join(TERNARY_PROJECTIONS)}")


def ternary_projections(model: nn.Module, projections=TERNARY_PROJECTIONS):
    """Yield ``(qualified_name, projection_name, module)`` for every attention/MLP projection of ``model``."""
    for name, module in model.named_modules():
        match = PROJECTION_PATH.match(name)
        if match and match.group(1) in projections:
            yield name, match.group(1), module


def quantize_(model: nn.Module, config: TernaryConfig) -> nn.Module:
    """Swap the attention and MLP ``nn.Linear`` layers of ``model`` in place; returns ``model``.

    Raises ``ValueError`` when the model has no such layers (not a LLaMA-style decoder).
    """
    swapped = 0
    for name, projection, module in list(ternary_projections(model, config.projections)):
        if not isinstance(module, nn.Linear):
            continue
        bitlinear = BitLinear.from_linear(
            module,
            weight_scale_method=config.weight_scale,
            sub_norm=config.sub_norm and projection in SUB_NORM_PROJECTIONS,
            sub_norm_eps=config.sub_norm_eps,
            quant_lambda=config.quant_lambda,
        )
        model.set_submodule(name, PackedBitLinear.from_bitlinear(bitlinear) if config.mode == "packed" else bitlinear)
        swapped += 1
    if swapped == 0:
        raise ValueError("quantize_ found no attention/MLP nn.Linear layers (q/k/v/o_proj, gate/up/down_proj) to swap")
    return model


def pack_(model: nn.Module) -> nn.Module:
    """Replace every training-mode :class:`BitLinear` of ``model`` by its :class:`PackedBitLinear`, in place."""
    for name, module in list(model.named_modules()):
        if isinstance(module, BitLinear):
            model.set_submodule(name, PackedBitLinear.from_bitlinear(module))
    return model


def set_quant_lambda(model: nn.Module, value: float) -> None:
    """Set ``quant_lambda`` of every :class:`BitLinear` in ``model`` (the QAT warm-up schedule calls this)."""
    for module in model.modules():
        if isinstance(module, BitLinear):
            module.quant_lambda = value
