"""Training precision: whether a run computes in bf16 or fp32.

bf16 mixed precision is DeepSpeed's ``"bf16"`` mode: the module's weights, activations and logits in bf16, fp32 master
weights and optimizer state in its optimizer wrapper; the teacher runs in bf16 too. Measured on SmolLM2-135M (a 2-core
AMD EPYC Zen 4, 40 steps of distillation from the block-reconstructed folder, 4 x 256 tokens per step): 141 tokens/s
against 81 in fp32, and the written models' held-out perplexity (``bitconvert ppl``, evaluated in fp32) 237.4 against
232.8. Keeping the logits in fp32 gave 235.7 at 116 tokens/s, not worth its cost. The held-out perplexity logged
during a bf16 run is the bf16 model's: at the end of that A/B it read 274.5 against the fp32 run's 250.1 (+10%),
while the written models differ by 2%.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from ..errors import BitconvertError

PRECISIONS = ("auto", "bf16", "fp32")


def cpu_has_native_bf16(cpuinfo: str | None = None) -> bool:
    """Whether the CPU multiplies bf16 in hardware (AVX512_BF16 or AMX-BF16 among the ``/proc/cpuinfo`` flags).
    Without them oneDNN emulates bf16, so fp32 stays the default there (and where ``/proc/cpuinfo`` does not exist)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return False
    return re.search(r"\b(avx512_bf16|amx_bf16)\b", cpuinfo) is not None


def resolve_bf16(precision: str, *, cuda: bool, user_config: dict | None, saved_config: dict | None) -> bool:
    """Whether the generated config trains in bf16: ``--precision`` bf16/fp32 as asked; ``auto`` bf16 where the
    device has it in hardware. A resumed run (``saved_config``, its ``ds_config.json``) keeps its precision, since its
    checkpoint's optimizer state is laid out for it; a user config decides for itself."""
    if precision not in PRECISIONS:
        raise BitconvertError(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if user_config is not None:
        if precision != "auto":
            raise BitconvertError("--precision applies to the generated DeepSpeed config; with --deepspeed set its "
                                  "\"bf16\" section instead")
        return bool(user_config.get("bf16", {}).get("enabled"))
    if saved_config is not None:
        saved = "bf16" if saved_config.get("bf16", {}).get("enabled") else "fp32"
        if precision not in ("auto", saved):
            raise BitconvertError(f"--precision {precision} conflicts with the run being resumed, which trains in "
                                  f"{saved}; drop --precision")
        return saved == "bf16"
    if precision != "auto":
        return precision == "bf16"
    return torch.cuda.is_bf16_supported() if cuda else cpu_has_native_bf16()
