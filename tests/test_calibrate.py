"""Calibrated conversion: exact equivalence transforms, scale search never worse than absmean, error compensation,
block reconstruction, the layer-by-layer runner, the CLI and its bad inputs, and loading of the output."""

import json

import pytest
import torch
from transformers import AutoTokenizer, LlamaForCausalLM

import bitconvert.convert.calibrate as calibrate
from bitconvert.bitlinear import fake_quantize_activations
from bitconvert.cli import main
from bitconvert.convert import CalibrationConfig, ConvertOptions, convert
from bitconvert.convert.calib_data import calibration_tokens
from bitconvert.convert.device import resolve_device
from bitconvert.convert.equalize import (
    LayerActivations,
    _best_alpha,
    equalize_layer,
    scale_attention_inputs,
    scale_mlp_inputs,
    scale_up,
    scale_values,
)
from bitconvert.convert.gptq import gptq_fit
from bitconvert.convert.layers import LayerStream
from bitconvert.convert.readers import StateDictReader
from bitconvert.convert.reconstruct import relative_error
from bitconvert.convert.scale_search import Inputs, OutputError, TernaryFit, absmean_fit, search_scale
from bitconvert.load import load
from tiny import SAMPLE_IDS, assert_stock_transformers_matches_bitconvert_load, make_tiny_llama, tiny_config


def _run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(arg) for arg in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _model(seed=0, **overrides) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_config(**overrides)).eval()


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(SAMPLE_IDS).logits


def _output_error(x, weight, codes, scale) -> float:
    return (x.double() @ (weight.double() - codes.double() * scale.double()).t()).pow(2).sum().item()


# --- equivalence transforms: exact in full precision -----------------------------------------------------------

