"""Conversion of a full-precision LLaMA checkpoint into the ternary BitNet b1.58 folder format."""

from .calibrate import CalibrationConfig
from .pipeline import ConvertOptions, ConvertResult, convert

__all__ = ["CalibrationConfig", "ConvertOptions", "ConvertResult", "convert"]

from .._callable_module import make_callable

make_callable(__name__, "convert")  # bitconvert.convert(source, out, ...) mirrors the CLI
