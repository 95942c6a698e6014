"""What the lean decoder's fp16 KV cache costs in accuracy against its exact fp32 cache, on real text.

    PYTHONPATH=. python benchmarks/kv_cache_accuracy.py FOLDER [FOLDER ...] [--tokens 2048] [--prompt 16]
        [--json bench-out/kv-cache-accuracy.json]

Per converted folder: the first ``--tokens`` tokens of ``bitconvert ppl``'s held-out text as one sequence, the first
``--prompt`` of them as a prompt (prefill, per operator), then the rest fed one token at a time (teacher forcing: the
fused single-token step, which reads the whole cache every token) through two :class:`Decoder` of the same loaded
model, one per cache type. Reports the perplexity of the fed tokens under each, the logits' error (max and RMS over
all positions, relative to the exact logits' standard deviation), and how often the top-1 token agrees.

A third decoder gives the model's own noise floor: the exact cache, with the embedding table multiplied by
(1 + ``--noise`` x N(0, 1)) (default 1e-6, a few fp32 roundings). A ternary model quantizes every product's input to
int8 per token, so a perturbation that moves one activation across a rounding boundary changes a code, and the codes
it changes propagate through the layers: where the floor's error is as large as the fp16 cache's, the figures measure
how much the model amplifies any rounding, not what the cache loses.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F

import bitconvert
from bitconvert.data import heldout_text
from bitconvert.kernels.decode import Decoder
from transformers import AutoTokenizer


def compare(folder: Path, tokens: int, prompt: int, noise: float) -> dict:
    model = bitconvert.load(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    ids = tokenizer(heldout_text(), return_tensors="pt", add_special_tokens=False).input_ids[0][:tokens]
    decoders = {name: Decoder(model, max_len=len(ids), kv_cache=name) for name in ("fp32", "fp16")}
    decoders["floor"] = Decoder(model, max_len=len(ids))
    generator = torch.Generator().manual_seed(0)
    decoders["floor"].embed = decoders["floor"].embed * (1 + noise * torch.randn(decoders["floor"].embed.shape,
                                                                                   generator=generator))
    logits = {}
    for name, decoder in decoders.items():
        rows = [decoder.forward(ids[:prompt], logits="all")]
        rows += [decoder.forward(ids[position:position + 1], logits="all") for position in range(prompt, len(ids) - 1)]
        logits[name] = torch.cat(rows)  # (len - 1, vocab): predictions of ids[1:]
    targets, exact = ids[1:], logits["fp32"]
    spread = float(exact.std())
    result = {"folder": str(folder), "tokens": len(ids), "prompt": prompt, "noise": noise,  # fp16 tops out at 65,504
              "max_abs_key": float(decoders["fp32"].keys.abs().max()),
              "max_abs_value": float(decoders["fp32"].values.abs().max())}
    for name, values in logits.items():
        result[f"perplexity_{name}"] = math.exp(float(F.cross_entropy(values, targets)))
        if name != "fp32":
            result[f"max_error_rel_std_{name}"] = float((values - exact).abs().max()) / spread
            result[f"rms_error_rel_std_{name}"] = float((values - exact).pow(2).mean().sqrt()) / spread
            result[f"top1_agreement_{name}"] = float((values.argmax(-1) == exact.argmax(-1)).float().mean())
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folders", nargs="+", type=Path, help="converted folders")
    parser.add_argument("--tokens", type=int, default=2048, help="length of the sequence (default 2048)")
    parser.add_argument("--prompt", type=int, default=16, help="tokens prefilled before the one-at-a-time steps")
    parser.add_argument("--noise", type=float, default=1e-6, help="relative noise on the floor's embeddings")
    parser.add_argument("--json", type=Path, default=Path("bench-out/kv-cache-accuracy.json"))
    args = parser.parse_args()
    rows = []
    print(f"{'folder':<28} {'against the exact cache':<26} {'tokens':>6} {'ppl exact':>10} {'ppl':>10} {'change':>8} "
          f"{'max err/std':>11} {'rms err/std':>11} {'top-1 agree':>11}")
    for folder in args.folders:
        row = compare(folder, args.tokens, args.prompt, args.noise)
        rows.append(row)
        print(f"{folder.name:<28} largest |key| {row['max_abs_key']:.1f}, |value| {row['max_abs_value']:.1f} "
              "(fp16 holds up to 65,504)")
        for name, label in (("fp16", "fp16 cache"), ("floor", f"embeddings x (1 + {args.noise:g} N)")):
            change = row[f"perplexity_{name}"] / row["perplexity_fp32"] - 1
            print(f"{folder.name:<28} {label:<26} {row['tokens']:>6} {row['perplexity_fp32']:>10.3f} "
                  f"{row[f'perplexity_{name}']:>10.3f} {100 * change:>7.3f}% {row[f'max_error_rel_std_{name}']:>11.4f} "
                  f"{row[f'rms_error_rel_std_{name}']:>11.5f} {100 * row[f'top1_agreement_{name}']:>10.2f}%",
                  flush=True)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"rows": rows}, indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
