"""A LLaMA/BitNet causal LM as one step of KV-cache decoding with explicit tensors, for ``torch.onnx.export``.

The transformers model supplies every submodule (embeddings, norms, rotary embedding, projections, MLP, lm_head);
this wrapper only spells out attention with the cache as plain tensors, so that the exported graph has the I/O names
of optimum and onnxruntime-genai:

    inputs   input_ids (B, S) int64, attention_mask (B, P + S) int64 (1 = real token, 0 = padding),
             position_ids (B, S) int64, past_key_values.{i}.key / .value (B, H_kv, P, D) fp32 for each layer i
    outputs  logits (B, S, V) fp32, present.{i}.key / .value (B, H_kv, P + S, D) fp32
             (with ``last_logits``: logits (B, 1, V) of the last position only, all that generation reads; the
             final norm and lm_head then run on one token per row instead of S, which is most of a prompt's cost
             on a large vocabulary)

Attention of layer i, for query t (absolute position P + t) and key j < P + S:
    scores = q k^T * D^-0.5 + mask,  mask = 0 where j <= P + t and attention_mask[b, j] = 1, else float32 min
    out = softmax(scores) v,  keys/values of the H_kv heads shared by H / H_kv query heads each (GQA)
with rotary embedding applied to q and k at ``position_ids``. BitNet models (SubLN) apply ``attn_sub_norm`` before
``o_proj``; their MLP module (with ``ffn_sub_norm``) runs unchanged.

:class:`FusedKVCacheDecoder` (``--graph fused``) has the same I/O and math with ONNX Runtime's fused CPU operators
(:mod:`bitconvert.export.fused_ops`): one attention node per layer (bitconvert's CachedAttention or ORT's
GroupQueryAttention, ``export_onnx(attention=...)``; rotary inside, cos/sin tables as initializers), q/k/v (gate/up) as
one stacked projection where the model has them, each residual add and the RMSNorm after it folded into the stacked
projection that reads them (``normed_ternary_matmul``: TernaryMatMul's skip and gamma inputs), and the final norm as
SkipSimplifiedLayerNormalization (without stacked projections: SimplifiedLayerNormalization and
SkipSimplifiedLayerNormalization for every norm). Positions are the cache's: token i of a step is at
past_sequence_length + i for every row, and ``position_ids`` is accepted but not read. For an unpadded batch that is
what position_ids holds; for a left-padded row all its positions shift by the padding, which rotary embedding cancels
(q.k depends on the difference of positions only), so the logits agree up to float rounding. ORT's CPU
GroupQueryAttention runs a multi-token step after a non-empty cache only at batch size 1 (CachedAttention at any batch
size).
With ``kv_cache="fp16"`` the fused decoder keeps the cache in float16 (``past_key_values.*`` and ``present.*`` are
fp16), half the cache bytes a step reads (at 7B shapes and position 512, 268 MB instead of 537 MB per token); each key
and value rounded to fp16, as the lean decoder's ``kv_cache="fp16"``. With CachedAttention everything else stays fp32
(the op reads the fp16 rows back in fp32: as fast as an fp32 cache, docs/export.md); with GroupQueryAttention each
layer's stacked q/k/v, the cos/sin tables and the padding bias (its blocked value float16's min) are fp16 too, attention
runs in fp16 and its output is cast back to fp32 for o_proj (on a CPU without fp16 arithmetic, Zen 4, ORT 1.32 decodes
slower with it than with the fp32 cache).
With ``layer_op`` (``--graph layer``; CachedAttention only) each layer that fits is one ``com.bitconvert::DecoderLayer``
node (:func:`bitconvert.export.fused_ops.decoder_layer`) in place of its five (normed q/k/v, attention, o_proj, normed
gate/up with SwiGLU, down), the same math on the same code: a layer fits when it has a stacked qkv_proj of segments
[H D, H_kv D, H_kv D] and a stacked gate_up_proj of two segments of down_proj's input width, o_proj and down_proj are
TernaryMatMul without sub-norm or bias, it has no attn_sub_norm or ffn_sub_norm, the model's hidden_act is silu (or
swish), and its two RMSNorms have one epsilon. Every other layer keeps the fused graph's nodes, in the same graph.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from .fused_ops import decoder_layer, group_query_attention, rms_norm, skip_rms_norm
from .modules import FusedTernaryMatMulLinear, is_bare_ternary, rms_norm_epsilon

INPUT_NAMES = ("input_ids", "attention_mask", "position_ids")
KV_CACHE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16}


def cache_names(num_layers: int, prefix: str) -> list[str]:
    """``prefix.{i}.key``, ``prefix.{i}.value`` for every layer, in that order."""
    return [f"{prefix}.{layer}.{kind}" for layer in range(num_layers) for kind in ("key", "value")]


class KVCacheDecoder(nn.Module):
    """Wraps a transformers ``LlamaForCausalLM`` or ``BitNetForCausalLM``; see the module docstring for the I/O."""

    kv_dtype = torch.float32  # the cache's (FusedKVCacheDecoder: fp32 or fp16)

    def __init__(self, model: nn.Module, last_logits: bool = False):
        super().__init__()
        self.model = model
        self.last_logits = last_logits
        config = model.config
        self.num_layers = config.num_hidden_layers
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads

    def _attention(self, attn: nn.Module, x, cos, sin, past_key, past_value, mask):
        batch, length, _ = x.shape
        q = attn.q_proj(x).view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)
        k = attn.k_proj(x).view(batch, length, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = attn.v_proj(x).view(batch, length, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        key = torch.cat([past_key, k], dim=2)
        value = torch.cat([past_value, v], dim=2)
        group = self.num_heads // self.num_kv_heads
        q = q.reshape(batch, self.num_kv_heads, group * length, self.head_dim)  # heads of one KV group side by side
        scores = torch.matmul(q, key.transpose(2, 3)) * self.head_dim**-0.5
        scores = scores.view(batch, self.num_kv_heads, group, length, -1) + mask.unsqueeze(1)
        probs = torch.softmax(scores, dim=-1).view(batch, self.num_kv_heads, group * length, -1)
        out = torch.matmul(probs, value).view(batch, self.num_heads, length, self.head_dim)
        out = out.transpose(1, 2).reshape(batch, length, self.num_heads * self.head_dim)
        sub_norm = getattr(attn, "attn_sub_norm", None)
        if sub_norm is not None:
            out = sub_norm(out)
        return attn.o_proj(out), key, value

    @staticmethod
    def _mask(attention_mask: torch.Tensor, length: int) -> torch.Tensor:
        """Additive mask (B, 1, S, P + S): causal over absolute positions and hiding padded keys."""
        total = attention_mask.shape[1]
        past = total - length
        query_pos = torch.arange(length, device=attention_mask.device).unsqueeze(1) + past
        key_pos = torch.arange(total, device=attention_mask.device).unsqueeze(0)
        allowed = (key_pos <= query_pos).unsqueeze(0) & attention_mask.bool().unsqueeze(1)
        blocked = torch.full((), torch.finfo(torch.float32).min)
        return torch.where(allowed, torch.zeros(()), blocked).unsqueeze(1)

    def forward(self, input_ids, attention_mask, position_ids, *past):
        inner = self.model.model
        hidden = inner.embed_tokens(input_ids)
        cos, sin = inner.rotary_emb(hidden, position_ids)
        mask = self._mask(attention_mask, input_ids.shape[1])
        presents = []
        for index, layer in enumerate(inner.layers):
            attn_out, key, value = self._attention(layer.self_attn, layer.input_layernorm(hidden), cos, sin,
                                                   past[2 * index], past[2 * index + 1], mask)
            hidden = hidden + attn_out
            hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
            presents += [key, value]
        if self.last_logits:
            hidden = hidden[:, -1:]
        logits = self.model.lm_head(inner.norm(hidden)).float()
        return (logits, *presents)

    def example_inputs(self, batch: int = 2, length: int = 3, past: int = 4) -> tuple[torch.Tensor, ...]:
        """Inputs for tracing (every dynamic size >= 2 so that none is specialised)."""
        vocab = self.model.config.vocab_size
        input_ids = torch.randint(0, vocab, (batch, length))
        attention_mask = torch.ones(batch, past + length, dtype=torch.int64)
        position_ids = torch.arange(past, past + length).expand(batch, length).contiguous()
        cache = [torch.zeros(batch, self.num_kv_heads, past, self.head_dim, dtype=self.kv_dtype)
                 for _ in range(2 * self.num_layers)]
        return (input_ids, attention_mask, position_ids, *cache)


class FusedKVCacheDecoder(KVCacheDecoder):
    """The same decoder on ORT's fused operators (see the module docstring). Call
    :func:`~bitconvert.export.modules.fuse_projections` on the model first to stack q/k/v and gate/up."""

    def __init__(self, model: nn.Module, last_logits: bool = False, kv_cache: str = "fp32", attention: str = "gqa",
                 layer_op: bool = False):
        """``attention``: the node the exporter will emit (:func:`bitconvert.export.fused_ops.translations`); with
        ``bitconvert``'s an fp16 cache keeps qkv, the rotary tables and the bias in fp32 (``attention_dtype``), with
        ``gqa``'s they are cast to the cache's type (ORT's GroupQueryAttention takes one type). ``layer_op`` (with
        ``bitconvert`` only): each layer that fits as one DecoderLayer node (see the module docstring)."""
        super().__init__(model, last_logits)
        if kv_cache not in KV_CACHE_DTYPES:
            raise ValueError(f"unknown KV cache type {kv_cache!r}; choose one of {', '.join(KV_CACHE_DTYPES)}")
        if layer_op and attention != "bitconvert":
            raise ValueError(f"layer_op needs attention 'bitconvert' (DecoderLayer runs CachedAttention), got "
                             f"{attention!r}")
        self.layer_op = layer_op
        self.kv_dtype = KV_CACHE_DTYPES[kv_cache]
        self.attention_dtype = torch.float32 if attention == "bitconvert" else self.kv_dtype
        inner = model.model
        positions = torch.arange(model.config.max_position_embeddings).unsqueeze(0)
        with torch.no_grad():
            cos, sin = inner.rotary_emb(inner.embed_tokens.weight[:1].float(), positions)  # (1, max, D), halves equal
        half = self.head_dim // 2
        self.register_buffer("cos_cache", cos[0, :, :half].to(self.attention_dtype).contiguous())
        self.register_buffer("sin_cache", sin[0, :, :half].to(self.attention_dtype).contiguous())

    @staticmethod
    def _norm(norm: nn.Module, x: torch.Tensor, skip: torch.Tensor | None = None):
        """``norm(x + skip)`` and ``x + skip`` (just ``norm(x)`` and ``x`` without skip), an RMSNorm's weight and
        epsilon on ORT's fused ops."""
        eps = rms_norm_epsilon(norm)
        if skip is None:
            return rms_norm(x, norm.weight.float(), eps), x
        return skip_rms_norm(x, skip, norm.weight.float(), eps)

    def _qkv(self, attn: nn.Module, norm: nn.Module, x: torch.Tensor, skip: torch.Tensor | None):
        """(q | k | v of norm(h), h), h = x + skip (x without skip): one TernaryMatMul with the norm folded in where
        the model has a stacked qkv_proj, else the norm node and the three projections."""
        if hasattr(attn, "qkv_proj"):
            return attn.qkv_proj.normed(x, skip, norm)
        normed, total = self._norm(norm, x, skip)
        return torch.cat([attn.q_proj(normed), attn.k_proj(normed), attn.v_proj(normed)], dim=-1), total

    def _attention_block(self, attn: nn.Module, qkv, past_key, past_value, seqlens, total, bias):
        out, key, value = group_query_attention(qkv.to(self.attention_dtype), past_key, past_value, seqlens, total,
                                                self.cos_cache, self.sin_cache, bias, self.num_heads,
                                                self.num_kv_heads)
        out = out.float()
        sub_norm = getattr(attn, "attn_sub_norm", None)
        if sub_norm is not None:
            out = sub_norm(out)
        return attn.o_proj(out), key, value

    def _mlp(self, mlp: nn.Module, norm: nn.Module, x: torch.Tensor, skip: torch.Tensor):
        """(down(act(gate) * up) of norm(h), h), h = x + skip. With a stacked gate_up_proj the norm is folded into
        its node, and a SiLU MLP computes silu(gate) * up inside that node too."""
        if not hasattr(mlp, "gate_up_proj"):
            normed, total = self._norm(norm, x, skip)
            return mlp(normed), total
        if self.model.config.hidden_act in ("silu", "swish"):
            hidden, total = mlp.gate_up_proj.normed(x, skip, norm, "swiglu")
        else:
            gate_up, total = mlp.gate_up_proj.normed(x, skip, norm)
            gate, up = gate_up.split(mlp.gate_up_proj.segments, dim=-1)
            hidden = mlp.act_fn(gate) * up
        sub_norm = getattr(mlp, "ffn_sub_norm", None)
        return mlp.down_proj(hidden if sub_norm is None else sub_norm(hidden)), total

    def _fused_layer(self, layer: nn.Module, x, skip, past_key, past_value, seqlens, total, bias):
        """(y, h1, present_key, present_value) of one decoder layer on the fused graph's nodes: h = x + skip (x
        without skip), h1 = h + attention(norm(h)), y = mlp(norm(h1)) without the residual (the next layer's x)."""
        qkv, hidden = self._qkv(layer.self_attn, layer.input_layernorm, x, skip)
        attn_out, key, value = self._attention_block(layer.self_attn, qkv, past_key, past_value, seqlens, total, bias)
        delta, hidden = self._mlp(layer.mlp, layer.post_attention_layernorm, attn_out, hidden)
        return delta, hidden, key, value

    def _layer_node(self, layer: nn.Module, x, skip, past_key, past_value, seqlens, total, bias):
        """``_fused_layer``'s outputs from one DecoderLayer node (a layer that ``fits_layer_op``)."""
        attn, mlp = layer.self_attn, layer.mlp
        return decoder_layer(
            x, skip, layer.input_layernorm.weight.float(), attn.qkv_proj.weight, attn.qkv_proj.weight_scale, past_key,
            past_value, seqlens, total, self.cos_cache, self.sin_cache, bias, attn.o_proj.weight,
            attn.o_proj.weight_scale, layer.post_attention_layernorm.weight.float(), mlp.gate_up_proj.weight,
            mlp.gate_up_proj.weight_scale, mlp.down_proj.weight, mlp.down_proj.weight_scale, self.num_heads,
            self.num_kv_heads, rms_norm_epsilon(layer.input_layernorm))

    def fits_layer_op(self, layer: nn.Module) -> bool:
        """Whether ``layer`` is what a DecoderLayer node computes (the conditions in the module docstring)."""
        attn, mlp = layer.self_attn, layer.mlp
        qkv, gate_up, down = (getattr(attn, "qkv_proj", None), getattr(mlp, "gate_up_proj", None),
                              getattr(mlp, "down_proj", None))
        q_width, kv_width = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        return (isinstance(qkv, FusedTernaryMatMulLinear) and qkv.segments == [q_width, kv_width, kv_width]
                and is_bare_ternary(attn.o_proj) and getattr(attn, "attn_sub_norm", None) is None
                and is_bare_ternary(down) and isinstance(gate_up, FusedTernaryMatMulLinear)
                and gate_up.segments == [down.in_features] * 2 and getattr(mlp, "ffn_sub_norm", None) is None
                and self.model.config.hidden_act in ("silu", "swish")
                and rms_norm_epsilon(layer.input_layernorm) == rms_norm_epsilon(layer.post_attention_layernorm))

    def forward(self, input_ids, attention_mask, position_ids, *past):
        inner = self.model.model
        batch, length = input_ids.shape
        total = attention_mask.shape[1]
        seqlens = torch.full((batch,), total - 1, dtype=torch.int32)
        total_length = torch.full((), total, dtype=torch.int32)
        dtype = self.attention_dtype
        blocked = torch.full((), torch.finfo(dtype).min, dtype=dtype)
        padding = torch.where(attention_mask.bool(), torch.zeros((), dtype=dtype), blocked)  # (B, P + S)
        bias = padding[:, None, None, :].expand(batch, 1, length, total)
        hidden, delta = inner.embed_tokens(input_ids), None
        presents = []
        for index, layer in enumerate(inner.layers):
            x, skip = (hidden, None) if delta is None else (delta, hidden)
            run = self._layer_node if self.layer_op and self.fits_layer_op(layer) else self._fused_layer
            delta, hidden, key, value = run(layer, x, skip, past[2 * index], past[2 * index + 1], seqlens,
                                            total_length, bias)
            presents += [key, value]
        if self.last_logits:
            delta, hidden = delta[:, -1:], hidden[:, -1:]
        normed, _ = self._norm(inner.norm, delta, hidden)
        logits = self.model.lm_head(normed).float()
        return (logits, *presents)
