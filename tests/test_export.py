"""ONNX export and ONNX Runtime deployment, on the tiny random model (exported once per session).

Exactness: the TernaryMatMul node is compared with the pure-torch BitLinear math bit for bit on every ISA path. The
whole model cannot be bit-exact: ORT and torch compute RMSNorm, rotary, softmax and the float matmuls with other
kernels, so values differ by a few ulps (relative ~1e-7) and, in principle, such a difference can move an activation
across a rounding boundary of the int8 quantization. On these fixed-seed inputs the logits differ by ~1e-7 of their
range; the bound LOGIT_TOLERANCE (1e-5 of the range) leaves 100x margin for the ulp noise while still failing on
any single flipped activation in the last layers (one int8 step is 1/127 of a token's range, ~1e-2).
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from bitconvert import kernels
from bitconvert.bitlinear import PackedBitLinear, quantize_activations
from bitconvert.cli import main
from bitconvert.errors import BitconvertError
from bitconvert.export import custom_op_library, export_onnx, session
from bitconvert.export.generate import OnnxDecoder, Sampling, _pick
from bitconvert.export.matmulnbits import dequantize, to_matmulnbits
from bitconvert.export.ops import DOMAIN, ternary_matmul
from bitconvert.export.runtime import ort_include_dir
from bitconvert.load import load
from bitconvert.packing import pack_ternary

LOGIT_TOLERANCE = 1e-5
# MatMulNBits at accuracy level 0 multiplies x_q/s by T*g in fp32 (not acc/weight_scale/s): same value up to float
# rounding; level 4 re-quantizes activations per block, an error of up to half an int8 step per element.
NBITS_TOLERANCE = {0: 1e-4, 4: 5e-2}


@pytest.fixture(scope="session")
def ternary_onnx(tiny_ternary, tmp_path_factory):
    return export_onnx(tiny_ternary, tmp_path_factory.mktemp("onnx") / "model.onnx")


@pytest.fixture(scope="session")
def nbits_onnx(tiny_ternary, tmp_path_factory):
    return export_onnx(tiny_ternary, tmp_path_factory.mktemp("onnx-nbits") / "model.onnx", op="matmulnbits")


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
@pytest.mark.parametrize("isa", kernels.ISAS)
@pytest.mark.parametrize("constant_weight", [True, False], ids=["initializer", "input"])
def test_op_bit_exact(tmp_path, monkeypatch, isa, constant_weight, threads):
    """Shapes off the 16-row/16-column grid; one token (work split by rows) and 18 (split by tokens)."""
    if isa not in kernels.supported_isas():
        pytest.skip(f"this CPU lacks the {isa} path")
    monkeypatch.setenv("BITCONVERT_ISA", isa)
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
            "position_ids": np.broadcast_to(np.arange(length), (batch, length)).copy(), **cache}


def assert_logits_close(actual, expected, tolerance=LOGIT_TOLERANCE):
    error = np.abs(actual - expected).max() / np.abs(expected).max()
    assert error <= tolerance, f"relative logit error {error:.2e} > {tolerance:.0e}"


def test_logits_match_pytorch(ternary_onnx, torch_model):
    decoder = OnnxDecoder(session(ternary_onnx))
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


def test_padding_mask(ternary_onnx):
    """A left-padded row gives the logits of the same tokens unpadded."""
    decoder = OnnxDecoder(session(ternary_onnx))
    tokens = np.array([[5, 6, 7, 8, 9]], np.int64)
    alone = decoder.session.run(["logits"], feed_for(tokens, decoder))[0]
    padded = np.array([[0, 0, 5, 6, 7, 8, 9], [1, 2, 3, 4, 5, 6, 7]], np.int64)
    feed = feed_for(padded, decoder)
    feed["attention_mask"][0, :2] = 0
    feed["position_ids"][0] = [0, 0, 0, 1, 2, 3, 4]
    batched = decoder.session.run(["logits"], feed)[0]
    assert_logits_close(batched[0, 2:], alone[0])


def test_greedy_matches_pytorch_32_steps(ternary_onnx, torch_model):
    prompt = [72, 101, 108, 108, 111]
    with torch.no_grad():
        expected = torch_model.generate(torch.tensor([prompt]), max_new_tokens=32, min_new_tokens=32,
                                        do_sample=False)[0, len(prompt):].tolist()
    assert OnnxDecoder(session(ternary_onnx)).generate(prompt, 32) == expected


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
