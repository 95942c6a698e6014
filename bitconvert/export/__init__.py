"""ONNX export of converted models and their ONNX Runtime deployment.

    export_onnx(model, "model.onnx", op="ternary" | "matmulnbits")   the exporter (:mod:`.exporter`)
    session("model.onnx")         an onnxruntime.InferenceSession with the TernaryMatMul library registered
    custom_op_library()           the path of that library (compiled on first use, cached) for your own sessions

Importing this package registers ONNX schemas for ``com.bitconvert::TernaryMatMul`` and ``com.microsoft::MatMulNBits``
with the ``onnx`` package (for the exporter, the checker and shape inference).
"""

from .exporter import export_onnx
from .runtime import custom_op_library, session

__all__ = ["custom_op_library", "export_onnx", "session"]
