"""ONNX export and ONNX Runtime deployment, on the tiny random model (exported once per session).

Exactness: the TernaryMatMul node is compared with the pure-torch BitLinear math bit for bit on every ISA path. The
whole model cannot be bit-exact: ORT and torch compute RMSNorm, rotary, softmax and the float matmuls with other
kernels, so values differ by a few ulps (relative ~1e-7) and, in principle, such a difference can move an activation
across a rounding boundary of the int8 quantization. On these fixed-seed inputs the logits differ by ~1e-7 of their
range; the bound LOGIT_TOLERANCE (1e-5 of the range) leaves 100x margin for the ulp noise while still failing on
any single flipped activation in the last layers (one int8 step is 1/127 of a token's range, ~1e-2). The same bound
holds for the fused graph (bitconvert's CachedAttention or ORT's GroupQueryAttention, and ORT's RMSNorm kernels, are
other float roundings of the same math; measured ~3e-7). The layer graph's DecoderLayer runs the code of the fused
graph's five nodes of a layer in one node: its logits and presents equal the fused graph's bit for bit. The int8
lm_head is an approximation with its own bound, INT8_HEAD_TOLERANCE.
"""

from __future__ import annotations

import re

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from bitconvert import kernels
from bitconvert.bitlinear import PackedBitLinear, quantize_activations
from bitconvert.cli import main
from bitconvert.convert import ConvertOptions, convert
from bitconvert.errors import BitconvertError
from bitconvert.export import custom_op_library, export_onnx, session
from bitconvert.export.decoder import FusedKVCacheDecoder
from bitconvert.export.exporter import _trace
from bitconvert.export.fused_ops import group_query_attention
from bitconvert.export.generate import OnnxDecoder, Sampling, _pick
from bitconvert.export.matmulnbits import dequantize, to_matmulnbits, to_matmulnbits_int8
from bitconvert.export.modules import fuse_projections, replace_bitlinears
from bitconvert.export.ops import DOMAIN, ternary_matmul
from bitconvert.export.runtime import ort_include_dir
from bitconvert.load import load, load_for_inference
from bitconvert.packing import pack_ternary

LOGIT_TOLERANCE = 1e-5
# MatMulNBits at accuracy level 0 multiplies x_q/s by T*g in fp32 (not acc/weight_scale/s): same value up to float
# rounding; level 4 re-quantizes activations per block, an error of up to half an int8 step per element.
NBITS_TOLERANCE = {0: 1e-4, 4: 5e-2}
# int8 lm_head: weights and (ORT, accuracy level 4) activations each rounded to half an int8 step of their block's
# absmax (1/254); a logit sums K such products, so its error stays a few 1/254 of the logits' range: measured 1.1e-2
# on the tiny model, 3e-2 leaves margin while failing on a wrong scale or layout (errors of order 1).
INT8_HEAD_TOLERANCE = 3e-2


@pytest.fixture(scope="session")
def ternary_onnx(tiny_ternary, tmp_path_factory):
    return export_onnx(tiny_ternary, tmp_path_factory.mktemp("onnx") / "model.onnx")


@pytest.fixture(scope="session")
def nbits_onnx(tiny_ternary, tmp_path_factory):
    return export_onnx(tiny_ternary, tmp_path_factory.mktemp("onnx-nbits") / "model.onnx", op="matmulnbits")


@pytest.fixture(scope="session")
def fused_onnx(tiny_ternary, tmp_path_factory):
    return export_onnx(tiny_ternary, tmp_path_factory.mktemp("onnx-fused") / "model.onnx", graph="fused")


@pytest.fixture(scope="session")
def fused_gqa_onnx(tiny_ternary, tmp_path_factory):
    return export_onnx(tiny_ternary, tmp_path_factory.mktemp("onnx-fused-gqa") / "model.onnx", graph="fused",
                       attention="gqa")


@pytest.fixture(scope="session")
def layer_onnx(tiny_ternary, tmp_path_factory):
    return export_onnx(tiny_ternary, tmp_path_factory.mktemp("onnx-layer") / "model.onnx", graph="layer")


GRAPH_FIXTURES = {"plain": "ternary_onnx", "fused": "fused_onnx", "fused-gqa": "fused_gqa_onnx",
                  "layer": "layer_onnx"}


@pytest.fixture(params=list(GRAPH_FIXTURES))
def graph_onnx(request):
    """The plain export of the tiny model, its fused exports (bitconvert's attention, ORT's GroupQueryAttention) and
    its layer export (DecoderLayer nodes), for tests that hold for all four."""
    return request.getfixturevalue(GRAPH_FIXTURES[request.param])


@pytest.fixture(params=["fused", "fused-gqa", "layer"])
def fused_graph_onnx(request):
    return request.getfixturevalue(GRAPH_FIXTURES[request.param])


@pytest.fixture(scope="session")
def torch_model(tiny_ternary):
    return load(tiny_ternary, dtype=torch.float32)


def single_node_model(out_features: int, in_features: int, weight: np.ndarray | None, scale: float):
    """One TernaryMatMul node; W is an initializer when ``weight`` is given, else a graph input."""
    node = helper.make_node("TernaryMatMul", ["X", "W", "S"], ["Y"], domain=DOMAIN, out_features=out_features)
    inputs = [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["n", "t", "k"])]
    initializers = [numpy_helper.from_array(np.array([scale], np.float32), "S")]
    if weight is None:
        inputs.append(helper.make_tensor_value_info("W", TensorProto.UINT8, [None, in_features]))
    else:
        initializers.append(numpy_helper.from_array(weight, "W"))
    graph = helper.make_graph([node], "g", inputs, [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)],
                              initializer=initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid(DOMAIN, 1)])


def run_single(tmp_path, model, feed, threads=0):
    path = tmp_path / "op.onnx"
    onnx.save(model, path)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    return session(path, options).run(None, feed)[0]


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("isa,layout", [(isa, layout) for layout in kernels.LAYOUTS
                                        for isa in kernels.LAYOUT_ISAS[layout]])
@pytest.mark.parametrize("constant_weight", [True, False], ids=["initializer", "input"])
def test_op_bit_exact(tmp_path, monkeypatch, isa, layout, constant_weight, threads):
    """Shapes off the 16-row/16-column (base3: 24-column) grid; one token (work split by rows) and 18 (split by
    tokens); every layout the path computes on (BITCONVERT_LAYOUT)."""
    if isa not in kernels.supported_isas():
        pytest.skip(f"this CPU lacks the {isa} path")
    if not kernels.layout_supported(kernels.LAYOUTS.index(layout), kernels.ISAS.index(isa)):
        pytest.skip(f"this CPU's {isa} path lacks the {layout} layout")
    monkeypatch.setenv("BITCONVERT_ISA", isa)
    monkeypatch.setenv("BITCONVERT_LAYOUT", layout)
    generator = torch.Generator().manual_seed(1)
    for out_features, in_features in [(20, 37), (1500, 700), (5, 1000)]:
        ternary = torch.randint(-1, 2, (out_features, in_features), generator=generator, dtype=torch.int8)
        packed = pack_ternary(ternary)
        x = torch.randn(2, 9, in_features, generator=generator) * 3
        x[0, 0] = 1.0  # adversarial rows: constant, zero, and one huge value
        x[0, 1] = 0.0
        x[0, 2, 0] = 1e4
        scale = torch.tensor([1 / 0.037])
        model = single_node_model(out_features, in_features, packed.numpy() if constant_weight else None, scale.item())
        for tokens in (x, x[:1, :1]):
            feed = {"X": tokens.numpy()} if constant_weight else {"X": tokens.numpy(), "W": packed.numpy()}
            expected = ternary_matmul(tokens, packed, scale, out_features).numpy()
            np.testing.assert_array_equal(run_single(tmp_path, model, feed, threads), expected)


