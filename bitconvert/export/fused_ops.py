"""ONNX Runtime's fused CPU operators for the ``fused`` decoder graph, as torch custom ops the exporter translates.

``torch.ops.bitconvert_export.group_query_attention(qkv, past_key, past_value, seqlens_k, total_length, cos_cache,
sin_cache, attention_bias, num_heads, kv_num_heads)`` -> (out, present_key, present_value)
    ``com.microsoft::GroupQueryAttention`` with packed QKV and rotary inside (``do_rotary=1``, halves not
    interleaved, as LLaMA). qkv (B, S, (H + 2 H_kv) D) = [q | k | v] per token; past_key/value (B, H_kv, P, D);
    seqlens_k int32 (B,) = P + S - 1; total_length int32 scalar = P + S; cos/sin_cache (max_positions, D/2);
    attention_bias (B, 1, S, P + S) additive. Token i of row b sits at position p = seqlens_k[b] + 1 - S + i: q and
    k are rotated by p (x1 cos - x2 sin, x2 cos + x1 sin on the halves x1, x2), present = [past, k] along the
    sequence, and out = softmax(q k^T / sqrt(D) + bias, causal over positions) v per query head, head h reading
    KV head h // (H / H_kv). ORT's CPU kernel refuses S > 1 with P > 0 unless B = 1.
    With ``attention="bitconvert"`` (:func:`translations`) the node is ``com.bitconvert::CachedAttention`` instead:
    the same inputs (less GroupQueryAttention's unused ones), attributes, outputs and math, on the lean decoder's
    attention loops in bitconvert's custom-op library (``export/csrc/attention_ort_op.cpp``), any batch; its cache
    may be fp16 while qkv, the tables, the bias and the output stay fp32 (the new keys and values are rounded to the
    cache's type, the attention computed in fp32; GroupQueryAttention's fp16 graph computes in fp16 throughout).

``torch.ops.bitconvert_export.decoder_layer(x, skip, input_norm, qkv_weight, qkv_scale, past_key, past_value,
seqlens_k, total_length, cos_cache, sin_cache, attention_bias, o_weight, o_scale, post_norm, gate_up_weight,
gate_up_scale, down_weight, down_scale, num_heads, kv_num_heads, eps)`` -> (y, h1, present_key, present_value)
    One LLaMA decoder layer of the ``layer`` graph, ``com.bitconvert::DecoderLayer`` (TernaryMatMul's domain version,
    ``NORM_OP_VERSION``): the fused graph's five nodes of a layer in one, on the same code in bitconvert's library.
    x, skip (B, S, K) fp32 (skip optional: h = x + skip, or x), K = hidden size, H = num_heads, G = kv_num_heads,
    D = head dim (past_key's last), I = intermediate size (down_weight's columns); the weights packed ternary
    (:mod:`bitconvert.export.ops`) with one 1/g per projection in the scales:
        qkv, h = normed_ternary_matmul(x, skip, input_norm, eps, qkv_weight, qkv_scale, (H + 2G) D, [HD, GD, GD])
        attn, present_key, present_value = group_query_attention(qkv, past_key, ..., attention_bias, H, G)
        act, h1 = normed_ternary_matmul(ternary_matmul(attn, o_weight, o_scale, K), h, post_norm, eps,
                                        gate_up_weight, gate_up_scale, 2I, [I, I], "swiglu")
        y = ternary_matmul(act, down_weight, down_scale, K)
    qkv_weight (ceil((H + 2G) D / 4), K), qkv_scale (3,); o_weight (ceil(K / 4), HD), o_scale (1,); gate_up_weight
    (ceil(2I / 4), K), gate_up_scale (2,); down_weight (ceil(K / 4), I), down_scale (1,); input_norm, post_norm (K,);
    the cache, rotary tables and bias as CachedAttention's (fp32 or fp16 cache). y and h1 are (B, S, K) fp32: the
    next layer's x and skip.

``torch.ops.bitconvert_export.rms_norm(x, weight, eps)`` -> ``SimplifiedLayerNormalization`` (ONNX domain,
    an ORT contrib op): weight * x / sqrt(mean(x^2) + eps) over the last dimension, in fp32.
``torch.ops.bitconvert_export.skip_rms_norm(x, skip, weight, eps)`` -> (rms_norm(x + skip), x + skip):
    ``com.microsoft::SkipSimplifiedLayerNormalization`` (outputs 0 and 3), the residual add and the next norm in one.

The eager implementations are the reference math (tracing and tests only). Importing this module registers ONNX
schemas for the ops with the ``onnx`` package (which has none), for the checker and shape inference (DecoderLayer's
at version ``NORM_OP_VERSION``, the others at 1).
"""

