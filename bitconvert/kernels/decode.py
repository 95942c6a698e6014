"""A lean decoding loop for converted LLaMA models: the kernels called directly, a static KV cache, fused products.

``bitconvert.load`` returns a transformers model; its ``generate`` spends most of a decoding step outside the
ternary products (module calls, cache objects, masks, per-layer Python). :class:`Decoder` runs the same LLaMA math
(RMSNorm, rotary embedding, grouped-query attention, SwiGLU) in fp32 as one flat loop over plain tensors taken from
that model:

- q/k/v and gate/up are each one ternary product (:func:`fuse_projections`): activation quantization is per token
  of the shared input, so the concatenated rows give the same int32 accumulators, and each row keeps its own
  projection's weight scale (``ternary_linear`` with one scale per row): bit for bit the separate products.
- the KV cache is preallocated per layer, (kv_heads, max_len, head_dim), in fp32 (exact) or fp16
  (``kv_cache="fp16"``: half the bytes that every decoded token reads, which at long contexts exceed the weights':
  2.1 GB of fp32 cache per 7B token at position 2,048 against 1.7 GB of weights; each key and value is rounded to
  fp16 once, as llama.cpp's default f16 cache does, and attention computes in fp32 on the values read back; a key
  or value beyond fp16's 65,504 becomes inf, so a model with such activations needs the fp32 cache); one
  C++ call (``rope_cache_write``, ``csrc/decode_ops.cpp``) applies the rotary embedding to q and k and writes k and
  v into it; attention is one ``scaled_dot_product_attention`` call with grouped-query heads (no repeated K/V).
- a single-token step (decoding) runs each layer as ONE C++ operator instead (``decode_layer``,
  ``csrc/decode_step.cpp``): the same norm, products, rotary/cache write, attention and SwiGLU with no Python or
  dispatcher call in between. Its products are bit-identical given equal inputs; its norms and attention sum in
  another fp32 order than torch's, so its logits equal the per-op path's up to fp32 rounding
  (``Decoder(model, fused_step=False)`` runs every step per operator, as prefill always does).
- the output projection is the model's own ``lm_head`` (exact float, or :class:`~.lm_head.Int8LmHead`), applied to
  the last position only unless all logits are asked for.

Supported: transformers ``LlamaForCausalLM`` with PackedBitLinear projections, no biases, no SubLN, SiLU MLP
(:func:`supported` says why not otherwise). Shapes: batch 1; ``forward(ids)`` takes token ids (T,) at the next T
positions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..bitlinear import PackedBitLinear
from ..packing import pack_ternary
from . import LAYOUTS, ROW_BLOCKS, layout_index, load_library, repack
from .pages import cat_on_huge_pages, on_huge_pages, zeros_on_huge_pages


KV_CACHE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16}


@dataclass
class FusedProjection:
    """Several PackedBitLinear of one input as one product: ``weight`` repacked in ``layout``, fp32 ``scales``
    (out,), the ``sizes`` of the parts in output order."""

    weight: torch.Tensor
    layout: int
    scales: torch.Tensor
    sizes: tuple[int, ...]

    @property
    def out_features(self) -> int:
        return sum(self.sizes)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        # the operator's overload itself: no Python wrapper or overload resolution on the per-token path
        return torch.ops.bitconvert.ternary_linear.default(x, self.weight, self.out_features, self.scales, -1, 0,
                                                           self.layout)


def fuse_projections(modules: list[PackedBitLinear], layout: int) -> FusedProjection:
    """One product for ``modules`` (same in_features) in ``layout``: rows concatenated in order, each with its
    module's scale.

    When every part is whole row blocks (:data:`ROW_BLOCKS`: 16 rows, lut 128) and was repacked in ``layout``
    already, the repacked buffers are concatenated (a block's bytes are contiguous) and each module's
    ``kernel_weight`` becomes a view into the fused buffer, so nothing is held twice; otherwise the ternary codes
    are concatenated and repacked.
    """
    load_library()
    sizes = tuple(module.out_features for module in modules)
    scales = torch.cat([module.weight_scale.float().expand(module.out_features) for module in modules]).contiguous()
    parts = [getattr(module, "kernel_weight", None) for module in modules]
    in_layout = all(getattr(module, "kernel_layout", None) == layout for module in modules)
    block = ROW_BLOCKS[LAYOUTS[layout]]
    if all(size % block == 0 for size in sizes) and all(part is not None for part in parts) and in_layout:
        weight = cat_on_huge_pages(parts)
        offset = 0
        for module, part in zip(modules, parts):
            module.kernel_weight = weight[offset:offset + part.numel()]
            offset += part.numel()
    else:
        weight = on_huge_pages(
            repack(pack_ternary(torch.cat([module.ternary() for module in modules])), sum(sizes), layout))
    return FusedProjection(weight, layout, scales, sizes)


def supported(model) -> str | None:
    """None if :class:`Decoder` can run ``model``, else the reason it cannot."""
    config = model.config
    if getattr(config, "model_type", None) != "llama":
        return f"model type {getattr(config, 'model_type', None)!r} (the lean decoder runs LLaMA)"
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        return "projection biases"
    if config.hidden_act != "silu":
        return f"activation {config.hidden_act!r}"
    for layer in model.model.layers:
        for module in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj, layer.self_attn.o_proj,
                       layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj):
            if not isinstance(module, PackedBitLinear) or module.sub_norm is not None:
                return "projections that are not plain PackedBitLinear (unconverted, or SubLN)"
    return None


@dataclass
class _Layer:
    input_norm: torch.Tensor
    qkv: FusedProjection
    o_proj: FusedProjection
    post_norm: torch.Tensor
    gate_up: FusedProjection
    down: FusedProjection


class Decoder:
    """Greedy/sampled decoding of ``model`` (see the module docstring) with a KV cache of ``max_len`` positions.

    ``forward(ids, logits="last"|"all")`` runs ids (T,) at positions ``position .. position + T - 1`` and returns
    fp32 logits (vocab,) of the last one, or (T, vocab); ``reset()`` empties the cache. ``fused_step``: run a
    single-token step as one ``decode_layer`` operator per layer (False: per operator, as prefill). ``kv_cache``:
    ``"fp32"`` (exact) or ``"fp16"`` (see the module docstring).
    """

    def __init__(self, model, max_len: int = 2048, fused_step: bool = True, kv_cache: str = "fp32"):
        reason = supported(model)
        if reason is not None:
            raise ValueError(f"the lean decoder does not support {reason}")
        if kv_cache not in KV_CACHE_DTYPES:
            raise ValueError(f"unknown KV cache type {kv_cache!r}; choose {' or '.join(KV_CACHE_DTYPES)}")
        config = model.config
        self.heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.eps = config.rms_norm_eps
        self.max_len = max_len
        self.embed = model.model.embed_tokens.weight.detach().float()
        self.final_norm = model.model.norm.weight.detach().float()
        self.lm_head = model.lm_head
        self.layout = layout_index()  # of the default path, which the products run on
        self.layers = []
        for layer in model.model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            self.layers.append(_Layer(
                layer.input_layernorm.weight.detach().float(),
                fuse_projections([attn.q_proj, attn.k_proj, attn.v_proj], self.layout),
                fuse_projections([attn.o_proj], self.layout),
                layer.post_attention_layernorm.weight.detach().float(),
                fuse_projections([mlp.gate_proj, mlp.up_proj], self.layout),
                fuse_projections([mlp.down_proj], self.layout),
            ))
        cos, sin = model.model.rotary_emb(self.embed[:1][None], torch.arange(max_len)[None])
        self.cos, self.sin = cos[0].float().contiguous(), sin[0].float().contiguous()  # (max_len, head_dim)
        shape = (len(self.layers), self.kv_heads, max_len, self.head_dim)
        self.keys = zeros_on_huge_pages(shape, KV_CACHE_DTYPES[kv_cache])
        self.values = zeros_on_huge_pages(shape, KV_CACHE_DTYPES[kv_cache])
        self.layer_keys, self.layer_values = list(self.keys.unbind(0)), list(self.values.unbind(0))  # views
        self.fused_step = fused_step
        # decode_layer's arguments after x, per layer, built once (the step then adds position, heads, eps, layout)
        self.step_arguments = [
            (layer.input_norm, layer.qkv.weight, layer.qkv.scales, layer.o_proj.weight, layer.o_proj.scales,
             layer.post_norm, layer.gate_up.weight, layer.gate_up.scales, layer.down.weight, layer.down.scales,
             self.cos, self.sin, keys, values)
            for layer, keys, values in zip(self.layers, self.layer_keys, self.layer_values)
        ]
        self.position = 0

    def reset(self) -> None:
        self.position = 0

    def _norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """LlamaRMSNorm in one call (torch's fused rms_norm rounds as LlamaRMSNorm's fp32 sequence of operations;
        the parity tests check it)."""
        return F.rms_norm(x, weight.shape, weight, self.eps)

    @torch.inference_mode()
    def forward(self, ids: torch.Tensor, logits: str = "last") -> torch.Tensor:
        count, start = ids.shape[0], self.position
        end = start + count
        if end > self.max_len:
            raise ValueError(f"the KV cache holds {self.max_len} positions; {end} needed")
        x = self.embed[ids]
        if count == 1 and self.fused_step:
            self._step_layers(x, start)
        else:
            x = self._layers(x, start)
        self.position = end
        if logits == "last":
            x = x[-1:]
        out = self.lm_head(self._norm(x, self.final_norm)).float()
        return out[0] if logits == "last" else out

    __call__ = forward

    def _step_layers(self, x: torch.Tensor, position: int) -> None:
        """All layers for one token x (1, hidden) at ``position``, in place: one ``decode_layer`` call each."""
        step = torch.ops.bitconvert.decode_layer.default
        heads, eps, layout = self.heads, self.eps, self.layout
        for arguments in self.step_arguments:
            step(x, *arguments, position, heads, eps, layout)

    def _layers(self, x: torch.Tensor, start: int) -> torch.Tensor:
        """All layers for tokens x (T, hidden) at positions ``start ..``, per operator; returns the new hidden states."""
        count = x.shape[0]
        end = start + count
        heads, kv_heads, dim = self.heads, self.kv_heads, self.head_dim
        rope_cache_write = torch.ops.bitconvert.rope_cache_write
        mask = None
        if count > 1 and start > 0:  # new queries see the whole cache and the causal part of themselves
            mask = torch.ones(count, end, dtype=torch.bool).tril(start)
        for index, layer in enumerate(self.layers):
            qkv = layer.qkv(self._norm(x, layer.input_norm))
            keys, values = self.layer_keys[index], self.layer_values[index]
            query = rope_cache_write(qkv, self.cos, self.sin, keys, values, start, heads)  # (heads, T, dim)
            attention = F.scaled_dot_product_attention(  # an fp16 cache is read back to fp32 (exact)
                query[None], keys[None, :, :end].float(), values[None, :, :end].float(), attn_mask=mask,
                is_causal=count > 1 and start == 0, scale=dim ** -0.5, enable_gqa=kv_heads != heads)
            x = x + layer.o_proj(attention[0].transpose(0, 1).reshape(count, heads * dim))
            gate, up = layer.gate_up(self._norm(x, layer.post_norm)).split(layer.gate_up.sizes, dim=-1)
            x = x + layer.down(F.silu(gate) * up)
        return x

    def generate(self, prompt: list[int], max_new_tokens: int, eos: tuple[int, ...] = (), sample=None) -> list[int]:
        """New token ids after ``prompt`` (the cache is reset first): greedy, or ``sample(logits) -> id``."""
        if len(prompt) + max_new_tokens > self.max_len:
            raise ValueError(f"prompt + new tokens = {len(prompt) + max_new_tokens} exceed the cache ({self.max_len})")
        self.reset()
        return self.continue_from(self.forward(torch.tensor(prompt)), max_new_tokens, eos, sample)

    def continue_from(self, logits: torch.Tensor, max_new_tokens: int, eos: tuple[int, ...] = (),
                      sample=None) -> list[int]:
        """New token ids after the positions already run, whose last logits are ``logits`` (vocab,)."""
        tokens: list[int] = []
        while True:
            token = int(logits.argmax()) if sample is None else int(sample(logits))
            tokens.append(token)
            if token in eos or len(tokens) == max_new_tokens:
                return tokens
            logits = self.forward(torch.tensor([token]))
