"""``load(path)``: a converted folder as a transformers ``PreTrainedModel`` running bitconvert's inference path.

Stock transformers builds the model (config, shards, dtype, tied weights); every transformers ``BitLinear`` is then
replaced by :class:`~bitconvert.bitlinear.PackedBitLinear`, sharing its packed weights and taking the scale from the
files in fp32 (transformers casts it to the model dtype).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from .bitlinear import PackedBitLinear, get_backend
from .checkpoint import read_tensors_with_suffix
from .errors import BitconvertError, reason
from .kernels.lm_head import LM_HEADS, replace_lm_head


def is_converted_folder(path: str | Path) -> bool:
    """True when ``path`` is a folder whose config.json declares the bitnet quantization."""
    config = Path(path) / "config.json"
    if not config.is_file():
        return False
    try:
        quantization = json.loads(config.read_text()).get("quantization_config") or {}
    except (OSError, json.JSONDecodeError):
        return False
    return quantization.get("quant_method") == "bitnet"


def load(path: str | Path, dtype: torch.dtype | str | None = None, lm_head: str = "exact"):
    """Load a converted folder; returns a transformers model in eval mode whose projections are PackedBitLinear.

    ``dtype``: the float parts (embeddings, norms, attention, lm_head). None (default): float32, because these parts
    run on the CPU, where float16/bfloat16 are imprecise (on a random 7B-shaped model fp16 moves the logits by ~14% of
    their standard deviation) and slow for everything but the largest matmul (no native half arithmetic on
    AVX2/AVX-512 CPUs without AMX-FP16: each op converts; measured on a 4-layer 7B-shaped model: attention 13 ms per
    token in fp16 against 7 ms in fp32, while the memory-bound exact lm_head, half the bytes in fp16, took 49 against
    67 ms: ``lm_head="int8"`` is the fast option for it, 21 ms). The ternary products are fp32 either way. "auto"
    keeps the checkpoint's dtype, as transformers does; any torch dtype forces that one.
    ``lm_head``: "exact" (default: the stored float weights, ``F.linear``), "int8" (per-row int8 weights times
    int8 activations per 32-column block on the C++ core, a quarter of the fp32 bytes per token), "int6" (6-bit
    codes with one fp16 scale per row and 32-column block times the same activations, 6.5 bits per weight) or
    "int4" (int4 codes with fp32 block scales, 5 bits per weight, lossy; see :mod:`bitconvert.kernels.lm_head`).
    An inference option: the folder is not changed.
    """
    from transformers import AutoModelForCausalLM
    from transformers.integrations.bitnet import BitLinear as HFBitLinear

    folder = Path(path)
    if not folder.is_dir():
        raise BitconvertError(f"no such folder: '{path}' (give a folder written by `bitconvert SOURCE --out DIR`)")
    if not is_converted_folder(folder):
        raise BitconvertError(f"'{path}' is not a bitconvert/BitNet folder (its config.json has no bitnet quantization_config)")
    if lm_head not in LM_HEADS:
        raise BitconvertError(f"unknown lm_head '{lm_head}'; choose one of {', '.join(LM_HEADS)}")
    quiet = logging.getLogger("transformers.quantizers.quantizer_bitnet")
    previous = quiet.level
    quiet.setLevel(logging.ERROR)  # its "no GPU, unpacking will be slow" warning is about its own path, not ours
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32 if dtype is None else dtype)
    except (OSError, ValueError, RuntimeError) as exc:
        raise BitconvertError(f"cannot load '{path}': {reason(exc)}") from None
    finally:
        quiet.setLevel(previous)
    scales = read_tensors_with_suffix(folder, ".weight_scale")  # as stored: fp32
    backend = get_backend()
    for name, module in list(model.named_modules()):
        if isinstance(module, HFBitLinear):
            packed = PackedBitLinear(module.in_features, module.out_features, module.bias is not None)
            packed.weight = module.weight
            packed.weight_scale = scales[f"{name}.weight_scale"].float().reshape(1)
            if module.bias is not None:
                packed.bias = module.bias
            backend.prepare(packed)
            model.set_submodule(name, packed)
    replace_lm_head(model, lm_head)
    return model.eval()


def load_for_inference(spec: str, dtype=None, lm_head: str = "exact"):
    """``(model, tokenizer)`` for any model spec: a converted folder through :func:`load` (with ``lm_head``), anything
    else a source (folder, .gguf, hub id, alias) in full precision."""
    from transformers import AutoTokenizer

    from .sources import load_full_precision, resolve_source

    if is_converted_folder(spec):
        model = load(spec, dtype=dtype, lm_head=lm_head)
        try:
            tokenizer = AutoTokenizer.from_pretrained(spec)
        except Exception as exc:
            raise BitconvertError(f"'{spec}' has no usable tokenizer ({reason(exc)})") from None
        return model, tokenizer
    return load_full_precision(resolve_source(spec), dtype=dtype)


from ._callable_module import make_callable  # noqa: E402

make_callable(__name__, "load")  # bitconvert.load(path)
