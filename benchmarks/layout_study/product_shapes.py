"""One 7B decoder layer's four ternary products (fused q/k/v 12288 x 4096, o 4096 x 4096, fused gate/up 22016 x
4096, down 4096 x 11008) at batch 1, streamed from memory (6 copies of each, cycled), per layout, 2 threads.

    python benchmarks/layout_study/product_shapes.py lut,base3,2bit

Prints, per layout, each product's mean time over 4 passes (after one warm-up pass) and the layer's total.
"""
import sys
import time

import torch

import bitconvert.kernels as kernels

SHAPES = [(12288, 4096), (4096, 4096), (22016, 4096), (4096, 11008)]


def main() -> None:
    kernels.load_library()
    torch.set_num_threads(2)
    op, weight_scale = torch.ops.bitconvert.ternary_linear, torch.tensor([0.5])
    for name in sys.argv[1].split(","):
        layout = kernels.LAYOUTS.index(name)
        copies = [(kernels.repack(torch.randint(0, 256, ((out + 3) // 4, inp), dtype=torch.uint8), out, layout),
                   out, inp) for _ in range(6) for out, inp in SHAPES]
        inputs = {inp: torch.randn(1, inp) for _, inp in SHAPES}
        seconds = [0.0] * len(SHAPES)
        for rep in range(5):
            for index, (weight, out, inp) in enumerate(copies):
                start = time.perf_counter()
                op(inputs[inp], weight, out, weight_scale, -1, 2, layout)
                if rep:
                    seconds[index % len(SHAPES)] += (time.perf_counter() - start) / 6 / 4
        print(name, " ".join(f"{out}x{inp}: {s * 1e6:.0f} us ({out * inp / s / 1e9:.0f} G w/s)"
                             for (out, inp), s in zip(SHAPES, seconds)), f"total {sum(seconds) * 1e6:.0f} us")


if __name__ == "__main__":
    main()
