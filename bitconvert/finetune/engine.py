"""DeepSpeed set-up: the process-group environment, the DeepSpeed config (the user's, or a generated default) and
the engine.

Config rules, as HF Trainer users expect: a user's JSON config is used as given, except that ``"auto"`` values (and
missing batch keys) are filled from bitconvert's flags: micro-batch (``--batch-size``), gradient accumulation
(``--grad-accum``), clipping (``--grad-clip``), optimizer lr/weight decay/betas, scheduler steps and lr.
The generated config trains in bf16 when asked to (:mod:`.precision` decides).
Without an ``optimizer`` section bitconvert adds AdamW (or, for ``--optim adamw8bit``, passes bitsandbytes'
8-bit AdamW as a client optimizer); without a ``scheduler`` section bitconvert uses its linear LR warm-up then cosine decay
(DeepSpeed's ``WarmupCosineLR``) over the whole run. The effective config is written beside the checkpoints.
"""

from __future__ import annotations

import json
import os
import socket
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import BitconvertError, reason
from .precision import bf16_section
from .schedule import lr_multiplier

ADAM_BETAS = (0.9, 0.95)  # from-scratch BitNet recipes
ADAM_EPS = 1e-8


def ensure_process_group_env() -> None:
    """Set RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT for a single process when no launcher did
    (otherwise DeepSpeed falls back to MPI discovery, which needs mpi4py)."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        os.environ.setdefault("LOCAL_RANK", "0")
        return
    with socket.socket() as probe:  # a free port, so that parallel single-process runs do not collide
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(port))


@dataclass(frozen=True)
class TrainingHyperparameters:
    """The flags that a DeepSpeed config may leave to bitconvert."""

    batch_size: int
    grad_accum: int
    lr: float
    min_lr_ratio: float
    lr_warmup_steps: int
    weight_decay: float
    grad_clip: float
    optim: str
    total_steps: int


def read_user_config(path: str) -> dict:
    """Parse the user's DeepSpeed JSON config (a JSON object) or raise a one-line error."""
    try:
        config = json.loads(Path(path).read_text())
    except OSError as exc:
        raise BitconvertError(f"cannot read DeepSpeed config '{path}': {exc.strerror}") from None
    except json.JSONDecodeError as exc:
        raise BitconvertError(f"DeepSpeed config '{path}' is not valid JSON: {exc}") from None
    if not isinstance(config, dict):
        raise BitconvertError(f"DeepSpeed config '{path}' must be a JSON object")
    return config


def _fill(section: dict, key: str, value) -> None:
    if section.get(key, "auto") == "auto":
        section[key] = value


def _int_setting(config: dict, key: str, path: str) -> int:
    value = config[key]
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise BitconvertError(f"DeepSpeed config '{path}': {key} must be a positive integer or \"auto\", got {value!r}")
    return value


def batch_shape(user_config: dict | None, batch_size: int, grad_accum: int, path: str | None) -> tuple[int, int]:
    """``(micro-batch per process, gradient accumulation steps)``: the config's numbers, or the flags for "auto"."""
    config = dict(user_config or {})
    _fill(config, "train_micro_batch_size_per_gpu", batch_size)
    _fill(config, "gradient_accumulation_steps", grad_accum)
    return (_int_setting(config, "train_micro_batch_size_per_gpu", path or "generated"),
            _int_setting(config, "gradient_accumulation_steps", path or "generated"))


