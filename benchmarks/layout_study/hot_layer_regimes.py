"""Study (not part of the package): the lean decoder's fused layer step, from cache, against the host's bandwidth mode.

Alternates for SECONDS (a 50 ms pause between rounds): the ``torch.sum`` bandwidth probe of the paired benchmark (512
MiB, best of 3, 2 threads), then layer 0's ``decode_layer`` at position 32 (20 untimed calls, then the median of 200)
and its gate/up product alone (``layer.gate_up``, likewise), on THREADS threads. Prints the medians of the rounds below
and above 45 GB/s and of the rounds whose layer took more or less than 40 us.

    PYTHONPATH=. python benchmarks/layout_study/hot_layer_regimes.py CONVERTED [SECONDS=120] [THREADS=2]
"""

import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import decode  # noqa: E402  (benchmarks/)
from headtohead import BandwidthProbe  # noqa: E402


def median_us(call, calls: int = 200) -> float:
    for _ in range(20):
        call()
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


def main() -> None:
    folder, seconds = sys.argv[1], float(sys.argv[2]) if len(sys.argv) > 2 else 120.0
    threads = int(sys.argv[3]) if len(sys.argv) > 3 else 2
    decoder = decode.Runner(folder, "lean", 256, lm_head="int8").decoder
    arguments, layer = decoder.step_arguments[0], decoder.layers[0]
    hidden = torch.randn(1, decoder.embed.shape[1])
    normed = torch.randn(1, decoder.embed.shape[1])
    step = torch.ops.bitconvert.decode_layer.default

    def layer_step():
        step(hidden, *arguments, 32, decoder.heads, decoder.eps, decoder.layout)

    probe = BandwidthProbe(512 << 20, 3)
    rows = []
    end = time.time() + seconds
    while time.time() < end:
        time.sleep(0.05)
        torch.set_num_threads(2)
        bandwidth = probe() / 1e9
        torch.set_num_threads(threads)
        rows.append((bandwidth, median_us(layer_step), median_us(lambda: layer.gate_up(normed))))
    print(f"{len(rows)} rounds, layer step on {threads} threads (medians, us)")
    for name, chosen in (("probe < 45 GB/s", [row for row in rows if row[0] < 45]),
                         ("probe >= 45 GB/s", [row for row in rows if row[0] >= 45]),
                         ("layer <= 40 us", [row for row in rows if row[1] <= 40]),
                         ("layer > 40 us", [row for row in rows if row[1] > 40])):
        if chosen:
            print(f"{name:<18} {len(chosen):5d} rounds: probe {statistics.median(r[0] for r in chosen):5.1f} GB/s, "
                  f"layer {statistics.median(r[1] for r in chosen):6.1f}, gate/up alone "
                  f"{statistics.median(r[2] for r in chosen):6.1f}")


if __name__ == "__main__":
    main()
