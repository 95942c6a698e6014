"""Decode and prefill speed, head to head, in one run: bitconvert.load, ONNX Runtime + TernaryMatMul, llama.cpp.

    LLAMA_CPP_DIR=/path/to/llama.cpp/build python benchmarks/headtohead.py \
        --model smollm2=ternary-smollm2:smollm2-135m \
        --model llama-192m=/models/llama-192m-ternary:/models/llama-192m-fp16 \
        --threads 2 --rounds 2 --json bench-out/headtohead.json

Each ``--model NAME=CONVERTED[:SOURCE]`` names a converted folder and, optionally, its full-precision source (a HF
folder or an alias), from which llama.cpp's own converter makes the F16 and Q4_0 GGUFs a user would otherwise run.
Per model the engines are:
- ``bitconvert``: ``bitconvert.load`` and its decode path (``benchmarks/decode.py: measure_bitconvert``), int8
  lm_head; ``bitconvert int6`` and ``bitconvert int4`` the same with the 6-bit and 4-bit lm_heads (int4 is lossier:
  docs/kernels.md);
- ``ort``: ``bitconvert export --graph layer --lm-head int8-row --logits last`` (the fastest ONNX export: one
  DecoderLayer node per layer, bitconvert's Int8MatMul head), run in ONNX Runtime with bitconvert's op library
  (``benchmarks/onnx_decode.py: measure_ort``);
- llama.cpp (when ``LLAMA_CPP_DIR`` names a build): our GGUF export (``ours``), llama.cpp's default TQ2_0 types
  (``tq2_0-default``), F16 and Q4_0 of the source (``benchmarks/llamacpp.py``).
All engines use the same thread count, a 128-token prompt and 64 generated tokens, greedy, batch 1, and each its
default way of waiting between parallel sections, as a user runs it: OpenMP's (torch, our kernels, llama.cpp's ggml;
leave ``OMP_WAIT_POLICY`` unset) and ONNX Runtime's spinning intra-op pool. On a machine shared with other jobs,
spinning threads wait for the core a neighbour holds: there pass ``--no-spinning`` and set
``OMP_WAIT_POLICY=PASSIVE``, and read the figures as a loaded machine's (that setting slowed llama.cpp's decoding about
2.4x and ours about 2x on the 2-core Zen 4, docs/kernels.md). Engines are
interleaved round by round (every engine once per round), so a slow spell of the shared machine hits all of them;
the best round per engine is reported, with the spread.

A llama.cpp engine whose tool fails (llama-bench crashed on llama.cpp's own TQ2_0 file of SmolLM2 in its prompt test,
on an Intel Xeon host) is reported as failed, with the exit status, and left out of the table; the run goes on.

Each decode figure is also given as a fraction of its physical bound: bytes read per generated token times tokens/s,
over the memory bandwidth (``torch.sum`` over a 1.5 GiB fp32 tensor with the same threads) measured right before
that engine's run, since a shared host's bandwidth drifts by up to 2x within one run. The bytes are every weight
tensor but the embedding table (gathered one row at a time, unless it doubles as the output matrix) plus the KV
cache at the mean decoding position, in each engine's cache type: fp32 for bitconvert and ONNX Runtime, f16 for
llama.cpp (its default).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from bitconvert import kernels

sys.path.insert(0, str(Path(__file__).resolve().parent))

import decode  # noqa: E402  (benchmarks/ siblings)
import llamacpp  # noqa: E402
import onnx_decode  # noqa: E402

BANDWIDTH_BYTES = 3 * 2**29  # 1.5 GiB: far beyond any L3 here


class BandwidthProbe:
    """Read bandwidth, in bytes/s, from one fp32 tensor of ``nbytes`` allocated once: ``torch.sum`` over it, best of
    ``passes`` (on torch's current thread count)."""

    def __init__(self, nbytes: int, passes: int):
        self.data, self.passes = torch.ones(nbytes // 4), passes

    def __call__(self) -> float:
        best = float("inf")
        for _ in range(self.passes):
            start = time.perf_counter()
            self.data.sum()
            best = min(best, time.perf_counter() - start)
        return self.data.numel() * 4 / best


def memory_bandwidth(threads: int, repeats: int = 5) -> float:
    """Bytes/s that ``torch.sum`` reads from a 1.5 GiB fp32 tensor (allocated for this call), best of ``repeats``."""
    torch.set_num_threads(threads)
    return BandwidthProbe(BANDWIDTH_BYTES, repeats)()


def gguf_tensor_bytes(path: Path) -> dict[str, int]:
    """Bytes of every tensor in a GGUF file, by name, from its tensor infos (block counts x block bytes). Q2_0
    (type 42: 64 values in 18 bytes) is added to gguf-py's size table, which (<= 0.19) lacks it."""
    import numpy as np
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader

    class TensorSizes(GGUFReader):
        def _build_tensors(self, start_offs, fields):
            self.sizes = {}
            for info in fields:
                _, name, _, dims, kind, _ = info.parts
                kind = int(kind[0])
                block, block_bytes = (64, 18) if kind == 42 else GGML_QUANT_SIZES[GGMLQuantizationType(kind)]
                self.sizes[bytes(name).decode()] = int(np.prod(dims)) // block * block_bytes
            self.tensors = []

    return TensorSizes(path).sizes


def gguf_bytes_per_token(path: Path) -> int:
    """Bytes of every tensor in a GGUF file but ``token_embd.weight``, which is counted only when the file has no
    ``output.weight`` (tied embeddings: the table is then the output matrix, read whole every token)."""
    tensors = gguf_tensor_bytes(path)
    if "output.weight" in tensors:
        tensors.pop("token_embd.weight", None)
    return sum(tensors.values())


def _decoder_layer_rows(node, shapes: dict[str, list[int]]) -> dict[str, int]:
    """A DecoderLayer node's ternary weights -> their rows N, from the weights' columns (as the op derives them):
    K = qkv's, H D = o's, I = down's; qkv (H + 2 G) D, o and down K, gate_up 2 I."""
    attributes = {a.name: a.i for a in node.attribute if a.name in ("num_heads", "kv_num_heads")}
    qkv, o, gate_up, down = (node.input[i] for i in (3, 12, 15, 17))
    hidden, dim, intermediate = shapes[qkv][1], shapes[o][1] // attributes["num_heads"], shapes[down][1]
    return {qkv: (attributes["num_heads"] + 2 * attributes["kv_num_heads"]) * dim, o: hidden,
            gate_up: 2 * intermediate, down: hidden}


def onnx_bytes_per_token(path: Path) -> int:
    """Bytes of the ONNX graph's initializers, less a table that is only ever the data input of a ``Gather``
    (the embedding lookup reads one row per token); a TernaryMatMul or DecoderLayer weight counts as the op's repacked
    copy in the layout it picks on this CPU (``kernels.layout_index``), which is what it reads."""
    import onnx
    from onnx.external_data_helper import uses_external_data

    model = onnx.load(str(path), load_external_data=False)
    shapes = {tensor.name: list(tensor.dims) for tensor in model.graph.initializer}
    consumers: dict[str, set[str]] = {}
    ternary_rows: dict[str, int] = {}  # TernaryMatMul weight -> out_features
    for node in model.graph.node:
        for position, name in enumerate(node.input):
            consumers.setdefault(name, set()).add(node.op_type if position == 0 else f"{node.op_type}:{position}")
        if node.op_type == "TernaryMatMul":
            ternary_rows[node.input[1]] = next(a.i for a in node.attribute if a.name == "out_features")
        if node.op_type == "DecoderLayer":
            ternary_rows.update(_decoder_layer_rows(node, shapes))
    layout = kernels.layout_index()
    total = 0
    for tensor in model.graph.initializer:
        if consumers.get(tensor.name) == {"Gather"}:
            continue
        if tensor.name in ternary_rows:
            total += kernels.repacked_bytes(ternary_rows[tensor.name], tensor.dims[1], layout)
        elif uses_external_data(tensor):
            total += int(next(entry.value for entry in tensor.external_data if entry.key == "length"))
        else:
            total += len(tensor.raw_data) or onnx.numpy_helper.to_array(tensor).nbytes
    return total


def parse_model(spec: str) -> tuple[str, Path, str | None]:
    """``NAME=CONVERTED[:SOURCE]`` -> (name, converted folder, source or None)."""
    name, _, rest = spec.partition("=")
    converted, _, source = rest.partition(":")
    if not name or not converted:
        raise SystemExit(f"--model {spec!r}: expected NAME=CONVERTED[:SOURCE]")
    if not Path(converted).is_dir():
        raise SystemExit(f"--model {spec!r}: no folder {converted}")
    return name, Path(converted), source or None


def engines_for(name: str, converted: Path, source: str | None, workdir: Path, threads: int,
                prompt: int, gen: int, ort: bool = True, gguf_variants: tuple[str, ...] = (),
                spinning: bool = True) -> dict:
    """Engine name -> a callable returning ``{'decode_tok_s', 'prefill_tok_s', 'bytes_per_token'}``; ``spinning``:
    ONNX Runtime's intra-op threads busy-wait between nodes (its default)."""
    from transformers import AutoConfig

    from bitconvert.export.exporter import export_onnx

    def with_bytes(measure, count: int):
        return lambda: {"bytes_per_token": count, **measure()}

    config = AutoConfig.from_pretrained(converted)
    engines = {"bitconvert": lambda: decode.measure_bitconvert(str(converted), threads, prompt, gen)}
    for head in ("int6", "int4"):
        engines[f"bitconvert {head}"] = lambda head=head: decode.measure_bitconvert(str(converted), threads, prompt, gen,
                                                                                    lm_head=head)
    if kernels.LAYOUTS[kernels.layout_index()] != "2bit":  # the same run in the layout every CPU has, for the ratio
        engines["bitconvert 2bit"] = lambda: decode.measure_bitconvert(str(converted), threads, prompt, gen,
                                                                       layout="2bit")
    if ort:
        onnx_path = workdir / name / "layer" / "model.onnx"
        if not onnx_path.exists():  # the fastest ORT path (docs/export.md)
            export_onnx(converted, onnx_path, graph="layer", lm_head="int8-row", logits="last")
        engines["ort"] = with_bytes(lambda: onnx_decode.measure_ort(onnx_path, threads, prompt, gen, repeats=1,
                                                                     spinning=spinning),
                                    onnx_bytes_per_token(onnx_path) + decode.kv_cache_bytes(config, prompt, gen, 4))
    if os.environ.get("LLAMA_CPP_DIR"):
        kv_f16 = decode.kv_cache_bytes(config, prompt, gen, 2)
        for label, path in llamacpp.build_ggufs(converted, source, workdir / name, variants=gguf_variants).items():
            engines[f"llama.cpp {label}"] = with_bytes(lambda path=path: llamacpp.bench_gguf(path, threads, prompt, gen),
                                                       gguf_bytes_per_token(path) + kv_f16)
    return engines


def run_rounds(name: str, engines: dict, rounds: int, threads: int,
               bandwidths: list[float]) -> tuple[dict[str, list[dict]], dict[str, str]]:
    """Every engine of one model once per round, each run right after a bandwidth probe (appended to
    ``bandwidths``, GB/s); returns the runs per engine and, for an engine whose llama.cpp tool failed (llama-bench
    crashing on a GGUF), the first line of the error: its other runs still count, and the other engines go on."""
    runs, failures = {engine: [] for engine in engines}, {}
    for round_index in range(rounds):
        for engine, measure in engines.items():
            bandwidth = memory_bandwidth(threads) / 1e9
            bandwidths.append(bandwidth)
            try:
                figures = {**measure(), "bandwidth_gb_s": bandwidth}
            except llamacpp.LlamaCppFailed as error:  # a peer's crash costs its row, not the run
                failures.setdefault(engine, str(error).splitlines()[0])
                print(f"  [{name} round {round_index + 1}] {engine:<26} {failures[engine]}", flush=True)
                continue
            figures["fraction_of_bandwidth"] = figures["bytes_per_token"] * figures["decode_tok_s"] / 1e9 / bandwidth
            runs[engine].append(figures)
            print(f"  [{name} round {round_index + 1}] {engine:<26} decode {figures['decode_tok_s']:8.2f} "
                  f"prefill {figures['prefill_tok_s']:8.2f} tok/s, {figures['fraction_of_bandwidth']:4.0%} of "
                  f"{bandwidth:.1f} GB/s", flush=True)
    return runs, failures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", required=True, help="NAME=CONVERTED[:SOURCE], repeatable")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--skip-ort", action="append", default=[], metavar="NAME",
                        help="leave ONNX Runtime out for this model (a 7B export takes minutes and GBs)")
    parser.add_argument("--gguf-variants", action="append", default=[], metavar="NAME=V1,V2",
                        help="more exports of ours for this model, as benchmarks/llamacpp.py's --variants "
                        "(e.g. q8_0: exact Q8_0 projections, which have x86 SIMD kernels; auto+q8_0: Q8_0 embeddings)")
    parser.add_argument("--no-spinning", dest="spinning", action="store_false",
                        help="ONNX Runtime's threads sleep between nodes (for a shared machine; set "
                        "OMP_WAIT_POLICY=PASSIVE too)")
    parser.add_argument("--workdir", type=Path, default=Path("bench-out/headtohead"), help="exported files go here")
    parser.add_argument("--json", type=Path, default=Path("bench-out/headtohead.json"))
    args = parser.parse_args()
    if not os.environ.get("LLAMA_CPP_DIR"):
        print("LLAMA_CPP_DIR is not set: llama.cpp rows are left out", file=sys.stderr)

    variants = dict(spec.split("=", 1) for spec in args.gguf_variants)
    results = {"threads": args.threads, "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens,
               "ort_spinning": args.spinning, "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "default"),
               "bandwidth_gb_s": [], "models": {}}
    for spec in args.model:
        name, converted, source = parse_model(spec)
        engines = engines_for(name, converted, source, args.workdir, args.threads, args.prompt_tokens,
                              args.new_tokens, ort=name not in args.skip_ort,
                              gguf_variants=tuple(variants.get(name, "").split(",")) if name in variants else (),
                              spinning=args.spinning)
        runs, failures = run_rounds(name, engines, args.rounds, args.threads, results["bandwidth_gb_s"])
        results["models"][name] = {engine: {"runs": runs[engine], "bytes_per_token": runs[engine][0]["bytes_per_token"]}
                                   for engine in engines if runs[engine]}
        if failures:
            results.setdefault("failed", {})[name] = failures

    low, high = min(results["bandwidth_gb_s"]), max(results["bandwidth_gb_s"])
    median = statistics.median(results["bandwidth_gb_s"])
    results["median_bandwidth_gb_s"] = median
    print(f"\n{args.threads} threads, {args.prompt_tokens}-token prompt, {args.new_tokens} new tokens, "
          f"memory bandwidth {low:.1f}-{high:.1f} GB/s in this run, median {median:.1f} (of bound: against the "
          "bandwidth measured right before the best run; of median: against the run's median, which a momentary "
          "dip in the probe does not move)")
    print(f"{'model':<12} {'engine':<26} {'decode tok/s':>13} {'prefill tok/s':>14} {'MB/token':>9} {'of bound':>9} "
          f"{'of median':>10}")
    for name, per_engine in results["models"].items():
        for engine, entry in per_engine.items():
            best = max(entry["runs"], key=lambda run: run["decode_tok_s"])
            decode_best, fraction = best["decode_tok_s"], best["fraction_of_bandwidth"]
            prefill_best = max(run["prefill_tok_s"] for run in entry["runs"])
            of_median = entry["bytes_per_token"] * decode_best / 1e9 / median
            entry.update(decode_tok_s=decode_best, prefill_tok_s=prefill_best, fraction_of_bandwidth=fraction,
                         fraction_of_median_bandwidth=of_median)
            print(f"{name:<12} {engine:<26} {decode_best:13.2f} {prefill_best:14.2f} "
                  f"{entry['bytes_per_token'] / 1e6:9.1f} {fraction:9.0%} {of_median:10.0%}")
    for name, failures in results.get("failed", {}).items():
        for engine, message in failures.items():
            print(f"{name:<12} {engine:<26} {message}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    try:
        main()
    except llamacpp.LlamaCppFailed as error:
        sys.exit(f"error: llama.cpp {error}")