def lane_rms_norm(h: np.ndarray, gamma: np.ndarray, eps: float) -> np.ndarray:
    """norm_core.h's rms_norm in numpy, bit for bit: fp32 squares summed in float64 in 8 lanes (lane l takes the
    columns l mod 8, each in order: cumsum is sequential), the lanes added in order, the rest in fp32."""
    tokens, k = h.shape
    squares = np.pad(h * h, ((0, 0), (0, -k % 8))).astype(np.float64).reshape(tokens, -1, 8)
    total = np.cumsum(np.cumsum(squares, axis=1)[:, -1, :], axis=1)[:, -1]
    inverse = np.float32(1) / np.sqrt(total.astype(np.float32) / np.float32(k) + np.float32(eps))
    return (h * inverse[:, None]) * gamma


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("isa", kernels.ISAS)
def test_op_with_folded_norm_bit_exact(tmp_path, monkeypatch, isa, threads):
    """TernaryMatMul version 2: Y = the product of rms_norm(X + skip) * gamma and H = X + skip, bit for bit against
    the lane-order norm and the torch product on its output; without skip, H is X. One token and 18 (three
    quantization groups), K off the 8-lane grid (700) and on it (64)."""
    if isa not in kernels.supported_isas():
        pytest.skip(f"this CPU lacks the {isa} path")
    monkeypatch.setenv("BITCONVERT_ISA", isa)
    generator = torch.Generator().manual_seed(9)
    for out_features, in_features in [(40, 700), (16, 64)]:
        packed = pack_ternary(torch.randint(-1, 2, (out_features, in_features), generator=generator,
                                            dtype=torch.int8))
        gamma = (torch.rand(in_features, generator=generator) + 0.5).numpy()
        names = ["X", "W", "S", "skip", "gamma"]
        node = helper.make_node("TernaryMatMul", names, ["Y", "H"], domain=DOMAIN, out_features=out_features,
                                epsilon=1e-5)
        bare = helper.make_node("TernaryMatMul", ["X", "W", "S", "", "gamma"], ["Y", "H"], domain=DOMAIN,
                                out_features=out_features, epsilon=1e-5)
        initializers = [numpy_helper.from_array(np.array([1 / 0.03], np.float32), "S"),
                        numpy_helper.from_array(packed.numpy(), "W"), numpy_helper.from_array(gamma, "gamma")]
        for tokens in (1, 18):
            x = (torch.randn(1, tokens, in_features, generator=generator) * 2).numpy()
            skip = torch.randn(1, tokens, in_features, generator=generator).numpy()
            for graph_node, with_skip in ((node, True), (bare, False)):
                inputs = [helper.make_tensor_value_info(name, TensorProto.FLOAT, None)
                          for name in (["X", "skip"] if with_skip else ["X"])]
                outputs = [helper.make_tensor_value_info(name, TensorProto.FLOAT, None) for name in ("Y", "H")]
                graph = helper.make_graph([graph_node], "g", inputs, outputs, initializer=initializers)
                model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18),
                                                                helper.make_opsetid(DOMAIN, 2)])
                path = tmp_path / "normed.onnx"
                onnx.save(model, path)
                options = ort.SessionOptions()
                options.intra_op_num_threads = threads
                feed = {"X": x, "skip": skip} if with_skip else {"X": x}
                y, h = session(path, options).run(None, feed)
                want_h = x + skip if with_skip else x
                np.testing.assert_array_equal(h, want_h)
                normed = lane_rms_norm(want_h[0], gamma, 1e-5)[None]
                want_y = ternary_matmul(torch.from_numpy(normed), packed, torch.tensor([1 / 0.03]), out_features)
                np.testing.assert_array_equal(y, want_y.numpy())


def test_op_with_folded_norm_rejects_bad_inputs(tmp_path):
    packed = pack_ternary(torch.zeros(16, 32, dtype=torch.int8))
    initializers = [numpy_helper.from_array(np.array([1.0], np.float32), "S"),
                    numpy_helper.from_array(packed.numpy(), "W")]

    def run(node, feed):
        inputs = [helper.make_tensor_value_info(name, TensorProto.FLOAT, None) for name in feed]
        outputs = [helper.make_tensor_value_info(name, TensorProto.FLOAT, None) for name in node.output]
        graph = helper.make_graph([node], "g", inputs, outputs, initializer=initializers)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid(DOMAIN, 2)])
        path = tmp_path / "bad.onnx"
        onnx.save(model, path)
        return session(path).run(None, feed)

    x = np.ones((1, 2, 32), np.float32)
    with pytest.raises(Exception, match="need the norm weight gamma"):
        run(helper.make_node("TernaryMatMul", ["X", "W", "S", "skip"], ["Y", "H"], domain=DOMAIN, out_features=16),
            {"X": x, "skip": x})
    with pytest.raises(Exception, match="the norm weight gamma needs the attribute epsilon"):
        run(helper.make_node("TernaryMatMul", ["X", "W", "S", "", "gamma"], ["Y"], domain=DOMAIN, out_features=16),
            {"X": x, "gamma": np.ones(32, np.float32)})
    with pytest.raises(Exception, match="gamma must hold K = 32 values"):
        run(helper.make_node("TernaryMatMul", ["X", "W", "S", "", "gamma"], ["Y"], domain=DOMAIN, out_features=16,
                             epsilon=1e-5), {"X": x, "gamma": np.ones(31, np.float32)})
    with pytest.raises(Exception, match=r"skip has shape \(1, 1, 32\), X \(1, 2, 32\); they must be equal"):
        run(helper.make_node("TernaryMatMul", ["X", "W", "S", "skip", "gamma"], ["Y"], domain=DOMAIN,
                             out_features=16, epsilon=1e-5),
            {"X": x, "skip": x[:, :1], "gamma": np.ones(32, np.float32)})


@pytest.mark.parametrize("huge_pages", ["1", "0"])
def test_op_bit_exact_with_a_weight_past_two_mib(tmp_path, monkeypatch, huge_pages):
    """A constant W whose repacked copy passes 2 MiB, the size from which the kernel keeps it on transparent huge
    pages (BITCONVERT_HUGE_PAGES=0: ordinary memory): the same products either way."""
    monkeypatch.setenv("BITCONVERT_HUGE_PAGES", huge_pages)
    generator = torch.Generator().manual_seed(5)
    out_features, in_features = 4096, 4104  # base3 3.4 MB, 2bit 4.2 MB
    ternary = torch.randint(-1, 2, (out_features, in_features), generator=generator, dtype=torch.int8)
    packed = pack_ternary(ternary)
    scale = torch.tensor([1 / 0.02])
    model = single_node_model(out_features, in_features, packed.numpy(), scale.item())
    x = torch.randn(1, 2, in_features, generator=generator)
    np.testing.assert_array_equal(run_single(tmp_path, model, {"X": x.numpy()}, 2),
                                  ternary_matmul(x, packed, scale, out_features).numpy())


def test_op_refuses_a_layout_its_path_lacks(tmp_path, monkeypatch):
    """BITCONVERT_LAYOUT reaches the op: base3 on the AVX-512 path of a CPU without VBMI is refused when the kernel
    is created (every other path computes on base3)."""
    if "avx512" not in kernels.supported_isas() or kernels.layout_supported(kernels.LAYOUTS.index("base3"),
                                                                            kernels.ISAS.index("avx512")):
        pytest.skip("only AVX-512 without VBMI lacks a layout")
    monkeypatch.setenv("BITCONVERT_ISA", "avx512")
    monkeypatch.setenv("BITCONVERT_LAYOUT", "base3")
    model = single_node_model(8, 16, np.zeros((2, 16), np.uint8), 1.0)
    with pytest.raises(Exception, match="does not compute on the layout BITCONVERT_LAYOUT names"):
        run_single(tmp_path, model, {"X": np.zeros((1, 2, 16), np.float32)})


def test_reference_op_is_bitlinear():
    """The torch op the exporter sees is BitLinear's math: exact int32 product, then / weight_scale / s."""
    ternary = torch.randint(-1, 2, (12, 40), dtype=torch.int8)
    x = torch.randn(3, 40)
    x_q, s = quantize_activations(x)
    expected = (x_q.int() @ ternary.int().t()).float() / torch.tensor([2.5]) / s
    torch.testing.assert_close(ternary_matmul(x, pack_ternary(ternary), torch.tensor([2.5]), 12), expected,
                               rtol=0, atol=0)


def test_op_rejects_wrong_shapes(tmp_path):
    model = single_node_model(8, 16, np.zeros((2, 16), np.uint8), 1.0)
    with pytest.raises(Exception, match="last dimension must be K = 16"):
        run_single(tmp_path, model, {"X": np.zeros((1, 2, 15), np.float32)})
    bad = single_node_model(8, 16, np.zeros((3, 16), np.uint8), 1.0)
    with pytest.raises(BitconvertError, match=r"expected \(ceil\(8/4\), K\)"):
        run_single(tmp_path, bad, {"X": np.zeros((1, 2, 16), np.float32)})


def test_export_graph(ternary_onnx, torch_model):
    model = onnx.load(ternary_onnx)
    onnx.checker.check_model(model, full_check=True)
    config = torch_model.config
    nodes = [node for node in model.graph.node if node.op_type == "TernaryMatMul"]
    assert len(nodes) == 7 * config.num_hidden_layers and all(node.domain == DOMAIN for node in nodes)
    initializers = {tensor.name: tensor for tensor in model.graph.initializer}
    packed = [initializers[node.input[1]] for node in nodes]
    assert all(tensor.data_type == TensorProto.UINT8 for tensor in packed)
    fp16_bytes = sum(2 * m.out_features * m.in_features for m in torch_model.modules() if isinstance(m, PackedBitLinear))
    assert sum(len(tensor.raw_data) for tensor in packed) * 8 == fp16_bytes  # 2 bits per weight on disk
    assert [i.name for i in model.graph.input][:3] == ["input_ids", "attention_mask", "position_ids"]
    assert model.graph.input[3].name == "past_key_values.0.key"
    assert [o.name for o in model.graph.output][:3] == ["logits", "present.0.key", "present.0.value"]
    model.graph.ClearField("value_info")  # what a tool without the exporter's annotations infers by itself
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    shapes = {v.name: v.type.tensor_type.shape for v in inferred.graph.value_info}
    out_dims = shapes[nodes[0].output[0]].dim
    assert out_dims[-1].dim_value == config.hidden_size  # q_proj: (batch, sequence, hidden)


