"""The converted-folder format, shared by conversion and fine-tuning.

A converted folder is a stock HF transformers checkpoint:
- ``config.json``: the LLaMA config plus ``quantization_config = {"quant_method": "bitnet", "linear_class": "bitlinear",
  "quantization_mode": "offline"}``; with SubLN the ``bitnet`` model type (``BitNetForCausalLM``), which has the
  ``attn_sub_norm`` / ``ffn_sub_norm`` norms before ``o_proj`` / ``down_proj``.
- safetensors shards: every attention/MLP projection ``...{q,k,v,o,gate,up,down}_proj.weight`` as packed uint8
  (:mod:`bitconvert.packing`) and ``...weight_scale`` = 1/g (fp32, shape (1,)); everything else in high precision.
- tokenizer files, ``generation_config.json``, and ``bitconvert.json`` (source, options, per-layer statistics, sizes).

Output is written atomically: into a hidden temporary folder beside the destination, renamed at the end.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file

from .bitlinear import ternarize, weight_scale
from .errors import BitconvertError
from .packing import pack_ternary
from .quantize import TERNARY_PROJECTIONS

REPORT_NAME = "bitconvert.json"
TERNARY_WEIGHT = re.compile(r"^(?:.*\.)?layers\.(\d+)\.(self_attn|mlp)\.(%s)\.weight$" % "|".join(TERNARY_PROJECTIONS))
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
BITNET_CONFIG_FIELDS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "hidden_act", "max_position_embeddings", "initializer_range", "rms_norm_eps", "use_cache",
    "pad_token_id", "bos_token_id", "eos_token_id", "tie_word_embeddings", "attention_bias", "attention_dropout",
    "rope_parameters", "rope_theta", "rope_scaling",
)


def untied_state_dict(model) -> dict[str, torch.Tensor]:
    """``model``'s tensors (detached) without ``lm_head.weight`` when it is tied to the embeddings (saved once)."""
    state = {name: tensor.detach() for name, tensor in model.state_dict().items()}
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    return state


def read_tensors_with_suffix(folder: Path, suffix: str) -> dict[str, torch.Tensor]:
    """Every tensor of ``folder``'s safetensors shards whose name ends with ``suffix``, as stored."""
    from safetensors import safe_open

    found = {}
    for shard in sorted(folder.glob("*.safetensors")):
        with safe_open(str(shard), framework="pt") as handle:
            found.update({name: handle.get_tensor(name) for name in handle.keys() if name.endswith(suffix)})
    return found


def read_folder_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a converted ``folder``'s safetensors shards, as stored; a folder without shards is refused."""
    if not any(folder.glob("*.safetensors")):
        raise BitconvertError(f"'{folder}' has no safetensors shards; give a folder written by `bitconvert SOURCE --out DIR`")
    return read_tensors_with_suffix(folder, "")


def is_ternary_weight(name: str) -> bool:
    """True for the weight of an attention or MLP projection inside a decoder layer."""
    return TERNARY_WEIGHT.match(name) is not None


def sub_norm_names(num_layers: int, prefix: str = "model.") -> list[tuple[str, str]]:
    """``(name, size_key)`` of the SubLN gains of the ``bitnet`` model type, per layer."""
    names = []
    for layer in range(num_layers):
        names.append((f"{prefix}layers.{layer}.self_attn.attn_sub_norm.weight", "hidden_size"))
        names.append((f"{prefix}layers.{layer}.mlp.ffn_sub_norm.weight", "intermediate_size"))
    return names


@dataclass
class TernaryWeight:
    """A projection weight already ternarized (by calibration or training): codes int8 (out, in), scale ``g`` (0-dim
    fp32), the float weight they approximate (for the relative error; optional) and extra statistics to record."""

    codes: torch.Tensor
    scale: torch.Tensor
    reference: torch.Tensor | None = None
    stats: dict = field(default_factory=dict)


@dataclass
class TernaryTensor:
    """One projection weight after quantization: packed codes, the HF scale 1/g, and its statistics."""

    packed: torch.Tensor
    inverse_scale: torch.Tensor
    stats: dict


