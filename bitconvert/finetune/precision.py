"""Training precision: whether a run computes in bf16 or fp32.

bf16 mixed precision is DeepSpeed's ``"bf16"`` mode: the module's weights, activations and logits in bf16, fp32 master
weights and optimizer state in its optimizer wrapper (with the generated ZeRO-0 config the gradients themselves are
bf16, so ``--grad-accum`` sums micro-batches in bf16); the teacher runs in bf16 too. The written model comes from the
fp32 master weights (:func:`module_with_fp32_masters`), not from their bf16 copies. Measured on SmolLM2-135M (a 2-core
AMD EPYC Zen 4, 40 steps of distillation from the block-reconstructed folder, 4 x 256 tokens per step): 141 tokens/s
against 81 in fp32, and the written models' held-out perplexity (``bitconvert ppl``, evaluated in fp32) 236.3 against
232.8 (237.4 when the bf16 copies were written instead of the masters). Keeping the logits in fp32 gave 235.7 at
116 tokens/s, not worth its cost. The held-out perplexity logged during a bf16 run is the bf16 model's: at the end of
that A/B it read 274.5 against the fp32 run's 250.1 (+10%), while the written models differ by 1.5%.
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


def bf16_section(config: dict) -> dict | None:
    """A DeepSpeed config's bf16 section, found as DeepSpeed finds it: ``"bf16"``, else its older name ``"bfloat16"``
    (``deepspeed.runtime.precision_config.get_bfloat16_config``); None when neither is a dict."""
    section = config.get("bf16", config.get("bfloat16"))
    return section if isinstance(section, dict) else None


def _bf16_enabled(config: dict):
    """A DeepSpeed config's ``bf16.enabled`` (True, False or "auto"); False without a bf16 section."""
    section = bf16_section(config)
    return section.get("enabled", False) if section is not None else False


def resolve_bf16(precision: str, *, cuda: bool, user_config: dict | None, saved_config: dict | None) -> bool:
    """Whether the run trains in bf16: ``--precision`` bf16/fp32 as asked; ``auto`` bf16 where the device has it in
    hardware (``including_emulation=False``: not on GPUs before Ampere). A user config decides for itself (its
    ``"bf16": {"enabled": "auto"}`` by the same hardware rule). A resumed run (``saved_config``, its
    ``ds_config.json``) keeps its precision, since its checkpoint's optimizer state is laid out for it: ``auto``
    takes it, anything else must match it."""
    if precision not in PRECISIONS:
        raise BitconvertError(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    hardware = torch.cuda.is_bf16_supported(including_emulation=False) if cuda else cpu_has_native_bf16()
    if user_config is not None:
        if precision != "auto":
            raise BitconvertError("--precision applies to the generated DeepSpeed config; with --deepspeed set its "
                                  "\"bf16\" section instead")
        enabled = _bf16_enabled(user_config)
        chosen = hardware if enabled == "auto" else bool(enabled)
    elif precision == "auto":
        chosen = hardware
    else:
        chosen = precision == "bf16"
    if saved_config is not None:
        saved = bool(_bf16_enabled(saved_config))
        if precision == "auto" and user_config is None:
            return saved
        if chosen != saved:
            raise BitconvertError(f"this run trains in {'bf16' if chosen else 'fp32'} but the run being resumed "
                                  f"trained in {'bf16' if saved else 'fp32'}; resume with its precision")
    return chosen


def module_with_fp32_masters(engine) -> torch.nn.Module:
    """``engine.module`` converted to fp32 in place, holding the optimizer's fp32 master weights where a bf16/fp16 run
    keeps them: ``fp32_groups`` of DeepSpeed's ZeRO-0 wrapper, else ``safe_get_full_fp32_param`` (ZeRO 1/2 and its
    bf16 optimizer). A parameter with no master (frozen) keeps its low-precision value. An fp32 run is returned as is."""
    from deepspeed.utils import safe_get_full_fp32_param

    module, optimizer = engine.module, engine.optimizer
    if all(p.dtype == torch.float32 for p in module.parameters()):
        return module
    masters = {}
    if hasattr(optimizer, "fp16_groups") and hasattr(optimizer, "fp32_groups"):
        for low, high in zip(optimizer.fp16_groups, optimizer.fp32_groups):
            masters.update({id(p): master for p, master in zip(low, high)})
    else:
        for p in module.parameters():
            master = safe_get_full_fp32_param(p)
            if master is not None:
                masters[id(p)] = master
    module.float()  # in place: the Parameter objects, and so the ids above, stay
    with torch.no_grad():
        for p in module.parameters():
            if id(p) in masters:
                p.copy_(masters[id(p)].reshape(p.shape))
    return module
