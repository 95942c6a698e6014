"""The tokenizer of a converted folder as GGUF metadata, so that llama.cpp tokenizes exactly like the folder's HF one.

llama.cpp's byte-level BPE (``tokenizer.ggml.model = gpt2``) needs the token strings in id order, a type per token
(NORMAL, CONTROL for special added tokens, USER_DEFINED for other added tokens, UNUSED for ids the tokenizer lacks),
the merges, the special token ids, whether BOS/EOS are added, the chat template, and the name of the pre-tokenizer
(``tokenizer.ggml.pre``), which selects llama.cpp's built-in splitting regexes. gguf-py's ``SpecialVocab`` reads the
merges, special ids and chat template from the folder; the tokens and types come from the HF tokenizer itself; the
pre-tokenizer name from the structure of ``tokenizer.json``'s ``pre_tokenizer`` (only the layouts whose llama.cpp
equivalent is known are accepted; the others are refused rather than tokenized differently).
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf

from ..errors import BitconvertError, reason

BYTE_LEVEL = {"type": "ByteLevel", "use_regex": True}


def _matches(node: dict, expected: dict) -> bool:
    return all(node.get(key) == value for key, value in expected.items())


def pre_tokenizer_name(pre: dict | None) -> str | None:
    """llama.cpp's name for a ``tokenizer.json`` pre-tokenizer, or None when it has no known equivalent.

    ByteLevel with GPT-2's regex alone -> ``gpt-2``; individual digits, then that -> ``smollm``
    (llama.cpp ``llama-vocab.cpp``: ``\\p{N}`` split first, then the GPT-2 regex).
    """
    if pre is None:
        return None
    if _matches(pre, BYTE_LEVEL):
        return "gpt-2"
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else []
    if (len(steps) == 2 and _matches(steps[0], {"type": "Digits", "individual_digits": True})
            and _matches(steps[1], BYTE_LEVEL)):
        return "smollm"
    return None


def _token_types(tokenizer, vocab_size: int) -> tuple[list[str], list[int]]:
    """Token strings in id order and their GGUF types; ids past the tokenizer's vocabulary become ``[PAD<id>]``."""
    by_id = {index: token for token, index in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for index in range(vocab_size):
        if index not in by_id:
            tokens.append(f"[PAD{index}]")
            types.append(gguf.TokenType.UNUSED)
        elif index in added:
            tokens.append(by_id[index])
            types.append(gguf.TokenType.CONTROL if added[index].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[index])
            types.append(gguf.TokenType.NORMAL)
    return tokens, types


def _adds_special(tokenizer) -> tuple[bool, bool]:
    """Whether the HF tokenizer puts BOS in front / EOS at the end when asked for special tokens."""
    plain = tokenizer("a", add_special_tokens=False).input_ids
    full = tokenizer("a", add_special_tokens=True).input_ids
    start = full.index(plain[0]) if plain and plain[0] in full else 0
    adds_bos = tokenizer.bos_token_id is not None and start > 0 and full[0] == tokenizer.bos_token_id
    adds_eos = tokenizer.eos_token_id is not None and len(full) > start + len(plain) and full[-1] == tokenizer.eos_token_id
    return adds_bos, adds_eos


def add_tokenizer(writer: gguf.GGUFWriter, folder: Path, vocab_size: int) -> str:
    """Write ``folder``'s tokenizer into ``writer`` for ``vocab_size`` embedding rows; returns the pre-tokenizer name."""
    from transformers import AutoTokenizer

    spec = folder / "tokenizer.json"
    if not spec.is_file():
        raise BitconvertError(f"'{folder}' has no tokenizer.json; GGUF export needs the HF fast tokenizer file")
    document = json.loads(spec.read_text(encoding="utf-8"))
    model = document.get("model", {})
    if model.get("type") != "BPE" or model.get("byte_fallback") or (document.get("decoder") or {}).get("type") != "ByteLevel":
        raise BitconvertError(f"'{spec}' is not a byte-level BPE tokenizer; GGUF export supports byte-level BPE only")
    pre = pre_tokenizer_name(document.get("pre_tokenizer"))
    if pre is None or document.get("normalizer") is not None:
        raise BitconvertError(f"the pre-tokenizer/normalizer of '{spec}' has no known llama.cpp equivalent "
                              f"({json.dumps(document.get('pre_tokenizer'))[:120]}); GGUF export would tokenize differently")
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except Exception as exc:
        raise BitconvertError(f"cannot load the tokenizer of '{folder}': {reason(exc)}") from None
    if len(tokenizer) > vocab_size:
        raise BitconvertError(f"the tokenizer has {len(tokenizer)} tokens but the embeddings only {vocab_size} rows")
    tokens, types = _token_types(tokenizer, vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(folder, load_merges=True, n_vocab=vocab_size)
    adds_bos, adds_eos = _adds_special(tokenizer)
    special.add_special_token.update(bos=adds_bos, eos=adds_eos)
    if not special.merges:  # llama.cpp requires the merges key, and gguf-py cannot write an empty array
        raise BitconvertError(f"'{spec}' has no BPE merges; llama.cpp cannot load a BPE vocabulary without them")
    special.add_to_gguf(writer, quiet=True)
    return pre
