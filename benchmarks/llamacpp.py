"""llama.cpp head to head on one model: the GGUFs a comparison needs, and llama-bench's prefill/decode tokens/s.

    LLAMA_CPP_DIR=/path/to/llama.cpp/build python benchmarks/llamacpp.py CONVERTED [--source SOURCE] [--threads 2]
        [--rounds 3] [--variants q2_0,q8_0] [--workdir DIR] [--json bench-out/llamacpp.json]

GGUFs (:func:`build_ggufs`, all in ``--workdir``):
- ``ours``: ``bitconvert export CONVERTED`` (auto type per tensor: TQ2_0, else Q2_0, else exact Q8_0/F16);
- ``ours-q2_0``, ``ours-q8_0``, ``ours-auto+q8_0`` (``--variants``): the same with every projection Q2_0 / Q8_0, or
  with Q8_0 embeddings, to compare layouts (ggml has SIMD Q2_0 dot products on ARM only; on x86 Q2_0 runs scalar code);
- ``llamacpp-tq2_0``: ``llama-quantize --allow-requantize ours TQ2_0``: llama.cpp's own default TQ2_0 file
  (token_embd/output as llama.cpp picks for TQ2_0, Q4_K; rows TQ2_0 cannot hold fall back to Q4_0, which is lossy);
- ``f16`` and ``q4_0``: the full-precision SOURCE through llama.cpp's own tools: ``convert_hf_to_gguf.py --outtype f16``
  for an HF folder (a .gguf source is requantized to F16 with ``llama-quantize --allow-requantize``), then
  ``llama-quantize f16 Q4_0``.
Speed (:func:`bench_gguf`): ``llama-bench -p PROMPT -n GEN -t THREADS -r 1 -o json``, run ``--rounds`` times with the
GGUFs interleaved (so a shared machine's load hits them alike); the median of the rounds is reported.
Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

BINARIES = ("llama-bench", "llama-quantize")


def llama_cpp_dir() -> Path:
    """The llama.cpp build folder from ``LLAMA_CPP_DIR`` (binaries in it or in its ``bin/``)."""
    value = os.environ.get("LLAMA_CPP_DIR")
    if not value:
        sys.exit("set LLAMA_CPP_DIR to a llama.cpp build folder (with bin/llama-bench and bin/llama-quantize)")
    return Path(value)


def binary(name: str) -> Path:
    """Path of the llama.cpp tool ``name`` in ``LLAMA_CPP_DIR`` (or its ``bin/``)."""
    root = llama_cpp_dir()
    for candidate in (root / "bin" / name, root / name):
        if candidate.is_file():
            return candidate
    sys.exit(f"{name} not found in {root} or {root / 'bin'}; build it (ninja -C {root} {name})")


def llama_cpp_source() -> Path:
    """llama.cpp's source tree (for ``convert_hf_to_gguf.py``): ``LLAMA_CPP_SRC``, else the build's CMake home."""
    if value := os.environ.get("LLAMA_CPP_SRC"):
        return Path(value)
    cache = llama_cpp_dir() / "CMakeCache.txt"
    for line in cache.read_text().splitlines() if cache.is_file() else []:
        if line.startswith("CMAKE_HOME_DIRECTORY:"):
            return Path(line.split("=", 1)[1])
    sys.exit("cannot find llama.cpp's source tree; set LLAMA_CPP_SRC")


class LlamaCppFailed(RuntimeError):
    """A llama.cpp tool exited with an error (a crash included): the command, its exit status and its stderr's end."""


def _run(command: list) -> str:
    result = subprocess.run([str(part) for part in command], capture_output=True, text=True)
    if result.returncode:
        raise LlamaCppFailed(f"failed ({result.returncode}): {' '.join(map(str, command))}\n{result.stderr[-2000:]}")
    return result.stdout


def quantize(source: Path, out: Path, kind: str) -> Path:
    """``llama-quantize --allow-requantize source out kind`` (once: an existing ``out`` is reused)."""
    if not out.exists():
        _run([binary("llama-quantize"), "--allow-requantize", source, out, kind])
    return out


def _with_architectures(source: Path, workdir: Path) -> Path:
    """``source``, or when its config.json names no ``architectures`` (which convert_hf_to_gguf.py needs) a folder of
    links to its files with ``LlamaForCausalLM`` added to the config."""
    config = json.loads((source / "config.json").read_text())
    if config.get("architectures"):
        return source
    staged = workdir / "source-with-architectures"
    staged.mkdir(exist_ok=True)
    for item in source.iterdir():
        if item.name != "config.json" and not (staged / item.name).exists():
            (staged / item.name).symlink_to(item.absolute())
    (staged / "config.json").write_text(json.dumps({**config, "architectures": ["LlamaForCausalLM"]}, indent=2))
    return staged


