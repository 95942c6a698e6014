"""bitconvert: turn a pretrained LLaMA into a ternary BitNet b1.58 model."""

from .bitlinear import BitLinear, PackedBitLinear
from .quantize import TernaryConfig, pack_, quantize_, set_quant_lambda

__version__ = "0.1.0"
__all__ = ["BitLinear", "PackedBitLinear", "TernaryConfig", "quantize_", "pack_", "set_quant_lambda"]