def quantize_weight_tensor(name: str, weight: torch.Tensor | TernaryWeight, method: str = "absmean") -> TernaryTensor:
    """Ternarize one ``(out, in)`` weight (or pack a :class:`TernaryWeight` as it is); stats: zero fraction, scale g,
    relative reconstruction error ``||W - g T||_F / ||W||_F``."""
    if isinstance(weight, TernaryWeight):
        ternary, scale, reference, extra = weight.codes, weight.scale.float().reshape(()), weight.reference, weight.stats
    else:
        reference = weight.float()
        scale = weight_scale(reference, method)
        ternary, extra = ternarize(reference, scale), {}
    out_features = ternary.shape[0]
    if out_features % 4:
        raise BitconvertError(
            f"{name} has {out_features} output rows, not a multiple of 4, which the packed BitNet format needs"
        )
    stats = {
        "name": name,
        "shape": list(ternary.shape),
        "scale": scale.item(),
        "zero_fraction": (ternary == 0).float().mean().item(),
    }
    if reference is not None:
        reference = reference.float()
        error = torch.linalg.vector_norm(reference - ternary.float() * scale)
        stats["relative_error"] = (error / torch.linalg.vector_norm(reference).clamp(min=1e-12)).item()
    return TernaryTensor(pack_ternary(ternary), (1.0 / scale).reshape(1), {**stats, **extra})


def output_config(source_config: dict, *, sub_norm: bool, dtype: torch.dtype):
    """The transformers config object of a converted model (``llama`` + bitnet quantization, or ``bitnet``)."""
    from transformers import BitNetConfig, LlamaConfig

    quantization = {
        "quant_method": "bitnet",
        "linear_class": "bitlinear",
        "quantization_mode": "offline",
        "modules_to_not_convert": ["lm_head"],
    }
    dtype_name = str(dtype).removeprefix("torch.")
    if not sub_norm:
        config = LlamaConfig.from_dict({**source_config, "dtype": dtype_name})
    else:
        head_dim = source_config.get("head_dim")
        if head_dim and head_dim * source_config["num_attention_heads"] != source_config["hidden_size"]:
            raise BitconvertError("--sub-norm needs head_dim * num_attention_heads == hidden_size (bitnet model type)")
        if source_config.get("mlp_bias"):
            raise BitconvertError("--sub-norm does not support models with mlp_bias (the bitnet model type has none)")
        fields = {key: source_config[key] for key in BITNET_CONFIG_FIELDS if key in source_config}
        config = BitNetConfig(**fields)
        config.architectures = ["BitNetForCausalLM"]
        config.dtype = dtype_name
    config.quantization_config = quantization
    return config


def write_converted_tensors(folder: Path, named_tensors, report: "Report", *, weight_scale_method: str,
                            dtype: torch.dtype, shard_bytes: int) -> None:
    """Write ``(name, tensor)`` pairs as the converted folder's shards: projection weights ternarized and packed (plus
    their ``weight_scale`` = 1/g), everything else cast to ``dtype``; fills ``report`` layers, sizes and counts.

    Shared by conversion (tensors streamed from the source, or :class:`TernaryWeight` from calibration) and
    fine-tuning (the trained model's latent tensors).
    """
    writer = ShardWriter(folder, shard_bytes)
    for name, tensor in named_tensors:
        if is_ternary_weight(name):
            quantized = quantize_weight_tensor(name, tensor, weight_scale_method)
            writer.add(name, quantized.packed)
            writer.add(name.removesuffix("weight") + "weight_scale", quantized.inverse_scale)
            report.layers.append(quantized.stats)
            report.parameters_converted += quantized.packed.shape[1] * quantized.stats["shape"][0]
        else:
            writer.add(name, tensor.to(dtype) if tensor.is_floating_point() else tensor)
        del tensor
    writer.finish()
    report.bytes_after = writer.total_bytes


