"""Held-out perplexity of full precision, direct conversion and QAT on the same blocks, quickly (float path).

The three models are scored on the first ``--blocks`` held-out LAMBADA blocks of ``--seq-len`` tokens, exactly the
blocks ``bitconvert finetune`` evaluates during training (no data is shared with training):
    full precision   SOURCE as loaded
    direct           SOURCE's projections swapped for BitLinear at lambda = 1 (what `bitconvert SOURCE` writes)
    QAT              DIR/latent with BitLinear at lambda = 1 (same logits as DIR through bitconvert.load, tested)
The float fake-quantized path is used because it is much faster on CPU than the packed reference kernels.

    PYTHONPATH=. python benchmarks/qat_heldout.py smollm2-135m /work/qat-smollm2 --seq-len 256 --blocks 8
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source")
    parser.add_argument("qat", help="a bitconvert finetune output folder")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--blocks", type=int, default=8)
    parser.add_argument("--json", default="qat_heldout.json")
    args = parser.parse_args()

    from transformers import LlamaForCausalLM

    from bitconvert.finetune.data import PackedCorpus
    from bitconvert.finetune.export import load_latent_sub_norms
    from bitconvert.finetune.loss import cross_entropy
    from bitconvert.quantize import TernaryConfig, quantize_, set_quant_lambda
    from bitconvert.sources import load_full_precision, resolve_source

    model, tokenizer = load_full_precision(resolve_source(args.source), dtype=torch.float32)
    blocks = PackedCorpus(None, tokenizer, args.seq_len, heldout=args.blocks).heldout

    @torch.no_grad()
    def perplexity(m) -> float:
        return math.exp(sum(cross_entropy(m(ids[None]).logits, ids[None]).item() for ids in blocks) / len(blocks))

    results = {"full precision": perplexity(model)}
    quantize_(model, TernaryConfig(mode="train", quant_lambda=1.0))
    results["direct conversion"] = perplexity(model)
    options = json.loads((Path(args.qat) / "bitconvert.json").read_text())["options"]
    qat = LlamaForCausalLM.from_pretrained(Path(args.qat) / "latent", dtype=torch.float32).eval()
    quantize_(qat, TernaryConfig(mode="train", sub_norm=options["sub_norm"], weight_scale=options["weight_scale"],
                                 sub_norm_eps=qat.config.rms_norm_eps))
    load_latent_sub_norms(qat, Path(args.qat) / "latent", options["sub_norm"])
    set_quant_lambda(qat, 1.0)
    results["QAT"] = perplexity(qat)
    tokens = len(blocks) * (args.seq_len - 1)
    for name, value in results.items():
        print(f"{name:<20}{value:>14.2f}")
    print(f"({len(blocks)} held-out blocks of {args.seq_len} tokens, {tokens} predictions)")
    Path(args.json).write_text(json.dumps({"source": args.source, "qat": args.qat, "seq_len": args.seq_len,
                                           "blocks": len(blocks), "perplexity": results}, indent=2))


if __name__ == "__main__":
    main()
