"""Calibrated conversion: codes and scales chosen on real activations, one decoder layer at a time.

For each decoder layer ``i`` (only its weights, fp32, and the calibration hidden states in memory):
1. the full-precision output ``y_fp = layer(h_fp)`` on the full-precision model's hidden states (the target of
   block reconstruction, and the next layer's ``h_fp``);
2. equivalence scaling (:mod:`.equalize`), searched on ``h_q``, the hidden states of the already converted prefix;
3. sequential quantization of the projection groups (q, k, v), (o), (gate, up), (down): each group's inputs are
   captured running the layer on ``h_q`` with the groups before it already ternary (int8 per-token activations, as
   in inference; :class:`.scale_search.Inputs`), and each projection gets the scale/threshold of least output
   error on them (:mod:`.scale_search`, else absmean) refined by error compensation (:mod:`.gptq`, from
   ``H = Q8(X)^T Q8(X)``);
4. optionally block reconstruction (:mod:`.reconstruct`) towards ``y_fp``;
5. ``h_q <- layer_q(h_q)``, ``h_fp <- y_fp``, and the layer's tensors are handed to the writer.
Embeddings, the final norm and lm_head pass through unchanged (so tied embeddings stay tied and exact).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from ..bitlinear import BitLinear
from ..checkpoint import TernaryWeight
from .calib_data import calibration_tokens
from .device import resolve_device
from .equalize import LayerActivations, equalize_layer
from .gptq import gptq_fit
from .layers import LayerStream
from .reconstruct import reconstruct_layer, relative_error
from .scale_search import Inputs, OutputError, TernaryFit, absmean_fit, search_scale

# LayerStream.stages' names -> the projections that read that input
PROJECTION_GROUPS = {"attention": ("self_attn", ("q_proj", "k_proj", "v_proj")), "values": ("self_attn", ("o_proj",)),
                     "mlp": ("mlp", ("gate_proj", "up_proj")), "down": ("mlp", ("down_proj",))}
SEARCH_TOKENS = 1024  # calibration tokens the equalization search measures on
SEARCH_THRESHOLDS = (0.6, 0.8)  # the coarser scale search that scores its candidates


@dataclass(frozen=True)
class CalibrationConfig:
    """What calibrated conversion does (the Python face of ``--calibrate`` and its options).

    data:               calibration text as ``finetune --data`` takes it (None: the LAMBADA training passages)
    text_field:         JSONL/Parquet/datasets field holding the text
    tokens:             calibration tokens (rounded up to whole sequences of ``seq_len``)
    seq_len:            tokens per calibration sequence
    optimal_scale:      scale and threshold of least output error (else absmean)
    equalize:           AWQ-style equivalence scaling folded into norms and neighbouring projections
    gptq:               error compensation across columns on the fixed ternary grid
    reconstruct:        block-wise reconstruction after the above
    reconstruct_steps:  Adam steps per layer
    reconstruct_lr:     Adam learning rate, relative to each projection's scale (see :mod:`.reconstruct`)
    reconstruct_batch:  sequences per reconstruction step
    device:             auto | cpu | cuda
    seed:               reconstruction batch order
    """

    data: str | None = None
    text_field: str = "text"
    tokens: int = 4096
    seq_len: int = 512
    optimal_scale: bool = True
    equalize: bool = True
    gptq: bool = True
    reconstruct: bool = False
    reconstruct_steps: int = 100
    reconstruct_lr: float = 0.01
    reconstruct_batch: int = 2
    device: str = "auto"
    seed: int = 0


def fit_projection(weight: torch.Tensor, inputs: Inputs, config: CalibrationConfig) -> TernaryFit:
    """Codes and scale for one projection given its (quantized-path) inputs (one :class:`.scale_search.OutputError`
    shared by the scale search and error compensation)."""
    objective = OutputError(weight, inputs)
    fit = search_scale(objective) if config.optimal_scale else absmean_fit(weight, objective)
    return gptq_fit(objective, fit) if config.gptq else fit


def _search_fit(config: CalibrationConfig):
    """The quantizer the equalization search scores candidates with (no error compensation: it is the slow part)."""
    if config.optimal_scale:
        return lambda weight, inputs: search_scale(OutputError(weight, inputs), SEARCH_THRESHOLDS, alternating_steps=1)
    return lambda weight, inputs: absmean_fit(weight)


def _search_activations(stream: LayerStream, layer, hidden: torch.Tensor) -> LayerActivations:
    stages = dict(stream.stages(layer, hidden))
    mlp = layer.mlp
    return LayerActivations(attention_in=stages["attention"], values_in=stages["values"], mlp_in=stages["mlp"],
                            gate_act=mlp.act_fn(mlp.gate_proj(stages["mlp"])), down_in=stages["down"])


def _ternary_module(linear: nn.Linear, fit: TernaryFit) -> BitLinear:
    module = BitLinear.from_linear(linear, weight_scale_method="learned")
    module.init_from_ternary(fit.codes, fit.scale)
    return module


def calibrate_layer(stream: LayerStream, layer, h_q: torch.Tensor, config: CalibrationConfig) -> dict:
    """Steps 2-3 of the module docstring on ``layer`` (in place); returns per-projection fits, statistics and
    ``"output"``, the converted layer's output on ``h_q``."""
    info: dict = {}
    if config.equalize:
        search_rows = max(1, -(-SEARCH_TOKENS // h_q.shape[1]))
        acts = _search_activations(stream, layer, h_q[:search_rows])
        info["equalize"] = equalize_layer(layer, acts, _search_fit(config))
        del acts
    fits = {}
    for stage, inputs in stream.stages(layer, h_q):
        if stage == "output":
            info["output"] = inputs
            break
        block_name, names = PROJECTION_GROUPS[stage]
        block = getattr(layer, block_name)
        quantized = Inputs.quantized(inputs)
        for name in names:
            linear = getattr(block, name)
            weight = linear.weight.detach().float()
            fit = fit_projection(weight, quantized, config)
            reference = weight.cpu().clone()
            fits[f"{block_name}.{name}.weight"] = TernaryWeight(
                fit.codes.cpu(), fit.scale.cpu(), reference,
                {"calibration_output_error": fit.error / max(fit.output_power, 1e-30),
                 "absmean_output_error": fit.absmean_error / max(fit.output_power, 1e-30)})
            setattr(block, name, _ternary_module(linear, fit))
        del quantized, inputs
    info["fits"] = fits
    return info


def _layer_tensors(layer, fits: dict[str, TernaryWeight]) -> dict[str, torch.Tensor | TernaryWeight]:
    """The layer's tensors by local name: the ternary projections as codes + scale, the rest as float tensors."""
    ternary = {name: module for name, module in layer.named_modules() if isinstance(module, BitLinear)}
    tensors: dict = {}
    for name, module in ternary.items():
        codes, scale = module.ternary_and_scale()
        fit = fits[f"{name}.weight"]
        tensors[f"{name}.weight"] = TernaryWeight(codes.cpu(), scale.cpu(), fit.reference, fit.stats)
    for name, parameter in layer.named_parameters():
        owner, _, leaf = name.rpartition(".")
        if not (owner in ternary and leaf in ("weight", "learned_scale")):
            tensors[name] = parameter.detach().cpu()
    return tensors


def calibrated_tensors(reader, model_config, tokenizer, config: CalibrationConfig, *, progress: bool = True,
                       summary: dict | None = None) -> Iterator[tuple[str, torch.Tensor | TernaryWeight]]:
    """``(name, tensor)`` for the whole checkpoint: non-layer tensors as read, then each calibrated layer's tensors
    (projections as :class:`TernaryWeight`). ``summary`` (if given) receives per-layer statistics and timings."""
    device = resolve_device(config.device)
    stream = LayerStream(reader, model_config, device)
    ids = calibration_tokens(config.data, tokenizer, config.tokens, min(config.seq_len, config.tokens), config.text_field)
    for name in stream.other_names:
        yield name, reader.get(name)
    h_fp = stream.embed(ids)
    h_q = h_fp
    layers_info = []
    if summary is not None:
        summary.update(device=str(device), tokens=int(ids.numel()), sequences=int(ids.shape[0]), layers=layers_info)
    bar = tqdm(range(stream.num_layers), desc="calibrating", unit="layer", disable=not progress)
    for index in bar:
        started = time.perf_counter()
        layer, passthrough = stream.layer(index)
        y_fp = stream.run(layer, h_fp)
        info = calibrate_layer(stream, layer, h_q, config)
        record = {"layer": index}
        if "equalize" in info:
            record["equalize"] = info["equalize"]
        output = info["output"]
        if config.reconstruct:
            result = reconstruct_layer(stream, layer, h_q, y_fp, steps=config.reconstruct_steps,
                                       lr=config.reconstruct_lr, batch_size=config.reconstruct_batch,
                                       seed=config.seed + index, progress=progress, desc=f"reconstruct layer {index}")
            record["reconstruct_error"] = [result.error_before, result.error_after]
            output = result.output
        h_q = output
        record["output_mse"] = (h_q - y_fp).pow(2).mean().item()
        record["output_relative_error"] = relative_error(h_q, y_fp).item()
        h_fp = y_fp
        prefix = stream.layer_prefix(index)
        for local, tensor in _layer_tensors(layer, info["fits"]).items():
            yield prefix + local, tensor
        yield from passthrough.items()
        record["seconds"] = round(time.perf_counter() - started, 2)
        layers_info.append(record)
        bar.set_postfix(error=f"{record['output_relative_error']:.3g}", refresh=False)
        del layer, info
