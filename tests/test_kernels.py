"""The compiled ternary kernels against independent references, bit for bit, on every ISA path this CPU has, in
every weight layout the path computes on.

References: the exact int32 product ``x_q.int() @ T.int().t()`` (plain torch integer matmul, independent of the
kernels' layout) and the pure-torch :class:`ReferenceBackend` math ``acc.float() / weight_scale / s``.
"""

from typing import Callable, NamedTuple

import pytest
import torch
import torch.nn.functional as F

from bitconvert import bitlinear, kernels
from bitconvert.bitlinear import BitLinear, PackedBitLinear, ReferenceBackend, quantize_activations
from bitconvert.packing import pack_ternary

IN_FEATURES = (1, 3, 67, 576, 1000)
OUT_FEATURES = (1, 5, 13, 200, 576)  # 200: 13 tiles, one full 128-row lut group and a partial one
BATCHES = (1, 3, 6, 17, 22, 64)  # one tile call of 1, 3, 6 tokens; several calls per tile (8 + 1, 8 + 6, 8 x 8)
MAX_IN_FEATURES = 1 << 19  # BC_MAX_IN_FEATURES: every int32 partial sum stays exact up to here


def isa_params():
    return [pytest.param(name, id=name) for name in kernels.ISAS]


def require(isa: str) -> int:
    """The index of ``isa``, skipping the test where this CPU cannot run it."""
    if isa not in kernels.supported_isas():
        pytest.skip(f"this CPU lacks the {isa} path")
    return kernels.ISAS.index(isa)


def path_params():
    """(isa, layout): every layout with every path that computes on it (kernels.LAYOUT_ISAS)."""
    return [pytest.param(isa, layout, id=f"{isa}-{layout}")
            for layout in kernels.LAYOUTS for isa in kernels.LAYOUT_ISAS[layout]]


def require_path(isa: str, layout: str) -> tuple[int, int]:
    """The indices of ``isa`` and ``layout``, skipping the test where this CPU cannot run that pair."""
    index, layout_index = require(isa), kernels.LAYOUTS.index(layout)
    if not kernels.layout_supported(layout_index, index):
        pytest.skip(f"this CPU's {isa} path lacks the {layout} layout")
    return index, layout_index


def repacked(ternary: torch.Tensor) -> dict[str, torch.Tensor]:
    """``ternary`` (out, in) int8 repacked in every layout, by layout name."""
    packed = pack_ternary(ternary)
    return {name: kernels.repack(packed, ternary.shape[0], index) for index, name in enumerate(kernels.LAYOUTS)}


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
            weights = repacked(ternary)
            for batch in BATCHES:
                x = torch.randn(batch, in_features, generator=generator) * 4
                x_q, scale = quantize_activations(x)
                result.append((x, x_q, scale, ternary, weights, exact_product(x_q, ternary)))
    return result


