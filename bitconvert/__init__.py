"""bitconvert: turn a pretrained LLaMA into a ternary BitNet b1.58 model.

The Python API mirrors the CLI: ``bitconvert.convert(source, out)`` and ``bitconvert.load(path)``; ``quantize_`` /
``pack_`` with a :class:`TernaryConfig` swap the layers of a model already in memory.
"""

from . import convert, load  # modules that are also callable: bitconvert.convert(...), bitconvert.load(...)
from .bitlinear import BitLinear, PackedBitLinear
from .convert import CalibrationConfig, ConvertOptions
from .quantize import TernaryConfig, pack_, quantize_, set_quant_lambda

__version__ = "0.1.0"
__all__ = ["BitLinear", "PackedBitLinear", "TernaryConfig", "quantize_", "pack_", "set_quant_lambda", "convert",
           "ConvertOptions", "CalibrationConfig", "load"]
