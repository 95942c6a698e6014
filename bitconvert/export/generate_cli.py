"""``bitconvert generate MODEL.onnx --prompt TEXT``: greedy or sampled generation in ONNX Runtime."""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "generate",
        help="generate text with an exported ONNX model in ONNX Runtime",
        description="Generate a continuation of --prompt with an ONNX model written by `bitconvert export`, in "
        "ONNX Runtime with its KV cache, using the tokenizer saved beside it. Greedy unless --temperature > 0.",
        epilog="example: bitconvert generate onnx/model.onnx --prompt 'The capital of France is' --max-new-tokens 20",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("model", metavar="MODEL.onnx", help="an ONNX file written by `bitconvert export`")
    parser.add_argument("--prompt", required=True, help="the text to continue")
    parser.add_argument("--max-new-tokens", type=int, default=64, metavar="N", help="at most N new tokens (default 64)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy; > 0: sample")
    parser.add_argument("--top-k", type=int, default=0, help="sample among the K most likely tokens (0: all)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold (default 1: off)")
    parser.add_argument("--seed", type=int, default=None, help="random seed for sampling")
    parser.set_defaults(run=run)


def run(args) -> int:
    import sys
    import time
    from pathlib import Path

    from ..errors import BitconvertError, reason
    from .generate import OnnxDecoder, Sampling
    from .runtime import session

    if args.max_new_tokens < 1:
        raise BitconvertError("--max-new-tokens must be at least 1")
    sampling = Sampling(args.temperature, args.top_k, args.top_p, args.seed)
    decoder = OnnxDecoder(session(args.model))
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(Path(args.model).parent)
    except Exception as exc:
        raise BitconvertError(f"no usable tokenizer beside '{args.model}' ({reason(exc)})") from None
    prompt = tokenizer(args.prompt)["input_ids"]
    eos = tokenizer.eos_token_id
    start = time.perf_counter()
    tokens = decoder.generate(prompt, args.max_new_tokens, sampling, () if eos is None else (eos,))
    seconds = time.perf_counter() - start
    print(args.prompt + tokenizer.decode(tokens, skip_special_tokens=True))
    print(f"[{len(tokens)} tokens in {seconds:.2f} s, {len(tokens) / seconds:.1f} tokens/s incl. the prompt]",
          file=sys.stderr)
    return 0
