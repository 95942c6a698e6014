"""Writing a trained QAT model: the converted folder (exactly :mod:`bitconvert.checkpoint`'s format, the model at
lambda = 1) and, inside it, ``latent/``, the full-precision latent weights for further training.

Name mapping from the training model (BitLinear with an inner SubLN) to the ``bitnet`` model type:
``...self_attn.o_proj.sub_norm.weight -> ...self_attn.attn_sub_norm.weight`` and
``...mlp.down_proj.sub_norm.weight -> ...mlp.ffn_sub_norm.weight``.
``latent/`` is a LLaMA folder (loadable as a fine-tuning SOURCE) whose safetensors also hold the SubLN gains under
their training names; :func:`load_latent_sub_norms` puts them back.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from ..bitlinear import BitLinear, PackedBitLinear
from ..checkpoint import (
    Report,
    ShardWriter,
    output_config,
    read_tensors_with_suffix,
    save_tokenizer_and_generation_config,
    untied_state_dict,
)
from ..errors import BitconvertError

LATENT_DIR = "latent"
SUB_NORM_RENAMES = (
    (".self_attn.o_proj.sub_norm.weight", ".self_attn.attn_sub_norm.weight"),
    (".mlp.down_proj.sub_norm.weight", ".mlp.ffn_sub_norm.weight"),
)
TRAINING_SUB_NORM_SUFFIX = ".sub_norm.weight"


def converted_tensors(named_tensors):
    """``(name, tensor)`` pairs in the converted folder's naming (SubLN gains renamed)."""
    for name, tensor in named_tensors:
        for old, new in SUB_NORM_RENAMES:
            if name.endswith(old):
                name = name.removesuffix(old) + new
        yield name, tensor


def _frozen(name: str, module: BitLinear, report: Report):
    """Freeze one BitLinear (:meth:`PackedBitLinear.from_bitlinear`: the codes and scale of its lambda = 1 forward)
    into ``(weight, packed codes)`` and ``(weight_scale, 1/g)``; adds its statistics to ``report``."""
    packed = PackedBitLinear.from_bitlinear(module)
    weight, codes = module.weight.detach().float(), packed.ternary().float()
    scale = 1.0 / packed.weight_scale.item()
    error = torch.linalg.vector_norm(weight - codes * scale) / torch.linalg.vector_norm(weight).clamp(min=1e-12)
    report.layers.append({"name": name, "shape": list(weight.shape), "scale": scale,
                          "zero_fraction": (codes == 0).float().mean().item(), "relative_error": error.item()})
    report.parameters_converted += weight.numel()
    return [(name, packed.weight), (name.removesuffix("weight") + "weight_scale", packed.weight_scale)]


def frozen_tensors(model, report: Report, dtype: torch.dtype):
    """``(name, tensor)`` of ``model`` in the converted format: each BitLinear's weight frozen into packed codes and
    ``weight_scale`` (absmean/absmedian of the latent weights, or the learned scale ``s``), training-only state (``s``)
    dropped, everything else cast to ``dtype``; SubLN gains renamed; fills ``report``'s layer stats and counts."""
    bitlinears = {name: module for name, module in model.named_modules() if isinstance(module, BitLinear)}

    def named():
        for name, tensor in untied_state_dict(model).items():
            owner, _, key = name.rpartition(".")
            if owner not in bitlinears:
                yield name, tensor.to(dtype) if tensor.is_floating_point() else tensor
            elif key == "weight":
                yield from _frozen(name, bitlinears[owner], report)
            elif key == "bias":
                yield name, tensor.to(dtype)

    return converted_tensors(named())


def write_trained_model(model, folder: Path, *, tokenizer, sub_norm: bool, report: Report,
                        shard_bytes: int = 1 << 30) -> None:
    """Write the trained ``model`` (training-mode BitLinear inside) into ``folder``: converted format + ``latent/``."""
    state = untied_state_dict(model)
    dtype = model.dtype
    config = output_config(model.config.to_dict(), sub_norm=sub_norm, dtype=dtype)
    writer = ShardWriter(folder, shard_bytes)
    for name, tensor in frozen_tensors(model, report, dtype):
        writer.add(name, tensor)
    writer.finish()
    report.bytes_after = writer.total_bytes
    config.save_pretrained(folder)
    save_tokenizer_and_generation_config(folder, tokenizer, model.generation_config)
    latent = folder / LATENT_DIR
    latent.mkdir()
    save_file({name: tensor.contiguous() for name, tensor in state.items()}, str(latent / "model.safetensors"),
              metadata={"format": "pt"})
    model.config.save_pretrained(latent)
    save_tokenizer_and_generation_config(latent, tokenizer, model.generation_config)


def load_latent_sub_norms(model, folder: Path | None, sub_norm: bool) -> None:
    """Copy SubLN gains saved in a ``latent/`` SOURCE folder into ``model`` (already swapped with SubLN)."""
    if folder is None:
        return
    saved = read_tensors_with_suffix(folder, TRAINING_SUB_NORM_SUFFIX)
    if saved and not sub_norm:
        raise BitconvertError(f"'{folder}' was trained with SubLN; pass --sub-norm to continue training it")
    if saved:
        model.load_state_dict(saved, strict=False)
