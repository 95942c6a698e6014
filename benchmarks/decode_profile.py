"""Where one decoded token's time goes, by component, for the decode configurations of ``benchmarks/decode.py``.

    PYTHONPATH=. python benchmarks/decode_profile.py FOLDER [--threads 1] [--tokens 16] [--position 128]
        [--json bench-out/decode-profile.json]

For each configuration the cache is filled with ``--position`` prompt tokens, then ``--tokens`` single-token steps
are timed without the profiler (wall time per token) and again under ``torch.profiler``. The profiler's top-level
operators are grouped:
- ternary products: ``bitconvert::ternary_linear``;
- lm_head: ``bitconvert::int8_linear`` and the float matmuls (``aten::linear``/``mm``/``addmm``/``matmul``; the only
  top-level float matmul of a step is the lm_head: attention's are inside ``scaled_dot_product_attention``);
- attention: ``scaled_dot_product_attention`` and, for the lean decoder, ``bitconvert::rope_cache_write`` (rotary
  embedding of q/k + KV-cache write, one C++ call);
- decode_layer: the lean decoder's fused single-token step (``bitconvert::decode_layer``: one call per layer holding
  that layer's norms, products, rotary/cache write and attention, so its time is not split further);
- norms/rotary/elementwise: every other top-level operator (RMSNorm, SiLU, residual adds, transformers' rotary and
  cache concatenation, casts, views);
- framework overhead: the rest of the profiled time (Python, module calls, dispatch).
Each component is printed as its share of the profiled time times the unprofiled time per token, which is this
process's CPU time at one thread (a loaded machine deschedules the process; CPU time does not count that), wall time
otherwise.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from torch.profiler import profile

from decode import CONFIGURATIONS, Runner, add_configurations_argument, prompt_ids

COMPONENTS = ("ternary products", "lm_head", "attention", "decode_layer", "norms/rotary/elementwise",
              "framework overhead")


def component(name: str) -> str:
    if name == "bitconvert::ternary_linear":
        return "ternary products"
    if name in ("bitconvert::int8_linear", "aten::linear", "aten::mm", "aten::addmm", "aten::matmul"):
        return "lm_head"
    if name in ("aten::scaled_dot_product_attention", "bitconvert::rope_cache_write"):
        return "attention"
    if name == "bitconvert::decode_layer":
        return "decode_layer"
    return "norms/rotary/elementwise"


def step_function(runner: Runner, ids: list[int]):
    """A function running one decoding step per call, after a prefill of ``ids``."""
    if runner.decoder is not None:
        runner.decoder.reset()
        runner.decoder.forward(torch.tensor(ids))
        return lambda: runner.decoder.forward(torch.tensor([7]))
    with torch.no_grad():
        cache = runner.model(torch.tensor([ids]), use_cache=True).past_key_values
    position = [len(ids)]

    def step():
        with torch.no_grad():
            runner.model(torch.tensor([[7]]), past_key_values=cache, use_cache=True,
                         cache_position=torch.tensor([position[0]]))
        position[0] += 1

    return step


def profile_configuration(runner: Runner, ids: list[int], tokens: int) -> dict:
    """ms per token in total and by component: the components' shares of the profiled time, times the unprofiled
    time per token (the profiler slows the small operators more than the big ones; a loaded machine inflates wall
    intervals: shares are what survives both)."""
    clock = time.process_time if torch.get_num_threads() == 1 else time.perf_counter
    step = step_function(runner, ids)
    step()
    start = clock()
    for _ in range(tokens):
        step()
    total_ms = (clock() - start) / tokens * 1e3
    step = step_function(runner, ids)
    with profile() as prof:
        start = time.perf_counter()
        for _ in range(tokens):
            step()
        profiled_ms = (time.perf_counter() - start) * 1e3
    shares = dict.fromkeys(COMPONENTS, 0.0)
    for event in prof.events():
        if event.cpu_parent is None and not event.name.startswith("ProfilerStep"):
            shares[component(event.name)] += event.cpu_time_total / 1e3 / profiled_ms
    shares["framework overhead"] = max(0.0, 1.0 - sum(shares.values()))
    return {"ms_per_token": round(total_ms, 3), **{name: round(share * total_ms, 3) for name, share in shares.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--tokens", type=int, default=16, help="decoding steps per measurement")
    parser.add_argument("--position", type=int, default=128, help="prompt tokens in the cache before the steps")
    add_configurations_argument(parser)
    parser.add_argument("--json", type=Path, default=Path("bench-out/decode-profile.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    print(f"{args.folder.name}: ms per decoded token at position {args.position}, {args.threads} threads")
    print(f"  {'configuration':<18} {'total':>7} " + " ".join(f"{name:>24}" for name in COMPONENTS))
    for name in args.configurations.split(","):
        runtime, options = CONFIGURATIONS[name]
        runner = Runner(args.folder, runtime, args.position + 2 * args.tokens + 2, **options)
        ids = prompt_ids(runner.model.config.vocab_size, args.position)
        row = {"model": args.folder.name, "configuration": name,
               **profile_configuration(runner, ids, args.tokens)}
        rows.append(row)
        print(f"  {name:<18} {row['ms_per_token']:7.2f} " + " ".join(f"{row[c]:24.2f}" for c in COMPONENTS),
              flush=True)
        del runner
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"threads": args.threads, "position": args.position, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
