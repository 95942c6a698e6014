"""``bitconvert generate MODEL --prompt TEXT``: greedy or sampled generation in ONNX Runtime (an .onnx file) or in
PyTorch (a converted folder, :mod:`bitconvert.kernels.generate`)."""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "generate",
        help="generate text with an exported ONNX model (ONNX Runtime) or a converted folder (PyTorch)",
        description="Generate a continuation of --prompt with an ONNX model written by `bitconvert export`, in "
        "ONNX Runtime with its KV cache, using the tokenizer saved beside it; or with a folder written by "
        "`bitconvert SOURCE --out DIR`, in PyTorch (bitconvert.load and its lean decoding loop on the ternary "
        "kernels). Greedy unless --temperature > 0. Prints the speed (tokens/s) at the end, on stderr.",
        epilog="examples: bitconvert generate onnx/model.onnx --prompt 'The capital of France is' --max-new-tokens 20\n"
        "          bitconvert generate ternary-smollm2 --prompt 'The capital of France is' --lm-head exact",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("model", metavar="MODEL", help="an ONNX file written by `bitconvert export`, or a converted "
                        "folder")
    parser.add_argument("--prompt", required=True, help="the text to continue")
    parser.add_argument("--max-new-tokens", type=int, default=64, metavar="N", help="at most N new tokens (default 64)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy; > 0: sample")
    parser.add_argument("--top-k", type=int, default=0, help="sample among the K most likely tokens (0: all)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold (default 1: off)")
    parser.add_argument("--seed", type=int, default=None, help="random seed for sampling")
    parser.add_argument("--lm-head", choices=("int8", "int6", "int4", "exact"), default="int8",
                        help="converted folders only: the output projection as int8 rows on the C++ core (default; a "
                        "quarter of the fp32 bytes per token), int6 (6.5 bits per weight with its block scales: 19%% "
                        "fewer bytes than int8, slightly less exact), int4 (5 bits per weight: faster, clearly less "
                        "exact) or exact (the stored float weights)")
    parser.add_argument("--kv-cache", choices=("fp32", "fp16"), default="fp32",
                        help="converted folders only: the KV cache's type, fp32 (default, exact) or fp16 (half the "
                        "bytes every decoded token reads, which at long contexts exceed the weights'; each key and "
                        "value rounded to fp16 once, as llama.cpp's default cache)")
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
    if Path(args.model).is_dir():
        from ..kernels.generate import run_folder

        return run_folder(args)
    if args.kv_cache != "fp32":
        raise BitconvertError("--kv-cache applies to converted folders; an ONNX model keeps the cache type it was "
                              "exported with (drop --kv-cache; `bitconvert export --kv-cache fp16` makes an fp16 one)")
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
