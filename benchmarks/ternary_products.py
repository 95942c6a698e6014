"""Benchmark the ternary kernels against torch fp32/bf16, transformers' BitNet path and (optionally) llama.cpp TQ2_0.

    PYTHONPATH=. python benchmarks/ternary_products.py [--json bench-out/kernels.json] [--threads N] [--repeats R]
        [--models smollm2-135m] [--batches 8,32,128,512]

Every SIMD path runs in every weight layout it computes on (``kernel_avx512`` is the 2-bit layout,
``kernel_avx512-base3`` the 1.67-bit one: ``bitconvert/kernels/csrc/ternary_core.h``).
Prints a table and writes JSON. Times are medians over ``--repeats`` calls with the weights hot in cache, except the
"streaming" rows: batch 1 cycling through distinct copies of the weights (> 1 GiB in all, larger than the L3),
reported as weight bytes read per second and as a fraction of this machine's memory read bandwidth, measured in the
same run (right before each such row) by summing > 1 GiB of distinct fp32 tensors. ``LLAMA_CPP_DIR`` naming a
llama.cpp build adds the rows its ``test-backend-ops perf -o MUL_MAT`` prints for TQ2_0 (its own fixed shapes, its
default threads).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from bitconvert import kernels
from bitconvert.packing import pack_ternary

SHAPES = {  # (out, in)
    "llama2-7b": [(4096, 4096), (11008, 4096), (4096, 11008)],
    "smollm2-135m": [(576, 576), (192, 576), (1536, 576), (576, 1536)],
}
BATCHES = (1, 8, 128)
LARGE_WORKING_SET = 1 << 30  # bytes; the L3 here is 260 MiB


def median_us(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    times.sort()
    return times[len(times) // 2] * 1e6


def cycling_us(fn, items: list, repeats: int) -> float:
    """Median time of one ``fn(item)`` while cycling through ``items`` (so none is cached between its uses)."""
    for item in items:
        fn(item)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for item in items:
            fn(item)
        times.append((time.perf_counter() - start) / len(items))
    times.sort()
    return times[len(times) // 2] * 1e6


def memory_read_bandwidth(repeats: int) -> float:
    """Bytes/s that ``torch.sum`` reads from > 1 GiB of distinct 64 MiB fp32 tensors."""
    chunk = 16 << 20
    tensors = [torch.ones(chunk) for _ in range(LARGE_WORKING_SET // (4 * chunk) + 1)]
    return 4 * chunk / (cycling_us(torch.sum, tensors, repeats) * 1e-6)


def transformers_bitlinear(out_features: int, in_features: int, packed: torch.Tensor):
    """transformers' own BitLinear (bf16, unpack_weights + F.linear, torch.compile'd) holding ``packed``."""
    from transformers.integrations.bitnet import BitLinear

    module = BitLinear(in_features, out_features, bias=False, dtype=torch.bfloat16)
    module.weight.copy_(packed)
    return module


def test_backend_ops(directory: str) -> Path:
    """llama.cpp's ``test-backend-ops`` under ``directory``; exits with one line if the build lacks it."""
    binaries = sorted(Path(directory).rglob("test-backend-ops"))
    if not binaries:
        raise SystemExit(f"error: LLAMA_CPP_DIR={directory} has no test-backend-ops; build that target "
                         "(cmake --build DIR --target test-backend-ops) or unset LLAMA_CPP_DIR")
    return binaries[0]