def feed_for(tokens: np.ndarray, decoder: OnnxDecoder) -> dict:
    cache = decoder.empty_cache(tokens.shape[0])
    batch, length = tokens.shape
    return {"input_ids": tokens, "attention_mask": np.ones((batch, length), np.int64),
            "position_ids": np.broadcast_to(np.arange(length), (batch, length)).copy(), **cache.values}


def assert_logits_close(actual, expected, tolerance=LOGIT_TOLERANCE):
    error = np.abs(actual - expected).max() / np.abs(expected).max()
    assert error <= tolerance, f"relative logit error {error:.2e} > {tolerance:.0e}"


def test_logits_match_pytorch(graph_onnx, torch_model):
    decoder = OnnxDecoder(session(graph_onnx))
    tokens = torch.randint(0, 256, (2, 11), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = torch_model(tokens).logits.numpy()
    logits, _ = decoder.step(tokens.numpy(), decoder.empty_cache(2))
    assert_logits_close(logits, expected)
    # the same sequence fed as prompt + one token at a time through the cache
    logits, cache = decoder.step(tokens[:, :6].numpy(), decoder.empty_cache(2))
    steps = [logits]
    for t in range(6, 11):
        logits, cache = decoder.step(tokens[:, t : t + 1].numpy(), cache)
        steps.append(logits)
    assert_logits_close(np.concatenate(steps, axis=1), expected)


def test_padding_mask(graph_onnx):
    """A left-padded row gives the logits of the same tokens unpadded."""
    decoder = OnnxDecoder(session(graph_onnx))
    tokens = np.array([[5, 6, 7, 8, 9]], np.int64)
    alone = decoder.session.run(["logits"], feed_for(tokens, decoder))[0]
    padded = np.array([[0, 0, 5, 6, 7, 8, 9], [1, 2, 3, 4, 5, 6, 7]], np.int64)
    feed = feed_for(padded, decoder)
    feed["attention_mask"][0, :2] = 0
    feed["position_ids"][0] = [0, 0, 0, 1, 2, 3, 4]
    batched = decoder.session.run(["logits"], feed)[0]
    assert_logits_close(batched[0, 2:], alone[0])


def test_greedy_matches_pytorch_32_steps(graph_onnx, torch_model):
    prompt = [72, 101, 108, 108, 111]
    with torch.no_grad():
        expected = torch_model.generate(torch.tensor([prompt]), max_new_tokens=32, min_new_tokens=32,
                                        do_sample=False)[0, len(prompt):].tolist()
    assert OnnxDecoder(session(graph_onnx)).generate(prompt, 32) == expected


def test_sampling():
    logits = np.array([0.0, 3.0, 2.9, -1.0])
    rng = np.random.default_rng(0)
    assert _pick(logits, Sampling(temperature=1.0, top_k=1), rng) == 1
    assert {_pick(logits, Sampling(temperature=1.0, top_p=0.5), rng) for _ in range(50)} == {1}
    assert {_pick(logits, Sampling(temperature=5.0), rng) for _ in range(200)} == {0, 1, 2, 3}
    with pytest.raises(BitconvertError):
        Sampling(top_p=0.0)


def test_matmulnbits_layout():
    ternary = torch.randint(-1, 2, (12, 80), dtype=torch.int8)
    b, scales, zero_points = to_matmulnbits(pack_ternary(ternary), torch.tensor([4.0]), 12, 32)  # K padded to 96
    assert b.shape == (12, 3, 8) and scales.shape == (36,) and zero_points.shape == (12,)
    torch.testing.assert_close(dequantize(b, scales, zero_points, 80, 12, 32), ternary.float() / 4, rtol=0, atol=0)


@pytest.mark.parametrize("level", [0, 4])
def test_matmulnbits_runs_without_library(nbits_onnx, torch_model, tmp_path, level):
    model = onnx.load(nbits_onnx)
    assert not any(node.op_type == "TernaryMatMul" for node in model.graph.node)
    nodes = [node for node in model.graph.node if node.op_type == "MatMulNBits"]
    assert len(nodes) == 7 * torch_model.config.num_hidden_layers
    for node in nodes:
        next(a for a in node.attribute if a.name == "accuracy_level").i = level
    path = tmp_path / "level.onnx"
    onnx.save(model, path)
    decoder = OnnxDecoder(ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]))
    tokens = torch.randint(0, 256, (1, 9), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        expected = torch_model(tokens).logits.numpy()
    assert_logits_close(decoder.step(tokens.numpy(), decoder.empty_cache())[0], expected, NBITS_TOLERANCE[level])


def test_cli_export_and_generate(tiny_ternary, tmp_path, capsys):
    out = tmp_path / "cli" / "model.onnx"
    assert main(["export", str(tiny_ternary), "--out", str(out), "--op", "matmulnbits"]) == 0
    assert (out.parent / "tokenizer.json").is_file()
    capsys.readouterr()
    args = ["generate", str(out), "--prompt", "hi", "--max-new-tokens", "5"]
    assert main(args) == 0
    greedy = capsys.readouterr().out
    assert main(args + ["--temperature", "0.9", "--top-k", "20", "--seed", "7"]) == 0
    first = capsys.readouterr().out
    assert main(args + ["--temperature", "0.9", "--top-k", "20", "--seed", "7"]) == 0
    assert capsys.readouterr().out == first and greedy.startswith("hi")


def test_cli_attention_option(tiny_ternary, tmp_path, capsys):
    """`bitconvert export --graph fused --attention gqa` writes GroupQueryAttention nodes and says so in the metadata;
    --attention without --graph fused is one error line and exit 2, nothing written."""
    out = tmp_path / "gqa" / "model.onnx"
    assert main(["export", str(tiny_ternary), "--out", str(out), "--graph", "fused", "--attention", "gqa"]) == 0
    model = onnx.load(out)
    assert {node.op_type for node in model.graph.node} >= {"GroupQueryAttention", "TernaryMatMul"}
    assert "CachedAttention" not in {node.op_type for node in model.graph.node}
    assert {p.key: p.value for p in model.metadata_props}["bitconvert.attention"] == "gqa"
    capsys.readouterr()
    bad = tmp_path / "bad" / "model.onnx"
    assert main(["export", str(tiny_ternary), "--out", str(bad), "--attention", "bitconvert"]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "--attention bitconvert needs --graph fused" in error[0]
    assert not bad.exists()


def test_corrupt_model(tmp_path, capsys):
    path = tmp_path / "broken.onnx"
    path.write_bytes(b"\x08\x07not a protobuf at all")
    with pytest.raises(BitconvertError, match="not a readable ONNX model"):
        session(path)
    assert main(["generate", str(path), "--prompt", "x"]) == 2
    assert "not a readable ONNX model" in capsys.readouterr().err


def test_missing_or_wrong_library(ternary_onnx, tmp_path):
    with pytest.raises(BitconvertError, match="does not exist"):
        session(ternary_onnx, library=tmp_path / "missing.so")
    fake = tmp_path / "fake.so"
    fake.write_bytes(b"\x7fELF garbage")
    with pytest.raises(BitconvertError, match="cannot load the TernaryMatMul library"):
        session(ternary_onnx, library=fake)
    with pytest.raises(Exception, match="TernaryMatMul"):  # plain onnxruntime without the library: its error, no crash
        ort.InferenceSession(str(ternary_onnx), providers=["CPUExecutionProvider"])


def test_header_checks(tmp_path, monkeypatch):
    monkeypatch.setenv("ORT_INCLUDE_DIR", str(tmp_path))
    with pytest.raises(BitconvertError, match="has no onnxruntime_cxx_api.h"):
        ort_include_dir()
    (tmp_path / "onnxruntime_cxx_api.h").write_text("")
    (tmp_path / "onnxruntime_c_api.h").write_text("#define ORT_API_VERSION 999\n")
    with pytest.raises(BitconvertError, match="newer than the installed onnxruntime"):
        ort_include_dir()


def test_model_without_the_decoder_interface(tmp_path):
    """An ONNX model exported without bitconvert's decoder I/O is refused by name, not with an ORT stack trace."""
    path = tmp_path / "plain.onnx"
    torch.onnx.export(torch.nn.Linear(4, 2), (torch.randn(1, 4),), str(path), dynamo=True, input_names=["x"])
    with pytest.raises(BitconvertError, match="lacks the input"):
        OnnxDecoder(session(path))


def test_library_path_is_cached():
    assert custom_op_library() == custom_op_library()


@pytest.mark.parametrize("layout", kernels.LAYOUTS)
@pytest.mark.parametrize("threads", [1, 2])
def test_segmented_op_equals_separate_projections(tmp_path, monkeypatch, threads, layout):
    """Stacked projections with one scale each (segments of 32, 16 and 21 rows) give, bit for bit, what three
    separate TernaryMatMul nodes give: one token (rows split across threads) and 2 x 9 tokens (tokens split), in
    every layout of the default path (lut: segments that start inside a 128-row group)."""
    if not kernels.layout_supported(kernels.LAYOUTS.index(layout), kernels.isa_index()):
        pytest.skip(f"the default path lacks the {layout} layout")
    monkeypatch.setenv("BITCONVERT_LAYOUT", layout)
    generator = torch.Generator().manual_seed(5)
    sizes, in_features = [32, 16, 21], 300
    parts = [torch.randint(-1, 2, (n, in_features), generator=generator, dtype=torch.int8) for n in sizes]
    scales = torch.tensor([1 / 0.031, 1 / 0.047, 1 / 0.02])
    node = helper.make_node("TernaryMatMul", ["X", "W", "S"], ["Y"], domain=DOMAIN, out_features=sum(sizes),
                            segments=sizes)
    model = single_node_model(sum(sizes), in_features, pack_ternary(torch.cat(parts)).numpy(), 1.0)
    model.graph.ClearField("node")
    model.graph.node.append(node)
    model.graph.initializer[0].CopyFrom(numpy_helper.from_array(scales.numpy(), "S"))
    x = torch.randn(2, 9, in_features, generator=generator) * 2
    for tokens in (x, x[:1, :1]):
        expected = torch.cat([ternary_matmul(tokens, pack_ternary(t), scales[i : i + 1], t.shape[0])
                              for i, t in enumerate(parts)], dim=-1).numpy()
        np.testing.assert_array_equal(run_single(tmp_path, model, {"X": tokens.numpy()}, threads), expected)


@pytest.mark.parametrize("threads", [1, 2])
def test_swiglu_op_equals_its_reference(tmp_path, threads):
    """activation="swiglu" (gate and up segments of 48 rows): silu(gate) * up of the node's two exact products.
    Against the torch reference (F.silu, whose exp is torch's own) within 4 ulp-scale relative error: each output is
    a product of two exact ternary results, one exp (both within 1 ulp of the true exp) and three roundings."""
    generator = torch.Generator().manual_seed(11)
    half, in_features = 48, 200
    ternary = torch.randint(-1, 2, (2 * half, in_features), generator=generator, dtype=torch.int8)
    scales = torch.tensor([1 / 0.03, 1 / 0.05])
    node = helper.make_node("TernaryMatMul", ["X", "W", "S"], ["Y"], domain=DOMAIN, out_features=2 * half,
                            segments=[half, half], activation="swiglu")
    model = single_node_model(2 * half, in_features, pack_ternary(ternary).numpy(), 1.0)
    model.graph.ClearField("node")
    model.graph.node.append(node)
    model.graph.initializer[0].CopyFrom(numpy_helper.from_array(scales.numpy(), "S"))
    x = torch.randn(3, 5, in_features, generator=generator) * 2
    for tokens in (x, x[:1, :1]):
        expected = ternary_matmul(tokens, pack_ternary(ternary), scales, 2 * half, [half, half], "swiglu")
        got = torch.from_numpy(run_single(tmp_path, model, {"X": tokens.numpy()}, threads))
        assert got.shape == (*tokens.shape[:-1], half)
        torch.testing.assert_close(got, expected, rtol=4 * 2**-23, atol=1e-30)


def test_swiglu_op_rejects_a_bad_activation(tmp_path):
    weight = np.zeros((24, 16), np.uint8)  # 96 rows
    for attributes, message in [({"segments": [48, 48], "activation": "gelu"}, "swiglu\" or absent"),
                                ({"segments": [64, 32], "activation": "swiglu"}, "two segments of equal size"),
                                ({"activation": "swiglu"}, "two segments of equal size")]:
        model = single_node_model(96, 16, weight, 1.0)
        model.graph.node[0].attribute.extend(helper.make_attribute(k, v) for k, v in attributes.items())
        with pytest.raises(BitconvertError, match=message):
            run_single(tmp_path, model, {"X": np.zeros((1, 1, 16), np.float32)})
    with pytest.raises(ValueError, match="two segments of equal size"):
        ternary_matmul(torch.zeros(1, 16), torch.from_numpy(weight), torch.ones(2), 96, [64, 32], "swiglu")


def test_segmented_op_rejects_bad_segments(tmp_path):
    weight = np.zeros((12, 16), np.uint8)  # 48 rows
    for segments, message in [([20, 28], "multiple of 16"), ([16, 16], "add up to out_features")]:
        model = single_node_model(48, 16, weight, 1.0)
        model.graph.node[0].attribute.append(helper.make_attribute("segments", segments))
        with pytest.raises(BitconvertError, match=message):
            run_single(tmp_path, model, {"X": np.zeros((1, 1, 16), np.float32)})
    model = single_node_model(48, 16, weight, 1.0)  # two segments, one scale
    model.graph.node[0].attribute.append(helper.make_attribute("segments", [32, 16]))
    with pytest.raises(Exception, match="one value per segment"):
        run_single(tmp_path, model, {"X": np.zeros((1, 1, 16), np.float32)})


@pytest.mark.parametrize("attention", ["bitconvert", "gqa"])
def test_fused_graph(attention, fused_onnx, fused_gqa_onnx, torch_model):
    """One attention node (bitconvert's CachedAttention by default, GroupQueryAttention with --attention gqa) and
    four TernaryMatMul nodes (qkv, o, gate_up, down) per layer, no attention in standard ops, the same I/O as the
    plain export."""
    model = onnx.load(fused_onnx if attention == "bitconvert" else fused_gqa_onnx)
    onnx.checker.check_model(model, full_check=True)
    layers = torch_model.config.num_hidden_layers
    count = lambda op: sum(node.op_type == op for node in model.graph.node)  # noqa: E731
    node = {"bitconvert": "CachedAttention", "gqa": "GroupQueryAttention"}[attention]
    assert count(node) == layers and count("TernaryMatMul") == 4 * layers
    assert count("CachedAttention") + count("GroupQueryAttention") == layers
    assert {p.key: p.value for p in model.metadata_props}["bitconvert.attention"] == attention
    assert count("Softmax") == 0 and count("ReduceMean") == 0
    # the SiLU MLP's activation runs inside its gate/up node: no Split, Sigmoid or elementwise Mul per layer
    swiglu = [node for node in model.graph.node
              if any(a.name == "activation" and a.s == b"swiglu" for a in node.attribute)]
    assert len(swiglu) == layers and count("Split") == 0 and count("Sigmoid") == 0 and count("Mul") == 0
    # each layer's residual adds and norms run inside the qkv and gate/up nodes (TernaryMatMul version 2: skip,
    # gamma, H); only the final norm before the lm_head is ORT's
    normed = [node for node in model.graph.node if node.op_type == "TernaryMatMul" and len(node.input) == 5]
    assert len(normed) == 2 * layers and all(node.input[4].endswith("layernorm.weight") for node in normed)
    assert sum(node.input[3] == "" for node in normed) == 1  # layer 0's qkv: no residual to add yet
    assert count("SkipSimplifiedLayerNormalization") == 1 and count("SimplifiedLayerNormalization") == 0
    assert {o.domain: o.version for o in model.opset_import}["com.bitconvert"] == 2
    assert [i.name for i in model.graph.input][:4] == ["input_ids", "attention_mask", "position_ids",
                                                       "past_key_values.0.key"]
    assert [o.name for o in model.graph.output][:3] == ["logits", "present.0.key", "present.0.value"]
    assert {p.key: p.value for p in model.metadata_props}["bitconvert.graph"] == "fused"


def test_fused_chunked_prompt_after_cache(fused_graph_onnx, torch_model):
    """Batch 1: a prompt fed in two chunks (the second with a cache) gives the one-pass logits."""
    decoder = OnnxDecoder(session(fused_graph_onnx))
    tokens = torch.randint(0, 256, (1, 9), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        expected = torch_model(tokens).logits.numpy()
    first, cache = decoder.step(tokens[:, :4].numpy(), decoder.empty_cache())
    second, _ = decoder.step(tokens[:, 4:].numpy(), cache)
    assert_logits_close(np.concatenate([first, second], axis=1), expected)


@pytest.mark.parametrize("batch", [1, 2])
def test_fused_cache_written_in_place_equals_growing_cache(fused_graph_onnx, batch):
    """The fused graph with past and present bound to one buffer (the attention node appends in place) gives the
    logits of the copying cache bit for bit, prompt and single steps, and refuses to step beyond its capacity; at
    batch 2 with bitconvert's attention (ORT's GroupQueryAttention shares at batch 1 only)."""
    decoder = OnnxDecoder(session(fused_graph_onnx))
    assert decoder.shares_cache
    tokens = np.random.default_rng(7).integers(0, 256, (batch, 10))
    if batch > 1 and not decoder.shares_batched_cache:
        assert decoder.empty_cache(batch, capacity=10).capacity == 0  # ORT's kernel: batch 1 only (see empty_cache)
        return
    shared, growing = decoder.empty_cache(batch, capacity=10), decoder.empty_cache(batch)
    assert (shared.capacity, growing.capacity) == (10, 0)
    returned = []
    for start, end in ((0, 6), (6, 7), (7, 8), (8, 10)):
        got, shared = decoder.step(tokens[:, start:end], shared)
        want, growing = decoder.step(tokens[:, start:end], growing)
        np.testing.assert_array_equal(got, want)
        returned.append((got, got.copy()))
    # the steps reuse one I/O binding, yet every step's logits are its own: none was overwritten by a later step
    assert all(np.array_equal(got, kept) for got, kept in returned)
    assert shared.length == growing.length == 10
    np.testing.assert_array_equal(shared.values["past_key_values.0.key"].numpy(),
                                  growing.values["past_key_values.0.key"].numpy())
    with pytest.raises(BitconvertError, match="holds 10 positions; 11 needed"):
        decoder.step(tokens[:, :1], shared)


@pytest.fixture(scope="session", params=["bitconvert", "gqa"])
def fused_fp16_cache_onnx(request, tiny_ternary, tmp_path_factory):
    return export_onnx(tiny_ternary, tmp_path_factory.mktemp("onnx-fused-fp16") / "model.onnx", graph="fused",
                       kv_cache="fp16", attention=request.param)


def test_fused_fp16_cache_stays_close_to_the_fp32_cache(fused_fp16_cache_onnx, fused_onnx, torch_model):
    """--kv-cache fp16: the cache inputs/outputs are float16; the keys and values are rounded to fp16 (2^-11
    relative; with GroupQueryAttention the queries and the attention too, CachedAttention computes in fp32), which
    moves the logits by a small fraction of their spread. The same bound as the lean decoder's fp16 cache
    (tests/test_decode.py: 5% of the logits' standard deviation; measured here 0.9%), over a prompt and
    teacher-forced single steps, each on the shared buffer written in place and on the growing cache (equal bit for
    bit); greedy tokens as PyTorch's."""
    model = onnx.load(fused_fp16_cache_onnx)
    types = {value.name: value.type.tensor_type.elem_type for value in [*model.graph.input, *model.graph.output]}
    assert types["past_key_values.0.key"] == types["present.0.value"] == TensorProto.FLOAT16
    assert types["logits"] == TensorProto.FLOAT
    assert {p.key: p.value for p in model.metadata_props}["bitconvert.kv_cache"] == "fp16"
    half, exact = OnnxDecoder(session(fused_fp16_cache_onnx)), OnnxDecoder(session(fused_onnx))
    tokens = np.random.default_rng(8).integers(0, 256, (1, 16))
    caches = {"shared": half.empty_cache(capacity=16), "growing": half.empty_cache(), "exact": exact.empty_cache()}
    assert caches["shared"].values["past_key_values.0.key"].data_type() == "tensor(float16)"
    errors, spread = [], None
    for start, end in ((0, 8), *((i, i + 1) for i in range(8, 16))):
        got, caches["shared"] = half.step(tokens[:, start:end], caches["shared"])
        growing, caches["growing"] = half.step(tokens[:, start:end], caches["growing"])
        want, caches["exact"] = exact.step(tokens[:, start:end], caches["exact"])
        np.testing.assert_array_equal(got, growing)
        spread = spread or float(want.std())
        errors.append(float(np.abs(got - want).max()))
    assert 0 < max(errors) <= 0.05 * spread, (max(errors), spread)
    prompt = [1, 5, 9, 2]
    assert half.generate(prompt, 24) == torch_model.generate(torch.tensor([prompt]), max_new_tokens=24,
                                                                do_sample=False)[0, 4:].tolist()
    with pytest.raises(BitconvertError, match="needs --graph fused"):
        export_onnx("unused", "unused.onnx", kv_cache="fp16")


def test_int8_layout_round_trip():
    weight = torch.randn(6, 80) * torch.logspace(-3, 1, 80)  # blocks of very different magnitudes
    b, scales, zero_points = to_matmulnbits_int8(weight, 32)  # K padded to 96
    assert b.shape == (6, 3, 32) and scales.shape == (18,) and zero_points.shape == (18,)
    restored = dequantize(b, scales, zero_points, 80, 6, 32, bits=8)
    step = scales.reshape(6, 3).repeat_interleave(32, dim=1)[:, :80]
    assert (restored - weight).abs().le(step / 2 * (1 + 1e-6)).all()  # within half a step of its block


@pytest.fixture(scope="session")
def tied_ternary(tmp_path_factory):
    """A tiny model with tied embeddings, converted (the folder)."""
    from bitconvert.convert import convert
    from tiny import make_tiny_llama

    source = make_tiny_llama(tmp_path_factory.mktemp("tied") / "src", tie_word_embeddings=True)
    converted = tmp_path_factory.mktemp("tied-out") / "ternary"
    convert(source, converted, progress=False)
    return converted


@pytest.fixture(scope="session")
def tied_int8(tied_ternary, tmp_path_factory):
    """The tied tiny model in PyTorch and its fused export with the int8 lm_head and the last position's logits
    only."""
    out = export_onnx(tied_ternary, tmp_path_factory.mktemp("onnx-int8") / "model.onnx", graph="fused",
                      lm_head="int8", logits="last")
    return load(tied_ternary, dtype=torch.float32), out


def test_int8_lm_head_last_logits(tied_int8):
    """MatMulNBits bits=8 for lm_head, the input Gather still on the float embedding; logits (B, 1, V) of the last
    position within the int8 bound, in one pass and after a cached step."""
    torch_model, path = tied_int8
    model = onnx.load(path)
    head = next(node for node in model.graph.node if node.op_type == "MatMulNBits")
    assert next(a.i for a in head.attribute if a.name == "bits") == 8
    gather = next(node for node in model.graph.node if node.op_type == "Gather")
    initializers = {tensor.name: tensor for tensor in model.graph.initializer}
    assert initializers[gather.input[0]].data_type == TensorProto.FLOAT
    decoder = OnnxDecoder(session(path))
    tokens = torch.randint(0, 256, (1, 9), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        expected = torch_model(tokens).logits.numpy()
    logits, _ = decoder.step(tokens.numpy(), decoder.empty_cache())
    assert logits.shape == (1, 1, expected.shape[-1])
    assert_logits_close(logits, expected[:, -1:], INT8_HEAD_TOLERANCE)
    _, cache = decoder.step(tokens[:, :8].numpy(), decoder.empty_cache())
    assert_logits_close(decoder.step(tokens[:, 8:].numpy(), cache)[0], expected[:, -1:], INT8_HEAD_TOLERANCE)


# The quantized heads on bitconvert's core: op name -> (quantize_rows, linear) of bitconvert.kernels.
HEAD_OPS = {"Int6MatMul": (kernels.int6_quantize_rows, kernels.int6_linear),
            "Int8MatMul": (kernels.int8_quantize_rows, kernels.int8_linear)}


def head_node_model(op: str, out_features: int, w_q: np.ndarray, d: np.ndarray):
    """One Int6MatMul or Int8MatMul node with W and D as initializers."""
    node = helper.make_node(op, ["X", "W", "D"], ["Y"], domain=DOMAIN, out_features=out_features)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["n", "t", "k"])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)],
                              initializer=[numpy_helper.from_array(w_q, "W"), numpy_helper.from_array(d, "D")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid(DOMAIN, 1)])


