"""The matmul operators seen by PyTorch's ONNX exporter, and what each becomes in the ONNX graph.

``torch.ops.bitconvert_export.ternary_matmul(x, weight, weight_scale, out_features)``
    x float (..., K), weight uint8 (ceil(N/4), K) (HF BitNet layout, see :mod:`bitconvert.packing`), weight_scale
    fp32 (1,) = 1/g -> fp32 (..., N) = BitLinear's ``(x_q @ T^T) / weight_scale / s``, activations quantized per token
    inside. Exported as one ``com.bitconvert::TernaryMatMul`` node (attribute ``out_features``), run in ONNX Runtime
    by the custom-op library (:mod:`bitconvert.export.runtime`). Optional: ``segments`` (N_1, ..., N_m), m stacked
    projections, one 1/g each in ``weight_scale`` (m,); ``activation="swiglu"`` with two equal segments (gate, up):
    the output is (..., N/2) = ``silu(gate) * up``, the LLaMA MLP's activation inside the node.

``torch.ops.bitconvert_export.normed_ternary_matmul(x, skip, gamma, eps, weight, weight_scale, out_features,
segments, activation)`` -> (y, h)
    ``ternary_matmul`` of ``rms_norm(h) * gamma`` with h = x + skip (x when skip is None; fp32, LLaMA's RMSNorm with
    ``eps``), and h: a layer's residual add and norm folded into the TernaryMatMul node of the product after them
    (inputs skip and gamma, attribute ``epsilon``, second output h), in place of a SkipSimplifiedLayerNormalization.
    These are TernaryMatMul's version 2 (``NORM_OP_VERSION``: two more optional inputs, one more optional output;
    version 1 nodes are version 2 nodes without them), and exported models import the domain at that version.

``torch.ops.bitconvert_export.matmul_nbits(x, b, scales, zero_points, k, n, block_size, accuracy_level)``
    The standard contrib op ``com.microsoft::MatMulNBits`` with ``bits=2`` (or 8, for the int8 lm_head; layouts in
    :mod:`bitconvert.export.matmulnbits`): ``y = x @ ((c - z) * scale)^T`` per block of ``block_size`` columns.

``torch.ops.bitconvert_export.int6_matmul(x, w_q, d, out_features)``
    The ~6-bit lm_head (``--lm-head int6``): x float (..., K), w_q uint8 (N, K' * 3 / 4) and d fp16 (N, K' / 32) as
    :func:`bitconvert.kernels.int6_quantize_rows` returns them (K' = K rounded up to 64) -> fp32 (..., N), the
    activations quantized to int8 per 32-column block inside (``bitconvert/kernels/csrc/int8_core.h``). Exported as
    one ``com.bitconvert::Int6MatMul`` node (attribute ``out_features``), in the same custom-op library.

``torch.ops.bitconvert_export.int8_matmul(x, w_q, d, out_features)``
    The per-row int8 lm_head (``--lm-head int8-row``): w_q int8 (N, K') and d fp32 (N,) as
    :func:`bitconvert.kernels.int8_quantize_rows` returns them -> fp32 (..., N), activations int8 per 32-column
    block inside: ``bitconvert.load(..., lm_head="int8")``'s product. One ``com.bitconvert::Int8MatMul`` node.

The eager implementations are the reference math (they run only while tracing and in tests); the fake (meta)
implementations give the exporter the output shapes. Importing this module also registers ONNX schemas for the
ops with the ``onnx`` package (which has none for them), so the exporter, ``onnx.checker.check_model(...,
full_check=True)`` and ``onnx.shape_inference`` know them and infer ``Y``'s shape (``X``'s, last dimension N).
"""

from __future__ import annotations

import onnx
import onnxscript
import torch
from onnx import defs

from ..bitlinear import int_matmul_reference, quantize_activations, reference_linear
from ..packing import unpack_ternary

