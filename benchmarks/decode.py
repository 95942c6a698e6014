"""End-to-end greedy decoding speed: ternary models on bitconvert's kernels vs the baselines a user would run.

    python benchmarks/decode.py [--model ternary-smollm2] [--new-tokens 64] [--json bench-out/decode.json] [--skip-7b]

Rows (all greedy, batch 1, same prompt, `generate` with the KV cache, tokens/s of the decoding phase):
- SmolLM2-135M-Instruct in fp32 PyTorch (the source model, loaded from the GGUF, dequantized);
- the converted ternary SmolLM2 in stock transformers (its BitNet `BitLinear`: unpack + matmul on every call);
- the same folder through `bitconvert.load` on the reference torch backend and on the compiled kernels;
- a synthetic model with Llama-2-7B's shapes (random weights): ternary on the kernels (2 bits per weight) against
  the same shapes in torch bf16 (fp32 would need 27 GB, more than this machine has).
Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from bitconvert import bitlinear
from bitconvert.bitlinear import PackedBitLinear, ReferenceBackend
from bitconvert.kernels import KernelBackend
from bitconvert.load import load
from bitconvert.packing import pack_ternary
from bitconvert.quantize import ternary_projections

PROMPT = "The history of the printing press begins"


def decode_tokens_per_s(model, input_ids: torch.Tensor, new_tokens: int) -> float:
    """Tokens/s of the decoding phase: (time of prefill + N tokens) - (time of prefill + 1 token), over N - 1."""
    def timed(count: int) -> float:
        start = time.perf_counter()
        with torch.no_grad():
            model.generate(input_ids, max_new_tokens=count, min_new_tokens=count, do_sample=False)
        return time.perf_counter() - start

    timed(2)  # warm-up: first-call compilation, allocator
    return (new_tokens - 1) / max(timed(new_tokens) - timed(1), 1e-9)


def synthetic_7b(ternary: bool):
    """A LLaMA with Llama-2-7B's shapes and random weights: projections PackedBitLinear with random ternary codes
    (``ternary``), or everything in bf16."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
        projections = list(ternary_projections(model)) if ternary else []
        for name, _, module in projections:
            model.set_submodule(name, PackedBitLinear(module.in_features, module.out_features))
    if not ternary:
        model.to(torch.bfloat16)
    model.to_empty(device="cpu")  # allocates (fp32 7B would need 27 GB: bf16 or 2-bit projections only)
    model.model.rotary_emb = type(model.model.rotary_emb)(config)  # its buffers were on meta
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            parameter.copy_(torch.ones_like(parameter) if "norm" in name else torch.randn_like(parameter) * 0.02)
    for name, _, module in projections:
        packed = model.get_submodule(name)
        codes = torch.randint(-1, 2, (module.out_features, module.in_features), dtype=torch.int8, generator=generator)
        packed.weight = pack_ternary(codes)
        packed.weight_scale = torch.tensor([50.0])
        bitlinear.get_backend().prepare(packed)
    return model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=Path("ternary-smollm2"), help="a converted SmolLM2 folder")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--json", type=Path, default=Path("bench-out/decode.json"))
    parser.add_argument("--skip-7b", action="store_true", help="leave out the synthetic 7B-shape model")
    args = parser.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from bitconvert.sources import load_full_precision, resolve_source

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    rows = []

    def row(name: str, model, tokens: torch.Tensor = ids) -> None:
        speed = decode_tokens_per_s(model, tokens, args.new_tokens)
        rows.append({"model": name, "decode_tokens_per_s": round(speed, 2)})
        print(f"  {name:<48} {speed:8.2f} tok/s", flush=True)

    print(f"greedy decoding, batch 1, {args.new_tokens} new tokens, {torch.get_num_threads()} threads")
    fp32, _ = load_full_precision(resolve_source("smollm2-135m"), dtype=torch.float32)
    row("smollm2-135m fp32 (torch)", fp32)
    del fp32
    row("smollm2-135m ternary, stock transformers BitNet", AutoModelForCausalLM.from_pretrained(args.model))
    bitlinear.set_backend(ReferenceBackend())
    row("smollm2-135m ternary, bitconvert torch reference", load(args.model))
    bitlinear.set_backend(KernelBackend())
    row("smollm2-135m ternary, bitconvert kernels", load(args.model))
    if not args.skip_7b:
        prompt = torch.tensor([[1, 450, 4955, 310]])
        args.new_tokens = min(args.new_tokens, 16)  # the bf16 7B decodes at about a token a second here
        row("llama-2-7b shapes bf16 (random), torch", synthetic_7b(ternary=False), prompt)
        row("llama-2-7b shapes ternary (random), bitconvert kernels", synthetic_7b(ternary=True), prompt)
    base = rows[0]["decode_tokens_per_s"]
    for entry in rows[:4]:
        entry["speedup_vs_fp32"] = round(entry["decode_tokens_per_s"] / base, 2)
    if len(rows) == 6:
        rows[5]["speedup_vs_bf16"] = round(rows[5]["decode_tokens_per_s"] / rows[4]["decode_tokens_per_s"], 2)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"threads": torch.get_num_threads(), "new_tokens": args.new_tokens, "rows": rows},
                                    indent=2))


if __name__ == "__main__":
    main()
