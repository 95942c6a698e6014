"""The compiled ternary kernels against independent references, bit for bit, on every ISA path this CPU has.

References: the exact int32 product ``x_q.int() @ T.int().t()`` (plain torch integer matmul, independent of the
kernels' layout) and the pure-torch :class:`ReferenceBackend` math ``acc.float() / weight_scale / s``.
"""

import pytest
import torch

from bitconvert import bitlinear, kernels
from bitconvert.bitlinear import BitLinear, PackedBitLinear, ReferenceBackend, quantize_activations
from bitconvert.packing import pack_ternary

IN_FEATURES = (1, 3, 67, 576, 1000)
OUT_FEATURES = (1, 5, 13, 576)
BATCHES = (1, 3, 17, 64)
MAX_IN_FEATURES = 1 << 19  # BC_MAX_IN_FEATURES: every int32 partial sum stays exact up to here


def isa_params():
    return [pytest.param(name, id=name) for name in kernels.ISAS]


def require(isa: str) -> int:
    """The index of ``isa``, skipping the test where this CPU cannot run it."""
    if isa not in kernels.supported_isas():
        pytest.skip(f"this CPU lacks the {isa} path")
    return kernels.ISAS.index(isa)


def exact_product(x_q: torch.Tensor, ternary: torch.Tensor) -> torch.Tensor:
    return x_q.int() @ ternary.int().t()


@pytest.fixture(scope="module")
def cases():
    """Random ternary matrices of every shape, with random activations of every batch size, and their references."""
    generator = torch.Generator().manual_seed(0)
    result = []
    for in_features in IN_FEATURES:
        for out_features in OUT_FEATURES:
            ternary = torch.randint(-1, 2, (out_features, in_features), generator=generator, dtype=torch.int8)
            weight = kernels.repack(pack_ternary(ternary), out_features)
            for batch in BATCHES:
                x = torch.randn(batch, in_features, generator=generator) * 4
                x_q, scale = quantize_activations(x)
                result.append((x, x_q, scale, ternary, weight, exact_product(x_q, ternary)))
    return result


