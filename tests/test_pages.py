"""bitconvert.kernels.pages: weights copied onto transparent-huge-page memory keep their values, and the kernels give
the same results from there; the opt-out, small tensors and a refused madvise keep ordinary memory."""

import mmap

import pytest
import torch

from bitconvert import bitlinear, kernels
from bitconvert.bitlinear import BitLinear, PackedBitLinear
from bitconvert.kernels import pages
from bitconvert.kernels.decode import fuse_projections
from bitconvert.kernels.lm_head import Int8LmHead

needs_huge_pages = pytest.mark.skipif(not pages.huge_pages_requested(),
                                      reason="no huge pages to ask for: not Linux, or BITCONVERT_HUGE_PAGES=0")
BIG = 3 * pages.HUGE_PAGE_BYTES // 2  # bytes: over the 2 MiB threshold


def on_huge_page_boundary(tensor: torch.Tensor) -> bool:
    return tensor.data_ptr() % pages.HUGE_PAGE_BYTES == 0


@needs_huge_pages
def test_a_large_tensor_is_copied_onto_a_huge_page_boundary():
    torch.manual_seed(0)
    tensor = torch.randn(BIG // 4 // 512, 512)
    copy = pages.on_huge_pages(tensor)
    assert copy is not tensor and copy.data_ptr() != tensor.data_ptr()
    assert on_huge_page_boundary(copy)
    assert copy.dtype == tensor.dtype and copy.shape == tensor.shape and copy.is_contiguous()
    assert torch.equal(copy, tensor)
    copy[0, 0] = 7.0  # its own writable memory
    assert tensor[0, 0] != 7.0


def test_small_tensors_and_the_opt_out_keep_ordinary_memory(monkeypatch):
    small = torch.ones(pages.HUGE_PAGE_BYTES // 4 - 1)
    assert pages.on_huge_pages(small) is small
    monkeypatch.setenv(pages.ENV_VARIABLE, "0")
    large = torch.ones(BIG)
    assert not pages.huge_pages_requested()
    assert pages.huge_page_empty(BIG, torch.uint8) is None
    assert pages.on_huge_pages(large) is large


@pytest.mark.parametrize("opt_out", [False, True])
def test_cat_on_huge_pages_equals_torch_cat(monkeypatch, opt_out):
    if opt_out:
        monkeypatch.setenv(pages.ENV_VARIABLE, "0")
    torch.manual_seed(1)
    parts = [torch.randint(-9, 9, (1000, 600), dtype=torch.int32), torch.randint(-9, 9, (13, 600), dtype=torch.int32)]
    fused = pages.cat_on_huge_pages(parts)
    assert torch.equal(fused, torch.cat(parts))
    if pages.huge_pages_requested():
        assert on_huge_page_boundary(fused)


@needs_huge_pages
def test_zeros_on_huge_pages_for_a_kv_cache():
    cache = pages.zeros_on_huge_pages((2, 8, 1024, 64), torch.float16)  # exactly 2 MiB
    assert on_huge_page_boundary(cache)
    assert cache.shape == (2, 8, 1024, 64) and cache.dtype == torch.float16
    assert not cache.any()
    cache[1, 7, 1023] = 1.5
    assert cache.sum().item() == 1.5 * 64
    small = pages.zeros_on_huge_pages((3, 5), torch.float32)
    assert torch.equal(small, torch.zeros(3, 5))


@needs_huge_pages
def test_a_refused_madvise_still_gives_valid_memory(monkeypatch):
    monkeypatch.setattr(mmap, "MADV_HUGEPAGE", 12345)  # no such advice: madvise fails with EINVAL
    tensor = torch.arange(BIG, dtype=torch.uint8)
    copy = pages.on_huge_pages(tensor)
    assert copy is not tensor and torch.equal(copy, tensor)


@needs_huge_pages
def test_kernels_compute_the_same_from_huge_pages(monkeypatch):
    """A ternary layer whose repacked weight passes 2 MiB, its fused form, and an int8 lm_head: on huge pages, and
    bit for bit what the same kernels give from ordinary memory."""
    torch.manual_seed(2)
    layer = PackedBitLinear.from_bitlinear(BitLinear(4096, 4096))  # 3.4 MB repacked in base3
    backend = kernels.KernelBackend()
    monkeypatch.setattr(bitlinear, "_backend", backend)
    x = torch.randn(3, 4096)
    got = layer(x)
    assert on_huge_page_boundary(layer.kernel_weight)
    ordinary = layer.kernel_weight.clone()  # torch's own allocation
    assert torch.equal(got, kernels.linear(x, ordinary, 4096, layer.weight_scale, layout=backend.layout))

    fused = fuse_projections([layer], backend.layout)
    assert on_huge_page_boundary(fused.weight)
    assert torch.equal(fused(x), got)

    head = Int8LmHead(torch.randn(4096, 1024) * 0.02)
    assert on_huge_page_boundary(head.weight_q)
    h = torch.randn(1, 1024)
    assert torch.equal(head(h), kernels.int8_linear(h, head.weight_q.clone(), head.scale))
