"""What the int8 lm_head costs in accuracy: logits and perplexity against the exact (stored float) lm_head.

    PYTHONPATH=. python benchmarks/lm_head_accuracy.py MODEL [--max-tokens 4096] [--seq-len 512] [--stride 256]
        [--json bench-out/lm-head-accuracy.json]

On the held-out text of ``bitconvert ppl`` (its first ``--max-tokens`` tokens), both lm_heads see the same final
hidden states (one model, lm_head swapped), so the figures isolate the lm_head: the logits' error (max and RMS,
relative to the logits' standard deviation), how often the top-1 token agrees, and the perplexity of each. Also the
lm_head's bytes per token and, with tied embeddings, the memory the int8 copy adds. MODEL: a converted folder, or
any full-precision source ``bitconvert ppl`` takes (e.g. ``smollm2-135m``: the lm_head of a trained model).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from bitconvert.data import heldout_text
from bitconvert.kernels.lm_head import Int8LmHead
from bitconvert.load import load_for_inference
from bitconvert.ppl import perplexity


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="a converted folder or a full-precision source")
    parser.add_argument("--max-tokens", type=int, default=4096)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--stride", type=int, default=256)
    parser.add_argument("--json", type=Path, default=Path("bench-out/lm-head-accuracy.json"))
    args = parser.parse_args()
    model, tokenizer = load_for_inference(args.model, dtype=torch.float32)
    ids = tokenizer(heldout_text(), return_tensors="pt", add_special_tokens=False).input_ids[0][: args.max_tokens]
    exact = model.lm_head
    int8 = Int8LmHead(exact.weight)
    with torch.no_grad():
        hidden = model.model(ids[None, : args.seq_len]).last_hidden_state[0]
        want, got = exact(hidden).float(), int8(hidden)
    error = got - want
    scale = want.std().item()
    result = {
        "model": args.model,
        "logits_std": scale,
        "max_abs_error_over_std": error.abs().max().item() / scale,
        "rms_error_over_std": error.pow(2).mean().sqrt().item() / scale,
        "top1_agreement": (got.argmax(-1) == want.argmax(-1)).float().mean().item(),
        "lm_head_bytes_exact": exact.weight.numel() * exact.weight.element_size(),
        "lm_head_bytes_int8": int8.weight_q.numel() + 4 * int8.row_scale.numel(),
        "tied": bool(model.config.tie_word_embeddings),
    }
    for name, head in (("exact", exact), ("int8", int8)):
        model.lm_head = head
        ppl = perplexity(model, ids, seq_len=args.seq_len, stride=args.stride, progress=False)
        result[f"perplexity_{name}"] = ppl.perplexity
        result["tokens"] = ppl.tokens
    model.lm_head = exact
    result["extra_bytes_if_tied"] = result["lm_head_bytes_int8"] if result["tied"] else 0
    for key, value in result.items():
        print(f"  {key:<28} {value:.6g}" if isinstance(value, float) else f"  {key:<28} {value}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
