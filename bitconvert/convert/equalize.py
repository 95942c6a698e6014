"""Exact equivalence scalings of a LLaMA decoder layer, folded into its float parts and neighbouring projections, and
the AWQ-style search (arXiv 2306.00978) that picks them on calibration activations.

Four sites, each a per-channel vector ``c`` (> 0); in full precision each leaves the layer's function unchanged:
- attention input: ``input_layernorm.weight /= c``, ``q/k/v_proj.weight[:, j] *= c_j`` (hidden,);
- MLP input: ``post_attention_layernorm.weight /= c``, ``gate/up_proj.weight[:, j] *= c_j`` (hidden,);
- values: ``v_proj.weight[i, :] /= c_i`` (and its bias), ``o_proj.weight[:, h*d + k] *= c[kv(h)*d + k]`` with
  ``c`` of size num_key_value_heads * head_dim and ``kv(h) = h // (heads / kv_heads)`` (attention is linear in V,
  and every query head of a KV group reads the same scaled values);
- MLP up: ``up_proj.weight[i, :] /= c_i`` (and its bias), ``down_proj.weight[:, i] *= c_i`` (``act(gate) * up`` is
  linear in ``up``).
With tied embeddings nothing here touches the embedding or the final norm: the scalings live inside the layer.

Search (per site, AWQ): ``c = s^alpha / sqrt(max(s^alpha) min(s^alpha))`` with ``s_j`` the mean ``|x_j|`` of the
consumer's inputs; ``alpha`` from :data:`ALPHAS` (0 = no scaling, so the search never picks a worse measured error).
Measured on SmolLM2-135M (1,024 LAMBADA tokens, layers 0/5/15/29), AWQ's own range alpha in (0, 1] raises the
ternary error at every site but the values one (up to 2.8x at alpha = 1): one scale per tensor leaves no room to
favour salient columns. Small exponents of either sign gain 1-20%, hence the grid.
The measured error is on the quantized path: the consumers' output error with int8 per-token activations of the
scaled inputs and ternary weights fitted to them, ``sum ||X W^T - Q8(X / c) Q(W c)^T||^2``; for the values and up
sites the producer's (v or up) output error is added, carried to the block output through the consumer
(``(err * c) W_o^T`` per KV group, ``(act(gate) * err * c) W_down^T``), ignoring the attention mixing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .scale_search import Inputs, TernaryFit

ALPHAS = (0.0, -0.25, 0.25)

Fit = Callable[[torch.Tensor, Inputs], TernaryFit]  # (weight (out, in), its int8-quantized inputs) -> fit


@dataclass
class LayerActivations:
    """Full-precision inputs of a layer's projections on the search tokens, all (N, features) fp32."""

    attention_in: torch.Tensor  # input_layernorm output: q/k/v inputs
    values_in: torch.Tensor  # attention output: o_proj input
    mlp_in: torch.Tensor  # post_attention_layernorm output: gate/up inputs
    gate_act: torch.Tensor  # act(gate_proj(x))
    down_in: torch.Tensor  # act(gate) * up: down_proj input


def _head_groups(layer) -> tuple[int, int, int]:
    attention = layer.self_attn
    config = attention.config
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    return heads, kv_heads, attention.head_dim