DOMAIN = "com.bitconvert"
OP_NAME = "TernaryMatMul"
INT6_OP_NAME = "Int6MatMul"
INT8_OP_NAME = "Int8MatMul"
OP_VERSION = 1
NORM_OP_VERSION = 2  # TernaryMatMul with the folded norm; the domain version exported models import
MS_DOMAIN = "com.microsoft"

_bitconvert_opset = onnxscript.values.Opset(DOMAIN, OP_VERSION)
_bitconvert_norm_opset = onnxscript.values.Opset(DOMAIN, NORM_OP_VERSION)
_microsoft_opset = onnxscript.values.Opset(MS_DOMAIN, 1)


@torch.library.custom_op("bitconvert_export::ternary_matmul", mutates_args=())
def ternary_matmul(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, out_features: int,
                   segments: list[int] | None = None, activation: str = "") -> torch.Tensor:
    """BitLinear's inference product (pure torch, exact integer part); see the module docstring. With ``segments``
    (N_1, ..., N_m), rows are m stacked projections and ``weight_scale`` (m,) holds each one's 1/g; with
    ``activation="swiglu"`` (two equal segments) the result is ``silu(gate) * up``."""
    check_activation(out_features, segments, activation)
    flat = x.reshape(-1, x.shape[-1])
    if not segments:
        return reference_linear(flat, weight, weight_scale, out_features).reshape(*x.shape[:-1], out_features)
    x_q, act_scale = quantize_activations(flat)
    acc = int_matmul_reference(x_q, unpack_ternary(weight, out_features)).float()
    parts = [part / weight_scale[i] / act_scale for i, part in enumerate(acc.split(list(segments), dim=-1))]
    if activation:
        return (torch.nn.functional.silu(parts[0]) * parts[1]).reshape(*x.shape[:-1], out_features // 2)
    return torch.cat(parts, dim=-1).reshape(*x.shape[:-1], out_features)


@torch.library.custom_op("bitconvert_export::normed_ternary_matmul", mutates_args=())
def normed_ternary_matmul(x: torch.Tensor, skip: torch.Tensor | None, gamma: torch.Tensor, eps: float,
                          weight: torch.Tensor, weight_scale: torch.Tensor, out_features: int,
                          segments: list[int] | None = None, activation: str = "") -> tuple[torch.Tensor, torch.Tensor]:
    """(ternary_matmul(rms_norm(h) * gamma), h), h = x + skip or x; see the module docstring."""
    total = x if skip is None else x + skip
    normed = (total * torch.rsqrt(total.pow(2).mean(-1, keepdim=True) + eps)) * gamma
    return ternary_matmul(normed, weight, weight_scale, out_features, segments, activation), total.clone()


@normed_ternary_matmul.register_fake
def _normed_ternary_matmul_fake(x, skip, gamma, eps, weight, weight_scale, out_features, segments=None,
                                activation=""):
    return _ternary_matmul_fake(x, weight, weight_scale, out_features, segments, activation), torch.empty_like(x)


def check_activation(out_features: int, segments: list[int] | None, activation: str) -> None:
    """``activation`` is "" or "swiglu", and "swiglu" comes with two equal segments (gate, up)."""
    if activation not in ("", "swiglu"):
        raise ValueError(f"ternary_matmul: activation must be '' or 'swiglu', got {activation!r}")
    if activation and (not segments or len(segments) != 2 or 2 * segments[0] != out_features):
        raise ValueError("ternary_matmul: activation 'swiglu' needs two segments of equal size (gate, up)")


@ternary_matmul.register_fake
def _ternary_matmul_fake(x, weight, weight_scale, out_features, segments=None, activation=""):
    check_activation(out_features, segments, activation)
    width = out_features // 2 if activation else out_features
    return x.new_empty((*x.shape[:-1], width), dtype=torch.float32)


@torch.library.custom_op("bitconvert_export::matmul_nbits", mutates_args=())
def matmul_nbits(x: torch.Tensor, b: torch.Tensor, scales: torch.Tensor, zero_points: torch.Tensor, k: int, n: int,
                 block_size: int, accuracy_level: int, bits: int = 2) -> torch.Tensor:
    """``x @ W^T`` with W dequantized from MatMulNBits' blocks (fp32 activations; accuracy level ignored)."""
    from .matmulnbits import dequantize

    return x.float() @ dequantize(b, scales, zero_points, k, n, block_size, bits).t()


@matmul_nbits.register_fake
def _matmul_nbits_fake(x, b, scales, zero_points, k, n, block_size, accuracy_level, bits=2):
    return x.new_empty((*x.shape[:-1], n), dtype=torch.float32)


@torch.library.custom_op("bitconvert_export::int6_matmul", mutates_args=())
def int6_matmul(x: torch.Tensor, w_q: torch.Tensor, d: torch.Tensor, out_features: int) -> torch.Tensor:
    """The int6 lm_head's product on the C++ core (:func:`bitconvert.kernels.int6_linear`); see the module docstring."""
    from ..kernels import int6_linear

    return int6_linear(x.float().reshape(-1, x.shape[-1]), w_q, d).reshape(*x.shape[:-1], out_features)


@int6_matmul.register_fake
def _int6_matmul_fake(x, w_q, d, out_features):
    return x.new_empty((*x.shape[:-1], out_features), dtype=torch.float32)


@torch.library.custom_op("bitconvert_export::int8_matmul", mutates_args=())
def int8_matmul(x: torch.Tensor, w_q: torch.Tensor, d: torch.Tensor, out_features: int) -> torch.Tensor:
    """The per-row int8 lm_head's product on the C++ core (:func:`bitconvert.kernels.int8_linear`)."""
    from ..kernels import int8_linear

    return int8_linear(x.float().reshape(-1, x.shape[-1]), w_q, d).reshape(*x.shape[:-1], out_features)


@int8_matmul.register_fake
def _int8_matmul_fake(x, w_q, d, out_features):
    return x.new_empty((*x.shape[:-1], out_features), dtype=torch.float32)


def _ternary_matmul_attributes(out_features: int, segments, activation: str) -> dict:
    """A TernaryMatMul node's attributes: out_features, and segments and activation where given."""
    attributes = {"out_features": out_features}
    if segments:
        attributes["segments"] = list(segments)
    if activation:
        attributes["activation"] = activation
    return attributes


def _ternary_matmul_onnx(x, weight, weight_scale, out_features: int, segments=None, activation: str = ""):
    return _bitconvert_opset.TernaryMatMul(x, weight, weight_scale,
                                           **_ternary_matmul_attributes(out_features, segments, activation))


def _normed_ternary_matmul_onnx(x, skip, gamma, eps: float, weight, weight_scale, out_features: int, segments=None,
                                activation: str = ""):
    attributes = _ternary_matmul_attributes(out_features, segments, activation)
    # the exporter gives a node every output of its schema: without skip, H is a copy of x that nothing reads
    y, total = _bitconvert_norm_opset.TernaryMatMul(x, weight, weight_scale, skip, gamma, epsilon=eps, **attributes)
    return y, (x if skip is None else total)


def _matmul_nbits_onnx(x, b, scales, zero_points, k: int, n: int, block_size: int, accuracy_level: int, bits: int = 2):
    return _microsoft_opset.MatMulNBits(x, b, scales, zero_points, K=k, N=n, bits=bits, block_size=block_size,
                                        accuracy_level=accuracy_level)


def _int6_matmul_onnx(x, w_q, d, out_features: int):
    return _bitconvert_opset.Int6MatMul(x, w_q, d, out_features=out_features)


def _int8_matmul_onnx(x, w_q, d, out_features: int):
    return _bitconvert_opset.Int8MatMul(x, w_q, d, out_features=out_features)


TRANSLATIONS = {
    torch.ops.bitconvert_export.ternary_matmul.default: _ternary_matmul_onnx,
    torch.ops.bitconvert_export.normed_ternary_matmul.default: _normed_ternary_matmul_onnx,
    torch.ops.bitconvert_export.matmul_nbits.default: _matmul_nbits_onnx,
    torch.ops.bitconvert_export.int6_matmul.default: _int6_matmul_onnx,
    torch.ops.bitconvert_export.int8_matmul.default: _int8_matmul_onnx,
}


def _infer_last_dim(width):
    """Shape inference: output 0 has input 0's type and shape with the last dimension set to ``width(ctx)``; an
    output 1 (TernaryMatMul's H) input 0's type and shape."""

    def infer(ctx) -> None:
        output = onnx.TypeProto()
        output.CopyFrom(ctx.get_input_type(0))
        dims = output.tensor_type.shape.dim
        if len(dims):
            dims[len(dims) - 1].Clear()
            dims[len(dims) - 1].dim_value = width(ctx)
        ctx.set_output_type(0, output)
        if ctx.get_num_outputs() > 1:  # TernaryMatMul's H: X's type and shape
            ctx.set_output_type(1, ctx.get_input_type(0))

    return infer


def _ternary_matmul_width(ctx) -> int:
    """TernaryMatMul's output width: out_features, halved by activation "swiglu"."""
    activation = ctx.get_attribute("activation")
    halved = activation is not None and activation.s == b"swiglu"
    return ctx.get_attribute("out_features").i // (2 if halved else 1)


def _ternary_matmul_schema(version: int) -> defs.OpSchema:
    """TernaryMatMul's schema: version 1 (X, W, scale -> Y), or 2 with the folded norm's optional inputs, output and
    attribute."""
    parameter = defs.OpSchema.FormalParameter
    optional = defs.OpSchema.FormalParameterOption.Optional
    attribute = defs.OpSchema.Attribute
    inputs = [parameter("X", "T", "activations (..., K)"),
              parameter("W", "tensor(uint8)", "packed ternary weights (ceil(N/4), K)"),
              parameter("scale", "tensor(float)", "weight_scale = 1/g, shape (1,), or (m,): one per segment")]
    outputs = [parameter("Y", "T", "(..., N), or (..., N/2) with activation \"swiglu\"")]
    attributes = [attribute("out_features", defs.OpSchema.AttrType.INT, "N, rows of T"),
                  attribute("segments", defs.OpSchema.AttrType.INTS,
                            "optional: rows of each stacked projection (sum N), each divided by its own scale; all "
                            "but the last a multiple of 16", required=False),
                  attribute("activation", defs.OpSchema.AttrType.STRING,
                            "optional: \"swiglu\" with two equal segments (gate, up): Y (..., N/2) = silu(gate) * up",
                            required=False)]
    if version >= NORM_OP_VERSION:
        inputs += [parameter("skip", "T", "optional, X's shape: H = X + skip (else H = X)", param_option=optional),
                   parameter("gamma", "T", "optional (K,): the product reads rms_norm(H) * gamma instead of X",
                             param_option=optional)]
        outputs.append(parameter("H", "T", "optional: H", param_option=optional))
        attributes.append(attribute("epsilon", defs.OpSchema.AttrType.FLOAT, "with gamma: the RMSNorm's epsilon",
                                    required=False))
    schema = defs.OpSchema(
        OP_NAME, DOMAIN, version,
        "BitNet b1.58 linear layer: Y = (X_q @ T^T) / scale / s, X quantized to int8 per row of its last dimension "
        "(s = 127 / max|x|), T ternary, packed 2 bits per weight (code T+1) in HF transformers' BitNet layout.",
        inputs=inputs, outputs=outputs, type_constraints=[("T", ["tensor(float)"], "float32 activations")],
        attributes=attributes,
    )
    return schema.set_type_and_shape_inference_function(_infer_last_dim(_ternary_matmul_width))


def _int6_matmul_schema() -> defs.OpSchema:
    parameter = defs.OpSchema.FormalParameter
    schema = defs.OpSchema(
        INT6_OP_NAME, DOMAIN, OP_VERSION,
        "int6 x int8 product (the ~6-bit lm_head): Y[t][o] = sum_b d[o][b] e[t][b] P[t][o][b] over 32-column blocks b, "
        "X quantized to int8 per block (scale e), W int6 codes with fp16 block scales D (bitconvert's int8_core.h).",
        inputs=[parameter("X", "T", "activations (..., K)"),
                parameter("W", "tensor(uint8)", "int6 codes (N, K' * 3 / 4), K' = K rounded up to 64"),
                parameter("D", "tensor(float16)", "block scales (N, K' / 32)")],
        outputs=[parameter("Y", "T", "(..., N)")],
        type_constraints=[("T", ["tensor(float)"], "float32 activations")],
        attributes=[defs.OpSchema.Attribute("out_features", defs.OpSchema.AttrType.INT, "N, rows of W")],
    )
    return schema.set_type_and_shape_inference_function(
        _infer_last_dim(lambda ctx: ctx.get_attribute("out_features").i))


def _int8_matmul_schema() -> defs.OpSchema:
    parameter = defs.OpSchema.FormalParameter
    schema = defs.OpSchema(
        INT8_OP_NAME, DOMAIN, OP_VERSION,
        "int8 x int8 product (the per-row int8 lm_head): Y[t][o] = d[o] sum_b e[t][b] P[t][o][b] over 32-column "
        "blocks b, X quantized to int8 per block (scale e), W int8 codes with one fp32 scale per row (bitconvert's "
        "int8_core.h).",
        inputs=[parameter("X", "T", "activations (..., K)"),
                parameter("W", "tensor(int8)", "int8 codes (N, K'), K' = K rounded up to 64"),
                parameter("D", "T", "row scales (N,)")],
        outputs=[parameter("Y", "T", "(..., N)")],
        type_constraints=[("T", ["tensor(float)"], "float32")],
        attributes=[defs.OpSchema.Attribute("out_features", defs.OpSchema.AttrType.INT, "N, rows of W")],
    )
    return schema.set_type_and_shape_inference_function(
        _infer_last_dim(lambda ctx: ctx.get_attribute("out_features").i))


def _matmul_nbits_schema() -> defs.OpSchema:
    """The subset of ONNX Runtime's contrib schema this exporter emits (the onnx package has none for it)."""
    parameter = defs.OpSchema.FormalParameter
    attribute = defs.OpSchema.Attribute
    integer = defs.OpSchema.AttrType.INT
    schema = defs.OpSchema(
        "MatMulNBits", MS_DOMAIN, 1, "ONNX Runtime contrib op: A @ dequantized(B)^T, B in blocks of N-bit codes.",
        inputs=[parameter("A", "T1"), parameter("B", "tensor(uint8)"), parameter("scales", "T1"),
                parameter("zero_points", "tensor(uint8)")],
        outputs=[parameter("Y", "T1")],
        type_constraints=[("T1", ["tensor(float)"], "float32")],
        attributes=[attribute("K", integer, "columns"), attribute("N", integer, "rows"),
                    attribute("bits", integer, "bits per code"), attribute("block_size", integer, "block columns"),
                    attribute("accuracy_level", integer, "0: fp32 activations, 4: int8 per block")],
    )
    return schema.set_type_and_shape_inference_function(_infer_last_dim(lambda ctx: ctx.get_attribute("N").i))


def register_onnx_schemas() -> None:
    """Register TernaryMatMul's (versions 1 and 2), Int6MatMul's and Int8MatMul's schemas, and MatMulNBits' unless the onnx
    package has one (idempotent)."""
    for version in (OP_VERSION, NORM_OP_VERSION):  # has(..., version) also finds an older version's schema
        if not defs.has(OP_NAME, version, DOMAIN) or defs.get_schema(OP_NAME, version, DOMAIN).since_version < version:
            defs.register_schema(_ternary_matmul_schema(version))
    if not defs.has(INT6_OP_NAME, OP_VERSION, DOMAIN):
        defs.register_schema(_int6_matmul_schema())
    if not defs.has(INT8_OP_NAME, OP_VERSION, DOMAIN):
        defs.register_schema(_int8_matmul_schema())
    if not defs.has("MatMulNBits", 1, MS_DOMAIN):
        defs.register_schema(_matmul_nbits_schema())


register_onnx_schemas()