def llama_cpp_rows(binary: Path) -> list[dict]:
    """Parse ``test-backend-ops perf -o MUL_MAT`` lines for TQ2_0 (``MUL_MAT(type_a=tq2_0,...): N runs - T us/run``)."""
    text = subprocess.run([str(binary), "perf", "-o", "MUL_MAT"], capture_output=True, text=True, check=True).stdout
    rows = []
    for params, us in re.findall(r"MUL_MAT\((type_a=tq2_0[^)]*)\):.*?([\d.]+) us/run", text):
        fields = dict(re.findall(r"(\w+)=(\[[^\]]*\]|[^,]+)", params))
        rows.append({"params": params, "m": int(fields["m"]), "n": int(fields["n"]), "k": int(fields["k"]),
                     "us": float(us)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", default="bench-out/kernels.json")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--isas", default=None, help="comma-separated paths (default: every SIMD path this CPU has)")
    parser.add_argument("--no-transformers", action="store_true", help="skip transformers' torch.compile'd path")
    parser.add_argument("--models", default=",".join(SHAPES), help="comma-separated shape sets (default: all)")
    parser.add_argument("--batches", default=",".join(map(str, BATCHES)), help="comma-separated token counts")
    args = parser.parse_args()
    unknown = sorted(set(args.models.split(",")) - set(SHAPES))
    if unknown:
        parser.error(f"unknown shape set {unknown[0]!r}; choose from {', '.join(SHAPES)}")
    batches = [int(batch) for batch in args.batches.split(",")]
    llama_cpp_binary = test_backend_ops(os.environ["LLAMA_CPP_DIR"]) if os.environ.get("LLAMA_CPP_DIR") else None
    torch.set_num_threads(args.threads)
    isas = args.isas.split(",") if args.isas else [name for name in kernels.supported_isas() if name != "scalar"]
    paths = {  # label -> (isa index, layout index)
        name if layout == 0 else f"{name}-{kernels.LAYOUTS[layout]}": (kernels.ISAS.index(name), layout)
        for name in isas for layout in range(len(kernels.LAYOUTS))
        if kernels.layout_supported(layout, kernels.ISAS.index(name))
    }
    torch.manual_seed(0)

    bandwidth = memory_read_bandwidth(args.repeats)
    print(f"memory read bandwidth (> 1 GiB working set, {args.threads} threads): {bandwidth / 1e9:.1f} GB/s")
    rows = []
    for model in args.models.split(","):
        for out_features, in_features in SHAPES[model]:
            ternary = torch.randint(-1, 2, (out_features, in_features), dtype=torch.int8)
            packed = pack_ternary(ternary)
            weights = {layout: kernels.repack(packed, out_features, layout) for _, layout in paths.values()}
            weight_scale = torch.tensor([1.7])
            dense = ternary.float()
            dense_bf16 = dense.bfloat16()
            hf = None if args.no_transformers else transformers_bitlinear(out_features, in_features, packed)
            for batch in batches:
                x = torch.randn(batch, in_features)
                x_bf16 = x.bfloat16()
                timings = {
                    "torch_fp32": median_us(lambda: F.linear(x, dense), args.repeats),
                    "torch_bf16": median_us(lambda: F.linear(x_bf16, dense_bf16), args.repeats),
                }
                if hf is not None:
                    with torch.no_grad():
                        timings["transformers_bitnet"] = median_us(lambda: hf(x_bf16), args.repeats)
                for name, (isa, layout) in paths.items():
                    timings[f"kernel_{name}"] = median_us(
                        lambda: kernels.linear(x, weights[layout], out_features, weight_scale, isa, args.threads,
                                               layout), args.repeats
                    )
                row = {"model": model, "out": out_features, "in": in_features, "batch": batch, "us": timings}
                if batch == 1 and model == "llama2-7b":
                    # Re-measured next to each streaming row: on a shared machine the bandwidth drifts.
                    local_bandwidth = memory_read_bandwidth(args.repeats)
                    row["streaming"] = {"memory_read_bandwidth_bytes_per_s": local_bandwidth}
                    for name, (isa, layout) in paths.items():
                        weight = weights[layout]
                        copies = [weight.clone() for _ in range(LARGE_WORKING_SET // weight.numel() + 1)]
                        us = cycling_us(
                            lambda w: kernels.linear(x, w, out_features, weight_scale, isa, args.threads, layout),
                            copies, max(3, args.repeats // 5),
                        )
                        rate = weight.numel() / (us * 1e-6)
                        row["streaming"][f"kernel_{name}"] = {"us": us, "bytes_per_s": rate,
                                                              "weights_per_s": out_features * in_features / (us * 1e-6),
                                                              "fraction_of_bandwidth": rate / local_bandwidth}
                        del copies
                rows.append(row)
                print_row(row)

    llama_cpp = None
    if llama_cpp_binary is not None:
        llama_cpp = llama_cpp_rows(llama_cpp_binary)
        for entry in llama_cpp:
            print(f"llama.cpp TQ2_0 m={entry['m']} n={entry['n']} k={entry['k']}: {entry['us']:.1f} us")
    result = {
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": args.threads,
                    "isas": kernels.supported_isas(), "torch": torch.__version__},
        "memory_read_bandwidth_bytes_per_s": bandwidth,
        "rows": rows,
        "llama_cpp_tq2_0": llama_cpp,
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.json}")


def print_row(row: dict) -> None:
    base = row["us"]["torch_fp32"]
    cells = [f"{name} {us:9.1f}us ({base / us:5.1f}x)" for name, us in row["us"].items()]
    print(f"{row['model']:13s} {row['out']:5d}x{row['in']:<5d} b={row['batch']:<3d} " + " | ".join(cells))
    streaming = dict(row.get("streaming", {}))
    if streaming:
        print(f"{'':13s} memory read bandwidth now: {streaming.pop('memory_read_bandwidth_bytes_per_s') / 1e9:.1f} GB/s")
    for name, entry in streaming.items():
        print(f"{'':13s} streaming {name}: {entry['us']:.1f}us, {entry['bytes_per_s'] / 1e9:.1f} GB/s weights "
              f"({entry['weights_per_s'] / 1e9:.0f} G weights/s), {100 * entry['fraction_of_bandwidth']:.0f}% of "
              "measured bandwidth")


if __name__ == "__main__":
    main()