def build_ggufs(converted: str | Path, source: str | Path | None, workdir: str | Path,
                variants: tuple[str, ...] = ("q2_0", "q8_0")) -> dict[str, Path]:
    """Write (or reuse) the GGUFs of one model in ``workdir``; returns ``{name: path}``.

    ``converted``: a bitconvert folder; ``source``: its full-precision source (HF folder or .gguf) or None, which
    skips the F16/Q4_0 rows; ``variants``: more exports of ours, ``TYPE`` (``--type``) or ``TYPE+FLOAT`` (also
    ``--float-type``). Names: ours, ours-<variant> (when every row fits), llamacpp-tq2_0, f16, q4_0.
    """
    from bitconvert.errors import BitconvertError
    from bitconvert.export.gguf import export_gguf

    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    ggufs = {"ours": workdir / "ours.gguf"}
    if not ggufs["ours"].exists():
        export_gguf(converted, ggufs["ours"], progress=False)
    for variant in variants:  # "TYPE" or "TYPE+FLOAT_TYPE", e.g. "q8_0" or "auto+q8_0"
        weight_type, _, float_type = variant.partition("+")
        path = workdir / f"ours-{variant}.gguf"
        try:
            if not path.exists():
                export_gguf(converted, path, weight_type=weight_type, float_type=float_type or "f16", progress=False)
            ggufs[f"ours-{variant}"] = path
        except BitconvertError:
            pass  # some row does not fit the type
    ggufs["llamacpp-tq2_0"] = quantize(ggufs["ours"], workdir / "llamacpp-tq2_0.gguf", "TQ2_0")
    if source is not None:
        source, f16 = Path(source), workdir / "f16.gguf"
        if f16.exists():
            pass
        elif source.suffix == ".gguf":
            quantize(source, f16, "F16")
        else:
            _run([sys.executable, llama_cpp_source() / "convert_hf_to_gguf.py", _with_architectures(source, workdir),
                  "--outtype", "f16", "--outfile", f16])
        ggufs["f16"] = f16
        ggufs["q4_0"] = quantize(f16, workdir / "q4_0.gguf", "Q4_0")
    return ggufs


def bench_gguf(path: str | Path, threads: int, prompt: int = 128, gen: int = 64, depth: int = 0) -> dict:
    """One ``llama-bench`` run of ``path`` (``-r 1``): ``{"prefill_tok_s", "decode_tok_s", "size_bytes", "type"}``.

    Prefill is the ``pp{prompt}`` test (a prompt of ``prompt`` tokens in one batch; None with ``prompt=0``, which
    skips it), decode the ``tg{gen}`` test (``gen`` tokens one at a time after an empty context, or after ``depth``
    tokens already in the cache: ``-d``, whose prefill llama-bench does not time); tokens/s as llama-bench's ``avg_ts``.
    """
    command = [binary("llama-bench"), "-m", path, "-p", prompt, "-n", gen, "-t", threads, "-r", 1, "-o", "json"]
    out = _run(command + (["-d", depth] if depth else []))
    records = json.loads(out)
    prefill = next((r for r in records if r["n_prompt"] == prompt and r["n_gen"] == 0), None) if prompt else None
    decode = next(r for r in records if r["n_gen"] == gen and r["n_prompt"] == 0)
    return {"prefill_tok_s": prefill and prefill["avg_ts"], "decode_tok_s": decode["avg_ts"],
            "size_bytes": decode["model_size"], "type": decode["model_type"]}


def bench_interleaved(ggufs: dict[str, Path], threads: int, rounds: int, prompt: int = 128, gen: int = 64) -> dict:
    """:func:`bench_gguf` for every GGUF, ``rounds`` times in turn; per name the median of each figure and the runs."""
    runs: dict[str, list[dict]] = {name: [] for name in ggufs}
    for _ in range(rounds):
        for name, path in ggufs.items():
            runs[name].append(bench_gguf(path, threads, prompt, gen))
    results = {}
    for name, values in runs.items():
        results[name] = {**values[0], "runs": values}
        for key in ("prefill_tok_s", "decode_tok_s"):
            results[name][key] = statistics.median(run[key] for run in values)
    return results


def print_table(model: str, results: dict) -> None:
    base = results["ours"]["decode_tok_s"]
    print(f"\n{model}: llama-bench, median of rounds")
    print(f"{'gguf':<16} {'type':<28} {'MiB':>7} {'prefill tok/s':>14} {'decode tok/s':>13} {'decode vs ours':>15}")
    for name, row in results.items():
        print(f"{name:<16} {row['type'][:28]:<28} {row['size_bytes'] / 2**20:>7.1f} {row['prefill_tok_s']:>14.1f} "
              f"{row['decode_tok_s']:>13.1f} {row['decode_tok_s'] / base:>14.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("converted", help="a bitconvert converted folder")
    parser.add_argument("--source", help="its full-precision source (HF folder or .gguf) for the F16/Q4_0 rows")
    parser.add_argument("--variants", default="q2_0,q8_0", help="more exports of ours: TYPE or TYPE+FLOAT_TYPE, comma-separated ('' for none)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved llama-bench runs per GGUF (median)")
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--gen", type=int, default=64)
    parser.add_argument("--workdir", type=Path, help="where the GGUFs go (default bench-out/gguf/<model name>)")
    parser.add_argument("--json", type=Path, default=Path("bench-out/llamacpp.json"))
    args = parser.parse_args()
    name = Path(args.converted).name
    variants = tuple(kind for kind in args.variants.split(",") if kind)
    try:
        ggufs = build_ggufs(args.converted, args.source, args.workdir or Path("bench-out/gguf") / name, variants)
        results = bench_interleaved(ggufs, args.threads, args.rounds, args.prompt, args.gen)
    except LlamaCppFailed as error:
        sys.exit(str(error))
    print_table(name, results)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"model": str(args.converted), "source": args.source, "threads": args.threads,
                                     "prompt": args.prompt, "gen": args.gen, "rounds": args.rounds,
                                     "ggufs": {key: str(path) for key, path in ggufs.items()}, "results": results},
                                    indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
