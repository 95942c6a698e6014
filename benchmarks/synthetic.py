"""Random full-precision LLaMA checkpoints with named real shapes, for speed and memory benchmarks.

    python benchmarks/synthetic.py llama-192m --out /tmp/models/llama-192m-fp16 [--tokenizer-from ternary-smollm2]
    bitconvert /tmp/models/llama-192m-fp16 --out /tmp/models/llama-192m-ternary

The checkpoint is a plain HF folder (config.json, fp16 safetensors shards with an index), written one shard at a
time so that even the 32-layer 7B shape (12.9 GB) never needs more than one shard in memory. Weights are
N(0, 0.02), norm gains 1: random, but the same bytes for every engine that reads them (bitconvert converts the folder,
llama.cpp's own converter reads it), which is what a same-model speed comparison needs. With --tokenizer-from, the
tokenizer files of an existing folder are copied in (SmolLM2's 49,152-token tokenizer fits every preset's vocab).

Presets (vocab 49,152, SmolLM2's tokenizer):
- llama-192m: hidden 1024, 12 layers, 16 heads / 4 KV heads, MLP 3072, tied embeddings (195.0M parameters);
- llama-7b-4l: 4 decoder layers of Llama-2-7B's shape (hidden 4096, 32 heads, MLP 11008), untied lm_head;
- llama-7b: all 32 layers of Llama-2-7B's shape, untied lm_head.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

LLAMA2_7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=32, max_position_embeddings=4096, rms_norm_eps=1e-5)
PRESETS = {
    "llama-192m": dict(vocab_size=49152, hidden_size=1024, intermediate_size=3072, num_hidden_layers=12,
                       num_attention_heads=16, num_key_value_heads=4, max_position_embeddings=2048,
                       rms_norm_eps=1e-5, tie_word_embeddings=True),
    "llama-7b-4l": dict(LLAMA2_7B, vocab_size=49152, num_hidden_layers=4, tie_word_embeddings=False),
    "llama-7b": dict(LLAMA2_7B, vocab_size=49152, tie_word_embeddings=False),
}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "chat_template.jinja", "generation_config.json")
SHARD_BYTES = 2 * 1024**3


def layer_shapes(layer: int, config: dict) -> dict[str, tuple[int, ...]]:
    """Shapes of decoder layer ``layer``'s tensors, by HF name: projections are (out_features, in_features)."""
    hidden, intermediate = config["hidden_size"], config["intermediate_size"]
    kv = hidden // config["num_attention_heads"] * config["num_key_value_heads"]
    prefix = f"model.layers.{layer}."
    return {
        prefix + "self_attn.q_proj.weight": (hidden, hidden),
        prefix + "self_attn.k_proj.weight": (kv, hidden),
        prefix + "self_attn.v_proj.weight": (kv, hidden),
        prefix + "self_attn.o_proj.weight": (hidden, hidden),
        prefix + "mlp.gate_proj.weight": (intermediate, hidden),
        prefix + "mlp.up_proj.weight": (intermediate, hidden),
        prefix + "mlp.down_proj.weight": (hidden, intermediate),
        prefix + "input_layernorm.weight": (hidden,),
        prefix + "post_attention_layernorm.weight": (hidden,),
    }


def checkpoint_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """Every tensor of the checkpoint in file order: embeddings, the layers, final norm, lm_head unless tied."""
    shapes = {"model.embed_tokens.weight": (config["vocab_size"], config["hidden_size"])}
    for layer in range(config["num_hidden_layers"]):
        shapes.update(layer_shapes(layer, config))
    shapes["model.norm.weight"] = (config["hidden_size"],)
    if not config.get("tie_word_embeddings", False):
        shapes["lm_head.weight"] = (config["vocab_size"], config["hidden_size"])
    return shapes


def make_checkpoint(folder: Path, config: dict, tokenizer_from: Path | None = None, seed: int = 0,
                    shard_bytes: int = SHARD_BYTES) -> int:
    """Write a random fp16 LLaMA of ``config``'s shapes to ``folder``; returns the size of its weights in bytes.

    Tensors are grouped into shards of at most ``shard_bytes`` (a tensor larger than that gets a shard of its own);
    norm gains are 1, every other tensor N(0, 0.02) from a generator seeded with ``seed``."""
    from transformers import LlamaConfig

    folder.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    groups: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    group_bytes = 0
    for name, shape in checkpoint_shapes(config).items():
        size = 2 * torch.Size(shape).numel()
        if groups[-1] and group_bytes + size > shard_bytes:
            groups.append([])
            group_bytes = 0
        groups[-1].append((name, shape))
        group_bytes += size
    weight_map, total = {}, 0
    for index, group in enumerate(groups):
        shard = f"model-{index + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {}
        for name, shape in group:
            if name.endswith("norm.weight"):
                tensors[name] = torch.ones(shape, dtype=torch.float16)
            else:
                tensors[name] = torch.empty(shape, dtype=torch.float16).normal_(0, 0.02, generator=generator)
            weight_map[name] = shard
            total += tensors[name].numel() * 2
        save_file(tensors, str(folder / shard), metadata={"format": "pt"})
        del tensors
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    LlamaConfig(**config, dtype="float16", architectures=["LlamaForCausalLM"]).save_pretrained(folder)
    if tokenizer_from is not None:
        for name in TOKENIZER_FILES:
            if (tokenizer_from / name).is_file():
                shutil.copy2(tokenizer_from / name, folder / name)
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("preset", choices=sorted(PRESETS))
    parser.add_argument("--out", type=Path, required=True, help="folder to write (must not exist)")
    parser.add_argument("--tokenizer-from", type=Path, help="copy this folder's tokenizer files in")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.out.exists():
        parser.error(f"{args.out} exists; remove it or pick another --out")
    staging = args.out.with_name(f".{args.out.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    total = make_checkpoint(staging, PRESETS[args.preset], args.tokenizer_from, args.seed)
    staging.rename(args.out)
    print(f"{args.preset}: {total / 1e9:.2f} GB of fp16 weights in {args.out}")


if __name__ == "__main__":
    main()
