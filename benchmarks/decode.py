"""End-to-end greedy decoding and prefill speed of converted folders in PyTorch (``bitconvert.load``).

    PYTHONPATH=. python benchmarks/decode.py FOLDER [FOLDER ...] [--threads 2] [--prompt-tokens 128]
        [--new-tokens 64] [--repeats 2] [--json bench-out/decode.json]

Per folder, three configurations, measured in interleaved rounds (batch 1, greedy, a fixed random prompt):
- ``generate`` (the path before issue 12): ``bitconvert.load(folder, dtype="auto")`` (the checkpoint's float dtype)
  and transformers' ``generate``; prefill is one forward with ``logits_to_keep=1``, decoding is
  (time of ``generate`` for N + 1 tokens - time for 1) / N;
- ``lean exact``: ``bitconvert.load(folder)`` (fp32 float parts) run by :class:`bitconvert.kernels.decode.Decoder`,
  the stored float lm_head;
- ``lean int8``: the same with ``lm_head="int8"``;
- ``lean int8 fp16kv``: the same with an fp16 KV cache (``Decoder(kv_cache="fp16")``; run it with a long
  ``--prompt-tokens``, where the cache's bytes per token rival the weights').
Each row also gives the bytes read per decoded token (weights streamed once per token, plus the KV cache at the mean
decoding position) and what that makes in GB/s, against the memory read bandwidth measured in the same run
(``torch.sum`` over > 1 GiB). Prints a table and writes JSON. :func:`measure_bitconvert` is the one-call API other
benchmarks import.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from pathlib import Path

import torch

import bitconvert
from bitconvert import bitlinear
from bitconvert.kernels import KernelBackend
from bitconvert.kernels.decode import Decoder
from bitconvert.kernels.lm_head import QuantizedLmHead

sys.path.insert(0, str(Path(__file__).parent))
from ternary_products import memory_read_bandwidth  # noqa: E402


def prompt_ids(vocab_size: int, count: int) -> list[int]:
    """A fixed pseudo-random prompt (llama-bench's prompts are random tokens too)."""
    return torch.randint(0, vocab_size, (count,), generator=torch.Generator().manual_seed(0)).tolist()


def kv_cache_bytes(config, prompt_tokens: int, new_tokens: int, value_bytes: int) -> int:
    """Bytes of keys and values one decoding step reads at the mean position ``prompt_tokens + new_tokens / 2``,
    for a transformers LLaMA ``config`` and a cache of ``value_bytes`` per value (4: fp32, 2: f16)."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    mean_position = prompt_tokens + new_tokens / 2
    return int(2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * mean_position * value_bytes)


def bytes_per_token(model, prompt_tokens: int, new_tokens: int, kv_value_bytes: int = 4) -> int:
    """Bytes one decoding step reads: every ternary product's repacked weights, the lm_head in its storage type, the
    norms, and the KV cache (``kv_value_bytes`` per value: 4 for the lean decoder's fp32 cache) at the mean
    position."""
    total = 0
    for module in model.modules():
        if isinstance(module, bitconvert.PackedBitLinear):
            total += module.kernel_weight.numel()
    head = model.lm_head
    if isinstance(head, QuantizedLmHead):
        total += head.weight_bytes()
    else:
        total += head.weight.numel() * head.weight.element_size()
    config = model.config
    total += kv_cache_bytes(config, prompt_tokens, new_tokens, kv_value_bytes)
    total += (2 * config.num_hidden_layers + 1) * config.hidden_size * 4
    return total


class Runner:
    """One loaded configuration: ``prefill_s(ids)`` and ``decode_s(ids, n)`` (seconds for n decoded tokens), in wall
    time, or in this process's CPU time with ``clock = time.process_time`` (at one thread, the time a quiet machine would
    take: a loaded machine deschedules the process, which wall time counts and CPU time does not)."""

    def __init__(self, folder, runtime: str, max_len: int, kv_cache: str = "fp32", **load_options):
        self.model = bitconvert.load(folder, **load_options)
        self.clock = time.perf_counter
        self.runtime = runtime
        self.decoder = Decoder(self.model, max_len=max_len, kv_cache=kv_cache) if runtime == "lean" else None

    def bytes_per_token(self, prompt_tokens: int, new_tokens: int) -> int:
        """:func:`bytes_per_token` with this runner's KV cache (the lean decoder's dtype; 4 bytes for generate)."""
        value_bytes = 4 if self.decoder is None else self.decoder.keys.element_size()
        return bytes_per_token(self.model, prompt_tokens, new_tokens, value_bytes)

    def prefill_s(self, ids: list[int]) -> float:
        start = self.clock()
        if self.decoder is not None:
            self.decoder.reset()
            self.decoder.forward(torch.tensor(ids))
        else:
            with torch.no_grad():
                self.model(torch.tensor([ids]), logits_to_keep=1, use_cache=True)
        return self.clock() - start

    def decode_s(self, ids: list[int], new_tokens: int) -> float:
        if self.decoder is not None:
            self.decoder.reset()
            logits = self.decoder.forward(torch.tensor(ids))
            start = self.clock()
            for _ in range(new_tokens):
                logits = self.decoder.forward(logits.argmax().reshape(1))
            return self.clock() - start

        def generate_s(count: int) -> float:
            begin = self.clock()
            with torch.no_grad():
                self.model.generate(torch.tensor([ids]), max_new_tokens=count, min_new_tokens=count, do_sample=False)
            return self.clock() - begin

        return generate_s(new_tokens + 1) - generate_s(1)


def measure(runner: Runner, ids: list[int], new_tokens: int) -> dict:
    """Wall-time rates; with one thread also the CPU-time rates (``*_cpu``), robust to a loaded machine."""
    runner.prefill_s(ids[:8])  # warm-up: allocator, first calls
    result = {}
    clocks = {"": time.perf_counter}
    if torch.get_num_threads() == 1:
        clocks["_cpu"] = time.process_time
    for suffix, clock in clocks.items():
        runner.clock = clock
        result["prefill_tok_s" + suffix] = len(ids) / runner.prefill_s(ids)
        result["decode_tok_s" + suffix] = new_tokens / runner.decode_s(ids, new_tokens)
    runner.clock = time.perf_counter
    return result


@contextlib.contextmanager
def kernel_layout(layout: str | None):
    """Within the block, the kernels repack into ``layout`` (``BITCONVERT_LAYOUT``; None: the default) through a
    fresh kernel backend; the previous backend and setting are restored after."""
    if layout is None:
        yield
        return
    saved_env, saved_backend = os.environ.get("BITCONVERT_LAYOUT"), bitlinear.get_backend()
    os.environ["BITCONVERT_LAYOUT"] = layout
    try:
        bitlinear.set_backend(KernelBackend())
        yield
    finally:
        if saved_env is None:
            os.environ.pop("BITCONVERT_LAYOUT")
        else:
            os.environ["BITCONVERT_LAYOUT"] = saved_env
        bitlinear.set_backend(saved_backend)


def measure_bitconvert(folder, threads: int, prompt_tokens: int = 128, new_tokens: int = 64, runtime: str = "lean",
                       repeats: int = 1, layout: str | None = None, kv_cache: str = "fp32", **load_options) -> dict:
    """Decode and prefill speed of a converted ``folder`` through ``bitconvert.load``, batch 1, greedy.

    ``threads``: torch's (and the kernels') thread count. ``runtime``: "lean" (:class:`Decoder`, the fastest path) or
    "generate" (transformers' ``generate`` on the loaded model). ``load_options`` go to ``bitconvert.load`` (e.g.
    ``lm_head="exact"``, ``dtype="auto"``); ``lm_head`` defaults to "int8" here, the fastest path. ``layout``: the
    kernels' weight layout (``"2bit"``, ``"base3"``; None: the default for this CPU). ``kv_cache``: the lean decoder's
    (``"fp32"``, ``"fp16"``). The prompt is ``prompt_tokens``
    fixed random ids; prefill is one forward of it (last position's logits), decoding ``new_tokens`` steps after it;
    the best of ``repeats`` runs is kept.

    Returns a dict: decode_tok_s, prefill_tok_s (wall time; with threads=1 also decode_tok_s_cpu, prefill_tok_s_cpu
    from this process's CPU time), bytes_per_token, decode_gb_s (bytes_per_token x decode_tok_s / 1e9),
    runtime, threads, prompt_tokens, new_tokens, load_options.
    """
    torch.set_num_threads(threads)
    load_options.setdefault("lm_head", "int8")
    with kernel_layout(layout):
        runner = Runner(folder, runtime, prompt_tokens + new_tokens + 1, kv_cache, **load_options)
        ids = prompt_ids(runner.model.config.vocab_size, prompt_tokens)
        runs = [measure(runner, ids, new_tokens) for _ in range(repeats)]
    result = {key: max(run[key] for run in runs) for key in runs[0]}
    result["bytes_per_token"] = runner.bytes_per_token(prompt_tokens, new_tokens)
    result["decode_gb_s"] = result["bytes_per_token"] * result["decode_tok_s"] / 1e9
    result.update(runtime=runtime, threads=threads, prompt_tokens=prompt_tokens, new_tokens=new_tokens,
                  layout=layout or "default", kv_cache=kv_cache, load_options={key: str(value) for key, value in load_options.items()})
    return result


CONFIGURATIONS = {  # name: (runtime, Runner options: the KV cache and bitconvert.load's options)
    "generate (before)": ("generate", {"dtype": "auto"}),
    "lean exact": ("lean", {}),
    "lean int8": ("lean", {"lm_head": "int8"}),
    "lean int8 fp16kv": ("lean", {"lm_head": "int8", "kv_cache": "fp16"}),
}


def add_configurations_argument(parser) -> None:
    parser.add_argument("--configurations", default=",".join(CONFIGURATIONS),
                        help=f"comma-separated subset of: {', '.join(CONFIGURATIONS)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folders", nargs="+", type=Path, help="converted folders (bitconvert SOURCE --out DIR)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2, help="interleaved rounds; the best is kept")
    add_configurations_argument(parser)
    parser.add_argument("--json", type=Path, default=Path("bench-out/decode.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    names = args.configurations.split(",")
    rows = []
    print(f"batch 1, greedy, {args.prompt_tokens}-token prompt, {args.new_tokens} new tokens, {args.threads} threads")
    for folder in args.folders:
        runners = {name: Runner(folder, CONFIGURATIONS[name][0], args.prompt_tokens + args.new_tokens + 1,
                                **CONFIGURATIONS[name][1]) for name in names}
        ids = prompt_ids(next(iter(runners.values())).model.config.vocab_size, args.prompt_tokens)
        best: dict[str, dict] = {}
        for _ in range(args.repeats):
            for name, runner in runners.items():
                run = measure(runner, ids, args.new_tokens)
                best[name] = {key: max(value, best.get(name, {}).get(key, 0.0)) for key, value in run.items()}
        bandwidth = memory_read_bandwidth(5) / 1e9
        base = best[names[0]]["decode_tok_s"]
        for name, runner in runners.items():
            row = {"model": folder.name, "configuration": name, **{k: round(v, 2) for k, v in best[name].items()},
                   "bytes_per_token": runner.bytes_per_token(args.prompt_tokens, args.new_tokens),
                   "memory_gb_s": round(bandwidth, 2)}
            row["decode_gb_s"] = round(row["bytes_per_token"] * row["decode_tok_s"] / 1e9, 2)
            row["fraction_of_bandwidth"] = round(row["decode_gb_s"] / bandwidth, 3)
            row["decode_speedup"] = round(row["decode_tok_s"] / base, 2)
            rows.append(row)
            cpu = (f"  [CPU time: decode {row['decode_tok_s_cpu']:.2f}, prefill {row['prefill_tok_s_cpu']:.1f} tok/s]"
                   if "decode_tok_s_cpu" in row else "")
            print(f"  {folder.name:<24} {name:<18} decode {row['decode_tok_s']:8.2f} tok/s ({row['decode_speedup']}x)"
                  f"  prefill {row['prefill_tok_s']:8.1f} tok/s  {row['bytes_per_token'] / 1e6:8.1f} MB/token"
                  f"  {row['decode_gb_s']:6.2f} GB/s = {100 * row['fraction_of_bandwidth']:.0f}% of {bandwidth:.1f}"
                  + cpu, flush=True)
        del runners
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"threads": args.threads, "prompt_tokens": args.prompt_tokens,
                                     "new_tokens": args.new_tokens, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
