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

from ..checkpoint import (
    Report,
    output_config,
    read_tensors_with_suffix,
    save_tokenizer_and_generation_config,
    untied_state_dict,
    write_converted_tensors,
)
from ..errors import BitconvertError

LATENT_DIR = "latent"
SUB_NORM_RENAMES = (
    (".self_attn.o_proj.sub_norm.weight", ".self_attn.attn_sub_norm.weight"),
    (".mlp.down_proj.sub_norm.weight", ".mlp.ffn_sub_norm.weight"),
)
TRAINING_SUB_NORM_SUFFIX = ".sub_norm.weight"


def converted_tensors(state: dict[str, torch.Tensor]):
    """``(name, tensor)`` in the converted folder's naming (SubLN gains renamed)."""
    for name, tensor in state.items():
        for old, new in SUB_NORM_RENAMES:
            if name.endswith(old):
                name = name.removesuffix(old) + new
        yield name, tensor


def write_trained_model(model, folder: Path, *, tokenizer, sub_norm: bool, weight_scale_method: str, report: Report,
                        shard_bytes: int = 1 << 30) -> None:
    """Write the trained ``model`` (training-mode BitLinear inside) into ``folder``: converted format + ``latent/``."""
    state = untied_state_dict(model)
    source_config = model.config.to_dict()
    dtype = model.dtype
    config = output_config(source_config, sub_norm=sub_norm, dtype=dtype)
    write_converted_tensors(folder, converted_tensors(state), report, weight_scale_method=weight_scale_method,
                            dtype=dtype, shard_bytes=shard_bytes)
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
