"""Where calibration and block reconstruction run: the one place that reads ``--device``."""

from __future__ import annotations

import torch

from ..errors import BitconvertError

DEVICES = ("auto", "cpu", "cuda")


def resolve_device(name: str = "auto") -> torch.device:
    """``auto``: the first CUDA device if one is present, else the CPU; ``cuda`` without one is a one-line error."""
    if name not in DEVICES:
        raise BitconvertError(f"unknown --device '{name}'; choose one of {', '.join(DEVICES)}")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise BitconvertError("--device cuda: no CUDA device is available to torch here; use --device cpu")
    return torch.device(name)
