"""The student of a fine-tuning run that starts from a converted folder: its model made trainable, exactly as saved.

A converted folder holds, per attention/MLP projection, ternary codes ``T`` (out, in) and ``weight_scale = 1/g``, and
every other tensor in high precision (norms possibly rescaled by an equivalence transform, embeddings, lm_head). The
student rebuilds a LLaMA with those float tensors and, for each projection, a training-mode
:class:`~bitconvert.bitlinear.BitLinear` in learned-scale mode initialised from ``(T, g)``: latent ``W = T * g`` and
scale parameter ``s = g``, so ``s * clamp(round(W / s), -1, 1) == T * g`` at step 0 and the student's first forward is
the folder's own model (up to float rounding of the fake-quantized product vs the integer path).

SubLN folders (``bitnet`` model type) map ``attn_sub_norm`` / ``ffn_sub_norm`` back onto the BitLinear's inner
``sub_norm`` (the reverse of :data:`.export.SUB_NORM_RENAMES`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ..bitlinear import LEARNED_SCALE, BitLinear
from ..checkpoint import REPORT_NAME, is_ternary_weight, read_folder_tensors
from ..errors import BitconvertError
from ..packing import unpack_ternary
from ..quantize import SUB_NORM_PROJECTIONS, ternary_projections
from .export import SUB_NORM_RENAMES

def recorded_source(folder: Path) -> str | None:
    """The full-precision source recorded in the folder's ``bitconvert.json`` (the conversion's SOURCE), if any."""
    report = folder / REPORT_NAME
    if not report.is_file():
        return None
    try:
        doc = json.loads(report.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    # a fine-tuned folder records its own teacher; a converted one its source
    return doc.get("options", {}).get("teacher") or doc.get("source")


def _training_config(folder: Path):
    """The LLaMA config of the student (the folder's config without its quantization), and whether it has SubLN."""
    from transformers import LlamaConfig

    doc = json.loads((folder / "config.json").read_text())
    sub_norm = doc.get("model_type") == "bitnet"
    doc.pop("quantization_config", None)
    for key in ("model_type", "architectures", "auto_map"):
        doc.pop(key, None)
    config = LlamaConfig.from_dict({**doc, "dtype": "float32"})
    config.architectures = ["LlamaForCausalLM"]
    config.use_cache = False
    return config, sub_norm


def learned_bitlinear(codes: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, sub_norm_eps: float | None):
    """A learned-scale BitLinear whose forward at step 0 is ``codes * scale`` (codes int8 (out, in), scale 0-dim)."""
    out_features, in_features = codes.shape
    module = BitLinear(in_features, out_features, bias is not None, weight_scale_method=LEARNED_SCALE,
                       sub_norm=sub_norm_eps is not None, sub_norm_eps=sub_norm_eps or 1e-5, quant_lambda=1.0)
    module.init_from_ternary(codes, scale)
    if bias is not None:
        module.bias.data.copy_(bias.float())
    return module


def load_converted_student(folder: Path):
    """``(model, tokenizer, sub_norm)``: the folder's model as a trainable fp32 LLaMA with learned-scale BitLinear."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    config, sub_norm = _training_config(folder)
    tensors = read_folder_tensors(folder)
    model = LlamaForCausalLM(config).float()  # every tensor is overwritten below; the random init costs seconds
    for name, _, _ in list(ternary_projections(model)):
        packed, inverse = tensors.pop(f"{name}.weight"), tensors.pop(f"{name}.weight_scale")
        bias = tensors.pop(f"{name}.bias", None)
        out_features = model.get_submodule(name).out_features
        eps = config.rms_norm_eps if sub_norm and name.rsplit(".", 1)[1] in SUB_NORM_PROJECTIONS else None
        model.set_submodule(name, learned_bitlinear(unpack_ternary(packed, out_features), 1.0 / inverse.float().reshape(()),
                                                    bias, eps))
    for new, old in ((new, old) for old, new in SUB_NORM_RENAMES):
        for key in [k for k in tensors if k.endswith(new)]:
            tensors[key.removesuffix(new) + old] = tensors.pop(key)
    leftover = [name for name in tensors if is_ternary_weight(name)]
    if leftover:
        raise BitconvertError(f"'{folder}' has projection weights the student does not know: {leftover[0]}")
    missing, unexpected = model.load_state_dict({k: v.float() for k, v in tensors.items()}, strict=False)
    projections = tuple(f"{name}." for name, _, _ in ternary_projections(model))
    missing = [k for k in missing if not k.startswith(projections)
               and not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise BitconvertError(f"'{folder}' does not match its config: missing {missing[:2]}, unexpected {unexpected[:2]}")
    if config.tie_word_embeddings:
        model.tie_weights()
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except Exception as exc:  # noqa: BLE001 - any tokenizer failure is one line for the user
        raise BitconvertError(f"'{folder}' has no usable tokenizer ({exc})") from None
    return model, tokenizer, sub_norm


@dataclass
class RunModels:
    """What a fine-tuning run trains and distils from.

    student: trainable LLaMA with training-mode BitLinear; tokenizer: the student's; teacher: frozen full-precision
    model in eval mode, or None; sub_norm: whether the student has SubLN; converted: whether SOURCE was a converted
    folder (the student is ternary from step 0); source/teacher_source: what to record in the output's report.
    """

    student: torch.nn.Module
    tokenizer: object
    teacher: torch.nn.Module | None
    sub_norm: bool
    converted: bool
    source: str
    teacher_source: str | None


def _frozen_teacher(model) -> torch.nn.Module:
    return model.eval().requires_grad_(False)


def _load_teacher(spec: str, student) -> torch.nn.Module:
    """The full-precision model ``spec``, checked to share the student's vocabulary."""
    from ..sources import load_full_precision, resolve_source

    teacher, _ = load_full_precision(resolve_source(spec), dtype=torch.float32)
    if teacher.config.vocab_size != student.config.vocab_size:
        raise BitconvertError(f"teacher '{spec}' has a vocabulary of {teacher.config.vocab_size} tokens, the student "
                              f"{student.config.vocab_size}; give --teacher the model the folder was converted from")
    teacher.config.use_cache = False
    return _frozen_teacher(teacher)


def run_models(source: str, *, distill: bool, teacher: str | None, sub_norm: bool, weight_scale: str) -> RunModels:
    """Student and teacher for ``bitconvert finetune SOURCE``.

    SOURCE a converted folder: the student is its model made trainable (:func:`load_converted_student`), the teacher
    ``teacher`` or else the source recorded in its ``bitconvert.json``. SOURCE a full-precision model: the student is
    that model with its projections swapped for BitLinear (latent weights = the full-precision ones), the teacher
    ``teacher`` or else a frozen copy of SOURCE.
    """
    from ..load import is_converted_folder
    from ..quantize import TernaryConfig, quantize_
    from ..sources import load_full_precision, resolve_source
    from .export import load_latent_sub_norms

    if is_converted_folder(source):
        folder = Path(source)
        student, tokenizer, folder_sub_norm = load_converted_student(folder)
        if sub_norm and not folder_sub_norm:
            raise BitconvertError(f"'{source}' has no SubLN and a converted folder is trained as saved; drop --sub-norm")
        teacher_spec = (teacher or recorded_source(folder)) if distill else None
        if distill and teacher_spec is None:
            raise BitconvertError(f"'{source}' records no source model; name the full-precision teacher with --teacher "
                                  f"or train without one (--no-distill)")
        if distill and not teacher and not Path(teacher_spec).exists():
            raise BitconvertError(f"the source recorded in '{folder / REPORT_NAME}', '{teacher_spec}', is gone; name the "
                                  f"full-precision teacher with --teacher")
        teacher_model = _load_teacher(teacher_spec, student) if distill else None
        return RunModels(student, tokenizer, teacher_model, folder_sub_norm, True, str(folder), teacher_spec)

    resolved = resolve_source(source)
    student, tokenizer = load_full_precision(resolved, dtype=torch.float32)
    student.config.use_cache = False
    teacher_model = None
    if distill and teacher:
        teacher_model = _load_teacher(teacher, student)
    elif distill:
        teacher_model = type(student)(student.config)
        teacher_model.load_state_dict(student.state_dict())
        teacher_model = _frozen_teacher(teacher_model)
    # SubLN eps = the model's rms_norm_eps: what the exported bitnet model type uses for attn/ffn_sub_norm
    quantize_(student, TernaryConfig(mode="train", weight_scale=weight_scale, sub_norm=sub_norm,
                                     sub_norm_eps=student.config.rms_norm_eps, quant_lambda=0.0))
    load_latent_sub_norms(student, None if resolved.gguf_file else resolved.folder, sub_norm)
    return RunModels(student, tokenizer, teacher_model, sub_norm, False, resolved.display,
                     (teacher or resolved.display) if distill else None)
