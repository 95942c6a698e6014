"""Two or more builds of the TernaryMatMul library on the same ONNX models, interleaved, in one run.

    python benchmarks/ort_library_ab.py --library before=/path/old/libbitconvert_ort.so \
        --library after=/path/new/libbitconvert_ort.so m1/model.onnx m2/model.onnx --json bench-out/ort_ab.json

A library is what ``bitconvert.export.custom_op_library()`` builds into ``~/.cache/bitconvert/ort_ops/<hash>/``;
an older one is obtained by running that function in a checkout of the older commit. Per model, every library gets
its own session (same options as ``benchmarks/onnx_decode.py``: ``--threads`` intra-op threads, no spinning), one
warm-up, then ``--repeats`` rounds of a random prompt and greedy decoding, library after library within each round,
so a slow spell of the shared machine hits all of them. Prints and writes decode and prefill tokens/s (best round,
with the spread) per library.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import onnx_decode  # noqa: E402  (benchmarks/ sibling)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="+", metavar="MODEL", help="ONNX files written by `bitconvert export`")
    parser.add_argument("--library", action="append", required=True, metavar="NAME=PATH",
                        help="a TernaryMatMul library build, repeatable")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", default="bench-out/ort_library_ab.json")
    args = parser.parse_args()
    libraries = dict(spec.split("=", 1) for spec in args.library)
    missing = [path for path in [*libraries.values(), *args.models] if not Path(path).is_file()]
    if missing:
        parser.error(f"no such file: {missing[0]}")

    results = {}
    for model in args.models:
        decoders = {name: onnx_decode.decoder_for(model, args.threads, library=path) for name, path in libraries.items()}
        prompt = onnx_decode._random_prompt(next(iter(decoders.values())), args.prompt_tokens)
        for decoder in decoders.values():  # warm-up: first-shape allocations
            onnx_decode._time_once(decoder, prompt[:, :8], 2)
        samples = {name: [] for name in decoders}
        for _ in range(args.repeats):
            for name, decoder in decoders.items():
                samples[name].append(onnx_decode._time_once(decoder, prompt, args.new_tokens))
        results[model] = {name: onnx_decode._summary(samples[name], args.prompt_tokens, args.new_tokens)
                          for name in decoders}
        for name, row in results[model].items():
            low, high = row["decode_min_max"]
            print(f"{model}  {name:<10} decode {row['decode_tok_s']:7.1f} tok/s ({low:.1f}-{high:.1f})  "
                  f"prefill {row['prefill_tok_s']:7.1f} tok/s", flush=True)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"args": vars(args), "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
