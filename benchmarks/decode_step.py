"""One decoded token of the lean decoder: the per-op path against one fused ``decode_layer`` call per layer.

    PYTHONPATH=. python benchmarks/decode_step.py FOLDER [FOLDER ...] [--threads 1,2] [--position 128]
        [--tokens 16] [--rounds 5] [--lm-head int8]

Per folder: ``bitconvert.load(folder, lm_head=...)`` and two :class:`~bitconvert.kernels.decode.Decoder` over that
model, ``fused_step=True`` (after) and ``False`` (before), both prefilled with the same ``--position``-token random
prompt. Then, per thread count, ``--rounds`` interleaved rounds (the order alternating), each timing ``--tokens``
greedy single-token steps of each decoder from the prompt's end. Reported: the median over rounds of ms per token,
in this process's CPU time at one thread (a loaded machine deschedules the process; CPU time does not count that),
in wall time otherwise.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

import bitconvert
from bitconvert.kernels.decode import Decoder

from decode import prompt_ids


def steps_ms(decoder: Decoder, position: int, tokens: int, clock) -> float:
    """ms per token of ``tokens`` greedy steps from ``position`` (the cache up to there already filled)."""
    decoder.position = position
    token = torch.tensor([7])
    start = clock()
    for _ in range(tokens):
        token = decoder.forward(token).argmax().reshape(1)
    return (clock() - start) / tokens * 1e3


def compare(decoders: dict[str, Decoder], position: int, tokens: int, rounds: int) -> dict[str, float]:
    """Median ms per token of each decoder over interleaved rounds, at torch's current thread count."""
    clock = time.process_time if torch.get_num_threads() == 1 else time.perf_counter
    times: dict[str, list[float]] = {name: [] for name in decoders}
    for index in range(rounds):
        order = list(decoders) if index % 2 == 0 else list(reversed(decoders))
        for name in order:
            times[name].append(steps_ms(decoders[name], position, tokens, clock))
    return {name: statistics.median(values) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folders", nargs="+", type=Path)
    parser.add_argument("--threads", default="1", help="comma-separated thread counts")
    parser.add_argument("--position", type=int, default=128, help="prompt tokens in the cache before the steps")
    parser.add_argument("--tokens", type=int, default=16, help="steps per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--lm-head", default="int8", choices=("exact", "int8"))
    args = parser.parse_args()
    print(f"ms per decoded token at position {args.position}, median of {args.rounds} interleaved rounds of "
          f"{args.tokens} steps (CPU time at 1 thread, wall time otherwise)")
    for folder in args.folders:
        model = bitconvert.load(folder, lm_head=args.lm_head)
        max_len = args.position + args.tokens
        decoders = {"per-op": Decoder(model, max_len, fused_step=False), "fused": Decoder(model, max_len)}
        prompt = torch.tensor(prompt_ids(model.config.vocab_size, args.position))
        for decoder in decoders.values():
            decoder.forward(prompt)
        for threads in (int(count) for count in args.threads.split(",")):
            torch.set_num_threads(threads)
            for decoder in decoders.values():  # warm-up: the fused step's work space, first calls
                steps_ms(decoder, args.position, 2, time.perf_counter)
            ms = compare(decoders, args.position, args.tokens, args.rounds)
            print(f"  {folder.name:<28} {threads} thread(s): per-op {ms['per-op']:7.2f}  fused {ms['fused']:7.2f}  "
                  f"({ms['per-op'] / ms['fused']:.2f}x)", flush=True)
        del decoders, model


if __name__ == "__main__":
    main()
