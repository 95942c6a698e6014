"""``export_gguf(folder, out)``: a converted folder -> one GGUF file that llama.cpp (and tools built on it) runs.

The projections go from the folder's codes straight into GGUF blocks (:mod:`.gguf_blocks`): each weight becomes
``T * fp16(g)``, the model's own ternary matrix ``T`` with its per-tensor scale ``g`` rounded once to fp16. Everything
else keeps its values: norms and biases as F32 (exact), the embeddings and an untied lm_head in ``float_type``
(F32 and, from an fp16/bf16 folder, F16/BF16 keep every bit; Q8_0 is lossy, for size).

Scale conventions (read from ``quantization_config.linear_class``): ``bitlinear`` (bitconvert's, HF's offline
BitLinear) stores packed uint8 codes ``(out/4, in)`` and ``weight_scale = 1/g``; ``autobitlinear`` (offline) stores
the ternary values as floats ``(out, in)`` and ``weight_scale = g``.

Architectures (llama.cpp ``src/models/llama.cpp``, ``bitnet.cpp``):
- ``llama`` for models without SubLN. llama.cpp rotates adjacent pairs (NORM rope) where HF rotates halves, so the
  q and k rows are permuted per head as llama.cpp's own converter does: ``(heads, 2, d/2) -> (heads, d/2, 2)``.
- ``bitnet`` for SubLN models (``attn_sub_norm`` before o_proj, ``ffn_sub_norm`` before down_proj). It uses NEOX rope
  (halves, like HF: no permutation) and the token embeddings as its output layer, so an untied model is refused.

The file is written beside ``out`` under a temporary name and renamed at the end; an existing ``out`` is refused.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import gguf
import numpy as np
import torch
from tqdm.auto import tqdm

from ..checkpoint import REPORT_NAME, read_folder_tensors
from ..errors import BitconvertError
from ..packing import unpack_ternary
from .gguf_blocks import TYPE_CHOICES, BlockType, choose_type, ternary_blocks
from .gguf_tokenizer import add_tokenizer

FLOAT_TYPES = ("f16", "bf16", "f32", "q8_0")
PROJECTION = re.compile(r"^model\.layers\.(\d+)\.(?:self_attn|mlp)\.(q|k|v|o|gate|up|down)_proj\.weight$")
SUB_NORMS = {
    re.compile(r"^model\.layers\.(\d+)\.self_attn\.attn_sub_norm\.weight$"): gguf.MODEL_TENSOR.ATTN_SUB_NORM,
    re.compile(r"^model\.layers\.(\d+)\.mlp\.ffn_sub_norm\.weight$"): gguf.MODEL_TENSOR.FFN_SUB_NORM,
}
EMBEDDING_NAMES = ("token_embd.weight", "output.weight")


@dataclass
class GgufExport:
    """What :func:`export_gguf` wrote: the file, its architecture, pre-tokenizer and the type of every tensor."""

    path: Path
    architecture: str
    pre_tokenizer: str
    types: dict[str, str] = field(default_factory=dict)

    def summary(self) -> list[str]:
        """One line per tensor kind (``blk.*.attn_q.weight``) with its GGUF type and count."""
        kinds = Counter((re.sub(r"^blk\.\d+\.", "blk.*.", name), kind) for name, kind in self.types.items())
        return [f"  {name:<28} {kind:<6} x{count}" for (name, kind), count in kinds.items()]


def _read_config(folder: Path) -> dict:
    from ..load import is_converted_folder

    if not folder.is_dir():
        raise BitconvertError(f"no such folder: '{folder}' (give a folder written by `bitconvert SOURCE --out DIR`)")
    if not is_converted_folder(folder):
        raise BitconvertError(f"'{folder}' is not a converted folder (its config.json has no bitnet "
                              "quantization_config); convert it first: bitconvert SOURCE --out DIR")
    return json.loads((folder / "config.json").read_text())


def _architecture(config: dict) -> gguf.MODEL_ARCH:
    """``bitnet`` for SubLN models (tied embeddings only), ``llama`` otherwise; refuses what llama.cpp cannot run."""
    if config.get("hidden_act", "silu") != "silu":
        raise BitconvertError(f"llama.cpp's llama/bitnet graphs use SiLU, this model uses {config['hidden_act']!r}")
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    if rope.get("rope_type", "default") not in ("default", "linear"):
        raise BitconvertError(f"rope type {rope['rope_type']!r} is not supported by the GGUF export (default or linear)")
    if config.get("model_type") != "bitnet":
        return gguf.MODEL_ARCH.LLAMA
    if not config.get("tie_word_embeddings", True):
        raise BitconvertError("llama.cpp's bitnet architecture (SubLN models) uses the token embeddings as its output "
                              "layer, but this model has a separate lm_head (tie_word_embeddings false); it cannot run there")
    return gguf.MODEL_ARCH.BITNET


def _head_dim(config: dict) -> int:
    return config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]


def _out_features(config: dict, projection: str) -> int:
    """Output rows of a projection (``q``, ``k``, ``v``, ``o``, ``gate``, ``up``, ``down``) from the config."""
    heads = {"q": config["num_attention_heads"], "k": config["num_key_value_heads"], "v": config["num_key_value_heads"]}
    if projection in heads:
        return heads[projection] * _head_dim(config)
    return config["intermediate_size"] if projection in ("gate", "up") else config["hidden_size"]


def _ternary(name: str, weight: torch.Tensor, stored_scale: torch.Tensor, out_features: int,
             quantization: dict) -> tuple[np.ndarray, float]:
    """``(T, g)`` of one projection: int8 ``(out, in)`` codes in {-1, 0, 1} and the scale g, per the config's
    ``linear_class`` (bitlinear: packed codes, ``weight_scale = 1/g``; autobitlinear: float values, ``= g``)."""
    linear_class = quantization.get("linear_class", "bitlinear")
    stored = float(stored_scale.double().reshape(-1)[0])
    if linear_class == "bitlinear":
        return unpack_ternary(weight, out_features).numpy(), 1.0 / stored
    if linear_class == "autobitlinear":
        if quantization.get("quantization_mode", "offline") != "offline" or quantization.get("use_rms_norm"):
            raise BitconvertError("only offline autobitlinear models without use_rms_norm can be exported to GGUF")
        values = weight.float()
        if not torch.isin(values, torch.tensor([-1.0, 0.0, 1.0])).all():
            raise BitconvertError(f"{name} holds values other than -1, 0, 1; it is not an offline ternary weight")
        return values.to(torch.int8).numpy(), stored
    raise BitconvertError(f"unknown quantization_config.linear_class {linear_class!r} (bitlinear or autobitlinear)")


def _permute_rope_rows(rows: np.ndarray, heads: int) -> np.ndarray:
    """Reorder q/k rows from HF's rotate-half layout to llama.cpp's adjacent pairs: per head ``(2, d/2) -> (d/2, 2)``."""
    return rows.reshape(heads, 2, rows.shape[0] // heads // 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def _float_tensor(tensor: torch.Tensor, float_type: str) -> tuple[np.ndarray, int]:
    """``(data, GGML type id)`` of an embedding-like tensor in ``float_type``."""
    if float_type == "f32":
        return tensor.float().numpy(), int(gguf.GGMLQuantizationType.F32)
    if float_type == "f16":
        return tensor.half().numpy(), int(gguf.GGMLQuantizationType.F16)
    if float_type == "bf16":
        return tensor.bfloat16().view(torch.int16).numpy(), int(gguf.GGMLQuantizationType.BF16)
    if tensor.shape[-1] % 32:
        raise BitconvertError(f"--float-type q8_0 needs rows that are a multiple of 32, the embeddings have {tensor.shape[-1]}")
    return gguf.quants.quantize(tensor.float().numpy(), gguf.GGMLQuantizationType.Q8_0), int(gguf.GGMLQuantizationType.Q8_0)


def _add_raw(writer: gguf.GGUFWriter, name: str, data: np.ndarray, shape: tuple[int, ...], type_id: int) -> None:
    """Add ``data`` (the tensor's bytes) as a tensor of logical ``shape`` and GGML ``type_id``.

    The bytes go in as int8 so that gguf-py takes ``shape`` as the logical shape instead of converting a byte shape,
    which needs the type in its size table (Q2_0, type 42, is not in gguf <= 0.19).
    """
    writer.add_tensor(name, np.ascontiguousarray(data).view(np.int8), raw_shape=shape, raw_dtype=type_id)


def _add_hparams(writer: gguf.GGUFWriter, config: dict, folder: Path) -> None:
    """The model hyperparameters llama.cpp's llama/bitnet loaders read, plus where the model came from."""
    heads = config["num_attention_heads"]
    head_dim = _head_dim(config)
    writer.add_name(config.get("_model_name_or_path") or folder.name)
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(config.get("num_key_value_heads", heads))
    if head_dim * heads != config["hidden_size"]:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    rope = config.get("rope_parameters") or {}
    writer.add_rope_freq_base(rope.get("rope_theta", config.get("rope_theta", 10000.0)))
    scaling = config.get("rope_parameters") or config.get("rope_scaling") or {}
    if scaling.get("rope_type") == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(scaling["factor"])
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_vocab_size(config["vocab_size"])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    from .. import __version__

    writer.add_string("bitconvert.version", __version__)
    report = folder / REPORT_NAME
    if report.is_file():
        writer.add_string("bitconvert.source", str(json.loads(report.read_text()).get("source", "")))
    writer.add_string("bitconvert.scale", "per-tensor scale g in every block's fp16 d (relative rounding <= 2^-11)")


def _check_destination(out: Path) -> None:
    if out.suffix != ".gguf":
        raise BitconvertError(f"--out must name a .gguf file, got '{out}'")
    if out.exists():
        raise BitconvertError(f"'{out}' already exists; remove it or pick another --out")
    if not out.absolute().parent.is_dir():
        raise BitconvertError(f"cannot write '{out}': folder '{out.absolute().parent}' does not exist; create it first")


def export_gguf(model_path: str | os.PathLike, out: str | os.PathLike, weight_type: str = "auto",
                float_type: str = "f16", progress: bool = True) -> GgufExport:
    """Export the converted folder ``model_path`` to the GGUF file ``out``; returns what was written.

    ``weight_type``: ``auto`` (per tensor: TQ2_0 when rows are a multiple of 256, else Q2_0 for multiples of 64, else the
    exact fallbacks Q8_0 / F16) or one of ``tq2_0``, ``tq1_0``, ``q2_0``, ``q8_0`` for every projection (refused when
    a row length does not fit). ``float_type``: ``f16``, ``bf16``, ``f32`` or ``q8_0`` for the embeddings and lm_head.
    """
    folder, out = Path(model_path), Path(out)
    if weight_type not in TYPE_CHOICES:
        raise BitconvertError(f"unknown --type {weight_type!r}; choose one of {', '.join(TYPE_CHOICES)}")
    if float_type not in FLOAT_TYPES:
        raise BitconvertError(f"unknown --float-type {float_type!r}; choose one of {', '.join(FLOAT_TYPES)}")
    _check_destination(out)
    config = _read_config(folder)
    arch = _architecture(config)
    tensors = read_folder_tensors(folder)
    plan = _plan(tensors, config, arch, weight_type)  # every refusal happens before a file exists
    tmp = out.absolute().parent / f".{out.name}.tmp-{os.getpid()}"
    try:
        writer = gguf.GGUFWriter(tmp, gguf.MODEL_ARCH_NAMES[arch])
        _add_hparams(writer, config, folder)
        pre = add_tokenizer(writer, folder, config["vocab_size"])
        result = GgufExport(out, gguf.MODEL_ARCH_NAMES[arch], pre)
        for hf_name, gguf_name, block in tqdm(plan, desc="gguf", unit="tensor", disable=not progress):
            result.types[gguf_name] = _add_tensor(writer, tensors, hf_name, gguf_name, block, config, arch, float_type)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file(progress=progress)
        writer.close()
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return result


def _gguf_name(name: str, tensor_map: gguf.TensorNameMap) -> str | None:
    for pattern, kind in SUB_NORMS.items():
        if match := pattern.match(name):
            return gguf.TENSOR_NAMES[kind].format(bid=int(match.group(1))) + ".weight"
    return tensor_map.get_name(name, try_suffixes=(".weight", ".bias"))


def _plan(tensors: dict[str, torch.Tensor], config: dict, arch: gguf.MODEL_ARCH, requested: str):
    """``[(hf_name, gguf_name, BlockType or None)]`` for every tensor to write; raises on anything unsupported."""
    tensor_map = gguf.get_tensor_name_map(arch, config["num_hidden_layers"])
    plan = []
    for name in tensors:
        if name.endswith(".weight_scale") or name.endswith("rotary_emb.inv_freq"):
            continue
        gguf_name = _gguf_name(name, tensor_map)
        if gguf_name is None:
            raise BitconvertError(f"tensor {name} has no llama.cpp equivalent in the {arch.name.lower()} architecture")
        if gguf_name == "output.weight" and arch == gguf.MODEL_ARCH.BITNET:
            raise BitconvertError("llama.cpp's bitnet architecture has no separate output layer, but the folder holds lm_head.weight")
        block = choose_type(name, tensors[name].shape[-1], requested) if PROJECTION.match(name) else None
        plan.append((name, gguf_name, block))
    return plan


def _add_tensor(writer, tensors, hf_name: str, gguf_name: str, block: BlockType | None, config: dict,
                arch: gguf.MODEL_ARCH, float_type: str) -> str:
    """Add one tensor to ``writer``; returns its GGUF type name."""
    tensor = tensors[hf_name]
    permute = None
    if arch == gguf.MODEL_ARCH.LLAMA and (match := re.search(r"\.(q|k)_proj\.(weight|bias)$", hf_name)):
        permute = config["num_attention_heads"] if match.group(1) == "q" else config["num_key_value_heads"]
    if block is not None:
        projection = PROJECTION.match(hf_name).group(2)
        out_features = _out_features(config, projection)
        scale_name = hf_name.removesuffix("weight") + "weight_scale"
        if scale_name not in tensors:
            raise BitconvertError(f"{hf_name} has no {scale_name} beside it; the folder is incomplete")
        ternary, scale = _ternary(hf_name, tensor, tensors[scale_name], out_features, config["quantization_config"])
        if permute:
            ternary = _permute_rope_rows(ternary, permute)
        _add_raw(writer, gguf_name, ternary_blocks(ternary, scale, block), ternary.shape, block.type_id)
        return block.name
    if permute:
        tensor = torch.from_numpy(_permute_rope_rows(tensor.numpy(), permute))
    if gguf_name in EMBEDDING_NAMES:
        data, type_id = _float_tensor(tensor, float_type)
        _add_raw(writer, gguf_name, data, tuple(tensor.shape), type_id)
        return gguf.GGMLQuantizationType(type_id).name
    writer.add_tensor(gguf_name, tensor.float().numpy())
    return "F32"
