"""Decode and prefill speed of converted folders in each kernel layout (lut, base3, 2bit), interleaved over two
rounds, with the memory read bandwidth (``torch.sum`` over 1.5 GiB) measured before each row.

    PYTHONPATH=. python benchmarks/layout_study/decode_layouts.py FOLDER [FOLDER ...] [--json bench-out/layouts.json]

2 threads, batch 1, greedy, a 128-token prompt, 32 new tokens, int8 lm_head (``benchmarks/decode.py``'s
``measure_bitconvert``). Prints one line per row and writes JSON.
"""
import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from decode import measure_bitconvert  # noqa: E402
from headtohead import memory_bandwidth  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folders", nargs="+")
    parser.add_argument("--json", type=Path, default=Path("bench-out/layouts.json"))
    args = parser.parse_args()
    rows = []
    for folder in args.folders:
        for round_ in range(2):
            for layout in ("lut", "base3", "2bit"):
                bandwidth = memory_bandwidth(2) / 1e9
                row = measure_bitconvert(folder, 2, prompt_tokens=128, new_tokens=32, layout=layout)
                row.update(folder=folder, round=round_, bandwidth_gb_s=bandwidth,
                           fraction=row["decode_gb_s"] / bandwidth)
                rows.append(row)
                print(f"{Path(folder).name:22s} {layout:6s} decode {row['decode_tok_s']:7.2f} tok/s prefill "
                      f"{row['prefill_tok_s']:7.1f} {row['bytes_per_token'] / 1e9:.3f} GB/token "
                      f"{row['decode_gb_s']:.1f} GB/s of {bandwidth:.1f} = {100 * row['fraction']:.0f}%", flush=True)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