@pytest.mark.parametrize("op", HEAD_OPS)
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("isa", kernels.ISAS)
def test_head_op_bit_exact(tmp_path, monkeypatch, isa, threads, op):
    """Int6MatMul (Int8MatMul) equals bitconvert.kernels.int6_linear (int8_linear) bit for bit on the same SIMD
    path: one token (the rows split into parts) and 2 x 9 tokens (the tokens split), widths off the 64-column grid;
    the heads are approximations, but ONNX Runtime adds nothing to them."""
    if isa not in kernels.supported_isas():
        pytest.skip(f"this CPU lacks the {isa} path")
    monkeypatch.setenv("BITCONVERT_ISA", isa)
    quantize_rows, linear = HEAD_OPS[op]
    generator = torch.Generator().manual_seed(3)
    for out_features, in_features in [(1000, 576), (37, 100), (3000, 1024)]:
        weight = torch.randn(out_features, in_features, generator=generator) * 0.05
        w_q, d = quantize_rows(weight)
        model = head_node_model(op, out_features, w_q.numpy(), d.numpy())
        x = torch.randn(2, 9, in_features, generator=generator) * 2
        x[0, 1] = 0.0
        for tokens in (x, x[:1, :1]):
            expected = linear(tokens.reshape(-1, in_features), w_q, d, kernels.ISAS.index(isa), 1)
            got = run_single(tmp_path, model, {"X": tokens.numpy()}, threads)
            assert got.shape == (*tokens.shape[:-1], out_features)
            np.testing.assert_array_equal(got.reshape(-1, out_features), expected.numpy())