@pytest.mark.parametrize("transform, size", [
    (scale_attention_inputs, "hidden"), (scale_mlp_inputs, "hidden"), (scale_values, "kv"), (scale_up, "intermediate"),
])
@pytest.mark.parametrize("tied", [False, True])
def test_each_equivalence_transform_keeps_the_logits(transform, size, tied):
    model = _model(tie_word_embeddings=tied)
    config = model.config
    sizes = {"hidden": config.hidden_size, "intermediate": config.intermediate_size,
             "kv": config.num_key_value_heads * config.hidden_size // config.num_attention_heads}
    before = _logits(model)
    embedding = model.model.embed_tokens.weight.clone()
    generator = torch.Generator().manual_seed(1)
    for layer in model.model.layers:
        transform(layer, torch.exp(torch.randn(sizes[size], generator=generator)))  # factors over ~e^-3..e^3
    # Each scaled weight or gain is rounded once (relative 2^-24) and the products re-associate: the logits (|.| ~ 1)
    # move by a few fp32 ulps of the accumulated sums, far below 1e-4; a wrong head grouping moves them by ~1e-1.
    torch.testing.assert_close(_logits(model), before, rtol=1e-4, atol=1e-4)
    assert torch.equal(model.model.embed_tokens.weight, embedding)


def test_equalize_search_applies_exact_transforms_and_never_scores_worse():
    model = _model()
    before = _logits(model)
    stream = LayerStream(StateDictReader(model), model.config, torch.device("cpu"))
    hidden = stream.embed(SAMPLE_IDS.repeat(2, 1))
    for index, layer in enumerate(model.model.layers):
        acts = calibrate._search_activations(stream, layer, hidden)
        chosen = equalize_layer(layer, acts, calibrate._search_fit(CalibrationConfig()))
        assert set(chosen) == {"attention_in", "values", "mlp_in", "up"}
        assert all(site["error_ratio"] <= 1.0 for site in chosen.values())  # alpha = 0 (identity) is a candidate
        hidden = stream.run(layer, hidden)
    torch.testing.assert_close(_logits(model), before, rtol=1e-4, atol=1e-4)  # as above


def test_layer_stream_reproduces_the_model():
    """The layer-by-layer runner (SDPA's own causal mask, rotary per position) equals the whole model's forward."""
    model = _model()
    stream = LayerStream(StateDictReader(model), model.config, torch.device("cpu"))
    hidden = stream.embed(SAMPLE_IDS)
    for index in range(stream.num_layers):
        layer, passthrough = stream.layer(index)
        assert passthrough == {}
        hidden = stream.run(layer, hidden)
    with torch.no_grad():
        logits = model.lm_head(model.model.norm(hidden))
    torch.testing.assert_close(logits, _logits(model), rtol=1e-5, atol=1e-5)  # same ops, same order


def test_staged_forward_of_a_calibrated_layer_equals_its_forward():
    """calibrate_layer quantizes between the stages of one forward; its output is the converted layer's forward."""
    model = _model()
    stream = LayerStream(StateDictReader(model), model.config, torch.device("cpu"))
    hidden = stream.embed(SAMPLE_IDS.repeat(3, 1))
    layer, _ = stream.layer(0)
    fp_out = dict(stream.stages(layer, hidden))["output"]
    torch.testing.assert_close(fp_out, stream.run(layer, hidden), rtol=1e-5, atol=1e-6)  # same ops, other shapes
    info = calibrate.calibrate_layer(stream, layer, hidden, CalibrationConfig())
    assert sum(isinstance(module, calibrate.BitLinear) for module in layer.modules()) == 7
    torch.testing.assert_close(info["output"], stream.run(layer, hidden), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(info["output"], fp_out, rtol=1e-3, atol=1e-4)  # it did quantize


# --- scale/threshold search -------------------------------------------------------------------------------------

@pytest.mark.parametrize("rows", [256, 32])  # N > in: errors through H; N <= in: through the outputs
@pytest.mark.parametrize("seed", range(12))
def test_scale_search_never_worse_than_absmean(seed, rows):
    generator = torch.Generator().manual_seed(seed)
    out_features, in_features = 24, 40
    weight = torch.randn(out_features, in_features, generator=generator)
    if seed % 3 == 1:
        weight = weight ** 3  # heavy tails
    if seed % 3 == 2:
        weight[:, :4] *= 10  # a few large columns
    x = torch.randn(rows, in_features, generator=generator)
    x[:, seed % in_features] *= 20  # an outlier channel, as LLM activations have
    x_q = fake_quantize_activations(x)
    fit = search_scale(OutputError(weight, Inputs.quantized(x)))
    absmean = absmean_fit(weight)
    searched, baseline = _output_error(x_q, weight, fit.codes, fit.scale), _output_error(x_q, weight, absmean.codes, absmean.scale)
    # The traces are fp32 products summed in float64: relative error ~1e-6 of tr(W H W^T), which bounds any tie.
    assert searched <= baseline * (1 + 1e-5)
    assert fit.error == pytest.approx(searched, rel=1e-4)
    assert set(fit.codes.unique().tolist()) <= {-1, 0, 1}


@pytest.mark.parametrize("rows", [64, 300])
def test_output_error_is_the_same_through_the_outputs_and_through_h(rows):
    """Both ways of evaluating E(T) and a*(T) agree, and the integer product X T^T is exact."""
    generator = torch.Generator().manual_seed(rows)
    weight = torch.randn(48, 200, generator=generator)
    inputs = Inputs.quantized(torch.randn(rows, 200, generator=generator) * torch.rand(200, generator=generator) * 5)
    codes = torch.randint(-1, 2, (48, 200), dtype=torch.int8, generator=generator)
    exact = (inputs.codes.double() @ codes.double().t()) / inputs.scale.double()
    assert torch.allclose(inputs.times_codes(codes).double(), exact, rtol=1e-7, atol=0)
    outputs, through_h = OutputError(weight, inputs, True), OutputError(weight, inputs, False)
    assert OutputError(weight, inputs).through_outputs == (rows <= 200)  # the cheaper way by default
    (a1, e1), (a2, e2) = outputs.best_scale(codes), through_h.best_scale(codes)
    # fp32 products summed in float64: the two differ by fp32 rounding, ~1e-6 relative
    assert a1.item() == pytest.approx(a2.item(), rel=1e-5) and e1 == pytest.approx(e2, rel=1e-5)
    reference = _output_error(inputs.x, weight, codes, a1)
    assert e1 == pytest.approx(reference, rel=1e-5)


def test_scale_search_by_hand_prefers_dropping_an_outlier():
    """W = [4, 1, 1, 1], X = I (output error = weight error): absmean g = 1.75 gives T = [1, 1, 1, 1], error
    2.25^2 + 3 * 0.75^2 = 6.75; the best ternary is a = 4 on T = [1, 0, 0, 0], error 3."""
    weight = torch.tensor([[4.0, 1.0, 1.0, 1.0]])
    h = Inputs.exact(torch.eye(4))
    absmean = absmean_fit(weight, OutputError(weight, h))  # 1 / 1.75 = 0.57 rounds to 1
    assert absmean.codes.tolist() == [[1, 1, 1, 1]]
    assert absmean.error == pytest.approx(2.25**2 + 3 * 0.75**2)
    fit = search_scale(OutputError(weight, h))
    assert fit.codes.tolist() == [[1, 0, 0, 0]] and fit.scale.item() == pytest.approx(4.0)
    assert fit.error == pytest.approx(3.0)


def test_equalization_factors_live_on_their_activations_device():
    """Every candidate factor, alpha = 0's identity included, is made where the activations are (the identity was
    made on the CPU, which stopped every calibration on CUDA in layer 0). The meta device stands in for CUDA."""
    devices = []

    def error(c: torch.Tensor) -> float:
        devices.append(c.device.type)
        return 0.0

    _best_alpha(torch.randn(8, 4, device="meta"), error)
    assert devices and set(devices) == {"meta"}


# --- error compensation -----------------------------------------------------------------------------------------

def test_gptq_compensates_on_a_hand_made_layer():
    """Two inputs that always carry the same value: W = [0.4, 0.4] on the grid {-1, 0, 1} rounds to [0, 0] (output
    error 0.8^2 per unit input); GPTQ moves the first column's error onto the second (0.4 + 0.4 = 0.8 -> 1), leaving
    0.2^2. With the scale re-fitted to [0, 1] (a = 0.8) the error vanishes."""
    x = torch.randn(64, 1).repeat(1, 2)
    weight = torch.tensor([[0.4, 0.4]])
    h = Inputs.exact(x)
    codes, scale = torch.zeros(1, 2, dtype=torch.int8), torch.tensor(1.0)  # round to nearest on {-1, 0, 1}
    error = _output_error(x, weight, codes, scale)
    fit = gptq_fit(OutputError(weight, h), TernaryFit(codes, scale, error, error))
    assert sorted(fit.codes.flatten().tolist()) == [0, 1]
    assert _output_error(x, weight, fit.codes, fit.scale) < 1e-3 * error


@pytest.mark.parametrize("seed", range(4))
def test_gptq_beats_round_to_nearest_on_correlated_inputs(seed):
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.randn(32, 32, generator=generator)
    inputs = Inputs.quantized(torch.randn(512, 32, generator=generator) @ mixing)
    x = inputs.x
    weight = torch.randn(16, 32, generator=generator)
    h = inputs
    objective = OutputError(weight, h)
    start = search_scale(objective)
    fit = gptq_fit(objective, start)
    assert _output_error(x, weight, fit.codes, fit.scale) < 0.9 * _output_error(x, weight, start.codes, start.scale)


# --- end to end -------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def calibrated(tiny_llama, calib_text, tmp_path_factory):
    out = tmp_path_factory.mktemp("calibrated") / "ternary"
    config = CalibrationConfig(data=str(calib_text), tokens=1024, reconstruct=True, reconstruct_steps=15,
                               reconstruct_lr=0.01)
    convert(tiny_llama, out, ConvertOptions(calibration=config), progress=False)
    return out


def test_calibrated_output_loads_in_stock_transformers_like_bitconvert_load(calibrated):
    assert_stock_transformers_matches_bitconvert_load(calibrated)


def test_calibrated_report_records_choices_and_improvements(calibrated):
    report = json.loads((calibrated / "bitconvert.json").read_text())
    assert report["options"]["calibration"]["gptq"] is True and report["options"]["calibration"]["tokens"] == 1024
    assert report["calibration"]["tokens"] == 1024
    assert report["calibration"]["device"] == str(resolve_device("auto"))  # the default: CUDA where present
    layers = report["calibration"]["layers"]
    assert len(layers) == 2
    for layer in layers:
        before, after = layer["reconstruct_error"]
        assert after < before  # block reconstruction lowered this block's error
    for projection in report["layers"]:
        assert projection["calibration_output_error"] <= projection["absmean_output_error"] * (1 + 1e-5)


def test_calibration_beats_direct_conversion_on_its_calibration_text(tiny_llama, tiny_ternary, calibrated, calib_text):
    """Per layer the choices only lower the error on the calibration batch; end to end on those very tokens the model
    must be much closer to full precision than round-to-nearest (measured: 10-20x lower logit MSE). On other text a
    random tiny model calibrated on one repeated sentence need not be: that is what the SmolLM2 perplexity measures."""
    ids = calibration_tokens(str(calib_text), AutoTokenizer.from_pretrained(tiny_llama), 1024, 512)

    def logits(model):
        with torch.no_grad():
            return model(ids).logits

    reference = logits(LlamaForCausalLM.from_pretrained(tiny_llama).eval())
    direct, calibrated_logits = logits(load(tiny_ternary)), logits(load(calibrated))
    assert (calibrated_logits - reference).pow(2).mean() < 0.5 * (direct - reference).pow(2).mean()


def test_cli_stage_switches_are_recorded(tiny_llama, calib_text, tmp_path, capsys):
    out = tmp_path / "out"
    code, stdout, _ = _run(capsys, tiny_llama, "--out", out, "--calibrate", "--calib-data", calib_text,
                           "--calib-tokens", 512, "--no-equalize", "--no-gptq", "--device", "cpu", "--quiet")
    assert code == 0 and "wrote" in stdout
    options = json.loads((out / "bitconvert.json").read_text())["options"]["calibration"]
    assert (options["optimal_scale"], options["equalize"], options["gptq"], options["reconstruct"]) == (True, False, False, False)
    assert options["device"] == "cpu"


def test_tied_embeddings_stay_tied_and_unchanged(calib_text, tmp_path, capsys):
    source = make_tiny_llama(tmp_path / "tied", tie_word_embeddings=True)
    out = tmp_path / "out"
    code, _, _ = _run(capsys, source, "--out", out, "--calibrate", "--calib-data", calib_text, "--calib-tokens", 512,
                      "--quiet")
    assert code == 0
    original = LlamaForCausalLM.from_pretrained(source).model.embed_tokens.weight
    model = load(out)
    assert torch.equal(model.model.embed_tokens.weight, original)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


# --- bad input --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", ["missing", "empty", "short", "zero_tokens", "no_calibrate", "cuda"])
def test_bad_calibration_input_is_one_line_and_no_output(case, tiny_llama, calib_text, tmp_path, capsys):
    data = tmp_path / "calib.txt"
    extra = []
    if case == "empty":
        data.write_text("")
    elif case == "short":
        data.write_text("only a few bytes")
    else:
        data.write_text(calib_text.read_text())
    if case == "missing":
        data = tmp_path / "nowhere.txt"
    argv = [tiny_llama, "--out", tmp_path / "out", "--calibrate", "--calib-data", data, "--quiet"]
    if case == "zero_tokens":
        extra = ["--calib-tokens", 0]
    if case == "no_calibrate":
        argv.remove("--calibrate")
    if case == "cuda":
        if torch.cuda.is_available():
            pytest.skip("a CUDA device is present")
        extra = ["--device", "cuda"]
    code, _, err = _run(capsys, *argv, *extra)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("bitconvert: error:")
    expected = {"missing": "--calib-data", "empty": "--calib-data", "short": "--calib-data",
                "zero_tokens": "--calib-tokens", "no_calibrate": "only applies with --calibrate",
                "cuda": "no CUDA device"}[case]
    assert expected in err
    assert [path.name for path in tmp_path.iterdir()] == ["calib.txt"]


def test_interrupted_calibration_leaves_nothing(tiny_llama, calib_text, tmp_path, capsys, monkeypatch):
    calls = []

    def interrupted(*args, **kwargs):
        calls.append(1)
        raise KeyboardInterrupt

    monkeypatch.setattr(calibrate, "calibrate_layer", interrupted)
    code, _, err = _run(capsys, tiny_llama, "--out", tmp_path / "out", "--calibrate", "--calib-data", calib_text,
                        "--quiet")
    assert calls and code == 130 and "interrupted" in err
    assert sorted(path.name for path in tmp_path.iterdir()) == []


def test_relative_error_weighs_each_token_by_its_own_size():
    """Block reconstruction's loss: a token 10^4 times larger than the others (an attention sink) counts like any
    other token, and the value is the mean of the per-token relative squared errors."""
    generator = torch.Generator().manual_seed(0)
    target = torch.randn(2, 8, 16, generator=generator)
    output = target + 0.1 * torch.randn(2, 8, 16, generator=generator)
    per_token = (output - target).pow(2).sum(-1) / target.pow(2).sum(-1)
    torch.testing.assert_close(relative_error(output, target), per_token.mean())
    sink = torch.ones(2, 8, 1)
    sink[:, 0] = 1e4
    torch.testing.assert_close(relative_error(output * sink, target * sink), per_token.mean())
