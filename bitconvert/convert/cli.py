"""``bitconvert [convert] SOURCE --out DIR``: argument parsing and the end-of-run summary."""

from __future__ import annotations

import argparse

from ..errors import BitconvertError

SIZE_UNITS = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "B": 1}


def parse_size(text: str) -> int:
    """'2GB', '512MiB', '1000000' -> bytes."""
    for unit, factor in sorted(SIZE_UNITS.items(), key=lambda item: -len(item[0])):
        if text.endswith(unit):
            number = text[: -len(unit)]
            break
    else:
        number, factor = text, 1
    try:
        value = int(float(number) * factor)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a size like 2GB or 512MiB") from None
    if value <= 0:
        raise argparse.ArgumentTypeError("size must be positive")
    return value


def human_bytes(count: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if count < 1024 or unit == "TiB":
            return f"{count:.1f} {unit}" if unit != "B" else f"{count} B"
        count /= 1024
    raise AssertionError("unreachable")


def register(subparsers) -> None:
    from ..sources import ALIASES

    parser = subparsers.add_parser(
        "convert",
        help="convert a full-precision LLaMA to ternary BitNet b1.58 (the default verb)",
        description="Convert a full-precision LLaMA-family model to a ternary BitNet b1.58 folder that loads in stock "
        "transformers (AutoModelForCausalLM.from_pretrained) and with bitconvert.load. Tensors are streamed one at "
        "a time; the output is written to a temporary folder and renamed at the end.",
        epilog="SOURCE is a model folder (safetensors), a .gguf file, a hub id (owner/name), or an alias: "
        + ", ".join(ALIASES)
        + ".\nexample: bitconvert smollm2-135m --out ternary-smollm2",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("source", metavar="SOURCE", help="model folder, .gguf file, hub id, or alias")
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder (must not exist unless --overwrite)")
    parser.add_argument("--overwrite", action="store_true", help="replace DIR if it exists (only once the new one is complete)")
    parser.add_argument("--weight-scale", choices=("absmean", "absmedian"), default="absmean",
                        help="per-tensor weight scale: mean |W| (BitNet b1.58) or median |W| (b1.58 Reloaded); default absmean")
    parser.add_argument("--sub-norm", action="store_true",
                        help="insert SubLN (RMSNorm, gain 1) before o_proj and down_proj; writes the 'bitnet' model type. "
                        "Changes the function: fine-tune afterwards")
    parser.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                        help="dtype of embeddings, norms and lm_head in the output (default: the source's)")
    parser.add_argument("--shard-size", type=parse_size, default="1GiB", metavar="SIZE",
                        help="maximum output shard size, e.g. 1GiB (default) or 500MB")
    parser.add_argument("--allow-pickle", action="store_true",
                        help="accept pickled .bin/.pt checkpoints (loaded with weights_only=True); only for files you trust")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    calibration = parser.add_argument_group(
        "calibrated conversion",
        "--calibrate runs the model layer by layer on calibration text (one decoder layer in memory at a time) and "
        "chooses each projection's codes and scale for the layer's output error, with int8 activations as in "
        "inference. Its three stages are on by default; each --no-* switch turns one off.")
    calibration.add_argument("--calibrate", action="store_true",
                             help="calibrate: optimal scale/threshold + equivalence scaling + error compensation")
    calibration.add_argument("--calib-data", metavar="DATA", default=None,
                             help="calibration text: .txt/.jsonl/.parquet file or folder, or a datasets name "
                             "owner/name[:config] (as finetune --data); default: the offline LAMBADA training passages")
    calibration.add_argument("--calib-text-field", metavar="FIELD", default="text",
                             help="JSONL/Parquet/datasets field holding the text (default: text)")
    calibration.add_argument("--calib-tokens", type=int, default=4096, metavar="N",
                             help="calibration tokens, in sequences of 512 (default: 4096)")
    calibration.add_argument("--no-optimal-scale", action="store_true",
                             help="keep absmean scales instead of the scale/threshold of least output error")
    calibration.add_argument("--no-equalize", action="store_true",
                             help="no equivalence scaling (per-channel scales folded into the norms, v->o, up->down)")
    calibration.add_argument("--no-gptq", action="store_true",
                             help="no error compensation across columns (GPTQ on the fixed ternary grid)")
    calibration.add_argument("--reconstruct", action="store_true",
                             help="then train each layer's latent weights, scales and norm gains to reproduce the "
                             "full-precision hidden states (block-wise reconstruction; minutes)")
    calibration.add_argument("--reconstruct-steps", type=int, default=100, metavar="N",
                             help="Adam steps per layer for --reconstruct (default: 100)")
    calibration.add_argument("--reconstruct-lr", type=float, default=0.01, metavar="LR",
                             help="Adam learning rate for --reconstruct, relative: latent weights and scale of each "
                             "projection move with LR times its scale, norm gains with LR; cosine decay (default: 0.01)")
    calibration.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                             help="where calibration runs (default: auto = CUDA if present, else CPU)")
    parser.set_defaults(run=run)


