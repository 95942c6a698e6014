"""Calibration tokens: the first ``tokens`` tokens of ``--calib-data`` (read as ``finetune --data`` reads its data),
packed into sequences of ``seq_len`` tokens, EOS between documents. Default data: the LAMBADA training passages (the
held-out passages that ``bitconvert ppl`` scores are never used)."""

from __future__ import annotations

import itertools

import torch

from ..errors import BitconvertError


def calibration_tokens(data: str | None, tokenizer, tokens: int, seq_len: int, text_field: str = "text") -> torch.Tensor:
    """int64 (ceil(tokens / seq_len), seq_len), fewer rows when the data runs out; an error below one sequence."""
    if tokens <= 0:
        raise BitconvertError(f"--calib-tokens must be positive, got {tokens}")
    if tokenizer is None:
        raise BitconvertError("calibration needs the source's tokenizer, and it has none; copy its tokenizer files in")
    from ..finetune.data import iter_documents, pack  # imported here: the finetune package pulls in its trainer

    count = -(-tokens // seq_len)
    try:
        sequences = list(itertools.islice(pack(iter_documents(data, text_field), tokenizer, seq_len), count))
    except BitconvertError as error:
        raise BitconvertError(str(error).replace("--data", "--calib-data")) from None
    if not sequences:
        raise BitconvertError(
            f"--calib-data {data or 'LAMBADA'} holds fewer than {seq_len} tokens (one calibration sequence); "
            "give more text"
        )
    return torch.stack(sequences)
