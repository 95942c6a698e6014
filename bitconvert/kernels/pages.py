"""Transparent huge pages for the tensors a decoded token streams from memory: the weights and the KV cache.

One decoded token reads every repacked ternary weight and the quantized lm_head once, in order. On 4 KiB pages each
page is a TLB miss and the hardware prefetchers stop at every page boundary; on 2 MiB pages neither happens 512
times as often. Linux backs an anonymous private mapping with huge pages when it is advised ``MADV_HUGEPAGE`` and
``/sys/kernel/mm/transparent_hugepage/enabled`` is ``always`` or ``madvise`` (the common default, under which torch's
own allocations stay on 4 KiB pages). Measured on a 2-core AMD EPYC (Zen 4) VM, 2 threads, the 4-layer
Llama-2-7B-shaped model (docs/kernels.md, "Huge pages"): a token 1-7% faster in paired runs (median 3%), its 201 MB
int8 lm_head 12% faster.

``BITCONVERT_HUGE_PAGES=0`` keeps ordinary allocations; elsewhere than Linux, or for tensors under 2 MiB, nothing
changes either.
"""

from __future__ import annotations

import ctypes
import math
import mmap
import os
import sys

import torch

HUGE_PAGE_BYTES = 2 << 20
ENV_VARIABLE = "BITCONVERT_HUGE_PAGES"


def huge_pages_requested() -> bool:
    """Whether this platform can advise huge pages and ``BITCONVERT_HUGE_PAGES`` does not say ``0``."""
    return (sys.platform.startswith("linux") and hasattr(mmap, "MADV_HUGEPAGE")
            and os.environ.get(ENV_VARIABLE) != "0")


def huge_page_empty(numel: int, dtype: torch.dtype) -> torch.Tensor | None:
    """A 1-D tensor of ``numel`` zeros of ``dtype`` starting on a 2 MiB boundary of an anonymous private mapping
    advised ``MADV_HUGEPAGE`` (the tensor keeps the mapping alive); None where :func:`huge_pages_requested` is
    False or the tensor would be under 2 MiB."""
    nbytes = numel * dtype.itemsize
    if nbytes < HUGE_PAGE_BYTES or not huge_pages_requested():
        return None
    mapping = mmap.mmap(-1, nbytes + HUGE_PAGE_BYTES, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    offset = -ctypes.addressof(ctypes.c_char.from_buffer(mapping)) % HUGE_PAGE_BYTES
    try:
        mapping.madvise(mmap.MADV_HUGEPAGE, offset, nbytes)
    except OSError:  # a kernel without transparent huge pages: still valid memory, on 4 KiB pages
        pass
    return torch.frombuffer(mapping, dtype=dtype, count=numel, offset=offset)


def on_huge_pages(tensor: torch.Tensor) -> torch.Tensor:
    """A copy of ``tensor`` (same shape, dtype and values, contiguous) in :func:`huge_page_empty` memory, or
    ``tensor`` itself where that gives None."""
    memory = huge_page_empty(tensor.numel(), tensor.dtype)
    if memory is None:
        return tensor
    return memory.view(tensor.shape).copy_(tensor)


def zeros_on_huge_pages(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """``torch.zeros(shape, dtype=dtype)`` in :func:`huge_page_empty` memory where it gives some (a fresh anonymous
    mapping reads as zeros): a KV cache, whose rows every decoded token reads."""
    memory = huge_page_empty(math.prod(shape), dtype)
    return torch.zeros(shape, dtype=dtype) if memory is None else memory.view(shape)


def cat_on_huge_pages(parts: list[torch.Tensor]) -> torch.Tensor:
    """``torch.cat(parts)`` (along dimension 0), written straight into :func:`huge_page_empty` memory where it
    gives some."""
    rows = sum(part.shape[0] for part in parts)
    shape = (rows, *parts[0].shape[1:])
    memory = huge_page_empty(math.prod(shape), parts[0].dtype)
    if memory is None:
        return torch.cat(parts)
    return torch.cat(parts, out=memory.view(shape))