def calibration_config(args):
    """The :class:`CalibrationConfig` the flags ask for, or None without --calibrate (its options then refused)."""
    from .calibrate import CalibrationConfig

    calibration_flags = [flag for flag, given in (
        ("--calib-data", args.calib_data is not None), ("--no-optimal-scale", args.no_optimal_scale),
        ("--no-equalize", args.no_equalize), ("--no-gptq", args.no_gptq), ("--reconstruct", args.reconstruct),
    ) if given]
    if not args.calibrate:
        if calibration_flags:
            raise BitconvertError(f"{calibration_flags[0]} only applies with --calibrate; add --calibrate")
        return None
    for flag, value in (("--calib-tokens", args.calib_tokens), ("--reconstruct-steps", args.reconstruct_steps)):
        if value <= 0:
            raise BitconvertError(f"{flag} must be at least 1, got {value}")
    if not args.reconstruct_lr > 0:
        raise BitconvertError(f"--reconstruct-lr must be positive, got {args.reconstruct_lr}")
    return CalibrationConfig(
        data=args.calib_data, text_field=args.calib_text_field, tokens=args.calib_tokens,
        optimal_scale=not args.no_optimal_scale, equalize=not args.no_equalize, gptq=not args.no_gptq,
        reconstruct=args.reconstruct, reconstruct_steps=args.reconstruct_steps, reconstruct_lr=args.reconstruct_lr,
        device=args.device)


def run(args) -> int:
    from .pipeline import ConvertOptions, convert

    options = ConvertOptions(weight_scale=args.weight_scale, sub_norm=args.sub_norm, dtype=args.dtype,
                             shard_bytes=args.shard_size, allow_pickle=args.allow_pickle,
                             calibration=calibration_config(args))
    result = convert(args.source, args.out, options, overwrite=args.overwrite, progress=not args.quiet)
    report = result.report
    zero = sum(layer["zero_fraction"] for layer in report.layers) / len(report.layers)
    error = sum(layer["relative_error"] for layer in report.layers) / len(report.layers)
    ratio = report.bytes_before / max(report.bytes_after, 1)
    if ratio >= 1:
        change = f"{ratio:.1f}x smaller"
    else:  # a quantized source (GGUF): the parts kept in high precision are stored in --dtype
        change = f"{1 / ratio:.1f}x larger: embeddings, norms and lm_head are stored as {report.options['dtype']}"
    print(
        f"converted {report.parameters_converted:,} parameters in {len(report.layers)} projections "
        f"({zero:.1%} zeros, mean relative error {error:.3f})\n"
        f"weights on disk {human_bytes(report.bytes_before)} -> {human_bytes(report.bytes_after)} ({change}) "
        f"in {report.seconds:.1f} s\n"
        f"wrote {result.out}  (load: bitconvert.load('{result.out}') or AutoModelForCausalLM.from_pretrained)"
    )
    return 0
