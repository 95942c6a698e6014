"""Tensor readers for conversion: stream a safetensors checkpoint one tensor at a time, or walk a loaded model.

Both expose ``names()`` (in storage order) and ``get(name)``. The safetensors reader opens the file
for each tensor and closes it afterwards, so the pages a read touched are unmapped again: resident memory stays at
about one tensor, not the whole file.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from ..checkpoint import untied_state_dict
from ..errors import BitconvertError

def _header(path: Path) -> dict:
    """The safetensors JSON header of ``path`` (8-byte little-endian length, then JSON), checked against the file size."""
    size = path.stat().st_size
    with path.open("rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise ValueError("file shorter than its 8-byte header length")
        length = int.from_bytes(prefix, "little")
        if length > size - 8:
            raise ValueError("header length runs past the end of the file")
        header = json.loads(handle.read(length))
    header.pop("__metadata__", None)
    end = max((info["data_offsets"][1] for info in header.values()), default=0)
    if 8 + length + end > size:
        raise ValueError(f"data ends at byte {8 + length + end} but the file has {size} bytes")
    return header


class SafetensorsReader:
    """Streams the tensors of a (single or sharded) safetensors checkpoint in ``folder``."""

    def __init__(self, folder: Path):
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            files = sorted({folder / name for name in json.loads(index.read_text())["weight_map"].values()})
        else:
            files = sorted(folder.glob("*.safetensors"))
        self.location: dict[str, Path] = {}
        for path in files:
            if not path.is_file():
                raise BitconvertError(f"shard '{path.name}' listed in the index is missing from {folder}; re-download the model")
            try:
                header = _header(path)
            except (ValueError, json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise BitconvertError(f"'{path}' is truncated or corrupt ({exc}); re-download it") from None
            for name in header:
                self.location[name] = path

    def names(self) -> list[str]:
        return list(self.location)

    def get(self, name: str) -> torch.Tensor:
        try:
            with safe_open(str(self.location[name]), framework="pt") as handle:
                return handle.get_tensor(name)
        except Exception as exc:
            raise BitconvertError(f"cannot read tensor '{name}' from '{self.location[name]}' ({exc}); re-download it") from None


class StateDictReader:
    """Walks the state dict of a model already in memory (GGUF sources, pickled checkpoints); skips tied copies."""

    def __init__(self, model):
        self.state = untied_state_dict(model)

    def names(self) -> list[str]:
        return list(self.state)

    def get(self, name: str) -> torch.Tensor:
        return self.state[name]
