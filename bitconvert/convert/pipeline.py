"""``convert(source, out)``: full-precision LLaMA -> ternary BitNet b1.58 folder, streamed tensor by tensor.

Peak memory for a safetensors source is about the largest tensor (as fp32, for the scale and rounding) plus one output
shard; GGUF and pickled sources are loaded whole by transformers first (they are dequantized on load).
"""

from __future__ import annotations

import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..checkpoint import (
    DTYPES,
    Report,
    atomic_output_dir,
    check_destination,
    is_ternary_weight,
    output_config,
    save_tokenizer_and_generation_config,
    sub_norm_names,
    write_converted_tensors,
)
from ..errors import BitconvertError, reason
from ..sources import Source, load_full_precision, read_config_dict, resolve_source
from .calibrate import CalibrationConfig, calibrated_tensors
from .readers import SafetensorsReader, StateDictReader


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json")


@dataclass(frozen=True)
class ConvertOptions:
    """weight_scale: absmean | absmedian; sub_norm: add SubLN gains (=1) and write the bitnet model type;
    dtype: dtype of the tensors kept in high precision (auto = the source's); shard_bytes: output shard size;
    calibration: None (round to nearest, tensor by tensor) or how to calibrate (:class:`CalibrationConfig`)."""

    weight_scale: str = "absmean"
    sub_norm: bool = False
    dtype: str = "auto"
    shard_bytes: int = 1 << 30
    allow_pickle: bool = False
    calibration: CalibrationConfig | None = None


@dataclass
class ConvertResult:
    out: Path
    report: Report


def _load_tokenizer_and_generation_config(source: Source):
    """Tokenizer and generation config of a safetensors folder; a missing tokenizer is a warning, not an error."""
    from transformers import AutoTokenizer, GenerationConfig

    tokenizer = None
    if not any((source.folder / name).is_file() for name in TOKENIZER_FILES):
        warnings.warn(f"{source.display} has no tokenizer files; the output will have none (copy them in to use it)")
    else:
        try:
            tokenizer = AutoTokenizer.from_pretrained(source.folder)
        except Exception as exc:  # a weights-only checkpoint still converts; say what is missing
            warnings.warn(f"cannot load the tokenizer of {source.display} ({reason(exc)}); "
                          "the output will have none")
    try:
        generation_config = GenerationConfig.from_pretrained(source.folder)
    except OSError:
        generation_config = None
    return tokenizer, generation_config


def _resolve_dtype(option: str, source_config: dict) -> torch.dtype:
    if option != "auto":
        if option not in DTYPES:
            raise BitconvertError(f"unknown --dtype '{option}'; choose auto, {', '.join(DTYPES)}")
        return DTYPES[option]
    name = str(source_config.get("dtype") or source_config.get("torch_dtype") or "float32").removeprefix("torch.")
    return DTYPES.get(name, torch.float32)


def convert(source: str | Source, out: str | Path, options: ConvertOptions = ConvertOptions(), *,
            overwrite: bool = False, progress: bool = True) -> ConvertResult:
    """Convert ``source`` (folder, .gguf, hub id or alias) into a ternary folder at ``out``; returns the report.

    Raises :class:`BitconvertError` for user mistakes; on any failure or Ctrl-C no ``out`` is left behind.
    """
    started = time.perf_counter()
    out = Path(out)
    check_destination(out, overwrite)
    calibration = options.calibration
    if calibration is not None and options.sub_norm:
        raise BitconvertError("--calibrate does not combine with --sub-norm (SubLN changes the function); "
                              "drop one of them")
    if calibration is not None and options.weight_scale != "absmean":
        raise BitconvertError("--calibrate chooses its own scales; drop --weight-scale (or --calibrate)")
    if not isinstance(source, Source):
        source = resolve_source(source, allow_pickle=options.allow_pickle)
    source_config = read_config_dict(source)
    dtype = _resolve_dtype(options.dtype, source_config)
    if source.gguf_file or source.pickled:
        model, tokenizer = load_full_precision(source, dtype=torch.float32)
        reader = StateDictReader(model)
        source_config = model.config.to_dict()
        generation_config = model.generation_config
    else:
        reader = SafetensorsReader(source.folder)
        tokenizer, generation_config = _load_tokenizer_and_generation_config(source)
    config = output_config(source_config, sub_norm=options.sub_norm, dtype=dtype)
    report = Report(source=source.display, options={**asdict(options), "dtype": str(dtype).removeprefix("torch.")},
                    bytes_before=source.weight_bytes())
    names = reader.names()
    if not any(is_ternary_weight(name) for name in names):
        raise BitconvertError(f"{source.display} has no attention/MLP projection weights to convert")

    def source_tensors():
        if calibration is not None:
            from transformers import LlamaConfig

            report.calibration = {}
            yield from calibrated_tensors(reader, LlamaConfig.from_dict(source_config), tokenizer, calibration,
                                          progress=progress, summary=report.calibration)
            return
        for name in tqdm(names, desc="converting", unit="tensor", disable=not progress):
            yield name, reader.get(name)
        if options.sub_norm:
            for name, size_key in sub_norm_names(config.num_hidden_layers):
                yield name, torch.ones(getattr(config, size_key), dtype=dtype)

    with atomic_output_dir(out, overwrite) as tmp:
        write_converted_tensors(tmp, source_tensors(), report, weight_scale_method=options.weight_scale, dtype=dtype,
                                shard_bytes=options.shard_bytes)
        config.save_pretrained(tmp)
        save_tokenizer_and_generation_config(tmp, tokenizer, generation_config)
        report.seconds = time.perf_counter() - started
        report.write(tmp)
    return ConvertResult(out, report)
