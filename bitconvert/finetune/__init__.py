"""Quantization-aware training (QAT) on DeepSpeed: ``bitconvert finetune`` and :func:`finetune`."""

from .trainer import FinetuneOptions, FinetuneResult, finetune

__all__ = ["FinetuneOptions", "FinetuneResult", "finetune"]
