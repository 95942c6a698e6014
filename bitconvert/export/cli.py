"""``bitconvert export MODEL --out model.onnx [--op ternary|matmulnbits]`` (ONNX) or ``--out model.gguf`` (GGUF)."""

from __future__ import annotations

import argparse

from .gguf_blocks import TYPE_CHOICES
from .gguf import FLOAT_TYPES


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "export",
        help="export a converted model to ONNX (KV cache; custom TernaryMatMul op or portable MatMulNBits) or GGUF",
        description="Export MODEL to an ONNX decoder with a KV cache (inputs input_ids, attention_mask, position_ids, "
        "past_key_values.N.key/value; outputs logits, present.N.key/value) and save its tokenizer beside it. "
        "--op ternary (default) makes each BitLinear one com.bitconvert::TernaryMatMul node on its 2-bit weights, "
        "run in ONNX Runtime by bitconvert's custom-op library (bitconvert.export.session); --op matmulnbits uses "
        "the standard contrib op com.microsoft::MatMulNBits (bits=2), which plain onnxruntime runs. A full-precision "
        "MODEL exports as fp32. --format gguf (or an --out ending in .gguf) writes one GGUF file for llama.cpp with the "
        "model's own ternary codes and tokenizer.",
        epilog="examples: bitconvert export ternary-smollm2 --out onnx/model.onnx && "
        "bitconvert generate onnx/model.onnx --prompt 'Once upon a time'\n"
        "          bitconvert export ternary-smollm2 --out smollm2.gguf && llama-cli -m smollm2.gguf -p 'Hello'",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("model", metavar="MODEL", help="converted folder (or a full-precision source for an fp32 export)")
    parser.add_argument("--out", required=True, metavar="FILE", help="the .onnx file to write (its folder gets the "
                        "tokenizer) or the .gguf file (must not exist)")
    parser.add_argument("--format", choices=("onnx", "gguf"), help="default: gguf when --out ends in .gguf, else onnx")
    parser.add_argument("--op", choices=("ternary", "matmulnbits"), default="ternary",
                        help="operator for the ternary layers (default: ternary)")
    parser.add_argument("--accuracy-level", type=int, choices=(0, 4), default=0,
                        help="MatMulNBits only: 0 multiplies fp32 activations, 4 quantizes them to int8 per block "
                        "(faster, less exact); default 0")
    parser.add_argument("--type", choices=TYPE_CHOICES, default="auto", dest="weight_type",
                        help="GGUF only: block type of the ternary projections; auto (default) picks per tensor TQ2_0 "
                        "(rows a multiple of 256), else Q2_0 (of 64), else exact Q8_0/F16; a forced type must fit every row "
                        "(q8_0: exact too, 4x larger than Q2_0 but with SIMD kernels on x86, where Q2_0 has none)")
    parser.add_argument("--float-type", choices=FLOAT_TYPES, default="f16",
                        help="GGUF only: type of the embeddings and lm_head (default f16; q8_0 is lossy); norms stay f32")
    parser.add_argument("--graph", choices=("plain", "fused", "layer"), default="plain",
                        help="plain (default): attention and RMSNorm in standard ONNX ops; fused: one attention "
                        "node per layer (--attention), ONNX Runtime's RMSNorm ops and stacked q/k/v, gate/up products "
                        "(fewer nodes, faster; logits equal up to float rounding; positions taken from the cache "
                        "length); layer: fused with bitconvert's attention, each LLaMA layer with stacked "
                        "projections one com.bitconvert::DecoderLayer node (its five fused nodes in one, the same "
                        "outputs bit for bit; other layers as in fused; --op ternary on a converted model only)")
    parser.add_argument("--lm-head", choices=("exact", "int8", "int8-row", "int6"), default="exact",
                        help="exact (default): fp32 lm_head; int8: MatMulNBits bits=8 with int8 activations, a "
                        "quarter of the bytes read per token; int8-row: bitconvert's Int8MatMul, per-row int8 as "
                        "bitconvert.load's lm_head='int8' (its logits bit for bit); int6: bitconvert's Int6MatMul "
                        "(6.5 bits per weight, as llama.cpp's Q6_K output), 19%% fewer bytes than int8; all "
                        "approximations (docs/export.md)")
    parser.add_argument("--kv-cache", choices=("fp32", "fp16"), default="fp32",
                        help="fp32 (default) or fp16 (with --graph fused or layer): the KV cache inputs/outputs in "
                        "float16, half the cache's memory; keys and values rounded to fp16. bitconvert's attention "
                        "reads it in fp32 as fast as an fp32 cache; with --attention gqa ONNX Runtime 1.32 computes "
                        "attention in fp16 and decodes slower on a CPU without fp16 arithmetic (docs/export.md)")
    parser.add_argument("--attention", choices=("auto", "bitconvert", "gqa"), default="auto",
                        help="with --graph fused: bitconvert (bitconvert's CachedAttention op: the lean decoder's "
                        "attention loops, 1.5-1.7x faster per node than gqa at SmolLM2's shapes, an fp16 cache read "
                        "in fp32) or gqa (ONNX Runtime's GroupQueryAttention, no custom op); auto (default): "
                        "bitconvert where the graph already needs bitconvert's library (--op ternary, --lm-head int8-row "
                        "or int6); --graph layer's is always bitconvert's")
    parser.add_argument("--logits", choices=("all", "last"), default="all",
                        help="all (default): logits for every input position; last: only the last position's "
                        "(B, 1, V), all that generation needs, and a much faster prompt")
    parser.set_defaults(run=run)


def run(args) -> int:
    if (args.format or ("gguf" if args.out.endswith(".gguf") else "onnx")) == "gguf":
        return _run_gguf(args)
    from .exporter import export_onnx

    out = export_onnx(args.model, args.out, op=args.op, accuracy_level=args.accuracy_level, graph=args.graph,
                      lm_head=args.lm_head, logits=args.logits, kv_cache=args.kv_cache,
                      attention=args.attention)
    size = sum(path.stat().st_size for path in out.parent.glob(out.name + "*"))
    print(f"wrote {out} ({size / 2**20:.1f} MiB) and its tokenizer; run it: bitconvert generate {out} --prompt ...")
    return 0


def _run_gguf(args) -> int:
    from .gguf import export_gguf

    result = export_gguf(args.model, args.out, weight_type=args.weight_type, float_type=args.float_type)
    print("\n".join([f"tensor types ({result.architecture} architecture, pre-tokenizer {result.pre_tokenizer}):",
                     *result.summary()]))
    print(f"wrote {result.path} ({result.path.stat().st_size / 2**20:.1f} MiB); run it: llama-cli -m {result.path} -p ...")
    return 0
