"""``bitconvert finetune SOURCE --out DIR``: argument parsing for quantization-aware training."""

from __future__ import annotations

import argparse

from .precision import PRECISIONS

EPILOG = """\
examples:
  bitconvert smollm2-135m --out ternary --calibrate         convert first (calibrated), then distil it back:
  bitconvert finetune ternary --out distilled --max-tokens 250000     (teacher: the source recorded in ternary/)
  bitconvert finetune smollm2-135m --out qat --max-steps 300 --no-distill   plain QAT from the full-precision model
  bitconvert finetune ./llama --data corpus.jsonl --text-field content --out qat --deepspeed ds_zero2.json
  bitconvert finetune ./llama --out qat --resume                          continue from qat-checkpoints/
  deepspeed --num_gpus 8 $(which bitconvert) finetune ./llama --out qat   8 GPUs (see docs/finetune.md for 2 nodes)
"""


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "finetune",
        help="quantization-aware training (DeepSpeed) to recover quality after conversion",
        description="Train a full-precision LLaMA into a ternary BitNet b1.58 model: latent full-precision weights, "
        "ternary forward through the straight-through estimator, on DeepSpeed (CPU with gloo, or GPUs). DIR is "
        "written in the converted format (loads in stock transformers) with latent/ (the latent weights, a SOURCE "
        "for further training), loss_curve.png and train_log.jsonl. Checkpoints, the step log and the DeepSpeed "
        "config go to --save-dir.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add = parser.add_argument
    add("source", metavar="SOURCE", help="a converted folder (the recommended start: its model is trained as saved, "
        "learned scales initialised from its codes and scales) or a full-precision model: folder, .gguf file, hub id, "
        "or alias")
    add("--out", required=True, metavar="DIR", help="output folder (must not exist unless --overwrite)")
    add("--overwrite", action="store_true", help="replace DIR at the end if it exists")
    data = parser.add_argument_group("data")
    data.add_argument("--data", metavar="PATH|NAME", help="text/JSONL/Parquet file or folder, or a datasets hub name "
                      "owner/name[:config] (streamed). Default: the offline LAMBADA passages (held-out part for eval)")
    data.add_argument("--text-field", default="text", help="JSONL field / Parquet column with the text (default text)")
    data.add_argument("--seq-len", type=int, default=256, help="tokens per packed sequence (default 256)")
    data.add_argument("--heldout-sequences", type=int, default=16,
                      help="held-out sequences for --eval-every (taken from the start of --data; default 16)")
    length = parser.add_mutually_exclusive_group()
    length.add_argument("--max-steps", type=int, help="optimizer steps (default 1000); warm-ups scale to the run")
    length.add_argument("--max-tokens", type=int, help="training tokens; steps = ceil(T / tokens per step)")
    recipe = parser.add_argument_group("recipe")
    recipe.add_argument("--warmup-quant-steps", type=int,
                        help="lambda goes linearly from 0 (full precision) to 1 (ternary) over these steps (default: "
                        "10%% of the run, at most 1000, from a full-precision SOURCE; 0 from a converted folder, which "
                        "is ternary already); a warm-up that does not end before the last step is refused")
    recipe.add_argument("--sub-norm", action="store_true", help="insert SubLN (RMSNorm) before o_proj and down_proj")
    recipe.add_argument("--weight-scale", choices=("absmean", "absmedian", "learned"), default="absmean",
                        help="scale of a full-precision SOURCE's projections: recomputed from the weights (absmean, "
                        "absmedian) or a learned parameter (LSQ); a converted folder always trains learned scales")
    recipe.add_argument("--distill", action=argparse.BooleanOptionalAction, default=True,
                        help="distil from the frozen full-precision teacher (logit KL; default on: the recommended "
                        "recipe); --no-distill trains on next-token cross-entropy alone")
    recipe.add_argument("--teacher", metavar="SOURCE", help="the full-precision teacher (default: the source recorded "
                        "in a converted folder's bitconvert.json, or SOURCE itself)")
    recipe.add_argument("--distill-temperature", type=float, default=1.0, help="KL temperature tau (default 1)")
    recipe.add_argument("--distill-alpha", type=float, default=1.0,
                        help="loss = (1 - alpha) CE + alpha tau^2 KL (default 1: KL alone)")
    recipe.add_argument("--distill-hidden", type=float, default=0.0, metavar="BETA",
                        help="add BETA x mean over layers of 1 - cos(student, teacher hidden state) (default 0)")
    optim = parser.add_argument_group("optimization (flags fill a DeepSpeed config's \"auto\" values)")
    optim.add_argument("--lr", type=float, default=None,
                       help="peak learning rate (default: 3e-3 from a converted folder, 3e-4 from a full-precision "
                            "model; measured in docs/finetune.md)")
    optim.add_argument("--lr-warmup-steps", type=int,
                       help="linear LR warm-up steps (default: 5%% of the run, at least 1, at most 100)")
    optim.add_argument("--min-lr-ratio", type=float, default=0.1, help="cosine decay ends at lr * this (default 0.1)")
    optim.add_argument("--weight-decay", type=float, default=0.0,
                       help="AdamW weight decay on matrices (default 0: decay pulls latent weights into the zero code)")
    optim.add_argument("--grad-clip", type=float, default=1.0, help="gradient norm clipping (default 1.0)")
    optim.add_argument("--optim", choices=("adamw", "adamw8bit"), default="adamw",
                       help="adamw, or bitsandbytes' 8-bit AdamW where it supports the device")
    optim.add_argument("--precision", choices=PRECISIONS, default="auto",
                       help="training precision of the generated DeepSpeed config: bf16 (fp32 master weights and "
                       "optimizer state) or fp32; auto (default): bf16 on GPUs and CPUs that have it in hardware "
                       "(AVX512_BF16, AMX), fp32 elsewhere; a resumed run keeps its own")
    optim.add_argument("--batch-size", type=int, default=8, help="sequences per micro-batch per process (default 8)")
    optim.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step (default 1)")
    optim.add_argument("--deepspeed", metavar="JSON", dest="deepspeed_config",
                       help="DeepSpeed config (ZeRO 0-2, optimizer, scheduler, precision, offload); default: generated")
    run = parser.add_argument_group("run")
    run.add_argument("--save-dir", metavar="DIR", help="checkpoints, log.jsonl, ds_config.json (default OUT-checkpoints)")
    run.add_argument("--save-every", type=int, default=500, help="checkpoint every N steps (default 500)")
    run.add_argument("--keep-checkpoints", type=int, default=2, help="keep the last N checkpoints (default 2)")
    run.add_argument("--eval-every", type=int, default=200, help="held-out perplexity every N steps (default 200)")
    run.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --save-dir")
    run.add_argument("--stop-after", type=int, metavar="N",
                     help="stop after N steps of this invocation, saving a checkpoint (fits a job time limit)")
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)  # set by the deepspeed launcher
    parser.set_defaults(run=run_finetune)


def run_finetune(args) -> int:
    import os

    from .trainer import FinetuneOptions, finetune

    if args.local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    fields = {name: getattr(args, name) for name in FinetuneOptions.__dataclass_fields__ if hasattr(args, name)}
    result = finetune(FinetuneOptions(**fields, progress=not args.quiet))
    if os.environ.get("RANK", "0") != "0":
        return 0
    if result.stopped == "interrupted":
        print(f"bitconvert: interrupted at step {result.steps}; checkpoint saved; continue with --resume")
        return 130
    if result.stopped:
        print(f"stopped after step {result.steps} (--stop-after); checkpoint saved; continue with --resume")
    elif result.out is not None:
        print(f"wrote {result.out} after {result.steps} steps")
    return 0
