"""Paired decode speed: the engines alternate in short blocks inside one run, each block right after a memory
bandwidth probe, so a shared host's bandwidth swings (35-67 GB/s within seconds on the 2-core Zen 4 VM) hit every
engine alike and every block has its own bound.

    LLAMA_CPP_DIR=/path/to/llama.cpp/build PYTHONPATH=. python benchmarks/paired_decode.py CONVERTED \
        [--layouts 2bit,base3] [--lm-heads int8,int6] [--pages huge,4k] [--onnx model.onnx ...] \
        [--gguf model.gguf] [--rounds 30] [--block 32] [--gguf-tokens 32] [--json bench-out/paired.json]

Engines (all loaded before the first round):
- ``bitconvert LAYOUT [HEAD] [fp16-kv] [4k-pages]``, one per ``--layouts``, ``--lm-heads``, ``--kv-caches`` and
  ``--pages`` entry (defaults int8, fp32 and huge, left out of the name): ``bitconvert.load(CONVERTED,
  lm_head=HEAD)`` with the kernels repacking into that layout, run by the lean
  :class:`~bitconvert.kernels.decode.Decoder` (its KV cache in that type; its weights and cache on transparent huge
  pages, or with ``4k-pages`` on ordinary ones);
- ``ort [HEAD] [ATTENTION] [fp16-kv] [4k-pages]`` (``--onnx``, repeatable: ``bitconvert export``s of the same folder,
  named by their lm_head when it is not int8, their attention op when it is not bitconvert's CachedAttention (``gqa``:
  ORT's GroupQueryAttention, as every fused export before ``--attention``; ``standard``: the plain graph) and their
  KV cache when it is fp16; one per ``--pages`` entry): ONNX Runtime with
  TernaryMatMul (its repacked weights and the cache buffers on huge pages, or not), the cache kept in ORT, spinning
  intra-op threads (its default);
- ``llama.cpp`` (``--gguf``, needs ``LLAMA_CPP_DIR``): one ``llama-bench -p 0 -n GGUF_TOKENS -r 1`` process per
  block (the GGUF stays in the page cache; llama-bench's warm-up run is not timed). It decodes from an empty context,
  so its KV cache adds almost nothing to its bytes, or with ``--gguf-depth D`` after D tokens (``-d D``, an untimed
  prefill in every block): set D to ``--prompt-tokens`` to compare at the in-process engines' depth.
Each round visits every engine (in reverse order on odd rounds): a 100 ms pause (so the previous engine's
spinning threads have let go of the cores: ORT's hold one for ~60 ms and halve the probe), a bandwidth probe (``torch.sum`` over 512 MiB of
fp32, best of 3 passes, same threads), a 50 ms pause (the probe's OpenMP workers spin on after it, which slowed
ONNX Runtime's next tokens), then one block of greedy tokens. The in-process engines run ``--warmup-tokens`` untimed
tokens first (default 1, as llama-bench's warm-up run before its timed tokens: the probe has just flushed the caches).
They prefill a 128-token random prompt once and decode on from there, starting over when the next block would pass
``--max-position``.

Per block: ms/token, bytes read per token (every streamed weight once, plus the KV cache at the block's mean position
in the engine's cache type; ``decode.bytes_per_token`` and ``headtohead``'s GGUF/ONNX counts) and the fraction of
the probe's bandwidth that makes. Per engine: medians over the rounds, and the median of the per-round time ratio to
the first engine (same round, so a paired ratio); with ``--split GB_S``, the same over the rounds whose probes all
fell below GB_S and over those whose probes all reached it. Prints the tables and writes JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from bitconvert import kernels
from bitconvert.kernels import pages
from bitconvert.kernels.lm_head import LM_HEADS

sys.path.insert(0, str(Path(__file__).resolve().parent))

import decode  # noqa: E402  (benchmarks/ siblings)
import headtohead  # noqa: E402
import llamacpp  # noqa: E402
import onnx_decode  # noqa: E402

PROBE_BYTES = 512 << 20  # 16x this VM's 32 MiB L3
SETTLE_S = 0.1  # ORT's spinning workers hold a core for ~60 ms after its last step (measured), OpenMP's briefly
# After the probe, torch's OpenMP workers spin on both cores for some milliseconds: ONNX Runtime's first two tokens
# after it took 5.1 and 6.6 ms instead of ~3.0 (192M model, 2 threads; llama.cpp starts a process, so it never met
# them, and the lean decoder shares torch's pool). 30 ms of pause removed it (measured); 50 ms leaves a margin.
SETTLE_AFTER_PROBE_S = 0.05


@contextlib.contextmanager
def environment(name: str, value: str | None):
    """Environment variable ``name`` set to ``value`` (None: left as it is) inside the block, restored after."""
    before = os.environ.get(name)
    if value is not None:
        os.environ[name] = value
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = before


class InProcessEngine:
    """A decoder in this process that decodes on from a prefilled prompt and starts over (prefills the prompt again,
    untimed) when the next block would pass ``max_position``. Subclasses give ``restart()`` (prefill; returns the
    logits) and ``step(logits)`` (one greedy token; returns the next logits)."""

    def __init__(self, prompt: list[int], max_position: int):
        self.prompt, self.max_position = prompt, max_position
        self.position = max_position  # forces a prefill before the first block

    def block(self, tokens: int, warmup: int = 0) -> tuple[float, float]:
        """(seconds per token, mean position) of ``tokens`` greedy steps after ``warmup`` untimed ones."""
        if self.position + warmup + tokens > self.max_position:
            self.logits = self.restart()
            self.position = len(self.prompt)
        for _ in range(warmup):
            self.logits = self.step(self.logits)
        self.position += warmup
        start = time.perf_counter()
        for _ in range(tokens):
            self.logits = self.step(self.logits)
        elapsed = time.perf_counter() - start
        mean_position = self.position + tokens / 2
        self.position += tokens
        return elapsed / tokens, mean_position


class LeanEngine(InProcessEngine):
    """``bitconvert.load`` in one kernel layout and its lean decoder."""

    def __init__(self, folder: str, layout: str, lm_head: str, kv_cache: str, prompt: list[int], max_position: int,
                 huge_pages: bool = True):
        super().__init__(prompt, max_position)
        # the decoder keeps the layout and the pages it was built with
        with decode.kernel_layout(layout), environment(pages.ENV_VARIABLE, None if huge_pages else "0"):
            self.runner = decode.Runner(folder, "lean", max_position + 1, kv_cache=kv_cache, lm_head=lm_head)

    def restart(self) -> torch.Tensor:
        self.runner.decoder.reset()
        return self.runner.decoder.forward(torch.tensor(self.prompt))

    def step(self, logits: torch.Tensor) -> torch.Tensor:
        return self.runner.decoder.forward(logits.argmax().reshape(1))

    def bytes_per_token(self, mean_position: float) -> int:
        return self.runner.bytes_per_token(mean_position, 0)


class OrtEngine(InProcessEngine):
    """An exported decoder in ONNX Runtime, its cache preallocated for ``max_position`` positions."""

    def __init__(self, path: Path, threads: int, prompt: list[int], max_position: int, config,
                 huge_pages: bool = True):
        super().__init__(prompt, max_position)
        self.pages = None if huge_pages else "0"  # BITCONVERT_HUGE_PAGES as the session starts and caches are made
        with environment(pages.ENV_VARIABLE, self.pages):
            self.decoder = onnx_decode.decoder_for(path, threads, spinning=True)
        self.config, self.weight_bytes = config, headtohead.onnx_bytes_per_token(path)

    def restart(self) -> np.ndarray:
        with environment(pages.ENV_VARIABLE, self.pages):
            cache = self.decoder.empty_cache(capacity=self.max_position + 1)
        logits, self.cache = self.decoder.step(np.array([self.prompt]), cache)
        return logits

    def step(self, logits: np.ndarray) -> np.ndarray:
        logits, self.cache = self.decoder.step(np.array([[int(np.argmax(logits[0, -1]))]]), self.cache)
        return logits

    def bytes_per_token(self, mean_position: float) -> int:
        value_bytes = np.dtype(self.decoder.cache_dtype).itemsize  # fp32, or fp16 (--kv-cache fp16 export)
        return self.weight_bytes + decode.kv_cache_bytes(self.config, mean_position, 0, value_bytes)


class LlamaCppEngine:
    """``llama-bench`` on a GGUF, one process per block, decoding ``tokens`` after ``depth`` cached tokens (0: an
    empty context)."""

    def __init__(self, path: Path, threads: int, tokens: int, config, depth: int = 0):
        self.path, self.threads, self.tokens, self.config, self.depth = path, threads, tokens, config, depth
        self.weight_bytes = headtohead.gguf_bytes_per_token(path)

    def block(self, _tokens: int, _warmup: int = 0) -> tuple[float, float]:
        """llama-bench's own warm-up (one untimed token) stands for ``warmup``."""
        figures = llamacpp.bench_gguf(self.path, self.threads, prompt=0, gen=self.tokens, depth=self.depth)
        return 1 / figures["decode_tok_s"], self.depth + self.tokens / 2

    def bytes_per_token(self, mean_position: float) -> int:
        return self.weight_bytes + decode.kv_cache_bytes(self.config, mean_position, 0, 2)


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (``platform.processor()`` where there is none)."""
    cpuinfo = Path("/proc/cpuinfo")
    for line in cpuinfo.read_text().splitlines() if cpuinfo.exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def summarize(blocks: dict[str, list[dict]], rounds: list[int]) -> dict[str, dict]:
    """Per engine, over the blocks of ``rounds``: median ms/token, tok/s, fraction of the bound, and the median of
    the per-round time ratio to the first engine (a paired ratio)."""
    first = next(iter(blocks))
    summary = {}
    for engine, all_rows in blocks.items():
        rows = [all_rows[index] for index in rounds]
        seconds = [row["seconds_per_token"] for row in rows]
        fractions = [row["fraction_of_bound"] for row in rows]
        ratios = [all_rows[index]["seconds_per_token"] / blocks[first][index]["seconds_per_token"] for index in rounds]
        summary[engine] = {
            "ms_per_token": 1e3 * statistics.median(seconds), "tok_s": 1 / statistics.median(seconds),
            "best_tok_s": 1 / min(seconds), "bytes_per_token": statistics.median(row["bytes_per_token"] for row in rows),
            "probe_gb_s": statistics.median(row["bandwidth_gb_s"] for row in rows),
            "fraction_of_bound": statistics.median(fractions), "fraction_of_bound_range": [min(fractions), max(fractions)],
            f"time_ratio_to_{first}": statistics.median(ratios)}
    return summary


def regimes(blocks: dict[str, list[dict]], split_gb_s: float | None) -> dict[str, list[int]]:
    """Round indices to summarize: all of them; with ``split_gb_s``, also the rounds whose every probe was below it
    ("low") and those whose every probe was at or above it ("high"), where there are any."""
    count = len(next(iter(blocks.values())))
    chosen = {"all": list(range(count))}
    if split_gb_s is not None:
        probes = [[rows[index]["bandwidth_gb_s"] for rows in blocks.values()] for index in range(count)]
        chosen["low"] = [index for index, values in enumerate(probes) if max(values) < split_gb_s]
        chosen["high"] = [index for index, values in enumerate(probes) if min(values) >= split_gb_s]
    return {name: rounds for name, rounds in chosen.items() if rounds}


def print_table(name: str, summary: dict[str, dict], rounds: int) -> None:
    first = next(iter(summary))
    print(f"\n{name}: {rounds} rounds (medians)")
    print(f"{'engine':<18} {'ms/token':>9} {'tok/s':>7} {'best':>7} {'MB/token':>9} {'probe GB/s':>10} {'of bound':>9} "
          f"{'range':>10} {'time / ' + first:>20}")
    for engine, row in summary.items():
        low, high = row["fraction_of_bound_range"]
        print(f"{engine:<18} {row['ms_per_token']:9.2f} {row['tok_s']:7.2f} {row['best_tok_s']:7.2f} "
              f"{row['bytes_per_token'] / 1e6:9.0f} {row['probe_gb_s']:10.1f} {row['fraction_of_bound']:9.0%} "
              f"{low:4.0%}-{high:4.0%} {row[f'time_ratio_to_{first}']:20.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("converted", help="a bitconvert-converted folder")
    parser.add_argument("--layouts", default="2bit,base3", help="kernel layouts to load, comma-separated (default "
                        "2bit,base3; lut is opt-in); the first engine is the ratios' reference")
    parser.add_argument("--lm-heads", default="int8", help="lm_heads of the bitconvert engines, comma-separated "
                        "(default int8; int6 is the ~6-bit head, as llama.cpp's Q6_K output)")
    parser.add_argument("--kv-caches", default="fp32", help="KV caches of the bitconvert engines, comma-separated "
                        "(default fp32; fp16 halves the cache bytes, as llama.cpp's default f16 cache)")
    parser.add_argument("--pages", default="huge", help="memory of the in-process engines' weights and KV caches, "
                        "comma-separated: huge (the default: transparent huge pages where Linux offers them, "
                        "bitconvert.kernels.pages; in ORT, TernaryMatMul's repacked weights) and/or 4k "
                        "(BITCONVERT_HUGE_PAGES=0 while loading)")
    parser.add_argument("--onnx", type=Path, action="append", default=[],
                        help="an export of the same folder, for an ONNX Runtime engine (repeatable: e.g. one with "
                        "--lm-head int8 and one with int6)")
    parser.add_argument("--gguf", type=Path, help="a GGUF of the same model, for the llama.cpp engine "
                        "(needs LLAMA_CPP_DIR)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--block", type=int, default=32, help="timed tokens per block of the in-process engines "
                        "(default 32, as --gguf-tokens: every engine's block then pays its start-up over as many "
                        "tokens)")
    parser.add_argument("--warmup-tokens", type=int, default=1, help="untimed tokens of the in-process engines "
                        "before each block, after the probe (default 1: as llama-bench's own warm-up run, one token)")
    parser.add_argument("--gguf-tokens", type=int, default=32, help="timed tokens per llama-bench block")
    parser.add_argument("--gguf-depth", type=int, default=0, help="tokens in llama.cpp's cache before each block "
                        "(llama-bench -d, prefilled untimed; default 0: an empty context)")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--max-position", type=int, default=512)
    parser.add_argument("--split", type=float, metavar="GB_S", help="also summarize the rounds whose every probe was "
                        "below GB_S, and those whose every probe was at or above it (a host that swings between two "
                        "bandwidths: e.g. 45 on the Zen 4 VM, which gives about 35 or about 66)")
    parser.add_argument("--json", type=Path, default=Path("bench-out/paired.json"))
    args = parser.parse_args()
    if not Path(args.converted, "config.json").is_file():
        raise SystemExit(f"error: {args.converted} is not a converted folder (no config.json); pass the output of "
                         "`bitconvert SOURCE --out DIR`")
    for option, path in (*(("--onnx", path) for path in args.onnx), ("--gguf", args.gguf)):
        if path is not None and not path.is_file():
            raise SystemExit(f"error: {option} {path}: no such file")
    layouts = args.layouts.split(",")
    for layout in layouts:
        if layout not in kernels.LAYOUTS or not kernels.layout_supported(kernels.LAYOUTS.index(layout),
                                                                          kernels.isa_index()):
            supported = [name for index, name in enumerate(kernels.LAYOUTS)
                         if kernels.layout_supported(index, kernels.isa_index())]
            raise SystemExit(f"error: --layouts {layout}: not a layout this CPU's kernels compute on; pick from "
                             f"{','.join(supported)}")
    if repeated := sorted({layout for layout in layouts if layouts.count(layout) > 1}):
        raise SystemExit(f"error: --layouts names {repeated[0]} twice; list each layout once")
    heads = args.lm_heads.split(",")
    if unknown := [head for head in heads if head not in LM_HEADS]:
        raise SystemExit(f"error: --lm-heads {unknown[0]}: not an lm_head; pick from {','.join(LM_HEADS)}")
    if len(set(heads)) < len(heads):
        raise SystemExit("error: --lm-heads names a head twice; list each once")
    caches = args.kv_caches.split(",")
    if unknown := [cache for cache in caches if cache not in ("fp32", "fp16")] or len(set(caches)) < len(caches):
        raise SystemExit(f"error: --kv-caches {args.kv_caches}: list fp32 and/or fp16, each once")
    page_kinds = args.pages.split(",")
    if any(kind not in ("huge", "4k") for kind in page_kinds) or len(set(page_kinds)) < len(page_kinds):
        raise SystemExit(f"error: --pages {args.pages}: list huge and/or 4k, each once")
    if args.gguf is not None:
        llamacpp.binary("llama-bench")  # exits with the fix if LLAMA_CPP_DIR is unset or lacks it, before any loading
    if args.warmup_tokens < 0 or args.gguf_depth < 0:
        raise SystemExit("error: --warmup-tokens and --gguf-depth must be >= 0")
    if args.prompt_tokens + args.warmup_tokens + args.block > args.max_position:
        raise SystemExit("error: --max-position must leave room for the prompt, the warm-up tokens and one block")

    from transformers import AutoConfig

    torch.set_num_threads(args.threads)
    config = AutoConfig.from_pretrained(args.converted)
    prompt = decode.prompt_ids(config.vocab_size, args.prompt_tokens)
    engines = {}
    for layout in layouts:
        for head in heads:
            for cache in caches:
                for kind in page_kinds:
                    name = f"bitconvert {layout}" + ("" if head == "int8" else f" {head}") + (
                        "" if cache == "fp32" else f" {cache}-kv") + ("" if kind == "huge" else " 4k-pages")
                    print(f"loading {name}", flush=True)
                    engines[name] = LeanEngine(args.converted, layout, head, cache, prompt, args.max_position,
                                               huge_pages=kind == "huge")
    for path in args.onnx:
        for kind in page_kinds:
            print(f"loading ONNX Runtime ({path}{'' if kind == 'huge' else ', 4k pages'})", flush=True)
            engine = OrtEngine(path, args.threads, prompt, args.max_position, config, huge_pages=kind == "huge")
            metadata = engine.decoder.session.get_modelmeta().custom_metadata_map
            head, cache = metadata.get("bitconvert.lm_head", "exact"), metadata.get("bitconvert.kv_cache", "fp32")
            graph = metadata.get("bitconvert.graph", "plain")
            attention = metadata.get("bitconvert.attention", "gqa" if graph == "fused" else "standard")
            name = "ort" + "".join(f" {part}" for part in (
                "" if head == "int8" else head, "" if attention == "bitconvert" else attention,
                "" if graph != "layer" else graph, "" if cache == "fp32" else f"{cache}-kv",
                "" if kind == "huge" else "4k-pages") if part)
            if name in engines:
                raise SystemExit(f"error: two --onnx files with the {head} lm_head, {attention} attention, {cache} "
                                 f"KV cache and {graph} graph; give one export per kind")
            engines[name] = engine
    if args.gguf:
        engines["llama.cpp"] = LlamaCppEngine(args.gguf, args.threads, args.gguf_tokens, config, args.gguf_depth)

    probe = headtohead.BandwidthProbe(PROBE_BYTES, passes=3)  # bytes/s
    blocks: dict[str, list[dict]] = {name: [] for name in engines}
    for round_index in range(args.rounds):
        order = list(engines) if round_index % 2 == 0 else list(engines)[::-1]
        for name in order:
            time.sleep(SETTLE_S)
            bandwidth = probe() / 1e9
            time.sleep(SETTLE_AFTER_PROBE_S)
            seconds, mean_position = engines[name].block(args.block, args.warmup_tokens)
            count = engines[name].bytes_per_token(mean_position)
            blocks[name].append({"round": round_index, "bandwidth_gb_s": bandwidth, "seconds_per_token": seconds,
                                 "mean_position": mean_position, "bytes_per_token": count,
                                 "fraction_of_bound": count / seconds / 1e9 / bandwidth})
        print(f"round {round_index + 1}/{args.rounds}: " + ", ".join(
            f"{name} {1e3 * rows[-1]['seconds_per_token']:.1f} ms ({rows[-1]['fraction_of_bound']:.0%} of "
            f"{rows[-1]['bandwidth_gb_s']:.0f})" for name, rows in blocks.items()), flush=True)

    bandwidths = [row["bandwidth_gb_s"] for rows in blocks.values() for row in rows]
    print(f"\n{cpu_model()}, {args.threads} threads; probe {min(bandwidths):.1f}-{max(bandwidths):.1f} GB/s, median "
          f"{statistics.median(bandwidths):.1f}")
    summaries = {}
    for name, rounds in regimes(blocks, args.split).items():
        summaries[name] = {"rounds": rounds, "engines": summarize(blocks, rounds)}
        print_table(name if name == "all" else f"{name} bandwidth (every probe of the round "
                    f"{'<' if name == 'low' else '>='} {args.split} GB/s)", summaries[name]["engines"], len(rounds))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"cpu": cpu_model(), "arguments": {k: str(v) for k, v in vars(args).items()},
                                     "summary": summaries, "blocks": blocks}, indent=1))


if __name__ == "__main__":
    try:
        main()
    except llamacpp.LlamaCppFailed as error:
        sys.exit(f"error: llama.cpp {error}")
