"""Time of the lm_head product alone at batch 1: exact fp32 ``F.linear`` against the int8, int6 and int4 heads; with
``--decode FOLDER``, also the lean decoder's ms per token with each quantized head.

    PYTHONPATH=. OMP_NUM_THREADS=1 python benchmarks/lm_head_speed.py [--shapes 49152x576 49152x1024 49152x4096]
        [--threads 1,2] [--rounds 5] [--calls 10] [--decode FOLDER [--position 128] [--tokens 16]]
        [--json bench-out/lm-head-speed.json]

One random (vocab, hidden) weight per shape (N(0, 0.02)), one token of N(0, 1) activations. The heads are timed
interleaved (each round times ``--calls`` calls of every head in turn), so a load change on a shared machine hits all
of them alike; each figure is the median over rounds of the time per call: the process's CPU time at one thread
(wall time on a loaded machine mostly measures the scheduler), wall time at more threads (CPU time would add the
threads up), as ``benchmarks/decode_step.py`` does. Each ``--threads`` count is a separate pass over every shape.
Weights larger than the L3 stream from memory on every call, as in decoding; the bytes per call are printed beside
the times, and so is ``read int8 bytes``: ``torch.sum`` over as many bytes as the int8 head, the memory floor at that
size. ``--decode``: one
:class:`~bitconvert.kernels.decode.Decoder` per head over ``bitconvert.load(FOLDER, lm_head=HEAD)``, timed as
``benchmarks/decode_step.py`` times its decoders (interleaved rounds of greedy steps from a prefilled random prompt).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import bitconvert
from bitconvert.kernels.decode import Decoder
from bitconvert.kernels.lm_head import HEAD_CLASSES

from decode import prompt_ids
from decode_step import compare


def ms_per_call(fn, x: torch.Tensor, calls: int, clock) -> float:
    """``clock`` time of ``calls`` calls of ``fn(x)``, in ms per call."""
    start = clock()
    for _ in range(calls):
        fn(x)
    return (clock() - start) * 1e3 / calls


def measure(vocab: int, hidden: int, rounds: int, calls: int) -> dict:
    """Median ms per call (CPU time at 1 thread, wall time otherwise) and bytes per call for exact and every
    quantized head at (vocab, hidden), at torch's current thread count."""
    clock = time.process_time if torch.get_num_threads() == 1 else time.perf_counter
    weight = torch.randn(vocab, hidden) * 0.02
    heads = {"exact": lambda x: F.linear(x, weight)}
    bytes_per_call = {"exact": weight.numel() * 4}
    for name, cls in HEAD_CLASSES.items():
        head = cls(weight)
        heads[name] = head
        bytes_per_call[name] = head.weight_bytes()
    # the memory floor: torch.sum reading as many bytes as the int8 head (an fp32 buffer, written so it is resident)
    floor = torch.ones(bytes_per_call["int8"] // 4)
    heads["read int8 bytes"] = lambda x: floor.sum()
    bytes_per_call["read int8 bytes"] = floor.numel() * 4
    x = torch.randn(1, hidden)
    times = {name: [] for name in heads}
    with torch.no_grad():
        for fn in heads.values():
            fn(x)  # warm-up
        for _ in range(rounds):
            for name, fn in heads.items():
                times[name].append(ms_per_call(fn, x, calls, clock))
    return {name: {"ms": statistics.median(values), "bytes": bytes_per_call[name]} for name, values in times.items()}


def decode_ms(folder: Path, position: int, tokens: int, rounds: int) -> dict[str, float]:
    """Median ms per decoded token (CPU time at 1 thread, wall otherwise) of the lean decoder over ``folder`` with each
    quantized lm_head."""
    decoders = {}
    for name in HEAD_CLASSES:
        model = bitconvert.load(folder, lm_head=name)
        decoders[name] = Decoder(model, position + tokens)
        decoders[name].forward(torch.tensor(prompt_ids(model.config.vocab_size, position)))
    return compare(decoders, position, tokens, rounds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="*", default=["49152x576", "49152x1024", "49152x4096"],
                        metavar="VOCABxHIDDEN")
    parser.add_argument("--threads", default="1", help="comma-separated thread counts, one pass each (default 1)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=10)
    parser.add_argument("--decode", type=Path, metavar="FOLDER", help="also ms per decoded token on this folder")
    parser.add_argument("--position", type=int, default=128, help="--decode: prompt tokens before the steps")
    parser.add_argument("--tokens", type=int, default=16, help="--decode: steps per round")
    parser.add_argument("--json", type=Path, default=Path("bench-out/lm-head-speed.json"))
    args = parser.parse_args()
    result = {}
    for threads in (int(t) for t in args.threads.split(",")):
        torch.set_num_threads(threads)
        clock = "CPU" if threads == 1 else "wall"
        runs = result[f"threads={threads}"] = {}
        for shape in args.shapes:
            vocab, hidden = (int(v) for v in shape.split("x"))
            runs[shape] = measure(vocab, hidden, args.rounds, args.calls)
            row = "  ".join(f"{name} {r['ms']:.2f} ms ({r['bytes'] / 1e6:.0f} MB)" for name, r in runs[shape].items())
            print(f"{threads} thread(s), {clock} time  {shape:>12}  {row}", flush=True)
        if args.decode:
            runs["decode"] = decode_ms(args.decode, args.position, args.tokens, args.rounds)
            print(f"{threads} thread(s), {args.decode.name}: {clock} ms per decoded token " +
                  "  ".join(f"{name} {ms:.2f}" for name, ms in runs["decode"].items()), flush=True)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