def test_int6_op_rejects_wrong_shapes(tmp_path):
    w_q, d = kernels.int6_quantize_rows(torch.randn(40, 64))  # (40, 48) codes, (40, 2) scales
    model = head_node_model("Int6MatMul", 40, w_q.numpy(), d.numpy())
    with pytest.raises(Exception, match=r"Int6MatMul: W has shape \(40, 48\), expected \(40, 96\) for K = 100"):
        run_single(tmp_path, model, {"X": np.zeros((1, 1, 100), np.float32)})
    bad = head_node_model("Int6MatMul", 41, w_q.numpy(), d.numpy())
    with pytest.raises(Exception, match=r"Int6MatMul: W has shape \(40, 48\), expected \(41, 48\)"):
        run_single(tmp_path, bad, {"X": np.zeros((1, 1, 64), np.float32)})


def test_int8_op_rejects_wrong_shapes(tmp_path):
    w_q, d = kernels.int8_quantize_rows(torch.randn(40, 64))  # (40, 64) codes, (40,) scales
    model = head_node_model("Int8MatMul", 40, w_q.numpy(), d.numpy())
    with pytest.raises(Exception, match=r"Int8MatMul: W has shape \(40, 64\), expected \(40, 128\) for K = 100"):
        run_single(tmp_path, model, {"X": np.zeros((1, 1, 100), np.float32)})
    bad = head_node_model("Int8MatMul", 40, w_q.numpy(), d[:39].numpy())
    with pytest.raises(Exception, match=r"Int8MatMul: D has shape \(39\), expected \(40\)"):
        run_single(tmp_path, bad, {"X": np.zeros((1, 1, 64), np.float32)})


