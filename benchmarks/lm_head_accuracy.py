"""What the int8, int6 and int4 lm_heads cost in accuracy: logits and perplexity against the exact (stored float)
lm_head.

    PYTHONPATH=. python benchmarks/lm_head_accuracy.py MODEL [--heads int8 int6 int4] [--max-tokens 4096] [--seq-len 512]
        [--stride 256] [--json bench-out/lm-head-accuracy.json]

On the held-out text of ``bitconvert ppl`` (its first ``--max-tokens`` tokens), every lm_head sees the same final
hidden states (one model, lm_head swapped), so the figures isolate the lm_head: the logits' error (max and RMS,
relative to the logits' standard deviation), how often the top-1 token agrees, and the perplexity of each. Also the
lm_head's bytes per token and, with tied embeddings, the memory the quantized copy adds (its bytes). Keys of a
quantized head carry its name (``top1_agreement_int4``, ...). MODEL: a converted folder, or
any full-precision source ``bitconvert ppl`` takes (e.g. ``smollm2-135m``: the lm_head of a trained model).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from bitconvert.data import heldout_text
from bitconvert.kernels.lm_head import HEAD_CLASSES
from bitconvert.load import load_for_inference
from bitconvert.ppl import perplexity


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="a converted folder or a full-precision source")
    parser.add_argument("--max-tokens", type=int, default=4096)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--stride", type=int, default=256)
    parser.add_argument("--json", type=Path, default=Path("bench-out/lm-head-accuracy.json"))
    parser.add_argument("--heads", nargs="+", choices=tuple(HEAD_CLASSES), default=list(HEAD_CLASSES))
    args = parser.parse_args()
    model, tokenizer = load_for_inference(args.model, dtype=torch.float32)
    ids = tokenizer(heldout_text(), return_tensors="pt", add_special_tokens=False).input_ids[0][: args.max_tokens]
    exact = model.lm_head
    heads = {name: HEAD_CLASSES[name](exact.weight) for name in args.heads}
    result = {
        "model": args.model,
        "tied": bool(model.config.tie_word_embeddings),
        "lm_head_bytes_exact": exact.weight.numel() * exact.weight.element_size(),
    }
    with torch.no_grad():
        hidden = model.model(ids[None, : args.seq_len]).last_hidden_state[0]
        want = exact(hidden).float()
    scale = want.std().item()
    result["logits_std"] = scale
    for name, head in heads.items():
        with torch.no_grad():
            error = head(hidden) - want
        result[f"max_abs_error_over_std_{name}"] = error.abs().max().item() / scale
        result[f"rms_error_over_std_{name}"] = error.pow(2).mean().sqrt().item() / scale
        result[f"top1_agreement_{name}"] = (error + want).argmax(-1).eq(want.argmax(-1)).float().mean().item()
        result[f"lm_head_bytes_{name}"] = head.weight_bytes()
    for name, head in {"exact": exact, **heads}.items():
        model.lm_head = head
        ppl = perplexity(model, ids, seq_len=args.seq_len, stride=args.stride, progress=False)
        result[f"perplexity_{name}"] = ppl.perplexity
        result["tokens"] = ppl.tokens
    model.lm_head = exact
    for key, value in result.items():
        print(f"  {key:<28} {value:.6g}" if isinstance(value, float) else f"  {key:<28} {value}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