def resolve_config(user_config: dict | None, hp: TrainingHyperparameters, *, world_size: int, cuda: bool,
                   path: str = "generated", bf16: bool = False) -> dict:
    """The effective DeepSpeed config: ``user_config`` with its gaps filled, or the default one (in bf16 if
    ``bf16``, see :func:`.precision.resolve_bf16`)."""
    config = json.loads(json.dumps(user_config)) if user_config is not None else {}
    micro, accum = batch_shape(config, hp.batch_size, hp.grad_accum, path)
    config["train_micro_batch_size_per_gpu"], config["gradient_accumulation_steps"] = micro, accum
    _fill(config, "train_batch_size", micro * accum * world_size)
    _fill(config, "gradient_clipping", hp.grad_clip)
    config.setdefault("steps_per_print", 10**9)  # bitconvert prints its own progress
    config.setdefault("zero_optimization", {"stage": 0})
    stage = config["zero_optimization"].get("stage", 0) if isinstance(config["zero_optimization"], dict) else None
    if stage not in (0, 1, 2):
        raise BitconvertError(f"DeepSpeed config '{path}': ZeRO stage {stage!r} is not supported (use 0, 1 or 2)")
    if user_config is None and bf16:
        config["bf16"] = {"enabled": True}
    elif bf16_section(config) is not None:
        _fill(bf16_section(config), "enabled", bf16)  # "auto": :func:`.precision.resolve_bf16`'s choice
    if "optimizer" in config:
        if hp.optim != "adamw":
            raise BitconvertError(
                f"--optim {hp.optim} conflicts with the 'optimizer' section of DeepSpeed config '{path}'; drop one"
            )
        params = config["optimizer"].setdefault("params", {})
        _fill(params, "lr", hp.lr)
        _fill(params, "weight_decay", hp.weight_decay)
        _fill(params, "betas", list(ADAM_BETAS))
        _fill(params, "eps", ADAM_EPS)
    elif hp.optim == "adamw":
        # torch's AdamW, fused into one kernel on CUDA, rather than DeepSpeed's FusedAdam: nothing to JIT-compile
        # (FusedAdam needs nvcc at run time, and DeepSpeed 0.19.8 cannot parse a TORCH_CUDA_ARCH_LIST such as "9.0a").
        params = {"lr": hp.lr, "betas": list(ADAM_BETAS), "eps": ADAM_EPS, "weight_decay": hp.weight_decay,
                  "torch_adam": True}
        if cuda:
            params["fused"] = True
        config["optimizer"] = {"type": "AdamW", "params": params}
    if "scheduler" in config:
        params = config["scheduler"].setdefault("params", {})
        for key, value in (("total_num_steps", hp.total_steps), ("warmup_num_steps", hp.lr_warmup_steps),
                           ("warmup_max_lr", hp.lr), ("cos_min_ratio", hp.min_lr_ratio)):
            if params.get(key) == "auto":
                params[key] = value
    return config


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """nanoGPT's split: weight decay on matrices (dim >= 2), none on norms' gains and biases."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]


def adamw8bit(groups: list[dict], hp: TrainingHyperparameters, device: torch.device):
    """bitsandbytes' 8-bit AdamW, after checking with one step on a scratch tensor that it runs on ``device``."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise BitconvertError("--optim adamw8bit needs bitsandbytes: pip install bitsandbytes") from None
    probe = torch.nn.Parameter(torch.zeros(4096, device=device))
    probe.grad = torch.ones_like(probe)
    try:
        bnb.optim.AdamW8bit([probe], lr=hp.lr).step()
    except Exception as exc:
        raise BitconvertError(
            f"--optim adamw8bit: bitsandbytes cannot run 8-bit AdamW on {device.type} here ({reason(exc)}); use --optim adamw"
        ) from None
    return bnb.optim.AdamW8bit(groups, lr=hp.lr, betas=ADAM_BETAS, eps=ADAM_EPS, weight_decay=hp.weight_decay)


def training_device() -> torch.device:
    """This process's device: GPU ``LOCAL_RANK`` where torch sees CUDA (made current), else the CPU; a process
    without a GPU of its own is a one-line error."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    if device.index >= torch.cuda.device_count():
        raise BitconvertError(
            f"process {device.index} of this launch has no GPU (torch sees {torch.cuda.device_count()}); "
            "launch one process per GPU, or set CUDA_VISIBLE_DEVICES= to train on the CPU"
        )
    torch.cuda.set_device(device)
    return device


def initialize(model: torch.nn.Module, config: dict, hp: TrainingHyperparameters, path: str):
    """``deepspeed.initialize`` with bitconvert's parameter groups; config errors become one line."""
    device = training_device()
    import deepspeed

    deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo", verbose=False)
    groups = parameter_groups(model, hp.weight_decay)
    optimizer = adamw8bit(groups, hp, device) if "optimizer" not in config else None
    scheduler = None
    if "scheduler" not in config:
        def scheduler(optim):
            return torch.optim.lr_scheduler.LambdaLR(optim, lambda step: lr_multiplier(
                step, hp.lr_warmup_steps, hp.total_steps, hp.min_lr_ratio))
    try:
        engine, *_ = deepspeed.initialize(model=model, model_parameters=groups, optimizer=optimizer,
                                          lr_scheduler=scheduler, config=config)
    except (ValueError, KeyError, TypeError, AssertionError) as exc:
        raise BitconvertError(f"DeepSpeed rejected config '{path}': {reason(exc)}") from None
    return engine, device