def test_repacked_size():
    for out_features, in_features in [(1, 1), (13, 67), (576, 576), (4096, 1000)]:
        packed = pack_ternary(torch.zeros(out_features, in_features, dtype=torch.int8))
        expected = -(-out_features // 16) * -(-in_features // 16) * 64
        assert kernels.repack(packed, out_features).numel() == expected


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("isa", isa_params())
def test_matmul_int_exact(cases, isa, threads):
    index = require(isa)
    for _, x_q, _, ternary, weight, expected in cases:
        acc = kernels.matmul_int(x_q, weight, ternary.shape[0], index, threads)
        assert acc.dtype == torch.int32
        assert torch.equal(acc, expected), f"{isa} shape {tuple(ternary.shape)} batch {x_q.shape[0]}"


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("isa", isa_params())
def test_linear_bit_exact(cases, isa, threads):
    index = require(isa)
    weight_scale = torch.tensor([1 / 0.0371])
    for x, _, scale, ternary, weight, expected in cases:
        y = kernels.linear(x, weight, ternary.shape[0], weight_scale, index, threads)
        assert torch.equal(y, expected.float() / weight_scale / scale), f"{isa} {tuple(ternary.shape)} {x.shape[0]}"


@pytest.mark.parametrize("isa", isa_params())
def test_adversarial_values(isa):
    """Saturated weights and activations, including -128 which quantization never produces, up to the longest row."""
    index = require(isa)
    for in_features in (67, 1000, MAX_IN_FEATURES):
        activations = [
            torch.full((3, in_features), -128, dtype=torch.int8),
            torch.full((3, in_features), 127, dtype=torch.int8),
            torch.tensor([-128, 127], dtype=torch.int8).repeat(3, in_features)[:, :in_features],
        ]
        for value in (-1, 0, 1):
            ternary = torch.full((13, in_features), value, dtype=torch.int8)
            weight = kernels.repack(pack_ternary(ternary), 13)
            for x_q in activations:
                for threads in (1, 2):
                    acc = kernels.matmul_int(x_q, weight, 13, index, threads)
                    assert torch.equal(acc, exact_product(x_q, ternary)), f"{isa} w={value} in={in_features}"


@pytest.mark.parametrize("isa", isa_params())
def test_rounding_ties_and_tiny_rows(isa):
    """Half-integer products (round half to even), all-zero rows (scale clamp at 1e-5) and huge/tiny magnitudes."""
    index = require(isa)
    generator = torch.Generator().manual_seed(1)
    ternary = torch.randint(-1, 2, (13, 67), generator=generator, dtype=torch.int8)
    weight = kernels.repack(pack_ternary(ternary), 13)
    halves = torch.randint(-254, 255, (4, 67), generator=generator).float() / 2
    halves[:, 0] = 127.0  # scale ~1, so x * s lands on .5 ties
    x = torch.cat([halves, torch.zeros(1, 67), torch.full((1, 67), 3e-6), torch.randn(2, 67) * 1e30])
    x_q, scale = quantize_activations(x)
    weight_scale = torch.tensor([2.5])
    y = kernels.linear(x, weight, 13, weight_scale, index, 1)
    assert torch.equal(y, exact_product(x_q, ternary).float() / weight_scale / scale)


def test_rejects_rows_longer_than_exact_int32_allows():
    weight = kernels.repack(pack_ternary(torch.ones(1, MAX_IN_FEATURES + 1, dtype=torch.int8)), 1)
    with pytest.raises(RuntimeError, match="in_features exceeds"):
        kernels.matmul_int(torch.ones(1, MAX_IN_FEATURES + 1, dtype=torch.int8), weight, 1)


def test_empty_batch():
    weight = kernels.repack(pack_ternary(torch.ones(5, 7, dtype=torch.int8)), 5)
    assert kernels.linear(torch.zeros(0, 7), weight, 5, torch.ones(1)).shape == (0, 5)


@pytest.mark.parametrize("isa", isa_params())
def test_packed_bitlinear_matches_reference_backend(isa, monkeypatch):
    require(isa)
    torch.manual_seed(2)
    layer = BitLinear(576, 1000, bias=True)
    packed = PackedBitLinear.from_bitlinear(layer)
    x = torch.randn(2, 9, 576)
    monkeypatch.setenv("BITCONVERT_ISA", isa)
    backend = kernels.KernelBackend()
    assert backend.name == f"kernels-{isa}"
    monkeypatch.setattr(bitlinear, "_backend", backend)
    got = packed(x)
    got_bf16 = packed(x.bfloat16())
    monkeypatch.setattr(bitlinear, "_backend", ReferenceBackend())
    assert torch.equal(got, packed(x))
    assert torch.equal(got_bf16, packed(x.bfloat16()))


def test_backend_reprepares_changed_weights(monkeypatch):
    torch.manual_seed(3)
    packed = PackedBitLinear.from_bitlinear(BitLinear(64, 32))
    other = PackedBitLinear.from_bitlinear(BitLinear(64, 32))
    backend = kernels.KernelBackend()
    x = torch.randn(4, 64)
    backend.linear(x, packed)
    packed.weight.copy_(other.weight)  # in place
    assert torch.equal(backend.linear(x, packed), ReferenceBackend().linear(x, packed))
    packed.weight = PackedBitLinear.from_bitlinear(BitLinear(64, 32)).weight  # replaced
    assert torch.equal(backend.linear(x, packed), ReferenceBackend().linear(x, packed))
    assert "kernel_weight" not in packed.state_dict()


def test_isa_environment_variable(monkeypatch):
    monkeypatch.setenv("BITCONVERT_ISA", "scalar")
    assert kernels.KernelBackend().isa == 0
    monkeypatch.setenv("BITCONVERT_ISA", "sse9")
    with pytest.raises(RuntimeError, match="unknown ISA"):
        kernels.KernelBackend()
    monkeypatch.delenv("BITCONVERT_ISA")
    assert kernels.ISAS[kernels.isa_index()] == kernels.supported_isas()[-1]


def test_default_backend_selection(monkeypatch):
    monkeypatch.setattr(bitlinear, "_backend", None)
    monkeypatch.setenv("BITCONVERT_BACKEND", "torch")
    assert isinstance(bitlinear.get_backend(), ReferenceBackend)
    monkeypatch.setattr(bitlinear, "_backend", None)
    monkeypatch.delenv("BITCONVERT_BACKEND")
    assert isinstance(bitlinear.get_backend(), kernels.KernelBackend)


def test_failed_build_falls_back_with_warning(monkeypatch):
    def broken():
        raise RuntimeError("no compiler")

    monkeypatch.setattr(kernels, "load_library", broken)
    with pytest.warns(RuntimeWarning, match="no compiler"):
        assert isinstance(kernels.default_backend(), ReferenceBackend)