# --lm-head choice -> (bitconvert.load's lm_head with the same codes, the node that computes it)
LIBRARY_HEADS = {"int6": ("int6", "Int6MatMul"), "int8-row": ("int8", "Int8MatMul")}


@pytest.fixture(scope="session", params=list(LIBRARY_HEADS))
def tied_library_head(request, tied_ternary, tmp_path_factory):
    """The tied tiny model's fused export with a head on bitconvert's core (Int6MatMul, Int8MatMul), last logits."""
    head = request.param
    return tied_ternary, head, export_onnx(tied_ternary, tmp_path_factory.mktemp(f"onnx-{head}") / "model.onnx",
                                           graph="fused", lm_head=head, logits="last")


def test_library_lm_head_equals_pytorch_head(tied_library_head):
    """The exported int6 (int8-row) head holds bitconvert.load(..., lm_head="int6" ("int8"))'s codes: the ONNX logits
    equal PyTorch's with the same head within the float tolerance of the rest of the graph (LOGIT_TOLERANCE), and
    stay within the int8 head's bound of the exact logits; metadata names the head, the Gather keeps the float
    table."""
    converted, head, path = tied_library_head
    torch_head, op = LIBRARY_HEADS[head]
    torch_model = load(converted, dtype=torch.float32)
    model = onnx.load(path)
    assert [node.op_type for node in model.graph.node].count(op) == 1
    assert "MatMulNBits" not in {node.op_type for node in model.graph.node}
    assert {p.key: p.value for p in model.metadata_props}["bitconvert.lm_head"] == head
    gather = next(node for node in model.graph.node if node.op_type == "Gather")
    assert {t.name: t for t in model.graph.initializer}[gather.input[0]].data_type == TensorProto.FLOAT
    decoder = OnnxDecoder(session(path))
    tokens = torch.randint(0, 256, (1, 9), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        exact = torch_model(tokens).logits.numpy()[:, -1:]
        quantized = load(converted, dtype=torch.float32, lm_head=torch_head)(tokens).logits.numpy()[:, -1:]
    logits, _ = decoder.step(tokens.numpy(), decoder.empty_cache())
    assert logits.shape == exact.shape
    assert_logits_close(logits, quantized, LOGIT_TOLERANCE)
    assert_logits_close(logits, exact, INT8_HEAD_TOLERANCE)
    assert np.abs(logits - exact).max() > 0  # the approximation is really there (not the exact head by mistake)
    # the shared-buffer cache writes the last logits straight into an array of ours: same values, and a later step
    # leaves the earlier array alone
    shared_logits, shared = decoder.step(tokens[:, :8].numpy(), decoder.empty_cache(capacity=10))
    kept = shared_logits.copy()
    last, _ = decoder.step(tokens[:, 8:].numpy(), shared)
    np.testing.assert_array_equal(last, logits)
    np.testing.assert_array_equal(shared_logits, kept)


# CachedAttention against the eager reference (fused_ops.group_query_attention, torch fp32): the two sum the same
# products in other orders and the op's exp is fast_exp.h's (within 1 ulp), so outputs of order 1 differ by a few
# fp32 ulps (measured below 1e-6); 1e-5 leaves that margin and fails on any wrong position, head, row or mask
# (errors of order 1).
ATTENTION_TOLERANCE = 1e-5


def cached_attention_model(heads: int, kv_heads: int, dim: int, positions: int):
    """One CachedAttention node; the rotary tables (positions, dim / 2) are initializers, as in the export."""
    names = ["qkv", "past_key", "past_value", "seqlens_k", "total_length", "cos", "sin", "bias"]
    node = helper.make_node("CachedAttention", names, ["out", "present_key", "present_value"], domain=DOMAIN,
                            num_heads=heads, kv_num_heads=kv_heads)
    angles = np.arange(positions)[:, None] * 10000.0 ** (-np.arange(dim // 2) / (dim // 2))
    tables = [numpy_helper.from_array(np.cos(angles).astype(np.float32), "cos"),
              numpy_helper.from_array(np.sin(angles).astype(np.float32), "sin")]
    integers = ("seqlens_k", "total_length")
    inputs = [helper.make_tensor_value_info(name, TensorProto.INT32 if name in integers else TensorProto.FLOAT, None)
              for name in names if name not in ("cos", "sin")]
    outputs = [helper.make_tensor_value_info(name, TensorProto.FLOAT, None) for name in node.output]
    graph = helper.make_graph([node], "g", inputs, outputs, initializer=tables)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid(DOMAIN, 1)]), tables


def attention_case(batch, length, past, heads=6, kv_heads=2, dim=40, seed=0):
    """Random qkv, cache and a bias that pads the first two positions of row 0 (when batch > 1)."""
    rng = np.random.default_rng(seed)
    total = past + length
    qkv = rng.standard_normal((batch, length, (heads + 2 * kv_heads) * dim)).astype(np.float32)
    key, value = (rng.standard_normal((batch, kv_heads, past, dim)).astype(np.float32) for _ in range(2))
    bias = np.zeros((batch, 1, length, total), np.float32)
    if batch > 1:
        bias[0, :, :, :2] = np.finfo(np.float32).min
    return {"qkv": qkv, "past_key": key, "past_value": value, "seqlens_k": np.full(batch, total - 1, np.int32),
            "total_length": np.array(total, np.int32), "bias": bias}


def reference_attention(feed, tables, heads, kv_heads):
    cos, sin = (torch.tensor(numpy_helper.to_array(table)) for table in tables)
    args = [torch.from_numpy(feed[name]) for name in ("qkv", "past_key", "past_value", "seqlens_k", "total_length")]
    out, key, value = group_query_attention(*args, cos, sin, torch.from_numpy(feed["bias"]), heads, kv_heads)
    return out.numpy(), key.numpy(), value.numpy()


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("batch,length,past", [(1, 1, 37), (2, 3, 5), (2, 7, 0), (3, 1, 300)])
def test_cached_attention_op_equals_reference(tmp_path, batch, length, past, threads):
    """A prompt, prompt chunks after a cache and single steps, batched with padding; 300 past rows cut the step
    into several parts; the past copied into a new present."""
    model, tables = cached_attention_model(6, 2, 40, 512)
    feed = attention_case(batch, length, past)
    path = tmp_path / "attention.onnx"
    onnx.save(model, path)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    out, key, value = session(path, options).run(None, feed)
    want_out, want_key, want_value = reference_attention(feed, tables, 6, 2)
    np.testing.assert_allclose(out, want_out, rtol=0, atol=ATTENTION_TOLERANCE)
    np.testing.assert_allclose(key, want_key, rtol=0, atol=ATTENTION_TOLERANCE)
    np.testing.assert_array_equal(value, want_value)  # values are copied, not computed


@pytest.mark.parametrize("isa", ["scalar", "auto"])
def test_cached_attention_op_writes_a_shared_buffer_in_place(tmp_path, monkeypatch, isa):
    """past and present bound to one buffer of 16 positions: the op writes rows 5..7 and leaves the others; the
    output equals the reference's and, bit for bit, the scalar loops' (BITCONVERT_ISA=scalar) and the copying
    call's."""
    if isa == "scalar":
        monkeypatch.setenv("BITCONVERT_ISA", "scalar")
    model, tables = cached_attention_model(6, 2, 40, 64)
    path = tmp_path / "attention.onnx"
    onnx.save(model, path)
    feed = attention_case(2, 3, 5, seed=1)
    want_out, want_key, want_value = reference_attention(feed, tables, 6, 2)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    runner = session(path, options)
    copied = runner.run(None, feed)[0]
    buffers = {}
    for name in ("key", "value"):
        buffer = np.full((2, 2, 16, 40), 7.0, np.float32)
        buffer[:, :, :5] = feed[f"past_{name}"]
        buffers[name] = ort.OrtValue.ortvalue_from_numpy(buffer)
    binding = runner.io_binding()
    binding.bind_output("out", "cpu")  # get_outputs() lists the outputs in binding order
    for name in ("qkv", "seqlens_k", "total_length", "bias"):
        binding.bind_cpu_input(name, feed[name])
    for name in ("key", "value"):
        binding.bind_ortvalue_input(f"past_{name}", buffers[name])
        binding.bind_ortvalue_output(f"present_{name}", buffers[name])
    runner.run_with_iobinding(binding)
    out = binding.get_outputs()[0].numpy()
    np.testing.assert_allclose(out, want_out, rtol=0, atol=ATTENTION_TOLERANCE)
    np.testing.assert_array_equal(out, copied)
    key, value = buffers["key"].numpy(), buffers["value"].numpy()
    np.testing.assert_allclose(key[:, :, :8], want_key, rtol=0, atol=ATTENTION_TOLERANCE)
    np.testing.assert_array_equal(value[:, :, :8], want_value)
    assert (key[:, :, 8:] == 7.0).all() and (value[:, :, 8:] == 7.0).all()
    if isa == "scalar":
        monkeypatch.delenv("BITCONVERT_ISA")
        np.testing.assert_array_equal(runner.run(None, feed)[0], out)


def test_cached_attention_op_rejects_bad_inputs(tmp_path):
    model, _ = cached_attention_model(6, 2, 40, 16)
    path = tmp_path / "attention.onnx"
    onnx.save(model, path)
    runner = session(path)
    feed = attention_case(2, 3, 5)
    with pytest.raises(Exception, match=r"attention_bias has shape \(2, 1, 3, 7\), expected \(B, 1, S, T\) = "
                                        r"\(2, 1, 3, 8\)"):
        runner.run(None, {**feed, "bias": feed["bias"][..., 1:]})
    with pytest.raises(Exception, match=r"past_key holds 4 positions; it must hold the T - S = 5 past ones"):
        runner.run(None, {**feed, "past_key": feed["past_key"][:, :, 1:], "past_value": feed["past_value"][:, :, 1:]})
    with pytest.raises(Exception, match=r"outside the T = 20 positions or the 16 rows of the rotary tables"):
        long = attention_case(1, 1, 19)
        runner.run(None, long)
    with pytest.raises(Exception, match=r"do not match 6 \+ 2 x 2 heads"):
        runner.run(None, {**feed, "qkv": feed["qkv"][..., 1:]})


def test_attention_option_errors():
    with pytest.raises(BitconvertError, match="--attention gqa needs --graph fused"):
        export_onnx("unused", "unused.onnx", attention="gqa")
    with pytest.raises(BitconvertError, match="unknown --attention 'sdpa'"):
        export_onnx("unused", "unused.onnx", graph="fused", attention="sdpa")


def test_cached_attention_op_with_an_fp16_cache(tmp_path):
    """An fp16 cache (the op's second kernel): the new keys and values are stored as fp16 rounded to nearest even,
    numpy's float16 bits exactly (values chosen on ties, in the subnormal range, past the largest fp16), and the
    output equals the reference reading the same fp16 cache in fp32 (ATTENTION_TOLERANCE, and 1e-6 relative for the
    large outputs the crafted values make)."""
    model, tables = cached_attention_model(6, 2, 40, 64)
    for value in [*model.graph.input[1:3], *model.graph.output[1:3]]:
        value.type.tensor_type.elem_type = TensorProto.FLOAT16
    path = tmp_path / "attention16.onnx"
    onnx.save(model, path)
    feed = attention_case(2, 3, 5, seed=2)
    feed["past_key"], feed["past_value"] = (feed[name].astype(np.float16) for name in ("past_key", "past_value"))
    values = feed["qkv"][..., (6 + 2) * 40:]  # the value heads: stored as they are, rounded
    values[0, 0, :8] = [1 + 2**-11, 1 + 3 * 2**-11, 65519.0, 65520.0, 1e6, -3e-8, 2**-25, 2**-25 * 3]
    values[0, 1, :4] = [6e-8, -6e-5, 2.0**-14 * (1 - 2**-12), np.inf]
    feed["qkv"][0, 1, :40] = 0.0  # keep one query head's output finite-checkable despite the inf value
    out, key, value = session(path).run(None, feed)
    assert key.dtype == value.dtype == np.float16
    want_out, want_key, want_value = reference_attention(feed, tables, 6, 2)
    np.testing.assert_array_equal(value.view(np.uint16), want_value.view(np.uint16))
    np.testing.assert_array_equal(value[:, :, 5:].view(np.uint16),
                                  values.reshape(2, 3, 2, 40).transpose(0, 2, 1, 3).astype(np.float16).view(np.uint16))
    np.testing.assert_array_equal(key.view(np.uint16), want_key.view(np.uint16))
    finite = np.isfinite(want_out)  # the huge values give outputs up to ~1e4: a few fp32 ulps relative there
    np.testing.assert_allclose(out[finite], want_out[finite], rtol=1e-6, atol=ATTENTION_TOLERANCE)


@pytest.fixture(scope="session", params=[("fp32", "all"), ("fp32", "last"), ("fp16", "all"), ("fp16", "last")],
                ids=lambda param: "-".join(param))
def fused_and_layer_onnx(request, tiny_ternary, tmp_path_factory):
    """The tiny model's fused export (bitconvert's attention) and its layer export, with one KV cache type and one
    choice of logits."""
    kv_cache, logits = request.param
    folder = tmp_path_factory.mktemp(f"onnx-layer-{kv_cache}-{logits}")
    return tuple(export_onnx(tiny_ternary, folder / graph / "model.onnx", graph=graph, kv_cache=kv_cache,
                             logits=logits) for graph in ("fused", "layer"))


def test_layer_graph(fused_and_layer_onnx, torch_model):
    """One DecoderLayer node per layer in place of the fused graph's five (no CachedAttention or TernaryMatMul left),
    chained x = y, skip = h1 (layer 0 without skip), the final norm ORT's; the I/O of the fused export; the checker
    and strict shape inference pass (com.bitconvert at version 2); metadata says layer, bitconvert attention."""
    fused, layer = (onnx.load(path) for path in fused_and_layer_onnx)
    onnx.checker.check_model(layer, full_check=True)
    config = torch_model.config
    count = lambda op: sum(node.op_type == op for node in layer.graph.node)  # noqa: E731
    assert count("DecoderLayer") == config.num_hidden_layers
    assert count("CachedAttention") == count("TernaryMatMul") == count("SimplifiedLayerNormalization") == 0
    assert count("SkipSimplifiedLayerNormalization") == 1
    nodes = [node for node in layer.graph.node if node.op_type == "DecoderLayer"]
    assert all(node.domain == DOMAIN and len(node.input) == 19 and len(node.output) == 4 for node in nodes)
    assert nodes[0].input[1] == "" and all(node.input[1] for node in nodes[1:])
    assert all(node.input[:2] == before.output[:2] for before, node in zip(nodes, nodes[1:]))
    assert [node.output[2:] for node in nodes] == [[f"present.{i}.key", f"present.{i}.value"]
                                                   for i in range(config.num_hidden_layers)]
    attributes = {a.name: helper.get_attribute_value(a) for a in nodes[0].attribute}
    assert attributes["num_heads"] == config.num_attention_heads
    assert attributes["kv_num_heads"] == config.num_key_value_heads
    assert attributes["epsilon"] == pytest.approx(config.rms_norm_eps)
    assert {o.domain: o.version for o in layer.opset_import}[DOMAIN] == 2
    signature = lambda model: [(v.name, v.type.tensor_type.elem_type)  # noqa: E731
                               for v in [*model.graph.input, *model.graph.output]]
    assert signature(layer) == signature(fused)
    metadata = {p.key: p.value for p in layer.metadata_props}
    assert (metadata["bitconvert.graph"], metadata["bitconvert.attention"]) == ("layer", "bitconvert")
    assert metadata["bitconvert.kv_cache"] == {p.key: p.value for p in fused.metadata_props}["bitconvert.kv_cache"]
    layer.graph.ClearField("value_info")
    inferred = onnx.shape_inference.infer_shapes(layer, strict_mode=True)
    types = {v.name: v.type.tensor_type for v in inferred.graph.value_info}
    assert types[nodes[0].output[0]].shape.dim[-1].dim_value == config.hidden_size
    assert types[nodes[0].output[1]].shape.dim[-1].dim_value == config.hidden_size


def run_padded_steps(path, threads: int, steps: int = 3) -> list[list[np.ndarray]]:
    """Every output (logits, then the presents) of a batch of two prompts, row 0 left-padded by two positions
    (attention_mask 0) before 5 tokens and row 1 of 7 tokens, then of ``steps`` single-token steps, each fed the
    previous run's presents as its past."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    runner = session(path, options)
    past_input = runner.get_inputs()[3]
    _, kv_heads, _, head_dim = past_input.shape
    cache_type = np.float16 if past_input.type == "tensor(float16)" else np.float32
    names = [output.name for output in runner.get_outputs()]
    past = {name.replace("present.", "past_key_values.", 1): np.zeros((2, kv_heads, 0, head_dim), cache_type)
            for name in names[1:]}
    tokens = np.random.default_rng(12).integers(0, 256, (2, 7 + steps))
    mask = np.ones_like(tokens)
    mask[0, :2] = 0
    results, start = [], 0
    for end in range(7, 8 + steps):
        positions = np.broadcast_to(np.arange(start, end), (2, end - start)).copy()
        outputs = runner.run(None, {"input_ids": tokens[:, start:end], "attention_mask": mask[:, :end],
                                    "position_ids": positions, **past})
        past = {name.replace("present.", "past_key_values.", 1): value
                for name, value in zip(names[1:], outputs[1:])}
        results.append(outputs)
        start = end
    return results


@pytest.mark.parametrize("threads", [1, 2])
def test_layer_graph_equals_fused_graph_bit_for_bit(fused_and_layer_onnx, threads):
    """DecoderLayer runs the fused graph's five nodes of a layer as one, on the same code: the logits and every
    present equal the fused graph's bit for bit (compared as integers), over a left-padded prompt batch and three
    single-token steps on the returned cache; fp32 and fp16 caches, all and last logits."""
    fused, layer = fused_and_layer_onnx
    want, got = run_padded_steps(fused, threads), run_padded_steps(layer, threads)
    assert len(got) == len(want) == 4
    for want_outputs, got_outputs in zip(want, got):
        assert len(got_outputs) == len(want_outputs)
        for expected, actual in zip(want_outputs, got_outputs):
            assert actual.dtype == expected.dtype and actual.shape == expected.shape
            bits = f"u{actual.itemsize}"
            assert np.array_equal(actual.view(bits), expected.view(bits))


def test_decoder_layer_refuses_bad_graphs(fused_and_layer_onnx, tmp_path):
    """A DecoderLayer whose weights are not constant initializers, or whose head count does not divide o_proj's
    columns, is refused when the session is made, with the op's own message (no crash)."""
    model = onnx.load(fused_and_layer_onnx[1])
    node = next(node for node in model.graph.node if node.op_type == "DecoderLayer")
    weight = next(t for t in model.graph.initializer if t.name == node.input[12])  # o_weight
    model.graph.initializer.remove(weight)
    model.graph.input.append(helper.make_tensor_value_info(weight.name, TensorProto.UINT8, list(weight.dims)))
    with pytest.raises(BitconvertError, match=r"DecoderLayer: the weights, norms and scales must be constant "
                                              r"initializers \(input 12 is not\)"):
        onnx.save(model, tmp_path / "input-weight.onnx")
        session(tmp_path / "input-weight.onnx")
    model = onnx.load(fused_and_layer_onnx[1])
    node = next(node for node in model.graph.node if node.op_type == "DecoderLayer")
    next(a for a in node.attribute if a.name == "num_heads").i = 3
    with pytest.raises(BitconvertError, match=r"DecoderLayer: num_heads \(3\) must be a positive multiple of "
                                              r"kv_num_heads \(2\)"):
        onnx.save(model, tmp_path / "heads.onnx")
        session(tmp_path / "heads.onnx")


@pytest.fixture(scope="session")
def wide_fused_and_layer_onnx(tmp_path_factory):
    """A 2-layer model wide enough that DecoderLayer cuts every product into several parts for one token and for a
    prompt (hidden 512, MLP 1536, 8 heads / 4 KV heads of 64), converted, exported with --graph fused and layer."""
    from tiny import make_tiny_llama

    root = tmp_path_factory.mktemp("wide-layer")
    source = make_tiny_llama(root / "src", hidden_size=512, intermediate_size=1536, num_attention_heads=8,
                             num_key_value_heads=4)
    convert(source, root / "ternary", progress=False)
    return tuple(export_onnx(root / "ternary", root / graph / "model.onnx", graph=graph, lm_head="int8-row",
                             logits="last") for graph in ("fused", "layer"))


@pytest.mark.parametrize("layout", ["2bit", "base3", "lut"])
def test_layer_graph_equals_fused_graph_in_parts(wide_fused_and_layer_onnx, monkeypatch, layout):
    """At widths where each product and the prompt's attention are cut into parts (SmolLM2-like), in every kernel
    layout this CPU computes on: the layer graph's logits and presents equal the fused graph's bit for bit at 2
    threads (the parts claimed by two participants, each from its own share first, then the other's)."""
    if not kernels.layout_supported(kernels.LAYOUTS.index(layout), kernels.isa_index()):
        pytest.skip(f"this CPU's path does not compute on the {layout} layout")
    monkeypatch.setenv("BITCONVERT_LAYOUT", layout)
    fused, layer = wide_fused_and_layer_onnx
    for want_outputs, got_outputs in zip(run_padded_steps(fused, 2), run_padded_steps(layer, 2)):
        for expected, actual in zip(want_outputs, got_outputs):
            assert np.array_equal(actual.view(np.uint32), expected.view(np.uint32))


@pytest.fixture(scope="session")
def fused_model(tiny_ternary):
    """The tiny converted model with its export stand-ins and stacked projections (what the fused graph traces)."""
    model, _ = load_for_inference(str(tiny_ternary), dtype=torch.float32)
    replace_bitlinears(model.eval(), "ternary")
    fuse_projections(model)
    return model


@pytest.mark.parametrize("kv_cache", ["fp32", "fp16"])
def test_decoder_layer_op_is_the_fused_layer(fused_model, kv_cache):
    """In PyTorch the decoder_layer op (the reference the exporter traces) gives the fused layers' outputs bit for
    bit: logits and presents of FusedKVCacheDecoder with and without layer_op; layer_op needs bitconvert's
    attention."""
    fused = FusedKVCacheDecoder(fused_model, kv_cache=kv_cache, attention="bitconvert").eval()
    layer = FusedKVCacheDecoder(fused_model, kv_cache=kv_cache, attention="bitconvert", layer_op=True).eval()
    assert all(map(layer.fits_layer_op, fused_model.model.layers))
    inputs = fused.example_inputs()
    with torch.no_grad():
        want, got = fused(*inputs), layer(*inputs)
    assert all(a.dtype == b.dtype and torch.equal(a, b) for a, b in zip(want, got))
    with pytest.raises(ValueError, match="layer_op needs attention 'bitconvert'"):
        FusedKVCacheDecoder(fused_model, attention="gqa", layer_op=True)


def test_layer_graph_keeps_the_fused_nodes_of_a_layer_that_does_not_fit(fused_model):
    """A layer outside DecoderLayer's contract (here an o_proj with a bias) is traced as the fused graph's nodes,
    next to the DecoderLayer node of the layer that fits."""
    o_proj = fused_model.model.layers[1].self_attn.o_proj
    o_proj.bias = torch.zeros(o_proj.out_features)
    try:
        decoder = FusedKVCacheDecoder(fused_model, attention="bitconvert", layer_op=True).eval()
        assert [decoder.fits_layer_op(layer) for layer in fused_model.model.layers] == [True, False]
        with torch.no_grad():
            nodes = [node.op_type for node in _trace(decoder, "bitconvert").model.graph]
    finally:
        o_proj.bias = None
    assert nodes.count("DecoderLayer") == 1 and nodes.count("CachedAttention") == 1
    assert nodes.count("TernaryMatMul") == 4


def test_layer_graph_option_errors(tiny_llama, tiny_ternary, tmp_path, capsys):
    """--graph layer refuses --attention gqa, --op matmulnbits, a full-precision source and a model none of whose
    layers fits the op (SubLN), naming the cause; on the command line one error line and exit 2, nothing written.
    With --kv-cache fp16 it exports."""
    message = ("--graph layer runs attention inside bitconvert's DecoderLayer op; drop --attention gqa or use "
               "--graph fused")
    with pytest.raises(BitconvertError, match=re.escape(message)):
        export_onnx("unused", "unused.onnx", graph="layer", attention="gqa")
    with pytest.raises(BitconvertError, match=r"--graph layer needs --op ternary .*use --graph fused with --op "
                                              r"matmulnbits"):
        export_onnx("unused", "unused.onnx", graph="layer", op="matmulnbits")
    fp32 = tmp_path / "fp32" / "model.onnx"
    with pytest.raises(BitconvertError, match="--graph layer needs a converted model: .* is full precision"):
        export_onnx(tiny_llama, fp32, graph="layer")
    assert not fp32.exists()
    sub_norm = tmp_path / "subln"
    convert(tiny_llama, sub_norm, ConvertOptions(sub_norm=True), progress=False)
    with pytest.raises(BitconvertError, match="--graph layer: no layer of .* fits one DecoderLayer node"):
        export_onnx(sub_norm, tmp_path / "subln-onnx" / "model.onnx", graph="layer")
    assert not (tmp_path / "subln-onnx" / "model.onnx").exists()
    capsys.readouterr()
    bad = tmp_path / "bad" / "model.onnx"
    assert main(["export", str(tiny_ternary), "--out", str(bad), "--graph", "layer", "--attention", "gqa"]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and message in error[0]
    assert not bad.exists()
    out = tmp_path / "layer" / "model.onnx"
    assert main(["export", str(tiny_ternary), "--out", str(out), "--graph", "layer", "--kv-cache", "fp16"]) == 0
    metadata = {p.key: p.value for p in onnx.load(out).metadata_props}
    assert (metadata["bitconvert.graph"], metadata["bitconvert.kv_cache"]) == ("layer", "fp16")
