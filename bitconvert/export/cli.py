"""``bitconvert export MODEL --out model.onnx [--op ternary|matmulnbits]``: the ONNX export verb."""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "export",
        help="export a converted model to ONNX (KV cache; custom TernaryMatMul op or portable MatMulNBits)",
        description="Export MODEL to an ONNX decoder with a KV cache (inputs input_ids, attention_mask, position_ids, "
        "past_key_values.N.key/value; outputs logits, present.N.key/value) and save its tokenizer beside it. "
        "--op ternary (default) makes each BitLinear one com.bitconvert::TernaryMatMul node on its 2-bit weights, "
        "run in ONNX Runtime by bitconvert's custom-op library (bitconvert.export.session); --op matmulnbits uses "
        "the standard contrib op com.microsoft::MatMulNBits (bits=2), which plain onnxruntime runs. A full-precision "
        "MODEL exports as fp32.",
        epilog="example: bitconvert export ternary-smollm2 --out onnx/model.onnx && "
        "bitconvert generate onnx/model.onnx --prompt 'Once upon a time'",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("model", metavar="MODEL", help="converted folder (or a full-precision source for an fp32 export)")
    parser.add_argument("--out", required=True, metavar="FILE.onnx", help="the ONNX file to write (its folder gets the tokenizer)")
    parser.add_argument("--op", choices=("ternary", "matmulnbits"), default="ternary",
                        help="operator for the ternary layers (default: ternary)")
    parser.add_argument("--accuracy-level", type=int, choices=(0, 4), default=0,
                        help="MatMulNBits only: 0 multiplies fp32 activations, 4 quantizes them to int8 per block "
                        "(faster, less exact); default 0")
    parser.add_argument("--graph", choices=("plain", "fused"), default="plain",
                        help="plain (default): attention and RMSNorm in standard ONNX ops; fused: ONNX Runtime's "
                        "GroupQueryAttention and RMSNorm ops and stacked q/k/v, gate/up products (fewer nodes, "
                        "faster; logits equal up to float rounding; positions taken from the cache length)")
    parser.add_argument("--lm-head", choices=("exact", "int8"), default="exact",
                        help="exact (default): fp32 lm_head; int8: MatMulNBits bits=8 with int8 activations, a "
                        "quarter of the bytes read per token, an approximation (see docs/export.md)")
    parser.add_argument("--logits", choices=("all", "last"), default="all",
                        help="all (default): logits for every input position; last: only the last position's "
                        "(B, 1, V), all that generation needs, and a much faster prompt")
    parser.set_defaults(run=run)


def run(args) -> int:
    from .exporter import export_onnx

    out = export_onnx(args.model, args.out, op=args.op, accuracy_level=args.accuracy_level, graph=args.graph,
                      lm_head=args.lm_head, logits=args.logits)
    size = sum(path.stat().st_size for path in out.parent.glob(out.name + "*"))
    print(f"wrote {out} ({size / 2**20:.1f} MiB) and its tokenizer; run it: bitconvert generate {out} --prompt ...")
    return 0
