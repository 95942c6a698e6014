"""Tiny random LLaMA models and a byte-level tokenizer, made on the spot so tests run in seconds and offline."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

VOCAB = 260  # 256 bytes + 4 specials


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer with no merges: every byte is one token."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {token: index for index, token in enumerate(sorted(alphabet))}
    for special in ("<s>", "</s>", "<unk>", "<pad>"):
        vocab[special] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>")


def tiny_config(**overrides) -> LlamaConfig:
    options = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False, bos_token_id=256,
                   eos_token_id=257, pad_token_id=259)
    options.update(overrides)
    return LlamaConfig(**options)


def make_tiny_llama(folder: Path, seed: int = 0, dtype=torch.float32, **overrides) -> Path:
    """Save a random tiny LLaMA (GQA, 2 layers) with its tokenizer to ``folder``; returns ``folder``."""
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_config(**overrides)).to(dtype).eval()
    model.save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    return folder
