"""ONNX Runtime decoding speed of exported models: prefill and decode tokens/s, and where a token's time goes.

    python benchmarks/onnx_decode.py MODEL [MODEL ...] --workdir DIR [--variants before,after] [--threads 2]
        [--prompt-tokens 128] [--new-tokens 64] [--repeats 3] [--profile] [--parity] [--json bench-out/onnx.json]

MODEL is a converted folder (or an existing .onnx). Each variant is exported once by ``bitconvert export`` into
DIR/<model name>/<variant>/model.onnx and reused when present:
    before   the plain graph: one TernaryMatMul per projection, attention in standard ops, fp32 lm_head
    fused    --graph fused: CachedAttention or GroupQueryAttention (rotary inside), ORT's RMSNorm ops, q/k/v and
             gate/up fused
    int8     --lm-head int8 on the plain graph (MatMulNBits bits=8, int8 activations)
    after    --graph fused --lm-head int8
    fast     --graph fused --lm-head int8 --logits last (logits of the last position only: the prompt's lm_head
             runs on one token, as llama.cpp's does)
    fast-exact  --graph fused --logits last (the exact lm_head)
    fast-int6   --graph fused --lm-head int6 --logits last (bitconvert's Int6MatMul, 6.5 bits per weight)
    layer    --graph layer --lm-head int8-row --logits last (one DecoderLayer node per layer, bitconvert's Int8MatMul
             head: the fastest, docs/export.md)
All variants of a model run with the same session options, repeats interleaved round-robin so that drifting machine
load hits them alike. ``--profile`` adds ONNX Runtime's per-node profile of the decode steps, grouped by component
(:func:`profile_ort`); ``--parity`` compares greedy tokens with ``bitconvert.load`` on real prompts.

Other benchmarks import :func:`measure_ort` (one model) and :func:`profile_ort`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

VARIANTS = {
    "before": {},
    "fused": {"graph": "fused"},
    "int8": {"lm_head": "int8"},
    "after": {"graph": "fused", "lm_head": "int8"},
    "fast": {"graph": "fused", "lm_head": "int8", "logits": "last"},
    "fast-exact": {"graph": "fused", "logits": "last"},
    "fast-int6": {"graph": "fused", "lm_head": "int6", "logits": "last"},
    "layer": {"graph": "layer", "lm_head": "int8-row", "logits": "last"},
}
PROMPTS = (
    "The capital of France is",
    "Once upon a time, in a small village,",
    "def fibonacci(n):",
    "Water boils at a temperature of",
    "The three primary colors are",
)
# Profile groups by ONNX op type (the lm_head MatMul, MatMulNBits, Int6MatMul or Int8MatMul is recognised by its
# output width = vocabulary size).
TERNARY_OPS = {"TernaryMatMul"}
ATTENTION_OPS = {"CachedAttention", "GroupQueryAttention", "MultiHeadAttention", "Attention", "Softmax", "MatMul",
                 "FusedMatMul", "Concat"}
ELEMENTWISE_OPS = {"SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization", "RotaryEmbedding", "Mul", "Add",
                   "Sub", "Div", "Pow", "ReduceMean", "Sqrt", "Reciprocal", "Neg", "Sigmoid", "Cos", "Sin", "Where",
                   "Softplus", "QuickGelu", "BiasGelu"}
GROUPS = ("ternary products", "whole layers", "lm_head", "attention", "norms/rotary/elementwise", "other nodes",
          "ORT between nodes", "Python and I/O")  # whole layers: DecoderLayer nodes (products, attention and norms)


def decoder_for(path: str | Path, threads: int, spinning: bool = False, profile_prefix: str | None = None,
                library: str | Path | None = None):
    """An :class:`~bitconvert.export.generate.OnnxDecoder` on ``threads`` intra-op threads; ``library``: a
    TernaryMatMul library build instead of the current one."""
    import onnxruntime as ort

    from bitconvert.export import session
    from bitconvert.export.generate import OnnxDecoder

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    if profile_prefix:
        options.enable_profiling = True
        options.profile_file_prefix = profile_prefix
    return OnnxDecoder(session(path, options, library=library))


def _time_once(decoder, prompt: np.ndarray, new_tokens: int) -> tuple[float, float]:
    """(prefill seconds, decode seconds): the prompt in one step, then ``new_tokens`` greedy single-token steps."""
    start = time.perf_counter()
    logits, cache = decoder.step(prompt, decoder.empty_cache(capacity=prompt.shape[1] + new_tokens))
    prefill = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(new_tokens):
        logits, cache = decoder.step(np.array([[int(np.argmax(logits[0, -1]))]]), cache)
    return prefill, time.perf_counter() - start


def _random_prompt(decoder, tokens: int) -> np.ndarray:
    vocab = decoder.session.get_outputs()[0].shape[-1]
    return np.random.default_rng(0).integers(0, vocab, (1, tokens))


def _summary(samples: list[tuple[float, float]], prompt_tokens: int, new_tokens: int) -> dict:
    decode = [new_tokens / d for _, d in samples]
    return {"prefill_tok_s": statistics.median(prompt_tokens / p for p, _ in samples),
            "decode_tok_s": statistics.median(decode), "decode_min_max": [min(decode), max(decode)],
            "decode_ms_per_token": 1e3 / statistics.median(decode)}


def measure_ort(onnx_path: str | Path, threads: int, prompt_tokens: int = 128, new_tokens: int = 64,
                repeats: int = 3, spinning: bool = False) -> dict:
    """Prefill and decode speed of one exported decoder in ONNX Runtime (CPU), batch 1, greedy.

    Prefill: ``prompt_tokens`` random tokens (seed 0) in one step from an empty cache. Decode: ``new_tokens``
    single-token steps after it, the cache kept in ORT (``OnnxDecoder``). One warm-up, then ``repeats`` timed runs;
    medians. ``threads``: ORT intra-op threads (also the TernaryMatMul op's); ``spinning``: ORT's worker threads
    busy-wait between nodes (faster on an idle machine, harmful on a loaded one).

    Returns ``{"decode_tok_s", "prefill_tok_s", "decode_ms_per_token", "decode_min_max", "file_bytes", "op",
    "graph", "lm_head", "logits", "threads", "spinning", "prompt_tokens", "new_tokens", "repeats"}``: tokens/s
    (medians), the decode range over the repeats, the file size, the export's metadata (``bitconvert.*``) and the
    arguments.
    """
    decoder = decoder_for(onnx_path, threads, spinning)
    prompt = _random_prompt(decoder, prompt_tokens)
    _time_once(decoder, prompt[:, : min(8, prompt_tokens)], 2)
    samples = [_time_once(decoder, prompt, new_tokens) for _ in range(repeats)]
    return {**_summary(samples, prompt_tokens, new_tokens), **_metadata(onnx_path), "threads": threads,
            "spinning": spinning, "prompt_tokens": prompt_tokens, "new_tokens": new_tokens, "repeats": repeats}


def _metadata(onnx_path: str | Path) -> dict:
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    meta = {prop.key.removeprefix("bitconvert."): prop.value for prop in model.metadata_props}
    path = Path(onnx_path)
    return {"file_bytes": sum(p.stat().st_size for p in path.parent.glob(path.name + "*")),
            "op": meta.get("op", "?"), "graph": meta.get("graph", "plain"), "lm_head": meta.get("lm_head", "exact"),
            "logits": meta.get("logits", "all")}


def _group(event: dict, vocab: int) -> str:
    op = event["args"].get("op_name", "")
    if op in TERNARY_OPS:
        return "ternary products"
    if op == "DecoderLayer":
        return "whole layers"
    if op in {"MatMul", "MatMulNBits", "Gemm", "FusedMatMul", "Int6MatMul", "Int8MatMul"}:
        shapes = event["args"].get("output_type_shape") or [{}]
        dims = next(iter(shapes[0].values()), [])
        if dims and dims[-1] == vocab:
            return "lm_head"
    if op in ATTENTION_OPS:
        return "attention"
    if op in ELEMENTWISE_OPS:
        return "norms/rotary/elementwise"
    return "other nodes"


def profile_ort(onnx_path: str | Path, threads: int, prompt_tokens: int = 128, new_tokens: int = 32,
                spinning: bool = False, workdir: str | Path = "/tmp") -> dict:
    """Where one decode token's time goes in ONNX Runtime: ms per token by component (see :data:`GROUPS`).

    Runs the prompt and ``new_tokens`` single-token steps with ``SessionOptions.enable_profiling``; of every decode
    step (not the prefill, not the first decode step) it sums the node kernel times by op type into groups, counts
    the rest of the ``model_run`` time as "ORT between nodes" and the rest of the wall time of ``OnnxDecoder.step``
    as "Python and I/O". Returns ``{"ms_per_token": {group: ms}, "total_ms", "nodes_per_token",
    "ops": {op_type: ms}}``.
    """
    Path(workdir).mkdir(parents=True, exist_ok=True)  # ORT writes no profile into a missing folder
    decoder = decoder_for(onnx_path, threads, spinning, profile_prefix=str(Path(workdir) / "ort_profile"))
    vocab = decoder.session.get_outputs()[0].shape[-1]
    prompt = _random_prompt(decoder, prompt_tokens)
    logits, cache = decoder.step(prompt, decoder.empty_cache(capacity=prompt.shape[1] + new_tokens))
    walls = []
    for _ in range(new_tokens):
        start = time.perf_counter()
        logits, cache = decoder.step(np.array([[int(np.argmax(logits[0, -1]))]]), cache)
        walls.append(time.perf_counter() - start)
    events = json.loads(Path(decoder.session.end_profiling()).read_text())
    runs = sorted((e for e in events if e.get("name") == "model_run"), key=lambda e: e["ts"])
    decode_runs = runs[2:]  # skip the prefill and the first decode step (first-shape allocations)
    totals: dict[str, float] = defaultdict(float)
    ops: dict[str, float] = defaultdict(float)
    nodes = 0
    spans = [(run["ts"], run["ts"] + run["dur"]) for run in decode_runs]
    for event in events:
        if event.get("cat") != "Node" or not event.get("name", "").endswith("_kernel_time"):
            continue
        if not any(low <= event["ts"] <= high for low, high in spans):
            continue
        totals[_group(event, vocab)] += event["dur"]
        ops[event["args"].get("op_name", "?")] += event["dur"]
        nodes += 1
    steps = len(decode_runs)
    run_us = sum(run["dur"] for run in decode_runs)
    totals["ORT between nodes"] = max(run_us - sum(totals.values()), 0.0)
    totals["Python and I/O"] = max(sum(walls[1:]) * 1e6 - run_us, 0.0)
    per_token = {group: totals.get(group, 0.0) / steps / 1e3 for group in GROUPS}
    return {"ms_per_token": per_token, "total_ms": sum(per_token.values()), "nodes_per_token": nodes / steps,
            "ops": {op: us / steps / 1e3 for op, us in sorted(ops.items(), key=lambda item: -item[1])}}


def export_variants(model: str, workdir: Path, names: list[str]) -> dict[str, Path]:
    """``{variant: path}``; a MODEL that is an .onnx file is used as is (one variant, named after the file)."""
    if model.endswith(".onnx"):
        return {Path(model).stem: Path(model)}
    from bitconvert.export import export_onnx

    paths = {}
    for name in names:
        path = workdir / Path(model).name / name / "model.onnx"
        if not path.is_file():
            print(f"exporting {model} ({name}) ...", file=sys.stderr, flush=True)
            export_onnx(model, path, **VARIANTS[name])
        paths[name] = path
    return paths


def parity(model: str, decoders: dict, tokens: int) -> dict:
    """Greedy tokens of each variant vs PyTorch's ``bitconvert.load`` on :data:`PROMPTS`: identical, and the first
    differing position."""
    import torch
    from transformers import AutoTokenizer

    from bitconvert.load import load

    tokenizer = AutoTokenizer.from_pretrained(model)
    reference = load(model, dtype=torch.float32)
    result = {}
    for prompt in PROMPTS:
        ids = tokenizer(prompt)["input_ids"]
        with torch.no_grad():
            expected = reference.generate(torch.tensor([ids]), max_new_tokens=tokens, min_new_tokens=tokens,
                                          do_sample=False)[0, len(ids):].tolist()
        row = {}
        for name, decoder in decoders.items():
            got = decoder.generate(ids, tokens)
            same = next((i for i, (a, b) in enumerate(zip(got, expected)) if a != b), len(got))
            row[name] = {"identical": got == expected, "first_difference": same}
        result[prompt] = row
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="+", metavar="MODEL", help="converted folders (or .onnx files)")
    parser.add_argument("--workdir", default="/tmp/onnx-bench", help="where the exports live (reused)")
    parser.add_argument("--variants", default="before,after", help=f"comma-separated, of {', '.join(VARIANTS)}")
    parser.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra-op threads (default 2)")
    parser.add_argument("--spinning", action="store_true", help="let ORT's threads spin between nodes")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--profile", action="store_true", help="also profile the decode steps per component")
    parser.add_argument("--parity", action="store_true", help="also compare greedy tokens with bitconvert.load")
    parser.add_argument("--json", default="bench-out/onnx_decode.json", help="write the results here")
    args = parser.parse_args()
    names = args.variants.split(",")
    unknown = [name for name in names if name not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant(s) {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")

    results = {}
    for model in args.models:
        paths = export_variants(model, Path(args.workdir), names)
        decoders = {name: decoder_for(path, args.threads, args.spinning) for name, path in paths.items()}
        prompt = _random_prompt(next(iter(decoders.values())), args.prompt_tokens)
        for decoder in decoders.values():  # warm-up: first-shape allocations
            _time_once(decoder, prompt[:, :8], 2)
        samples = {name: [] for name in decoders}
        for _ in range(args.repeats):
            for name, decoder in decoders.items():
                samples[name].append(_time_once(decoder, prompt, args.new_tokens))
        rows = {name: {**_summary(samples[name], args.prompt_tokens, args.new_tokens), **_metadata(paths[name])}
                for name in decoders}
        if args.profile:
            for name, path in paths.items():
                rows[name]["profile"] = profile_ort(path, args.threads, args.prompt_tokens, 32, args.spinning,
                                                    Path(args.workdir))
        if args.parity and not model.endswith(".onnx"):
            for name, row in parity(model, decoders, 32).items():
                rows.setdefault("parity", {})[name] = row
        results[model] = rows
        print_table(model, rows, args)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results}, indent=2) + "\n")


def print_table(model: str, rows: dict, args) -> None:
    variants = [name for name in rows if name != "parity"]
    base = rows[variants[0]]
    print(f"\n{model}: threads={args.threads} spinning={args.spinning} prompt={args.prompt_tokens} "
          f"new={args.new_tokens} repeats={args.repeats} (medians; decode min-max in brackets)")
    print(f"{'variant':<9}{'file MiB':>10}{'prefill tok/s':>15}{'decode tok/s':>14}{'min-max':>15}"
          f"{'decode vs ' + variants[0]:>18}")
    for name in variants:
        row = rows[name]
        low, high = row["decode_min_max"]
        print(f"{name:<9}{row['file_bytes'] / 2**20:>10.1f}{row['prefill_tok_s']:>15.1f}{row['decode_tok_s']:>14.1f}"
              f"{f'{low:.1f}-{high:.1f}':>15}{row['decode_tok_s'] / base['decode_tok_s']:>17.2f}x")
    if "profile" in base:
        print(f"\ndecode ms per token by component (ORT profile){'':<4}" + "".join(f"{n:>10}" for n in variants))
        for group in (*GROUPS, "total"):
            cells = [rows[n]["profile"]["total_ms" if group == "total" else "ms_per_token"] for n in variants]
            values = [c if group == "total" else c[group] for c in cells]
            print(f"  {group:<48}" + "".join(f"{v:>10.2f}" for v in values))
        print(f"  {'nodes run per token':<48}" + "".join(f"{rows[n]['profile']['nodes_per_token']:>10.0f}"
                                                        for n in variants))
    for prompt, row in rows.get("parity", {}).items():
        cells = "  ".join(f"{n}: {'yes' if r['identical'] else 'no'}/{r['first_difference']}" for n, r in row.items())
        print(f"  greedy parity {prompt!r:<42} {cells}")


if __name__ == "__main__":
    main()