from __future__ import annotations

import onnx
import onnxscript
import torch
from onnx import defs

from .ops import DOMAIN, MS_DOMAIN, NORM_OP_VERSION, OP_VERSION, normed_ternary_matmul, ternary_matmul

ATTENTIONS = ("bitconvert", "gqa")
LAYER_OP_NAME = "DecoderLayer"
_microsoft_opset = onnxscript.values.Opset(MS_DOMAIN, 1)
_bitconvert_opset = onnxscript.values.Opset(DOMAIN, OP_VERSION)
_bitconvert_layer_opset = onnxscript.values.Opset(DOMAIN, NORM_OP_VERSION)
_onnx_opset = onnxscript.values.Opset("", 18)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding on halves: x (..., D), cos/sin (..., D/2) broadcastable."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


@torch.library.custom_op("bitconvert_export::group_query_attention", mutates_args=())
def group_query_attention(qkv: torch.Tensor, past_key: torch.Tensor, past_value: torch.Tensor,
                          seqlens_k: torch.Tensor, total_length: torch.Tensor, cos_cache: torch.Tensor,
                          sin_cache: torch.Tensor, attention_bias: torch.Tensor, num_heads: int,
                          kv_num_heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """See the module docstring."""
    batch, length, _ = qkv.shape
    head_dim = past_key.shape[-1]
    q, k, v = qkv.split([num_heads * head_dim, kv_num_heads * head_dim, kv_num_heads * head_dim], dim=-1)
    q, k, v = (t.reshape(batch, length, heads, head_dim).transpose(1, 2)
               for t, heads in ((q, num_heads), (k, kv_num_heads), (v, kv_num_heads)))
    positions = seqlens_k.long().unsqueeze(1) + 1 - length + torch.arange(length)  # (B, S)
    cos, sin = cos_cache[positions].unsqueeze(1), sin_cache[positions].unsqueeze(1)  # (B, 1, S, D/2)
    q, k = rotate(q, cos, sin), rotate(k, cos, sin)
    key = torch.cat([past_key, k.to(past_key.dtype)], dim=2)  # the new rows rounded to the cache's type
    value = torch.cat([past_value, v.to(past_value.dtype)], dim=2)
    group = num_heads // kv_num_heads
    keys, values = (t.to(q.dtype).repeat_interleave(group, dim=1) for t in (key, value))  # read back exactly
    scores = q @ keys.transpose(2, 3) / head_dim**0.5 + attention_bias
    key_pos = torch.arange(key.shape[2])
    scores = scores.masked_fill(key_pos > positions[:, None, :, None], float("-inf"))
    out = torch.softmax(scores, dim=-1) @ values
    return out.transpose(1, 2).reshape(batch, length, num_heads * head_dim), key, value


@group_query_attention.register_fake
def _gqa_fake(qkv, past_key, past_value, seqlens_k, total_length, cos_cache, sin_cache, attention_bias, num_heads,
              kv_num_heads):
    batch, length, _ = qkv.shape
    present = past_key.new_empty((batch, kv_num_heads, past_key.shape[2] + length, past_key.shape[3]))
    return qkv.new_empty((batch, length, num_heads * past_key.shape[3])), present, torch.empty_like(present)


@torch.library.custom_op("bitconvert_export::decoder_layer", mutates_args=())
def decoder_layer(x: torch.Tensor, skip: torch.Tensor | None, input_norm: torch.Tensor, qkv_weight: torch.Tensor,
                  qkv_scale: torch.Tensor, past_key: torch.Tensor, past_value: torch.Tensor, seqlens_k: torch.Tensor,
                  total_length: torch.Tensor, cos_cache: torch.Tensor, sin_cache: torch.Tensor,
                  attention_bias: torch.Tensor, o_weight: torch.Tensor, o_scale: torch.Tensor,
                  post_norm: torch.Tensor, gate_up_weight: torch.Tensor, gate_up_scale: torch.Tensor,
                  down_weight: torch.Tensor, down_scale: torch.Tensor, num_heads: int, kv_num_heads: int,
                  eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, h1, present_key, present_value): the composition of the reference ops in the module docstring."""
    hidden, head_dim, intermediate = x.shape[-1], past_key.shape[-1], down_weight.shape[-1]
    q_width, kv_width = num_heads * head_dim, kv_num_heads * head_dim
    qkv, total = normed_ternary_matmul(x, skip, input_norm, eps, qkv_weight, qkv_scale, q_width + 2 * kv_width,
                                       [q_width, kv_width, kv_width])
    attn, key, value = group_query_attention(qkv, past_key, past_value, seqlens_k, total_length, cos_cache,
                                             sin_cache, attention_bias, num_heads, kv_num_heads)
    act, total = normed_ternary_matmul(ternary_matmul(attn, o_weight, o_scale, hidden), total, post_norm, eps,
                                       gate_up_weight, gate_up_scale, 2 * intermediate,
                                       [intermediate, intermediate], "swiglu")
    return ternary_matmul(act, down_weight, down_scale, hidden), total, key, value


@decoder_layer.register_fake
def _decoder_layer_fake(x, skip, input_norm, qkv_weight, qkv_scale, past_key, past_value, seqlens_k, total_length,
                        cos_cache, sin_cache, attention_bias, o_weight, o_scale, post_norm, gate_up_weight,
                        gate_up_scale, down_weight, down_scale, num_heads, kv_num_heads, eps):
    batch, length, _ = x.shape
    present = past_key.new_empty((batch, kv_num_heads, past_key.shape[2] + length, past_key.shape[3]))
    return torch.empty_like(x), torch.empty_like(x), present, torch.empty_like(present)


@torch.library.custom_op("bitconvert_export::rms_norm", mutates_args=())
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """LLaMA's RMSNorm in fp32: weight * (x * rsqrt(mean(x^2) + eps))."""
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


@rms_norm.register_fake
def _rms_norm_fake(x, weight, eps):
    return torch.empty_like(x)


@torch.library.custom_op("bitconvert_export::skip_rms_norm", mutates_args=())
def skip_rms_norm(x: torch.Tensor, skip: torch.Tensor, weight: torch.Tensor,
                  eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + skip), x + skip)."""
    total = x + skip
    return rms_norm(total, weight, eps), total


@skip_rms_norm.register_fake
def _skip_rms_norm_fake(x, skip, weight, eps):
    return torch.empty_like(x), torch.empty_like(x)


def _gqa_onnx(qkv, past_key, past_value, seqlens_k, total_length, cos_cache, sin_cache, attention_bias,
              num_heads: int, kv_num_heads: int):
    return _microsoft_opset.GroupQueryAttention(
        qkv, None, None, past_key, past_value, seqlens_k, total_length, cos_cache, sin_cache, None, attention_bias,
        num_heads=num_heads, kv_num_heads=kv_num_heads, do_rotary=1, rotary_interleaved=0, _outputs=3)


def _cached_attention_onnx(qkv, past_key, past_value, seqlens_k, total_length, cos_cache, sin_cache, attention_bias,
                           num_heads: int, kv_num_heads: int):
    return _bitconvert_opset.CachedAttention(
        qkv, past_key, past_value, seqlens_k, total_length, cos_cache, sin_cache, attention_bias,
        num_heads=num_heads, kv_num_heads=kv_num_heads, _outputs=3)


def _decoder_layer_onnx(x, skip, input_norm, qkv_weight, qkv_scale, past_key, past_value, seqlens_k, total_length,
                        cos_cache, sin_cache, attention_bias, o_weight, o_scale, post_norm, gate_up_weight,
                        gate_up_scale, down_weight, down_scale, num_heads: int, kv_num_heads: int, eps: float):
    return _bitconvert_layer_opset.DecoderLayer(
        x, skip, input_norm, qkv_weight, qkv_scale, past_key, past_value, seqlens_k, total_length, cos_cache,
        sin_cache, attention_bias, o_weight, o_scale, post_norm, gate_up_weight, gate_up_scale, down_weight,
        down_scale, num_heads=num_heads, kv_num_heads=kv_num_heads, epsilon=eps, _outputs=4)


def _rms_norm_onnx(x, weight, eps: float):
    return _onnx_opset.SimplifiedLayerNormalization(x, weight, axis=-1, epsilon=eps, stash_type=1)


def _skip_rms_norm_onnx(x, skip, weight, eps: float):
    out, _, _, total = _microsoft_opset.SkipSimplifiedLayerNormalization(x, skip, weight, epsilon=eps, _outputs=4)
    return out, total


def translations(attention: str = "gqa") -> dict:
    """The exporter's translations of this module's ops; ``attention``: ``gqa`` (ORT's GroupQueryAttention) or
    ``bitconvert`` (CachedAttention, and DecoderLayer for ``decoder_layer``: both from bitconvert's library)."""
    if attention not in ATTENTIONS:
        raise ValueError(f"attention must be one of {', '.join(ATTENTIONS)}, got {attention!r}")
    table = {
        torch.ops.bitconvert_export.group_query_attention.default:
            _cached_attention_onnx if attention == "bitconvert" else _gqa_onnx,
        torch.ops.bitconvert_export.rms_norm.default: _rms_norm_onnx,
        torch.ops.bitconvert_export.skip_rms_norm.default: _skip_rms_norm_onnx,
    }
    if attention == "bitconvert":
        table[torch.ops.bitconvert_export.decoder_layer.default] = _decoder_layer_onnx
    return table


def _schemas() -> list[defs.OpSchema]:
    """The subsets of ONNX Runtime's schemas that the fused graph uses (shape inference: output 0 like input 0)."""
    parameter, attribute = defs.OpSchema.FormalParameter, defs.OpSchema.Attribute
    integer, real = defs.OpSchema.AttrType.INT, defs.OpSchema.AttrType.FLOAT
    optional = defs.OpSchema.FormalParameterOption.Optional
    floats = [("T", ["tensor(float)"], "float32")]
    gqa = defs.OpSchema(
        "GroupQueryAttention", MS_DOMAIN, 1, "ONNX Runtime contrib op: grouped-query attention with a KV cache.",
        inputs=[parameter("query", "T"), parameter("key", "T", param_option=optional),
                parameter("value", "T", param_option=optional), parameter("past_key", "T", param_option=optional),
                parameter("past_value", "T", param_option=optional), parameter("seqlens_k", "M"),
                parameter("total_sequence_length", "M"), parameter("cos_cache", "T", param_option=optional),
                parameter("sin_cache", "T", param_option=optional),
                parameter("position_ids", "tensor(int64)", param_option=optional),
                parameter("attention_bias", "T", param_option=optional)],
        outputs=[parameter("output", "T"), parameter("present_key", "T"), parameter("present_value", "T")],
        type_constraints=[("T", ["tensor(float)", "tensor(float16)"], "float32, or float16 (--kv-cache fp16)"),
                          ("M", ["tensor(int32)"], "int32")],
        attributes=[attribute("num_heads", integer, "query heads"), attribute("kv_num_heads", integer, "KV heads"),
                    attribute("do_rotary", integer, "rotary inside", required=False),
                    attribute("rotary_interleaved", integer, "rotary layout", required=False)],
    )
    norm = defs.OpSchema(
        "SimplifiedLayerNormalization", "", 1, "ONNX Runtime contrib op: RMSNorm.",
        inputs=[parameter("X", "T"), parameter("scale", "T")], outputs=[parameter("Y", "T")],
        type_constraints=floats,
        attributes=[attribute("axis", integer, "", required=False), attribute("epsilon", real, "", required=False),
                    attribute("stash_type", integer, "", required=False)],
    )
    skip_norm = defs.OpSchema(
        "SkipSimplifiedLayerNormalization", MS_DOMAIN, 1, "ONNX Runtime contrib op: residual add + RMSNorm.",
        inputs=[parameter("input", "T"), parameter("skip", "T"), parameter("gamma", "T")],
        outputs=[parameter("output", "T"), parameter("mean", "U", param_option=optional),
                 parameter("inv_std_var", "U", param_option=optional),
                 parameter("input_skip_bias_sum", "T", param_option=optional)],
        type_constraints=[*floats, ("U", ["tensor(float)"], "float32")],
        attributes=[attribute("epsilon", real, "", required=False)],
    )
    cached = defs.OpSchema(
        "CachedAttention", DOMAIN, OP_VERSION,
        "bitconvert's grouped-query attention with rotary and a KV cache: GroupQueryAttention's math on its packed "
        "qkv, cache, seqlens_k, total_sequence_length, rotary tables and additive bias, in fp32 (the cache fp32 or "
        "fp16).",
        inputs=[parameter("qkv", "T"), parameter("past_key", "C"), parameter("past_value", "C"),
                parameter("seqlens_k", "M"), parameter("total_sequence_length", "M"), parameter("cos_cache", "T"),
                parameter("sin_cache", "T"), parameter("attention_bias", "T")],
        outputs=[parameter("output", "T"), parameter("present_key", "C"), parameter("present_value", "C")],
        type_constraints=[*floats, ("C", ["tensor(float)", "tensor(float16)"], "the cache: float32 or float16"),
                          ("M", ["tensor(int32)"], "int32")],
        attributes=[attribute("num_heads", integer, "query heads"), attribute("kv_num_heads", integer, "KV heads")],
    )
    return [gqa, cached, norm, skip_norm]


def _decoder_layer_schema() -> defs.OpSchema:
    """DecoderLayer's schema (see the module docstring); y and h1 have x's type and shape, the presents past_key's
    type and rank (their length: max(past length, total_sequence_length))."""
    parameter, attribute = defs.OpSchema.FormalParameter, defs.OpSchema.Attribute
    optional = defs.OpSchema.FormalParameterOption.Optional
    packed, scale = "tensor(uint8)", "tensor(float)"
    schema = defs.OpSchema(
        LAYER_OP_NAME, DOMAIN, NORM_OP_VERSION,
        "One LLaMA decoder layer: TernaryMatMul q/k/v with the residual add and RMSNorm folded in, CachedAttention, "
        "TernaryMatMul o_proj, TernaryMatMul gate/up with the residual add, RMSNorm and silu(gate) * up, TernaryMatMul "
        "down; Y is the MLP's output and H1 the residual stream before it.",
        inputs=[parameter("X", "T", "(B, S, K)"),
                parameter("skip", "T", "optional (B, S, K): H = X + skip, else H = X", param_option=optional),
                parameter("input_norm", "T", "(K,)"), parameter("qkv_weight", packed, "(ceil((H + 2G) D / 4), K)"),
                parameter("qkv_scale", scale, "(3,): q, k, v"), parameter("past_key", "C", "(B, G, L, D)"),
                parameter("past_value", "C", "(B, G, L, D)"), parameter("seqlens_k", "M", "(B,)"),
                parameter("total_sequence_length", "M", "scalar total"),
                parameter("cos_cache", "T", "(positions, D / 2)"), parameter("sin_cache", "T", "(positions, D / 2)"),
                parameter("attention_bias", "T", "(B, 1, S, total)"),
                parameter("o_weight", packed, "(ceil(K / 4), H D)"), parameter("o_scale", scale, "(1,)"),
                parameter("post_norm", "T", "(K,)"), parameter("gate_up_weight", packed, "(ceil(2I / 4), K)"),
                parameter("gate_up_scale", scale, "(2,): gate, up"),
                parameter("down_weight", packed, "(ceil(K / 4), I)"), parameter("down_scale", scale, "(1,)")],
        outputs=[parameter("Y", "T", "(B, S, K)"), parameter("H1", "T", "(B, S, K)"),
                 parameter("present_key", "C", "(B, G, max(L, total), D)"),
                 parameter("present_value", "C", "(B, G, max(L, total), D)")],
        type_constraints=[("T", ["tensor(float)"], "float32"),
                          ("C", ["tensor(float)", "tensor(float16)"], "the cache: float32 or float16"),
                          ("M", ["tensor(int32)"], "int32")],
        attributes=[attribute("num_heads", defs.OpSchema.AttrType.INT, "query heads H"),
                    attribute("kv_num_heads", defs.OpSchema.AttrType.INT, "KV heads G"),
                    attribute("epsilon", defs.OpSchema.AttrType.FLOAT, "both RMSNorms' epsilon")],
    )
    return schema.set_type_and_shape_inference_function(_infer_decoder_layer)


def _infer_decoder_layer(ctx) -> None:
    """Outputs 0 and 1: input 0's type and shape; 2 and 3: past_key's type and shape, the length unknown."""
    for index in (0, 1):
        ctx.set_output_type(index, ctx.get_input_type(0))
    present = onnx.TypeProto()
    present.CopyFrom(ctx.get_input_type(5))
    dims = present.tensor_type.shape.dim
    if len(dims) == 4:
        dims[2].Clear()
    for index in (2, 3):
        ctx.set_output_type(index, present)


def _copy_input_shape(ctx) -> None:
    """Output 0 (and SkipSimplifiedLayerNormalization's sum, output 3) have input 0's type and shape."""
    for index in (0, 3) if ctx.get_num_outputs() == 4 else (0,):
        ctx.set_output_type(index, ctx.get_input_type(0))


def register_onnx_schemas() -> None:
    """Register the four schemas and DecoderLayer's unless the onnx package already has them (idempotent)."""
    for schema in _schemas():
        if not defs.has(schema.name, schema.since_version, schema.domain):
            if "Attention" not in schema.name:  # an attention's present length P + S is not input 0's shape
                schema = schema.set_type_and_shape_inference_function(_copy_input_shape)
            defs.register_schema(schema)
    if not defs.has(LAYER_OP_NAME, NORM_OP_VERSION, DOMAIN):
        defs.register_schema(_decoder_layer_schema())


register_onnx_schemas()
