"""Training throughput: QAT (BitLinear fake quantization + STE, lambda = 1) vs a plain full-precision fine-tune,
and (``--distill``) QAT with the frozen full-precision teacher's forward and the logit KL (the recommended recipe).

Same model, same batches, same DeepSpeed config (bitconvert's generated default, in the precision that
``--precision`` resolves to), in one process: DeepSpeed engines whose optimizer steps alternate (FP, QAT,
[QAT + teacher], FP, ...) so that a machine shared with other work slows them alike. Reports tokens/s from the fastest timed step of each (the least disturbed by other work; the median is
printed too), the overhead ``1 - qat / fp`` (target < 30%) and the teacher's cost ``1 - distill / qat``.

    PYTHONPATH=. python benchmarks/train_throughput.py --model smollm2-135m --seq-len 256 --batch-size 4 --steps 4
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m", help="conversion SOURCE (default smollm2-135m)")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=4, help="timed optimizer steps per variant")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per variant first")
    parser.add_argument("--distill", action="store_true", help="also time QAT with the teacher and the logit KL")
    parser.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto",
                        help="as `bitconvert finetune --precision` (the figures in docs/finetune.md: fp32)")
    parser.add_argument("--json", default="train_throughput.json", help="where to write the results")
    return parser.parse_args()


def make_engine(model, hp, config):
    from bitconvert.finetune import engine as ds

    engine, _ = ds.initialize(model, config, hp, "generated")
    return engine


def timed_step(engine, ids, teacher=None) -> float:
    from bitconvert.finetune.loss import cross_entropy, distillation_kl

    started = time.perf_counter()
    logits = engine(ids).logits
    if teacher is None:
        loss = cross_entropy(logits, ids)
    else:
        with torch.no_grad():
            target = teacher(ids).logits
        loss = distillation_kl(logits, target, 1.0)
    engine.backward(loss)
    engine.step()
    return time.perf_counter() - started


def main():
    args = parse_args()
    from bitconvert.finetune import engine as ds
    from bitconvert.finetune.data import PackedCorpus, batches
    from bitconvert.finetune.precision import resolve_bf16
    from bitconvert.quantize import TernaryConfig, quantize_
    from bitconvert.sources import load_full_precision, resolve_source

    ds.ensure_process_group_env()
    torch.manual_seed(0)
    full, tokenizer = load_full_precision(resolve_source(args.model), dtype=torch.float32)
    full.config.use_cache = False
    qat = type(full)(full.config)
    qat.load_state_dict(full.state_dict())
    quantize_(qat, TernaryConfig(mode="train", quant_lambda=1.0))
    total = args.warmup + args.steps
    hp = ds.TrainingHyperparameters(args.batch_size, 1, 1e-4, 0.1, 1, 0.0, 1.0, "adamw", 2 * total)
    cuda = torch.cuda.is_available()
    bf16 = resolve_bf16(args.precision, cuda=cuda, user_config=None, saved_config=None)
    config = ds.resolve_config(None, hp, world_size=1, cuda=cuda, bf16=bf16)
    teacher = None
    if args.distill:
        teacher = type(full)(full.config)
        teacher.load_state_dict(full.state_dict())
        teacher.eval().requires_grad_(False)
        if bf16:
            teacher.bfloat16()  # as finetune runs it
        student = type(full)(full.config)
        student.load_state_dict(full.state_dict())
        quantize_(student, TernaryConfig(mode="train", quant_lambda=1.0))
    engines = {"full precision": make_engine(full.train(), hp, config), "QAT (BitLinear)": make_engine(qat.train(), hp, config)}
    if teacher is not None:
        engines["QAT + teacher KL"] = make_engine(student.train(), hp, config)
    data = batches(PackedCorpus(None, tokenizer, args.seq_len, heldout=0).train(), args.batch_size)
    times = {name: [] for name in engines}
    for step in range(total):
        ids = next(data)
        for name, engine in engines.items():
            seconds = timed_step(engine, ids, teacher if name == "QAT + teacher KL" else None)
            if step >= args.warmup:
                times[name].append(seconds)
    tokens = args.batch_size * args.seq_len
    rates = {name: tokens / min(values) for name, values in times.items()}
    medians = {name: tokens / statistics.median(values) for name, values in times.items()}
    fp, q = rates["full precision"], rates["QAT (BitLinear)"]
    result = {"model": args.model, "seq_len": args.seq_len, "batch_size": args.batch_size, "steps": args.steps,
              "deepspeed_config": config, "tokens_per_s": rates, "tokens_per_s_median": medians,
              "step_seconds": times, "overhead": 1 - q / fp, "threads": torch.get_num_threads()}
    print(f"{'variant':<18}{'tokens/s (best)':>16}{'tokens/s (median)':>19}")
    for name in rates:
        print(f"{name:<18}{rates[name]:>16.1f}{medians[name]:>19.1f}")
    print(f"QAT overhead: {100 * result['overhead']:.1f}% (target < 30%)")
    if teacher is not None:
        result["teacher_cost"] = 1 - rates["QAT + teacher KL"] / q
        print(f"teacher cost (1 - distill / QAT tokens/s): {100 * result['teacher_cost']:.1f}%")
    Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
