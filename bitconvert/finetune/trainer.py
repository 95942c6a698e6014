"""``finetune(options)``: quantization-aware training of a full-precision LLaMA into BitNet b1.58, on DeepSpeed.

The model keeps full-precision latent weights; every attention/MLP projection is a training-mode
:class:`~bitconvert.bitlinear.BitLinear` whose forward is ternary (weights) / int8 (activations) through the
straight-through estimator, blended in with ``lambda`` (:mod:`.schedule`). One optimizer step:

    lambda = min(step / warmup_quant_steps, 1)
    for each of grad_accum micro-batches ids (B, T):
        logits = student(ids)                              (B, T, V)
        loss = CE(logits, ids)   or   (1 - alpha) CE + alpha tau^2 KL(teacher || student)   (:mod:`.loss`)
        engine.backward(loss); engine.step()               (DeepSpeed steps the optimizer at the boundary)

Files: ``--save-dir`` (default ``OUT-checkpoints``) holds ``ds_config.json``, ``log.jsonl`` and DeepSpeed
checkpoints ``step_N/`` (the last ``keep_checkpoints`` of them); ``OUT`` is written atomically at the end
(:mod:`.export`) with ``loss_curve.png``. Ctrl-C or SIGTERM finishes the current step, saves a checkpoint and stops;
a non-finite loss stops before the optimizer step, saving nothing, so the last checkpoint stays the last good one.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from ..checkpoint import Report, atomic_output_dir, check_destination
from ..errors import BitconvertError
from ..quantize import set_quant_lambda
from . import engine as ds
from .data import PackedCorpus, batches
from .export import write_trained_model
from .loss import cross_entropy, distillation_kl, hidden_cosine
from .precision import module_with_fp32_masters, resolve_bf16
from .runlog import StepLog, plot_loss_curve, read_log
from .schedule import quant_lambda, resolve_lr, resolve_warmups
from .student import run_models

CHECKPOINT_PREFIX = "step_"


@dataclass
class FinetuneOptions:
    """Every knob of a run; the CLI flags map one to one (see ``bitconvert finetune --help``)."""

    source: str
    out: Path
    data: str | None = None
    text_field: str = "text"
    deepspeed_config: str | None = None
    max_steps: int | None = None
    max_tokens: int | None = None
    seq_len: int = 256
    batch_size: int = 8
    grad_accum: int = 1
    warmup_quant_steps: int | None = None  # None: fit the run (:func:`.schedule.resolve_warmups`)
    sub_norm: bool = False
    weight_scale: str = "absmean"
    teacher: str | None = None
    distill: bool = True
    distill_temperature: float = 1.0
    distill_alpha: float = 1.0
    distill_hidden: float = 0.0
    lr: float | None = None  # None: by the kind of start (:func:`.schedule.resolve_lr`)
    min_lr_ratio: float = 0.1
    lr_warmup_steps: int | None = None  # None: fit the run
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    optim: str = "adamw"
    precision: str = "auto"  # auto: bf16 where the device has it in hardware (:func:`.precision.resolve_bf16`)
    save_every: int = 500
    keep_checkpoints: int = 2
    eval_every: int = 200
    heldout_sequences: int = 16
    resume: bool = False
    stop_after: int | None = None
    save_dir: Path | None = None
    overwrite: bool = False
    progress: bool = True
    seed: int = 0

    def __post_init__(self):
        self.out = Path(self.out)
        self.save_dir = Path(self.save_dir) if self.save_dir else self.out.with_name(self.out.name + "-checkpoints")


@dataclass
class FinetuneResult:
    out: Path | None
    steps: int
    stopped: str = ""  # "" (finished), "stop_after" or "interrupted"
    history: list = field(default_factory=list)


class StopRequest:
    """Turns the first SIGINT/SIGTERM into a flag checked between steps; a second SIGINT interrupts at once."""

    def __init__(self):
        self.requested = False
        self.previous = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def _validate(opts: FinetuneOptions) -> None:
    positive = {"--seq-len": opts.seq_len, "--batch-size": opts.batch_size, "--grad-accum": opts.grad_accum,
                "--save-every": opts.save_every, "--eval-every": opts.eval_every,
                "--keep-checkpoints": opts.keep_checkpoints, "--heldout-sequences": opts.heldout_sequences}
    optional_positive = {"--max-steps": opts.max_steps, "--max-tokens": opts.max_tokens, "--stop-after": opts.stop_after}
    positive.update({flag: value for flag, value in optional_positive.items() if value is not None})
    for flag, value in positive.items():
        if value < 1:
            raise BitconvertError(f"{flag} must be at least 1, got {value}")
    if opts.max_steps is not None and opts.max_tokens is not None:
        raise BitconvertError("give --max-steps or --max-tokens, not both")
    if not 0.0 <= opts.distill_alpha <= 1.0 or opts.distill_temperature <= 0 or opts.distill_hidden < 0:
        raise BitconvertError("--distill-alpha must lie in [0, 1], --distill-temperature be positive and "
                              "--distill-hidden at least 0")
    if (opts.lr is not None and opts.lr <= 0) or (opts.warmup_quant_steps or 0) < 0 or (opts.lr_warmup_steps or 0) < 0:
        raise BitconvertError("--lr must be positive and --warmup-quant-steps / --lr-warmup-steps at least 0")
    if opts.teacher and not opts.distill:
        raise BitconvertError("--teacher is only used with distillation; drop --no-distill or --teacher")


def _checkpoints(save_dir: Path) -> list[Path]:
    found = [p for p in save_dir.glob(CHECKPOINT_PREFIX + "*") if p.is_dir() and p.name[len(CHECKPOINT_PREFIX):].isdigit()]
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]))


def _check_save_dir(opts: FinetuneOptions) -> None:
    has_checkpoints = opts.save_dir.is_dir() and (opts.save_dir / "latest").is_file()
    if opts.resume and not has_checkpoints:
        raise BitconvertError(f"--resume: no DeepSpeed checkpoint in '{opts.save_dir}' (set --save-dir to the run's folder)")
    if not opts.resume and opts.save_dir.exists():
        raise BitconvertError(f"checkpoint folder '{opts.save_dir}' already exists; pass --resume to continue that run, "
                              f"or remove it")


def _all_reduce(values: list[float], device: torch.device, op=dist.ReduceOp.SUM) -> list[float]:
    """``values`` reduced over the processes, through a float64 tensor on ``device`` (NCCL reduces CUDA tensors
    only; gloo, CPU ones)."""
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=op)
    return tensor.tolist()


@torch.no_grad()
def heldout_loss(model, sequences: list[torch.Tensor], device, rank: int, world: int, batch_size: int) -> float:
    """Mean next-token CE over the held-out sequences, split across ranks; ``exp`` of it is the perplexity."""
    model.eval()
    mine = sequences[rank::world]
    nll, count = 0.0, 0.0
    for begin in range(0, len(mine), batch_size):
        ids = torch.stack(mine[begin:begin + batch_size]).to(device)
        nll += cross_entropy(model(ids).logits, ids).item() * ids.shape[0] * (ids.shape[1] - 1)
        count += ids.shape[0] * (ids.shape[1] - 1)
    model.train()
    nll, count = _all_reduce([nll, count], device)
    return nll / count


def train_step(engine, teacher, data, accum: int, world: int, device, opts: FinetuneOptions) -> list[float]:
    """One optimizer step over ``accum`` micro-batches; returns ``[loss, ce, kl, hidden, teacher seconds]``, the
    losses averaged over micro-batches and processes, the teacher's forward time summed on this process. Raises
    ``FloatingPointError(loss)`` before any backward pass on a non-finite loss on any process."""
    sums, teacher_seconds = [0.0, 0.0, 0.0, 0.0], 0.0
    hidden_states = opts.distill_hidden > 0
    for _ in range(accum):
        ids = next(data).to(device)
        output = engine(ids, output_hidden_states=hidden_states)
        ce = cross_entropy(output.logits, ids)
        zero = torch.zeros((), device=device)
        kl, hidden, loss = zero, zero, ce
        if teacher is not None:
            started = time.perf_counter()
            with torch.no_grad():
                target = teacher(ids, output_hidden_states=hidden_states)
            teacher_seconds += time.perf_counter() - started
            kl = distillation_kl(output.logits, target.logits, opts.distill_temperature)
            if hidden_states:
                hidden = hidden_cosine(output.hidden_states, target.hidden_states)
            loss = (1 - opts.distill_alpha) * ce + opts.distill_alpha * kl + opts.distill_hidden * hidden
        values = _all_reduce([loss.item(), ce.item(), kl.item(), hidden.item()], device)
        if not all(math.isfinite(v) for v in values):
            raise FloatingPointError(values[0])
        engine.backward(loss)
        engine.step()
        sums = [total + value / world / accum for total, value in zip(sums, values)]
    return sums + [teacher_seconds]


def _save(engine, opts: FinetuneOptions, step: int, rank: int) -> None:
    engine.save_checkpoint(str(opts.save_dir), tag=f"{CHECKPOINT_PREFIX}{step}")
    if rank == 0:
        for old in _checkpoints(opts.save_dir)[:-opts.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)


def finetune(opts: FinetuneOptions) -> FinetuneResult:
    """Run QAT as described in the module docstring; returns where the model went and how the run ended."""
    from transformers.utils import logging as transformers_logging

    _validate(opts)
    check_destination(opts.out, opts.overwrite)
    _check_save_dir(opts)
    user_config = ds.read_user_config(opts.deepspeed_config) if opts.deepspeed_config else None
    cuda = torch.cuda.is_available()
    saved_path = opts.save_dir / "ds_config.json"  # a resumed run's own config, which fixes its precision
    saved_config = json.loads(saved_path.read_text()) if opts.resume and saved_path.is_file() else None
    bf16 = resolve_bf16(opts.precision, cuda=cuda, user_config=user_config, saved_config=saved_config)  # before loading
    ds.ensure_process_group_env()
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    torch.manual_seed(opts.seed)

    if not opts.progress:
        transformers_logging.disable_progress_bar()
    models = run_models(opts.source, distill=opts.distill, teacher=opts.teacher, sub_norm=opts.sub_norm,
                        weight_scale=opts.weight_scale)
    model, tokenizer, teacher = models.student, models.tokenizer, models.teacher
    max_positions = getattr(model.config, "max_position_embeddings", None)
    if max_positions and opts.seq_len > max_positions:
        raise BitconvertError(f"--seq-len {opts.seq_len} exceeds the model's maximum of {max_positions} positions")
    corpus = PackedCorpus(opts.data, tokenizer, opts.seq_len, opts.text_field, opts.heldout_sequences)
    model.train()

    micro, accum = ds.batch_shape(user_config, opts.batch_size, opts.grad_accum, opts.deepspeed_config)
    tokens_per_step = micro * accum * world * opts.seq_len
    if opts.max_steps is not None:
        total_steps = opts.max_steps
    else:
        total_steps = math.ceil(opts.max_tokens / tokens_per_step) if opts.max_tokens is not None else 1000
    try:
        quant_warmup, lr_warmup = resolve_warmups(total_steps, opts.warmup_quant_steps, opts.lr_warmup_steps,
                                                  student_is_ternary=models.converted)
    except ValueError as exc:
        raise BitconvertError(str(exc)) from None
    set_quant_lambda(model, quant_lambda(0, quant_warmup))
    peak_lr = resolve_lr(opts.lr, student_is_ternary=models.converted)
    hp = ds.TrainingHyperparameters(opts.batch_size, opts.grad_accum, peak_lr, opts.min_lr_ratio, lr_warmup,
                                    opts.weight_decay, opts.grad_clip, opts.optim, total_steps)
    config_name = opts.deepspeed_config or "generated"
    config = ds.resolve_config(user_config, hp, world_size=world, cuda=cuda, path=config_name, bf16=bf16)
    engine, device = ds.initialize(model, config, hp, config_name)
    compute_dtype = next(engine.module.parameters()).dtype
    if teacher is not None:
        teacher.to(device=device, dtype=compute_dtype)

    if opts.resume:
        path, _ = engine.load_checkpoint(str(opts.save_dir))
        if path is None:
            raise BitconvertError(f"--resume: DeepSpeed could not load the checkpoint in '{opts.save_dir}'")
    elif rank == 0:
        opts.save_dir.mkdir(parents=True)
    dist.barrier()
    step = engine.global_steps
    if rank == 0:
        (opts.save_dir / "ds_config.json").write_text(json.dumps(config, indent=2))
        (opts.save_dir / "options.json").write_text(json.dumps(asdict(opts), indent=2, default=str))
        log = StepLog(opts.save_dir / "log.jsonl", resume_step=step)
    data = batches(corpus.train(skip=step * micro * accum * world, rank=rank, world=world), micro)
    bar = tqdm(total=total_steps, initial=step, desc="finetune", unit="step", disable=not opts.progress or rank != 0)
    stop_at = step + opts.stop_after if opts.stop_after is not None else total_steps
    stopped, last_saved = "", step

    if step == 0:  # the curve's starting point: what the student scores before any training
        value = heldout_loss(engine.module, corpus.heldout, device, rank, world, micro)
        if rank == 0:
            log.write(kind="eval", step=0, tokens=0, heldout_loss=value, heldout_ppl=math.exp(value),
                      quant_lambda=quant_lambda(0, quant_warmup))
    with StopRequest() as stop:
        while step < min(total_steps, stop_at):
            lam = quant_lambda(step, quant_warmup)
            set_quant_lambda(engine.module, lam)
            lr = engine.optimizer.param_groups[0]["lr"]  # what this step uses
            started = time.perf_counter()
            try:
                sums = train_step(engine, teacher, data, accum, world, device, opts)
            except FloatingPointError as exc:
                kept = _checkpoints(opts.save_dir)
                raise BitconvertError(
                    f"loss became {exc} at step {step + 1} (lr {lr:.3g}, lambda {lam:.3f}); stopped without saving. "
                    f"Last good checkpoint: {kept[-1] if kept else 'none'}; continue with --resume and a lower --lr"
                ) from None
            step += 1
            seconds = time.perf_counter() - started
            record = dict(kind="train", step=step, loss=sums[0], ce=sums[1], kl=sums[2], hidden=sums[3], lr=lr,
                          quant_lambda=lam, tokens=step * tokens_per_step, tokens_per_s=tokens_per_step / seconds,
                          seconds=seconds, teacher_seconds=sums[4])
            if rank == 0:
                log.write(**record)
                bar.update(1)
                bar.set_postfix(loss=f"{sums[0]:.3f}", lr=f"{lr:.2e}", lam=f"{lam:.2f}", tok_s=f"{record['tokens_per_s']:.0f}")
            if step % opts.eval_every == 0 or step == total_steps:
                value = heldout_loss(engine.module, corpus.heldout, device, rank, world, micro)
                if rank == 0:
                    log.write(kind="eval", step=step, tokens=record["tokens"], heldout_loss=value,
                              heldout_ppl=math.exp(value), quant_lambda=lam)
                    bar.write(f"step {step}: held-out perplexity {math.exp(value):.3f} (lambda {lam:.2f})")
            if step % opts.save_every == 0 or step == total_steps:
                _save(engine, opts, step, rank)
                last_saved = step
            if _all_reduce([float(stop.requested)], device, dist.ReduceOp.MAX)[0]:
                stopped = "interrupted"
                break
    bar.close()
    if step < total_steps:
        stopped = stopped or "stop_after"
        if last_saved != step:
            _save(engine, opts, step, rank)
        return FinetuneResult(None, step, stopped, read_log(opts.save_dir / "log.jsonl") if rank == 0 else [])

    history = []
    if rank == 0:
        training = {"steps": step, "tokens": step * tokens_per_step, "world_size": world, "deepspeed_config": config,
                    "precision": {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(compute_dtype, "fp32")}
        training.update(lr=peak_lr, lr_warmup_steps=lr_warmup, warmup_quant_steps=quant_warmup, teacher=models.teacher_source,
                        sub_norm=models.sub_norm, started_from="converted folder" if models.converted else "source")
        history = _write_output(module_with_fp32_masters(engine), tokenizer, opts, models.source, training,
                                models.sub_norm)
    dist.barrier()
    return FinetuneResult(opts.out, step, "", history)


def _write_output(model, tokenizer, opts: FinetuneOptions, source: str, training: dict, sub_norm: bool) -> list[dict]:
    """Write ``opts.out`` atomically (the model at lambda = 1, latent/, loss curve, step log, report); returns the log."""
    set_quant_lambda(model, 1.0)
    model.config.use_cache = True
    history = read_log(opts.save_dir / "log.jsonl")
    options = json.loads(json.dumps({**asdict(opts), "teacher": training["teacher"], "training": training}, default=str))
    report = Report(source=source, options=options)
    started = time.perf_counter()
    with atomic_output_dir(opts.out, opts.overwrite) as tmp:
        write_trained_model(model, tmp, tokenizer=tokenizer, sub_norm=sub_norm, report=report)
        plot_loss_curve(history, tmp / "loss_curve.png")
        shutil.copy(opts.save_dir / "log.jsonl", tmp / "train_log.jsonl")
        report.seconds = time.perf_counter() - started
        report.write(tmp)
    return history
