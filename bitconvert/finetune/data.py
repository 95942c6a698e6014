"""Training text: local text / JSONL / Parquet files, a ``datasets`` hub name, or the offline LAMBADA passages;
streamed, tokenized and packed into fixed-length sequences.

Packing: documents are tokenized one at a time, joined with the EOS token between them, and cut into consecutive
blocks of ``seq_len`` tokens (the tail shorter than ``seq_len`` is dropped). Nothing is ever loaded whole: files are
read line by line (Parquet batch by batch, hub datasets with ``streaming=True``).

The order is fixed (no shuffling), so the ``i``-th sequence of a run is always the same one: that is what lets
``--resume`` skip exactly the sequences already trained on and continue with the same loss sequence.
A held-out slice for evaluation: with the default corpus the held-out LAMBADA passages (never trained on), otherwise
the first ``heldout`` sequences of the stream, which training then skips.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch

from ..errors import BitconvertError, reason

TEXT_SUFFIXES = (".txt", ".md", ".text")
JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
PARQUET_SUFFIXES = (".parquet",)
# Lines of a plain-text file grouped into one "document" for tokenization (keeps tokenizer calls few and large).
TEXT_LINES_PER_CHUNK = 256


def _data_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    known = TEXT_SUFFIXES + JSONL_SUFFIXES + PARQUET_SUFFIXES
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in known)
    if not files:
        raise BitconvertError(f"--data folder '{path}' holds no {', '.join(known)} files")
    return files


def _text_documents(path: Path) -> Iterator[str]:
    with path.open(encoding="utf-8") as handle:
        try:
            while chunk := "".join(itertools.islice(handle, TEXT_LINES_PER_CHUNK)):
                yield chunk
        except UnicodeDecodeError:
            raise BitconvertError(f"--data file '{path}' is not UTF-8 text") from None


def _jsonl_documents(path: Path, field: str) -> Iterator[str]:
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                raise BitconvertError(f"--data file '{path}' line {number} is not JSON") from None
            if not isinstance(record, dict) or field not in record:
                raise BitconvertError(
                    f"--data file '{path}' line {number} has no '{field}' field; name the text field with --text-field"
                )
            yield str(record[field])


def _parquet_documents(path: Path, field: str) -> Iterator[str]:
    import pyarrow.parquet as pq

    parquet = pq.ParquetFile(path)
    if field not in parquet.schema_arrow.names:
        raise BitconvertError(
            f"--data file '{path}' has no '{field}' column (columns: {', '.join(parquet.schema_arrow.names)}); "
            f"name the text column with --text-field"
        )
    for batch in parquet.iter_batches(columns=[field]):
        yield from (str(text) for text in batch.column(0).to_pylist() if text is not None)


def _hub_documents(name: str, field: str) -> Iterator[str]:
    import datasets

    dataset_name, _, config = name.partition(":")
    try:
        stream = datasets.load_dataset(dataset_name, config or None, split="train", streaming=True)
    except Exception as exc:  # offline, missing, gated: one line
        raise BitconvertError(f"cannot stream dataset '{name}' from the hub ({reason(exc)}); pass local files instead") from None
    for record in stream:
        if field not in record:
            raise BitconvertError(f"dataset '{name}' has no '{field}' field; name the text field with --text-field")
        yield str(record[field])


def iter_documents(data: str | None, text_field: str = "text") -> Iterator[str]:
    """The documents of ``data`` (path, folder, ``datasets`` name ``owner/name[:config]``, or None = LAMBADA train)."""
    if data is None:
        from ..data import lambada_split

        yield from lambada_split()[0]
        return
    path = Path(data).expanduser()
    if not path.exists():
        if "/" in data and not data.startswith((".", "/", "~")):
            yield from _hub_documents(data, text_field)
            return
        raise BitconvertError(f"--data '{data}' does not exist (give text/JSONL/Parquet files, a folder, or a datasets name)")
    for file in _data_files(path):
        if file.suffix in PARQUET_SUFFIXES:
            yield from _parquet_documents(file, text_field)
        elif file.suffix in JSONL_SUFFIXES:
            yield from _jsonl_documents(file, text_field)
        else:
            yield from _text_documents(file)


def pack(documents: Iterable[str], tokenizer, seq_len: int) -> Iterator[torch.Tensor]:
    """Tokenize ``documents`` and yield int64 blocks of shape ``(seq_len,)``, EOS between documents."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    buffer: list[int] = []
    for document in documents:
        buffer.extend(tokenizer(document, add_special_tokens=False).input_ids)
        buffer.extend(eos)
        while len(buffer) >= seq_len:
            yield torch.tensor(buffer[:seq_len], dtype=torch.long)
            del buffer[:seq_len]


class PackedCorpus:
    """The training and held-out sequences of one ``--data`` choice.

    ``train(skip, rank, world)`` restarts the stream at epoch 0 each call and loops over epochs forever; it yields the
    global sequences ``skip, skip+1, ...`` that belong to ``rank`` (index ``% world == rank``).
    """

    def __init__(self, data: str | None, tokenizer, seq_len: int, text_field: str = "text", heldout: int = 16):
        self.data, self.tokenizer, self.seq_len, self.text_field = data, tokenizer, seq_len, text_field
        self.skip_heldout = 0 if data is None else heldout
        self.heldout = self._heldout(heldout)
        first = next(self._stream(), None)
        if first is None:
            raise BitconvertError(
                f"--data {data or 'LAMBADA'} gives fewer than {self.seq_len} training tokens after the held-out slice "
                f"of {self.skip_heldout} sequences; give more text or a smaller --seq-len"
            )

    def _heldout(self, count: int) -> list[torch.Tensor]:
        if self.data is None:
            from ..data import lambada_split

            return list(itertools.islice(pack(lambada_split()[1], self.tokenizer, self.seq_len), count))
        return list(itertools.islice(pack(iter_documents(self.data, self.text_field), self.tokenizer, self.seq_len), count))

    def _stream(self) -> Iterator[torch.Tensor]:
        packed = pack(iter_documents(self.data, self.text_field), self.tokenizer, self.seq_len)
        return itertools.islice(packed, self.skip_heldout, None)

    def train(self, skip: int = 0, rank: int = 0, world: int = 1) -> Iterator[torch.Tensor]:
        index = 0
        while True:
            for sequence in self._stream():
                if index >= skip and index % world == rank:
                    yield sequence
                index += 1


def batches(sequences: Iterator[torch.Tensor], batch_size: int) -> Iterator[torch.Tensor]:
    """Stack consecutive sequences into ``(batch_size, seq_len)`` batches."""
    while True:
        yield torch.stack([next(sequences) for _ in range(batch_size)])
