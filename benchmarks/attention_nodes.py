"""ONNX Runtime's attention nodes alone: GroupQueryAttention against bitconvert's CachedAttention, one decoding step.

    python benchmarks/attention_nodes.py --config ternary-smollm2 --positions 40,200,1000 --json bench-out/attn.json

Per position, a graph of one node per layer of the model's shapes (``--config``: a folder with a config.json, or
``--heads/--kv-heads/--head-dim/--layers``), each on its own KV cache of ``--capacity`` positions bound as both past
and present (in place, as ``bitconvert generate`` runs the fused export), decoding one token at that position with
the fused graph's inputs (packed qkv, rotary tables, the padding bias). Both graphs run in one process, alternating
``--rounds`` rounds of ``--steps`` runs each; the best round per op is reported (us per node), and the ratio. The
nodes are independent and read fresh caches, so this is the attention's own cost with ORT's per-node overhead, not a
model's step (``benchmarks/paired_decode.py`` measures those).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from bitconvert.export import session
from bitconvert.export.ops import DOMAIN, MS_DOMAIN

OPS = ("gqa", "bitconvert")


def attention_graph(op: str, layers: int, heads: int, kv_heads: int, dim: int, capacity: int):
    """``layers`` independent attention nodes on one qkv input, each with its own cache input/output pair."""
    width = (heads + 2 * kv_heads) * dim
    angles = np.arange(capacity)[:, None] * 10000.0 ** (-np.arange(dim // 2) / (dim // 2))
    tables = [numpy_helper.from_array(np.cos(angles).astype(np.float32), "cos"),
              numpy_helper.from_array(np.sin(angles).astype(np.float32), "sin")]
    inputs = [helper.make_tensor_value_info("qkv", TensorProto.FLOAT, [1, 1, width]),
              helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, [1]),
              helper.make_tensor_value_info("total_length", TensorProto.INT32, []),
              helper.make_tensor_value_info("bias", TensorProto.FLOAT, [1, 1, 1, "total"])]
    outputs, nodes = [], []
    for layer in range(layers):
        past, present = [f"past.{layer}.{kv}" for kv in "kv"], [f"present.{layer}.{kv}" for kv in "kv"]
        inputs += [helper.make_tensor_value_info(name, TensorProto.FLOAT, [1, kv_heads, capacity, dim]) for name in past]
        outputs += [helper.make_tensor_value_info(f"out.{layer}", TensorProto.FLOAT, [1, 1, heads * dim]),
                    *(helper.make_tensor_value_info(name, TensorProto.FLOAT, [1, kv_heads, capacity, dim])
                      for name in present)]
        node_outputs = [f"out.{layer}", *present]
        if op == "gqa":
            nodes.append(helper.make_node(
                "GroupQueryAttention", ["qkv", "", "", *past, "seqlens_k", "total_length", "cos", "sin", "", "bias"],
                node_outputs, domain=MS_DOMAIN, num_heads=heads, kv_num_heads=kv_heads, do_rotary=1))
        else:
            nodes.append(helper.make_node(
                "CachedAttention", ["qkv", *past, "seqlens_k", "total_length", "cos", "sin", "bias"], node_outputs,
                domain=DOMAIN, num_heads=heads, kv_num_heads=kv_heads))
    graph = helper.make_graph(nodes, op, inputs, outputs, initializer=tables)
    opsets = [helper.make_opsetid("", 18), helper.make_opsetid(MS_DOMAIN, 1), helper.make_opsetid(DOMAIN, 1)]
    return helper.make_model(graph, opset_imports=opsets)


class Runner:
    """One op's graph in a session (``threads`` intra-op threads, spinning as ORT's default), bound in place."""

    def __init__(self, op: str, args, folder: Path, position: int):
        model = attention_graph(op, args.layers, args.heads, args.kv_heads, args.head_dim, args.capacity)
        path = folder / f"{op}.onnx"
        path.write_bytes(model.SerializeToString())
        options = ort.SessionOptions()
        options.intra_op_num_threads = args.threads
        self.session = session(path, options)
        rng = np.random.default_rng(0)
        self.binding = self.session.io_binding()
        width = (args.heads + 2 * args.kv_heads) * args.head_dim
        self.binding.bind_cpu_input("qkv", rng.standard_normal((1, 1, width)).astype(np.float32))
        self.binding.bind_cpu_input("seqlens_k", np.array([position], np.int32))
        self.binding.bind_cpu_input("total_length", np.array(position + 1, np.int32))
        self.binding.bind_cpu_input("bias", np.zeros((1, 1, 1, position + 1), np.float32))
        shape = (1, args.kv_heads, args.capacity, args.head_dim)
        self.caches = []
        for layer in range(args.layers):
            for kv in "kv":
                cache = ort.OrtValue.ortvalue_from_numpy(rng.standard_normal(shape).astype(np.float32))
                self.caches.append(cache)
                self.binding.bind_ortvalue_input(f"past.{layer}.{kv}", cache)
                self.binding.bind_ortvalue_output(f"present.{layer}.{kv}", cache)
            self.binding.bind_output(f"out.{layer}", "cpu")

    def seconds_per_run(self, steps: int) -> float:
        start = time.perf_counter()
        for _ in range(steps):
            self.session.run_with_iobinding(self.binding)
        return (time.perf_counter() - start) / steps


def shapes_from_config(folder: str) -> dict:
    config = json.loads((Path(folder) / "config.json").read_text())
    heads = config["num_attention_heads"]
    return {"heads": heads, "kv_heads": config.get("num_key_value_heads") or heads,
            "head_dim": config.get("head_dim") or config["hidden_size"] // heads, "layers": config["num_hidden_layers"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="a model folder whose config.json gives the shapes")
    parser.add_argument("--heads", type=int, default=9)
    parser.add_argument("--kv-heads", type=int, default=3)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--positions", default="40,200,1000", help="comma-separated decoding positions")
    parser.add_argument("--capacity", type=int, default=2048, help="cache positions (> every position)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--json", type=Path, default=Path("bench-out/attention_nodes.json"))
    args = parser.parse_args()
    if args.config:
        vars(args).update(shapes_from_config(args.config))
    positions = [int(p) for p in args.positions.split(",")]
    if max(positions) >= args.capacity:
        parser.error(f"--capacity {args.capacity} must exceed every position (largest {max(positions)})")
    rows = []
    folder = args.json.parent / "attention_nodes_graphs"
    folder.mkdir(parents=True, exist_ok=True)
    for position in positions:
        runners = {op: Runner(op, args, folder, position) for op in OPS}
        for runner in runners.values():
            runner.seconds_per_run(args.steps // 4)  # warm-up
        best = {op: float("inf") for op in OPS}
        for round_index in range(args.rounds):
            for op in (OPS if round_index % 2 == 0 else OPS[::-1]):
                best[op] = min(best[op], runners[op].seconds_per_run(args.steps))
        per_node = {op: best[op] / args.layers * 1e6 for op in OPS}
        rows.append({"position": position, "gqa_us_per_node": per_node["gqa"],
                     "bitconvert_us_per_node": per_node["bitconvert"],
                     "speedup": per_node["gqa"] / per_node["bitconvert"]})
        print(f"position {position:5d}: GroupQueryAttention {per_node['gqa']:7.2f} us/node, CachedAttention "
              f"{per_node['bitconvert']:7.2f} us/node, {rows[-1]['speedup']:.2f}x", flush=True)
    shapes = {key: getattr(args, key) for key in ("heads", "kv_heads", "head_dim", "layers", "threads")}
    args.json.write_text(json.dumps({"shapes": shapes, "onnxruntime": ort.__version__, "rows": rows}, indent=2))
    print(f"wrote {args.json}", file=sys.stderr)


if __name__ == "__main__":
    main()
