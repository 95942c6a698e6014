"""ONNX Runtime decoding of ternary SmolLM2-135M: parity with PyTorch, file sizes, prefill and decode speed.

Variants, each exported by ``bitconvert export`` into WORKDIR/<variant>/model.onnx (reused when present):
    fp32            the full-precision source model (plain MatMul)
    ternary         com.bitconvert::TernaryMatMul, bitconvert's custom-op library
    matmulnbits     com.microsoft::MatMulNBits bits=2, accuracy_level 0 (fp32 activations)
    matmulnbits-a4  the same with accuracy_level 4 (int8 activations per block)

Measured in one run, every variant on the same prompts with the same session options (intra-op threads = --threads,
no spinning), repeats interleaved round-robin so that drifting machine load hits all variants alike:
    prefill tokens/s   --prompt-tokens tokens in one step from an empty cache
    decode tokens/s    --decode-tokens single-token steps after that prompt
    parity             greedy tokens of each ternary variant vs PyTorch (bitconvert.load) on real prompts
Prints a table and writes JSON (--json). Example:
    python benchmarks/onnx_decode.py --ternary /tmp/ternary-smollm2 --workdir /tmp/onnx-bench --json onnx.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np

PROMPTS = (
    "The capital of France is",
    "Once upon a time, in a small village,",
    "def fibonacci(n):",
    "Water boils at a temperature of",
    "The three primary colors are",
)
VARIANTS = {  # name -> (source: "source" or "ternary", export options)
    "fp32": ("source", {}),
    "ternary": ("ternary", {"op": "ternary"}),
    "matmulnbits": ("ternary", {"op": "matmulnbits", "accuracy_level": 0}),
    "matmulnbits-a4": ("ternary", {"op": "matmulnbits", "accuracy_level": 4}),
}


def export_all(args) -> dict[str, Path]:
    from bitconvert.export import export_onnx

    paths = {}
    for name, (source, options) in VARIANTS.items():
        path = Path(args.workdir) / name / "model.onnx"
        if not path.is_file():
            print(f"exporting {name} ...", flush=True)
            export_onnx(args.source if source == "source" else args.ternary, path, **options)
        paths[name] = path
    return paths


def file_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.parent.glob(path.name + "*"))


def decoder_for(path: Path, threads: int):
    import onnxruntime as ort

    from bitconvert.export import session
    from bitconvert.export.generate import OnnxDecoder

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return OnnxDecoder(session(path, options))


def time_once(decoder, prompt: np.ndarray, decode_tokens: int) -> tuple[float, float]:
    """(prefill seconds, decode seconds) for one prompt and ``decode_tokens`` greedy steps."""
    start = time.perf_counter()
    logits, cache = decoder.step(prompt, decoder.empty_cache())
    prefill = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(decode_tokens):
        token = np.array([[int(np.argmax(logits[0, -1]))]])
        logits, cache = decoder.step(token, cache)
    return prefill, time.perf_counter() - start


def _first_difference(tokens: list[int], expected: list[int]) -> dict:
    same = next((i for i, (a, b) in enumerate(zip(tokens, expected)) if a != b), len(tokens))
    return {"identical": tokens == expected, "first_difference": same}


def parity(args, decoders: dict) -> dict:
    """Greedy tokens of each ternary variant vs PyTorch's bitconvert.load (sdpa attention), per prompt.

    Also PyTorch itself with eager instead of sdpa attention ("torch-eager"): the same model with float rounding
    changed only in attention, which calibrates how far ulp-level differences alone carry on this model.
    """
    import torch
    from transformers import AutoTokenizer

    from bitconvert.load import load

    tokenizer = AutoTokenizer.from_pretrained(args.ternary)
    model = load(args.ternary, dtype=torch.float32)
    result = {}
    for prompt in PROMPTS:
        ids = tokenizer(prompt)["input_ids"]
        greedy = {}
        for attention in ("sdpa", "eager"):
            model.set_attn_implementation(attention)
            with torch.no_grad():
                greedy[attention] = model.generate(torch.tensor([ids]), max_new_tokens=args.parity_tokens,
                                                   min_new_tokens=args.parity_tokens,
                                                   do_sample=False)[0, len(ids):].tolist()
        expected = greedy["sdpa"]
        row = {"torch": tokenizer.decode(expected), "torch-eager": _first_difference(greedy["eager"], expected)}
        for name, decoder in decoders.items():
            if name != "fp32":
                row[name] = _first_difference(decoder.generate(ids, args.parity_tokens), expected)
        result[prompt] = row
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ternary", default="/tmp/ternary-smollm2", help="converted ternary folder")
    parser.add_argument("--source", default="smollm2-135m", help="full-precision source (for the fp32 export)")
    parser.add_argument("--workdir", default="/tmp/onnx-bench", help="where the exports live (reused)")
    parser.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads (default 1)")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument("--parity-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args()

    paths = export_all(args)
    decoders = {name: decoder_for(path, args.threads) for name, path in paths.items()}
    vocab = decoders["ternary"].session.get_outputs()[0].shape[-1]
    prompt = np.random.default_rng(0).integers(0, vocab, (1, args.prompt_tokens))
    times = {name: [] for name in decoders}
    for decoder in decoders.values():  # warm-up: first-run allocations
        time_once(decoder, prompt[:, :8], 2)
    for _ in range(args.repeats):
        for name, decoder in decoders.items():
            times[name].append(time_once(decoder, prompt, args.decode_tokens))
    rows = {}
    for name, samples in times.items():
        prefill = statistics.median(args.prompt_tokens / p for p, _ in samples)
        decode = statistics.median(args.decode_tokens / d for _, d in samples)
        spread = [args.decode_tokens / d for _, d in samples]
        rows[name] = {"bytes": file_bytes(paths[name]), "prefill_tokens_per_s": prefill,
                      "decode_tokens_per_s": decode, "decode_min_max": [min(spread), max(spread)]}
    base = rows["fp32"]["decode_tokens_per_s"]
    print(f"\nthreads={args.threads} prompt={args.prompt_tokens} decode={args.decode_tokens} repeats={args.repeats} "
          "(medians; decode min-max in brackets)")
    print(f"{'variant':<16}{'file MiB':>10}{'prefill tok/s':>15}{'decode tok/s':>14}{'min-max':>16}{'vs fp32':>9}")
    for name, row in rows.items():
        low, high = row["decode_min_max"]
        print(f"{name:<16}{row['bytes'] / 2**20:>10.1f}{row['prefill_tokens_per_s']:>15.1f}"
              f"{row['decode_tokens_per_s']:>14.1f}{f'{low:.1f}-{high:.1f}':>16}"
              f"{row['decode_tokens_per_s'] / base:>8.2f}x")
    checks = parity(args, decoders)
    print(f"\ngreedy parity with PyTorch over {args.parity_tokens} tokens (identical / first differing position):")
    for text, row in checks.items():
        cells = "  ".join(f"{name}: {'yes' if r['identical'] else 'no'}/{r['first_difference']}"
                          for name, r in row.items() if name != "torch")
        print(f"  {text!r:<42} {cells}")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "speed": rows, "parity": checks}, indent=2) + "\n")


if __name__ == "__main__":
    main()