def test_repacked_size():
    for out_features, in_features in [(1, 1), (13, 67), (576, 576), (4096, 1000)]:
        weights = repacked(torch.zeros(out_features, in_features, dtype=torch.int8))
        tiles = -(-out_features // 16)
        assert weights["2bit"].numel() == tiles * -(-in_features // 16) * 64  # 16 x 16 weights per 64 bytes
        assert weights["base3"].numel() == tiles * -(-in_features // 24) * 80  # 16 x 24 weights per 80 bytes
        groups = -(-out_features // 128)  # lut: 128-row groups of 8 tiles, 16 x 9 weights per 32 bytes
        assert weights["lut"].numel() == groups * 8 * -(-in_features // 9) * 32
        for layout, name in enumerate(kernels.LAYOUTS):
            assert kernels.repacked_bytes(out_features, in_features, layout) == weights[name].numel()


def test_layout_isas_are_what_the_library_computes_on():
    for isa in kernels.supported_isas():
        index = kernels.ISAS.index(isa)
        for layout, name in enumerate(kernels.LAYOUTS):
            if kernels.layout_supported(layout, index):
                assert isa in kernels.LAYOUT_ISAS[name], (isa, name)
    assert kernels.layout_supported(kernels.LAYOUTS.index("base3"), 0)  # the scalar reference has every layout


def test_layout_defaults_and_environment_variable(monkeypatch):
    base3, best = kernels.LAYOUTS.index("base3"), kernels.isa_index()
    monkeypatch.delenv("BITCONVERT_LAYOUT", raising=False)
    assert kernels.layout_index(0) == 0  # the scalar reference defaults to 2bit
    avx512 = kernels.ISAS.index("avx512")
    assert kernels.layout_index(best) == (base3 if best == avx512 and kernels.layout_supported(base3, best) else 0)
    lut = kernels.LAYOUTS.index("lut")
    for name in ("avx2", "avxvnni"):  # base3 computes there, but more slowly than 2bit: not the default; lut not
        if name in kernels.supported_isas():
            assert kernels.layout_supported(base3, kernels.ISAS.index(name))
            assert kernels.layout_index(kernels.ISAS.index(name)) == 0
            assert not kernels.layout_supported(lut, kernels.ISAS.index(name))
    assert kernels.layout_index(best) != lut  # opt-in only (docs/kernels.md, "The lut layout")
    assert torch.ops.bitconvert.ternary_layout(-1) == kernels.layout_index(best)  # -1: the default path
    monkeypatch.setenv("BITCONVERT_LAYOUT", "base3")
    assert kernels.layout_index(0) == base3
    if "avx2" in kernels.supported_isas():
        assert kernels.layout_index(kernels.ISAS.index("avx2")) == base3  # opted in
    monkeypatch.setenv("BITCONVERT_LAYOUT", "lut")
    assert kernels.layout_index(0) == lut
    if "avx2" in kernels.supported_isas():
        with pytest.raises(RuntimeError, match="does not compute on the layout 'lut'"):
            kernels.layout_index(kernels.ISAS.index("avx2"))
    monkeypatch.setenv("BITCONVERT_LAYOUT", "base7")
    with pytest.raises(RuntimeError, match="unknown weight layout 'base7'"):
        kernels.layout_index(0)
    monkeypatch.setenv("BITCONVERT_LAYOUT", "2bit")
    assert kernels.KernelBackend().layout == 0


@pytest.mark.parametrize("variable, value, message", [("BITCONVERT_LAYOUT", "base7", "unknown weight layout 'base7'"),
                                                      ("BITCONVERT_ISA", "avx9", "unknown ISA path 'avx9'")])
def test_a_bad_environment_choice_is_an_error_not_a_slow_fallback(monkeypatch, variable, value, message):
    from bitconvert.errors import BitconvertError

    monkeypatch.setenv(variable, value)
    with pytest.raises(BitconvertError, match=message) as raised:
        kernels.default_backend()
    assert "\n" not in str(raised.value) and f"{variable}={value}" in str(raised.value)


def test_weight_of_another_layout_is_refused():
    weights = repacked(torch.ones(32, 100, dtype=torch.int8))  # 2 tiles; 2bit: 7 x 64 bytes each, base3: 5 x 80
    with pytest.raises(RuntimeError, match="has 896 bytes, expected 800 for \\(32, 100\\) in the base3 layout"):
        kernels.linear(torch.randn(2, 100), weights["2bit"], 32, torch.ones(1), 0, 1, 1)
    avx512, base3 = kernels.ISAS.index("avx512"), kernels.LAYOUTS.index("base3")
    if "avx512" in kernels.supported_isas() and not kernels.layout_supported(base3, avx512):  # AVX-512 without VBMI
        with pytest.raises(RuntimeError, match="does not compute on this weight layout"):
            kernels.linear(torch.randn(2, 100), weights["base3"], 32, torch.ones(1), avx512, 1, base3)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("isa,layout", path_params())
def test_matmul_int_exact(cases, isa, layout, threads):
    index, layout_index = require_path(isa, layout)
    for _, x_q, _, ternary, weights, expected in cases:
        acc = kernels.matmul_int(x_q, weights[layout], ternary.shape[0], index, threads, layout_index)
        assert acc.dtype == torch.int32
        assert torch.equal(acc, expected), f"{isa} {layout} shape {tuple(ternary.shape)} batch {x_q.shape[0]}"


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("isa,layout", path_params())
def test_linear_bit_exact(cases, isa, layout, threads):
    index, layout_index = require_path(isa, layout)
    weight_scale = torch.tensor([1 / 0.0371])
    for x, _, scale, ternary, weights, expected in cases:
        y = kernels.linear(x, weights[layout], ternary.shape[0], weight_scale, index, threads, layout_index)
        assert torch.equal(y, expected.float() / weight_scale / scale), f"{isa} {tuple(ternary.shape)} {x.shape[0]}"


@pytest.mark.parametrize("isa,layout", path_params())
def test_adversarial_values(isa, layout):
    """Saturated weights and activations, including -128 which quantization never produces, up to the longest row."""
    index, layout_index = require_path(isa, layout)
    for in_features in (67, 1000, MAX_IN_FEATURES):
        activations = [  # 3 tokens take the several-token loops; 1 token lut's int16 one (42 lookups of 768)
            torch.full((1, in_features), -128, dtype=torch.int8),
            torch.full((3, in_features), -128, dtype=torch.int8),
            torch.full((3, in_features), 127, dtype=torch.int8),
            torch.tensor([-128, 127], dtype=torch.int8).repeat(3, in_features)[:, :in_features],
        ]
        for value in (-1, 0, 1):
            ternary = torch.full((13, in_features), value, dtype=torch.int8)
            weight = kernels.repack(pack_ternary(ternary), 13, layout_index)
            for x_q in activations:
                for threads in (1, 2):
                    acc = kernels.matmul_int(x_q, weight, 13, index, threads, layout_index)
                    assert torch.equal(acc, exact_product(x_q, ternary)), f"{isa} w={value} in={in_features}"


@pytest.mark.parametrize("isa,layout", path_params())
def test_rounding_ties_and_tiny_rows(isa, layout):
    """Half-integer products (round half to even), all-zero rows (scale clamp at 1e-5) and huge/tiny magnitudes."""
    index, layout_index = require_path(isa, layout)
    generator = torch.Generator().manual_seed(1)
    ternary = torch.randint(-1, 2, (13, 67), generator=generator, dtype=torch.int8)
    weight = kernels.repack(pack_ternary(ternary), 13, layout_index)
    halves = torch.randint(-254, 255, (4, 67), generator=generator).float() / 2
    halves[:, 0] = 127.0  # scale ~1, so x * s lands on .5 ties
    x = torch.cat([halves, torch.zeros(1, 67), torch.full((1, 67), 3e-6), torch.randn(2, 67) * 1e30])
    x_q, scale = quantize_activations(x)
    weight_scale = torch.tensor([2.5])
    y = kernels.linear(x, weight, 13, weight_scale, index, 1, layout_index)
    assert torch.equal(y, exact_product(x_q, ternary).float() / weight_scale / scale)


@pytest.mark.parametrize("isa,layout", path_params())
def test_quantization_loops_on_vector_tails_and_token_threads(isa, layout):
    """Each path's quantization loop (AVX2: 8 values per step, AVX-512: 16, base3's permutation: 48) on rows that end
    one short of and one past those steps, with ties at .5, on batches large enough to quantize on two threads
    (n * in_features >= 2^15: bc_thread_count's two threads at 16 multiply-adds per activation)."""
    index, layout_index = require_path(isa, layout)
    generator = torch.Generator().manual_seed(2)
    for in_features in (7, 9, 15, 17, 47, 49, 95, 577):
        tokens = max(300, 2**15 // in_features + 4)
        ternary = torch.randint(-1, 2, (21, in_features), generator=generator, dtype=torch.int8)
        weight = kernels.repack(pack_ternary(ternary), 21, layout_index)
        x = torch.randint(-254, 255, (tokens, in_features), generator=generator).float() / 2
        x[::2, -1] = 127.0  # scale 1 on every other token: its halves are ties
        x[1::4] *= torch.rand(len(x[1::4]), in_features, generator=generator) * 1e3
        x_q, scale = quantize_activations(x)
        weight_scale = torch.tensor([0.75])
        for threads in (1, 2):
            y = kernels.linear(x, weight, 21, weight_scale, index, threads, layout_index)
            assert torch.equal(y, exact_product(x_q, ternary).float() / weight_scale / scale), (in_features, threads)


@pytest.mark.parametrize("isa,layout", path_params())
def test_nan_and_inf_activations_quantize_alike_on_every_path(isa, layout):
    """A NaN activation (and inf, whose x * s is inf * 0 = NaN) is code 0 on every path, in the vector body and the
    tail alike, so a token's output does not depend on the CPU (torch's reference gives NaN there)."""
    index, layout_index = require_path(isa, layout)
    generator = torch.Generator().manual_seed(3)
    ternary = torch.randint(-1, 2, (19, 37), generator=generator, dtype=torch.int8)
    weight = kernels.repack(pack_ternary(ternary), 19, layout_index)
    x = torch.randn(4, 37, generator=generator)
    x[0, [0, 16, 36]] = float("nan")  # in the first vector, a later one, and the tail
    x[1, [3, 33]] = float("inf")
    x[2, 20] = float("-inf")
    got = kernels.linear(x, weight, 19, torch.tensor([1.5]), index, 1, layout_index)
    want = kernels.linear(x, weight, 19, torch.tensor([1.5]), 0, 1, layout_index)  # the scalar reference
    torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)  # an infinite row: 0 / s with s = 0
    assert got[[0, 3]].isfinite().all()
    finite = x.clone()
    finite[0, [0, 16, 36]] = 0.0  # the NaN row equals the row with those activations at 0
    assert torch.equal(got[0], kernels.linear(finite[:1], weight, 19, torch.tensor([1.5]), 0, 1, layout_index)[0])


def test_rejects_rows_longer_than_exact_int32_allows():
    for layout, weight in enumerate(repacked(torch.ones(1, MAX_IN_FEATURES + 1, dtype=torch.int8)).values()):
        with pytest.raises(RuntimeError, match="in_features exceeds"):
            kernels.matmul_int(torch.ones(1, MAX_IN_FEATURES + 1, dtype=torch.int8), weight, 1, 0, 0, layout)


def test_empty_batch():
    weight = kernels.repack(pack_ternary(torch.ones(5, 7, dtype=torch.int8)), 5)
    assert kernels.linear(torch.zeros(0, 7), weight, 5, torch.ones(1)).shape == (0, 5)


@pytest.mark.parametrize("isa,layout", path_params())
def test_packed_bitlinear_matches_reference_backend(isa, layout, monkeypatch):
    _, layout_index = require_path(isa, layout)
    torch.manual_seed(2)
    layer = BitLinear(576, 1000, bias=True)
    packed = PackedBitLinear.from_bitlinear(layer)
    x = torch.randn(2, 9, 576)
    monkeypatch.setenv("BITCONVERT_ISA", isa)
    monkeypatch.setenv("BITCONVERT_LAYOUT", layout)
    backend = kernels.KernelBackend()
    assert (backend.name, backend.layout) == (f"kernels-{isa}", layout_index)
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


def int8_reference(x: torch.Tensor, w: torch.Tensor):
    """csrc/int8_core.h's math in torch: codes (int8, exact) and y in float64 from the exact int32 block sums."""
    amax = w.abs().amax(1, keepdim=True)
    # 127 / amax as a true division (torch's scalar / tensor takes the reciprocal first, which rounds differently)
    codes = torch.where(amax > 0, (w * (torch.full_like(amax, 127) / amax)).round(), 0).clamp(-127, 127)
    pad = -w.shape[1] % 64
    xb = F.pad(x, (0, pad)).view(x.shape[0], -1, 32)
    xmax = xb.abs().amax(-1, keepdim=True)
    x_q = torch.where(xmax > 0, (xb * (torch.full_like(xmax, 127) / xmax)).round(), 0).clamp(-127, 127)
    blocks = F.pad(codes, (0, pad)).view(w.shape[0], -1, 32)
    sums = torch.einsum("tbk,obk->tob", x_q.int(), blocks.int())
    e = (xmax / 127).double().squeeze(-1)  # (t, blocks)
    y = (sums.double() * e[:, None, :]).sum(-1) * (amax / 127).double().T
    # sum over k of |x_q w_q| e d: bounds every partial sum, whatever order a path adds the products in
    magnitude = torch.einsum("tbk,obk->tob", x_q.abs().double(), blocks.abs().double())
    return codes.to(torch.int8), y, (magnitude * e[:, None, :]).sum(-1) * (amax / 127).double().T


@pytest.mark.parametrize("isa", isa_params())
def test_int8_linear_matches_reference(isa):
    """Codes bit for bit; outputs to fp32 rounding of the float sum over blocks: every path accumulates
    e[b] * P[b] in fp32 (in a different order per path), so |error| <= ~(blocks + 8) * 2^-24 * sum |e[b] P[b]| d."""
    index = require(isa)
    generator = torch.Generator().manual_seed(4)
    for in_features in (1, 31, 33, 64, 576, 1000):
        for out_features in (1, 5, 13, 200):
            w = torch.randn(out_features, in_features, generator=generator)
            if out_features > 1:
                w[1] = 0  # an all-zero row: d = 0
            w_q, d = kernels.int8_quantize_rows(w)
            assert w_q.shape == (out_features, -(-in_features // 64) * 64)
            for batch in (1, 3, 9):
                x = torch.randn(batch, in_features, generator=generator) * 3
                x[0, : min(32, in_features)] = 0  # an all-zero activation block: e = 0
                codes, want, magnitude = int8_reference(x, w)
                assert torch.equal(w_q[:, :in_features], codes) and not w_q[:, in_features:].any()
                torch.testing.assert_close(d, w.abs().amax(1) / 127, rtol=0, atol=0)
                bound = (w_q.shape[1] // 32 + 8) * 2.0 ** -24 * magnitude + 1e-30
                for threads in (1, 2):
                    y = kernels.int8_linear(x, w_q, d, index, threads)
                    assert ((y.double() - want).abs() <= bound).all(), f"{isa} {in_features} {out_features} {batch}"


@pytest.mark.parametrize("isa", isa_params())
@pytest.mark.parametrize("kind", ["int8", "int6", "int4"])
def test_quantized_rows_one_token_equals_its_row_of_a_batch(isa, kind):
    """A single token runs one row per call (each thread streams its rows in order), several tokens 4 rows per call;
    each row's sum is the same instructions in the same order either way, so a token alone gives its row of the batch
    bit for bit, on every path, row count (tails of the 4-row groups and of the 64-row tasks) and thread count."""
    index = require(isa)
    quantize, linear = getattr(kernels, f"{kind}_quantize_rows"), getattr(kernels, f"{kind}_linear")
    generator = torch.Generator().manual_seed(5)
    for in_features in (31, 576, 1056):
        for out_features in (1, 5, 67, 130):
            w_q, d = quantize(torch.randn(out_features, in_features, generator=generator))
            x = torch.randn(5, in_features, generator=generator)
            for threads in (1, 2):
                batch = linear(x, w_q, d, index, threads)
                for t in range(x.shape[0]):
                    assert torch.equal(linear(x[t:t + 1], w_q, d, index, threads)[0], batch[t]), \
                        f"{kind} {isa} {in_features}x{out_features} token {t} threads {threads}"


ONE_TOKEN_HEADS = """
import sys, numpy as np, torch
from bitconvert import kernels
generator = torch.Generator().manual_seed(9)
rows = []
for kind in ("int8", "int6", "int4"):
    quantize, linear = getattr(kernels, kind + "_quantize_rows"), getattr(kernels, kind + "_linear")
    w_q, d = quantize(torch.randn(131, 1056, generator=generator))
    x = torch.randn(3, 1056, generator=generator)
    for t in range(3):
        rows.append(linear(x[t:t + 1], w_q, d, -1, 2)[0].numpy())
np.save(sys.argv[1], np.stack(rows))
"""


def test_head_streams_choice_keeps_the_bits(tmp_path):
    """BITCONVERT_HEAD_STREAMS=1 (one row per call: one memory stream per thread, the default off Intel) and =4 (four
    interleaved rows per call, the default on Intel) give every one-token row bit for bit the same, on the quantized
    heads' default path, 2 threads (the choice is read once per process, hence the subprocesses)."""
    import os
    import subprocess
    import sys

    import numpy as np

    results = {}
    for streams in ("1", "4"):
        out = tmp_path / f"streams-{streams}.npy"
        subprocess.run([sys.executable, "-c", ONE_TOKEN_HEADS, str(out)], check=True, timeout=300,
                       env={**os.environ, "BITCONVERT_HEAD_STREAMS": streams})
        results[streams] = np.load(out, allow_pickle=False)
    assert results["1"].shape == (9, 131) and np.isfinite(results["1"]).all()
    np.testing.assert_array_equal(results["1"], results["4"])


def test_int8_extremes_and_shape_errors():
    w = torch.tensor([[1e30, -1e30, 3.0], [1e-30, 0.0, -1e-30]])
    w_q, d = kernels.int8_quantize_rows(w)
    assert w_q[0, :3].tolist() == [127, -127, 0] and w_q[1, :3].tolist() == [127, 0, -127]
    y = kernels.int8_linear(torch.tensor([[1.0, 1.0, 1.0]]), w_q, d)
    assert torch.isfinite(y).all()
    with pytest.raises(RuntimeError, match="expected 128"):
        kernels.int8_linear(torch.ones(1, 65), w_q, d)


def quantized_lm_head_error(folder, kind: str) -> torch.Tensor:
    """|logits of load(folder, lm_head=kind) - exact logits| / the exact logits' std, on a few tokens; checks the
    head's class and that its buffers stay out of the state dict."""
    from bitconvert.kernels.lm_head import HEAD_CLASSES
    from bitconvert.load import load

    exact = load(folder)
    quantized = load(folder, lm_head=kind)
    assert isinstance(quantized.lm_head, HEAD_CLASSES[kind]) and "weight_q" not in quantized.state_dict()
    ids = torch.tensor([[256, 72, 101, 108, 108, 111]])
    with torch.no_grad():
        want, got = exact(ids).logits, quantized(ids).logits
    return (got - want).abs() / want.std()


def test_int8_lm_head_close_to_exact_and_option_of_load(tiny_ternary):
    """The int8 lm_head's logits against the exact ones: per-row int8 weights (relative error <= 1/254 of the row's
    max) and int8 activations per 32 columns (<= 1/254 of the block's max) keep the error at ~1% of the logits'
    spread; 5% leaves room for these random weights while catching a wrong scale or a wrong code."""
    error = quantized_lm_head_error(tiny_ternary, "int8")
    assert 0 < error.max() <= 0.05  # it is quantized, and close


def test_operators_trace_in_torch_compile_without_graph_breaks():
    """fullgraph=True fails on any graph break; the eager backend keeps the test fast (no code generation)."""
    module = PackedBitLinear.from_bitlinear(BitLinear(40, 24))
    w_q, d = kernels.int8_quantize_rows(torch.randn(10, 24))
    w4, d4 = kernels.int4_quantize_rows(torch.randn(10, 24))
    w6, d6 = kernels.int6_quantize_rows(torch.randn(10, 24))

    def step(x):
        y = torch.relu(torch.ops.bitconvert.ternary_linear(x, module.kernel_weight, 24, module.weight_scale, -1, 0,
                                                           module.kernel_layout))
        return (torch.ops.bitconvert.int8_linear(y, w_q, d, -1, 0) + torch.ops.bitconvert.int4_linear(y, w4, d4, -1, 0)
                + torch.ops.bitconvert.int6_linear(y, w6, d6, -1, 0))

    x = torch.randn(3, 40)
    compiled = torch.compile(step, backend="eager", fullgraph=True)
    assert torch.equal(compiled(x), step(x))


def half_at_least(target: torch.Tensor) -> torch.Tensor:
    """The smallest fp16 >= target (fp32, >= 0, finite in fp16): the nearest fp16, stepped up once if below."""
    nearest = target.half()
    below = nearest.float() < target
    return torch.where(below, (nearest.view(torch.int16) + 1).view(torch.float16), nearest)


def int4_weights(blocks: torch.Tensor):
    """int8_core.h's int4 rule on weight blocks (out, blocks, 32): codes, the stored scales d (fp32) and d as fp32."""
    amax = blocks.abs().amax(-1, keepdim=True)
    codes = torch.where(amax > 0, (blocks * (torch.full_like(amax, 7) / amax)).round(), 0).clamp(-7, 7)
    d = amax / 7
    return codes, d.squeeze(-1), d


def int6_weights(blocks: torch.Tensor):
    """int8_core.h's int6 rule: d the smallest fp16 >= max / 31 (true fp32 divisions, as the C++ code), codes
    rounded against it; returns codes, the stored scales d (fp16) and d as fp32."""
    amax = blocks.abs().amax(-1, keepdim=True)
    d = half_at_least(amax / torch.full_like(amax, 31))
    step = d.float()
    codes = (blocks * torch.where(step > 0, torch.ones_like(step) / step, 0)).round().clamp(-31, 31)
    return codes, d.squeeze(-1), step


def block_reference(x: torch.Tensor, w: torch.Tensor, weights):
    """csrc/int8_core.h's block-scaled math in torch, the weight rule given by ``weights`` (int4_weights,
    int6_weights): codes c (out, padded), scales d (out, blocks), the exact int32 block sums P (t, out, blocks), y in
    float64 from them (d * e rounded to fp32 once, as every path does), and the bound on any path's fp32 summation."""
    pad = -w.shape[1] % 64
    codes, d, step = weights(F.pad(w, (0, pad)).view(w.shape[0], -1, 32))
    xb = F.pad(x, (0, pad)).view(x.shape[0], -1, 32)
    xmax = xb.abs().amax(-1, keepdim=True)
    x_q = torch.where(xmax > 0, (xb * (torch.full_like(xmax, 127) / xmax)).round(), 0).clamp(-127, 127)
    sums = torch.einsum("tbk,obk->tob", x_q.int(), codes.int())
    scale = (step.squeeze(-1)[None] * (xmax / 127).squeeze(-1)[:, None, :]).double()  # (t, out, blocks)
    magnitude = torch.einsum("tbk,obk->tob", x_q.abs().double(), codes.abs().double())
    return codes.flatten(1).to(torch.int8), d, sums, (sums * scale).sum(-1), (magnitude * scale).sum(-1)


def unpack_int4(w_q: torch.Tensor) -> torch.Tensor:
    """The nibble layout of int8_core.h back to codes (out, 2 * bytes): byte j of each 32-byte group holds column
    64g + j (low nibble) and 64g + 32 + j (high nibble), each stored as c + 8."""
    groups = w_q.view(w_q.shape[0], -1, 32).int()
    return (torch.cat([groups & 15, groups >> 4], -1) - 8).flatten(1).to(torch.int8)


# Storage position of each column c of a 64-column int6 group: 4-column runs of its two blocks alternate.
INT6_POSITION = torch.tensor([4 * (2 * (c % 32 // 4) + c // 32) + c % 4 for c in range(64)])


def unpack_int6(w_q: torch.Tensor) -> torch.Tensor:
    """The ql/qh layout of int8_core.h back to codes (out, 64 * groups): per 48-byte group, byte j < 32 holds the low 4
    bits of positions j (low nibble) and 32 + j (high nibble), byte 32 + j bits 2i..2i+1 the high 2 bits of position
    16i + j; position 4 * (2 * (c % 32 // 4) + c // 32) + c % 4 holds column c, stored as c + 32."""
    groups = w_q.view(w_q.shape[0], -1, 48).int()
    ql, qh = groups[..., :32], groups[..., 32:]
    low = torch.cat([ql & 15, ql >> 4], -1)
    high = torch.cat([qh >> (2 * i) & 3 for i in range(4)], -1)
    return ((low | high << 4) - 32)[..., INT6_POSITION].flatten(1).to(torch.int8)


class BlockFormat(NamedTuple):
    """A block-scaled weight format of int8_core.h and what its tests need."""

    name: str
    levels: int  # codes in [-levels, levels]
    quantize: Callable
    linear: Callable
    weights: Callable  # the torch rule: int4_weights, int6_weights
    unpack: Callable
    group_bytes: int  # bytes per 64 columns
    scale_dtype: torch.dtype
    scale_type: str  # its name in the error messages
    wrong_dtype: torch.dtype  # a scale dtype it refuses


BLOCK_FORMATS = [
    pytest.param(BlockFormat("int4", 7, kernels.int4_quantize_rows, kernels.int4_linear, int4_weights, unpack_int4, 32,
                             torch.float32, "fp32", torch.float64), id="int4"),
    pytest.param(BlockFormat("int6", 31, kernels.int6_quantize_rows, kernels.int6_linear, int6_weights, unpack_int6, 48,
                             torch.float16, "fp16", torch.float32), id="int6"),
]


@pytest.mark.parametrize("fmt", BLOCK_FORMATS)
@pytest.mark.parametrize("isa", isa_params())
def test_block_sums_exact(isa, fmt):
    """The int32 block sums P bit for bit, read back through y: integer weights in [-levels, levels] with a `levels`
    in every block (d = 1 exactly, codes = W) and, for token t, integer activations in block t only, with max 127
    (x_q = x, e = 1; every other block 0, e = 0), make y[t][o] = P[t][o][t] exactly (|P| <= 32 * 127 * 31 < 2^24).
    in_features 96, 160 and 1056 are multiples of 32 but not of 64 (a padded block), 576 not of 128 (a partial chunk
    of scales on the SIMD paths); row counts are not multiples of the 4-row group or the 64-row task, and 2 threads
    really split the rows (2 tasks or more)."""
    index = require(isa)
    generator = torch.Generator().manual_seed(5)
    for in_features, out_features in ((64, 1), (65, 7), (96, 7), (160, 67), (576, 67), (1000, 13), (1056, 130)):
        w = torch.randint(-fmt.levels, fmt.levels + 1, (out_features, in_features), generator=generator).float()
        w[:, ::32] = fmt.levels
        w_q, d = fmt.quantize(w)
        blocks = -(-in_features // 32)
        assert torch.equal(d[:, :blocks].float(), torch.ones(out_features, blocks)) and not d[:, blocks:].any()
        x = torch.zeros(blocks, in_features)
        for t in range(blocks):
            x[t, 32 * t: 32 * t + 32] = torch.randint(-127, 128, (min(32, in_features - 32 * t),), generator=generator)
            x[t, 32 * t] = 127
        want = torch.einsum("tk,ok->to", x.double(), w.double())  # = P[t][o][t]
        for threads in (1, 2):
            assert torch.equal(fmt.linear(x, w_q, d, index, threads).double(), want), (in_features, threads)


@pytest.mark.parametrize("fmt", BLOCK_FORMATS)
@pytest.mark.parametrize("isa", isa_params())
def test_block_linear_matches_reference(isa, fmt):
    """Codes and scales bit for bit against a pure-torch reference of int8_core.h's math; outputs to fp32 rounding of
    the float sum over blocks, bounded as for int8 by (blocks + 8) * 2^-24 * sum_b |d e| sum_k |x_q c| (every path
    rounds d * e once, as the reference, and converts each exact int32 sum once; only the fp32 accumulation order
    differs); and the scalar reference and this path agree to twice that."""
    index = require(isa)
    generator = torch.Generator().manual_seed(6)
    for in_features in (1, 31, 33, 64, 65, 96, 160, 576, 1000, 1056):
        for out_features in (1, 5, 13, 200):
            w = torch.randn(out_features, in_features, generator=generator)
            if out_features > 1:
                w[1] = 0  # an all-zero row: d = 0
            w_q, d = fmt.quantize(w)
            stride = -(-in_features // 64) * 64
            assert w_q.shape == (out_features, stride // 64 * fmt.group_bytes) and w_q.dtype == torch.uint8
            assert d.shape == (out_features, stride // 32) and d.dtype == fmt.scale_dtype
            for batch in (1, 3):
                x = torch.randn(batch, in_features, generator=generator) * 3
                x[0, : min(32, in_features)] = 0  # an all-zero activation block: e = 0
                codes, scales, _, want, magnitude = block_reference(x, w, fmt.weights)
                assert torch.equal(fmt.unpack(w_q), codes) and torch.equal(d, scales)
                bound = (stride // 32 + 8) * 2.0 ** -24 * magnitude + 1e-30
                scalar = fmt.linear(x, w_q, d, 0, 1)
                for threads in (1, 2):
                    y = fmt.linear(x, w_q, d, index, threads)
                    assert ((y.double() - want).abs() <= bound).all(), f"{isa} {in_features} {out_features} {batch}"
                    assert ((y - scalar).double().abs() <= 2 * bound).all()


@pytest.mark.parametrize("fmt", BLOCK_FORMATS)
def test_block_formats_refuse_bad_arguments(fmt):
    w_q, d = fmt.quantize(torch.randn(5, 70))
    x = torch.randn(2, 70)
    with pytest.raises(RuntimeError, match=f"rows hold {2 * fmt.group_bytes} bytes, expected {fmt.group_bytes} for "
                                           "in_features 64"):
        fmt.linear(torch.randn(2, 64), w_q, d)
    with pytest.raises(RuntimeError, match=f"{fmt.name} weight must be a contiguous 2-D CPU Byte"):
        fmt.linear(x, w_q.view(torch.int8), d)
    with pytest.raises(RuntimeError, match=f"{fmt.name} scales must be contiguous {fmt.scale_type} with 20 values"):
        fmt.linear(x, w_q, d[:, :2].contiguous())
    with pytest.raises(RuntimeError, match=f"{fmt.name} scales must be contiguous {fmt.scale_type}"):
        fmt.linear(x, w_q, d.to(fmt.wrong_dtype))
    with pytest.raises(RuntimeError, match="2-D float tensor"):
        fmt.linear(x[0], w_q, d)
    with pytest.raises(RuntimeError, match="2-D float tensor"):
        fmt.linear(x.int(), w_q, d)
    with pytest.raises(RuntimeError, match="takes a 2-D weight"):
        fmt.quantize(torch.randn(70))


def test_int4_round_trip_within_half_a_step():
    """|W - d c| <= d / 2 per element (the rounding to the nearest of 15 levels), up to fp32 rounding of W * (7/max)
    and of d = max / 7 (a few ulps of max, allowed as 2^-21 * max); the block's max is exact (c = +-7)."""
    generator = torch.Generator().manual_seed(7)
    w = torch.randn(37, 250, generator=generator) * torch.logspace(-20, 20, 37)[:, None]
    w_q, d = kernels.int4_quantize_rows(w)
    codes = unpack_int4(w_q)[:, :250].float()
    step = d.repeat_interleave(32, 1)[:, :250]
    error = (w - step * codes).abs()
    assert (error <= step / 2 + 2.0 ** -21 * 7 * step).all()
    assert (codes.abs() <= 7).all() and (codes.abs().view(37, -1).amax(1) == 7).all()


def test_int6_round_trip_within_half_a_step():
    """d is the smallest fp16 >= max / 31, so no code clamps: |W - d c| <= d / 2 per element, up to fp32 rounding of
    W * (1 / d) (a few ulps of 31 steps, allowed as 2^-21 * 31 * d), over 25 decades of row scale: subnormal-fp16 d
    for tiny rows (coarse relative to the max, d = 2^-24 at the least, but never below max / 31) up to 1e5. Blocks
    with a normal-fp16 d reach code +-31 (d is within 2^-11 of max / 31)."""
    generator = torch.Generator().manual_seed(10)
    w = torch.randn(37, 250, generator=generator) * torch.logspace(-20, 5, 37)[:, None]
    w_q, d = kernels.int6_quantize_rows(w)
    codes = unpack_int6(w_q)[:, :250].float()
    step = d.float().repeat_interleave(32, 1)[:, :250]
    error = (w - step * codes).abs()
    assert (error <= step / 2 + 2.0 ** -21 * 31 * step).all()
    blocks = F.pad(w, (0, 6)).abs().view(37, -1, 32).amax(-1)
    target = blocks / 31
    smaller = (d.view(torch.int16) - 1).view(torch.float16).float()  # the fp16 just below d (d > 0 here)
    assert (d.float() >= target).all() and (smaller < target).all()
    normal = blocks >= 31 * 2.0 ** -14  # d a normal fp16
    top = F.pad(codes.abs(), (0, 6)).view(37, -1, 32).amax(-1)
    assert (top <= 31).all() and (top[normal] == 31).all() and normal.any() and not normal.all()


def test_int6_refuses_weights_beyond_its_fp16_scales():
    big = torch.randn(3, 40)
    big[1, 7] = 31 * 65504 * 1.001
    with pytest.raises(RuntimeError, match="int6 takes finite weights"):
        kernels.int6_quantize_rows(big)
    big[1, 7] = float("nan")
    with pytest.raises(RuntimeError, match="int6 takes finite weights"):
        kernels.int6_quantize_rows(big)
    big[1, 7] = -31 * 65504  # the largest magnitude it takes: d = 65504, code -31
    w_q, d = kernels.int6_quantize_rows(big)
    assert d[1, 0].item() == 65504 and unpack_int6(w_q)[1, 7].item() == -31


def test_int4_lm_head_close_to_exact_and_option_of_load(tiny_ternary):
    """The int4 lm_head's logits against the exact ones. Per element the error is uniform in [-d/2, d/2] with
    d = max_b / 7, and the max of a block of 32 Gaussian weights is ~2.07 sigma: an RMS weight error of
    2.07 / 7 / sqrt(12) = 8.5% of sigma, so the logits' RMS error is ~8.5% of their spread (the int8 activations add
    ~0.5%); 13% leaves room for this small random model while catching a wrong scale, code or layout (each moves the
    logits by about their whole spread)."""
    rms = quantized_lm_head_error(tiny_ternary, "int4").pow(2).mean().sqrt()
    assert 0 < rms <= 0.13, f"RMS error {rms:.4f} of the logits' std"


def test_int6_lm_head_close_to_exact_and_option_of_load(tiny_ternary):
    """The int6 lm_head's logits against the exact ones. Per element the weight error is uniform in [-d/2, d/2] with
    d = max_b / 31 (~2.07 sigma for 32 Gaussian weights): an RMS weight error of 2.07 / 31 / sqrt(12) = 1.9% of sigma,
    so the logits' RMS error is ~2% of their spread (2.2% measured on this model; the int8 activations add ~0.5% in
    quadrature); 3.5% leaves room while catching a wrong scale, code or layout (each moves the logits by about their
    whole spread) or an int4-sized error (10% measured)."""
    rms = quantized_lm_head_error(tiny_ternary, "int6").pow(2).mean().sqrt()
    assert 0 < rms <= 0.035, f"RMS error {rms:.4f} of the logits' std"


def test_a_stale_build_lock_is_removed_and_a_fresh_one_kept(tmp_path, capsys):
    import os
    import time

    from bitconvert.kernels import STALE_LOCK_SECONDS, _remove_stale_lock

    fresh, stale = tmp_path / "fresh", tmp_path / "stale"
    fresh.touch()
    stale.touch()
    old = time.time() - STALE_LOCK_SECONDS - 60
    os.utime(stale, (old, old))
    _remove_stale_lock(fresh)
    _remove_stale_lock(stale)
    _remove_stale_lock(tmp_path / "absent")  # no lock: nothing to do
    assert fresh.exists() and not stale.exists()
    assert "stale kernel-build lock" in capsys.readouterr().err