class ShardWriter:
    """Writes tensors into safetensors shards of at most ``max_bytes`` each (a single tensor may exceed it).

    Peak memory is one shard's worth of tensors; shards are renamed ``model-0000i-of-0000n.safetensors`` and indexed
    in :meth:`finish`.
    """

    def __init__(self, folder: Path, max_bytes: int):
        self.folder = folder
        self.max_bytes = max_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.shards: list[list[str]] = []
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + size > self.max_bytes:
            self._flush()
        self.pending[name] = tensor.contiguous()
        self.pending_bytes += size
        self.total_bytes += size

    def _flush(self) -> None:
        save_file(self.pending, str(self.folder / f"shard-{len(self.shards):05d}.tmp"), metadata={"format": "pt"})
        self.shards.append(list(self.pending))
        self.pending, self.pending_bytes = {}, 0

    def finish(self) -> list[str]:
        """Flush, give the shards their final names, write the index when there is more than one; returns names."""
        if self.pending or not self.shards:
            self._flush()
        count = len(self.shards)
        names = ["model.safetensors"] if count == 1 else [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]
        umask = os.umask(0)
        os.umask(umask)
        for index, name in enumerate(names):
            os.replace(self.folder / f"shard-{index:05d}.tmp", self.folder / name)
            os.chmod(self.folder / name, 0o666 & ~umask)  # the safetensors writer creates files as 0600
        if count > 1:
            weight_map = {tensor: names[i] for i, tensors in enumerate(self.shards) for tensor in tensors}
            index_doc = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
            (self.folder / "model.safetensors.index.json").write_text(json.dumps(index_doc, indent=2))
        return names


def check_destination(out: Path, overwrite: bool) -> None:
    """Refuse an existing destination (unless ``overwrite``) or one whose parent is missing or not writable."""
    if out.exists() and not overwrite:
        raise BitconvertError(f"output folder '{out}' already exists; pass --overwrite to replace it, or pick another --out")
    if out.exists() and not out.is_dir():
        raise BitconvertError(f"output path '{out}' exists and is not a folder; remove it or pick another --out")
    parent = out.absolute().parent
    if not parent.is_dir():
        raise BitconvertError(f"cannot write '{out}': folder '{parent}' does not exist; create it first")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise BitconvertError(f"cannot write '{out}': folder '{parent}' is not writable; pick another --out")


@contextlib.contextmanager
def atomic_output_dir(out: Path, overwrite: bool = False):
    """Yield a temporary folder beside ``out``; on success rename it to ``out``, on any failure or Ctrl-C delete it."""
    out = Path(out)
    check_destination(out, overwrite)
    tmp = out.absolute().parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
    except OSError as exc:
        raise BitconvertError(f"cannot write '{out}': {exc.strerror}; pick another --out") from None
    try:
        yield tmp
        if out.exists():
            trash = out.absolute().parent / f".{out.name}.old-{os.getpid()}"
            os.replace(out, trash)
            os.replace(tmp, out)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@dataclass
class Report:
    """What ``bitconvert.json`` records about a conversion."""

    source: str
    options: dict
    layers: list = field(default_factory=list)
    bytes_before: int = 0
    bytes_after: int = 0
    parameters_converted: int = 0
    seconds: float = 0.0
    calibration: dict | None = None

    def write(self, folder: Path) -> None:
        from . import __version__

        doc = {
            "bitconvert_version": __version__,
            "source": self.source,
            "options": self.options,
            "parameters_converted": self.parameters_converted,
            "bytes_before": self.bytes_before,
            "bytes_after": self.bytes_after,
            "seconds": round(self.seconds, 2),
            "layers": self.layers,
        }
        if self.calibration is not None:
            doc["calibration"] = self.calibration
        (folder / REPORT_NAME).write_text(json.dumps(doc, indent=2))


def save_tokenizer_and_generation_config(folder: Path, tokenizer, generation_config) -> None:
    """Write the tokenizer files and ``generation_config.json`` beside the weights."""
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    if generation_config is not None:
        generation_config.save_pretrained(folder)