def expand_to_heads(c: torch.Tensor, layer) -> torch.Tensor:
    """``c`` (kv_heads * head_dim,) repeated for every query head of its group -> (heads * head_dim,)."""
    heads, kv_heads, head_dim = _head_groups(layer)
    return c.view(kv_heads, head_dim).repeat_interleave(heads // kv_heads, dim=0).reshape(-1)


@torch.no_grad()
def scale_attention_inputs(layer, c: torch.Tensor) -> None:
    layer.input_layernorm.weight.div_(c.to(layer.input_layernorm.weight.dtype))
    for projection in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
        projection.weight.mul_(c.to(projection.weight.dtype))


@torch.no_grad()
def scale_mlp_inputs(layer, c: torch.Tensor) -> None:
    layer.post_attention_layernorm.weight.div_(c.to(layer.post_attention_layernorm.weight.dtype))
    for projection in (layer.mlp.gate_proj, layer.mlp.up_proj):
        projection.weight.mul_(c.to(projection.weight.dtype))


def _scale_rows_then_columns(producer, consumer, rows: torch.Tensor, columns: torch.Tensor) -> None:
    producer.weight.div_(rows.to(producer.weight.dtype).unsqueeze(1))
    if producer.bias is not None:
        producer.bias.div_(rows.to(producer.bias.dtype))
    consumer.weight.mul_(columns.to(consumer.weight.dtype))


@torch.no_grad()
def scale_values(layer, c: torch.Tensor) -> None:
    _scale_rows_then_columns(layer.self_attn.v_proj, layer.self_attn.o_proj, c, expand_to_heads(c, layer))


@torch.no_grad()
def scale_up(layer, c: torch.Tensor) -> None:
    _scale_rows_then_columns(layer.mlp.up_proj, layer.mlp.down_proj, c, c)


def awq_factor(x: torch.Tensor, alpha: float) -> torch.Tensor:
    """``s^alpha`` normalised to geometric mid-range 1, ``s = mean |x|`` per channel of ``x`` (N, features)."""
    s = x.abs().mean(0).clamp(min=1e-5).pow(alpha)
    return s / (s.max() * s.min()).sqrt()


def _consumer_error(x: torch.Tensor, weights: list[torch.Tensor], c: torch.Tensor, fit: Fit) -> float:
    """``sum ||x W^T - Q8(x / c) Q(W c)^T||^2`` over ``weights``."""
    inputs = Inputs.quantized(x / c)
    total = 0.0
    for weight in weights:
        result = fit(weight * c, inputs)
        total += (x @ weight.t() - inputs.times_codes(result.codes) * result.scale).pow(2).sum().item()
    return total


def _producer_error(x: torch.Tensor, weight: torch.Tensor, c: torch.Tensor, fit: Fit) -> torch.Tensor:
    """The producer's output error in unscaled units, (N, out): ``(Q8(x) Q(W / c)^T) * c - x W^T``."""
    inputs = Inputs.quantized(x)
    result = fit(weight / c.unsqueeze(1), inputs)
    return (inputs.times_codes(result.codes) * result.scale) * c - x @ weight.t()


def _best_alpha(stats: torch.Tensor, error: Callable[[torch.Tensor], float]) -> tuple[float, torch.Tensor, dict]:
    errors = {}
    best = (float("inf"), 0.0, None)
    for alpha in ALPHAS:
        c = awq_factor(stats, alpha) if alpha else torch.ones(stats.shape[1], device=stats.device)
        value = error(c)
        errors[alpha] = value
        if value < best[0]:
            best = (value, alpha, c)
    return best[1], best[2], errors


@torch.no_grad()
def equalize_layer(layer, acts: LayerActivations, fit: Fit) -> dict:
    """Search and apply the four scalings to ``layer`` (in place); returns the chosen alphas and relative gains."""
    attention, mlp = layer.self_attn, layer.mlp
    chosen = {}

    def record(site, alpha, errors):
        chosen[site] = {"alpha": alpha, "error_ratio": errors[alpha] / errors[0.0] if errors[0.0] else 1.0}

    qkv = [attention.q_proj.weight.float(), attention.k_proj.weight.float(), attention.v_proj.weight.float()]
    alpha, c, errors = _best_alpha(acts.attention_in, lambda c: _consumer_error(acts.attention_in, qkv, c, fit))
    scale_attention_inputs(layer, c)
    record("attention_in", alpha, errors)

    o_weight = attention.o_proj.weight.float()
    v_weight = attention.v_proj.weight.float()
    attention_in = acts.attention_in / c  # the (now scaled) q/k/v input

    heads, kv_heads, head_dim = _head_groups(layer)

    def values_error(c):
        producer = _producer_error(attention_in, v_weight, c, fit)  # (N, kv_heads * head_dim)
        producer = producer.view(-1, kv_heads, head_dim).repeat_interleave(heads // kv_heads, dim=1)
        carried = producer.reshape(-1, heads * head_dim) @ o_weight.t()
        return _consumer_error(acts.values_in, [o_weight], expand_to_heads(c, layer), fit) + carried.pow(2).sum().item()

    alpha, c, errors = _best_alpha(_kv_stats(acts.values_in, layer), values_error)
    scale_values(layer, c)
    record("values", alpha, errors)

    gate_up = [mlp.gate_proj.weight.float(), mlp.up_proj.weight.float()]
    alpha, c, errors = _best_alpha(acts.mlp_in, lambda c: _consumer_error(acts.mlp_in, gate_up, c, fit))
    scale_mlp_inputs(layer, c)
    record("mlp_in", alpha, errors)

    down_weight, up_weight = mlp.down_proj.weight.float(), mlp.up_proj.weight.float()
    mlp_in = acts.mlp_in / c

    def up_error(c):
        carried = (acts.gate_act * _producer_error(mlp_in, up_weight, c, fit)) @ down_weight.t()
        return _consumer_error(acts.down_in, [down_weight], c, fit) + carried.pow(2).sum().item()

    alpha, c, errors = _best_alpha(acts.down_in, up_error)
    scale_up(layer, c)
    record("up", alpha, errors)
    return chosen


def _kv_stats(values_in: torch.Tensor, layer) -> torch.Tensor:
    """o_proj inputs (N, heads * head_dim) pooled over the query heads of each KV group -> (N * group, kv * head_dim),
    so that ``mean |x|`` per channel is taken over every head that reads the same value channel."""
    heads, kv_heads, head_dim = _head_groups(layer)
    group = heads // kv_heads
    return values_in.view(-1, kv_heads, group, head_dim).transpose(1, 2).reshape(-1, kv_heads * head_dim)
