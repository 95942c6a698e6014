"""The real SmolLM2-135M-Instruct end to end (slow: ~2 minutes; run with `python -m pytest -m slow`)."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from bitconvert.convert import convert
from bitconvert.load import load
from bitconvert.ppl import perplexity
from bitconvert.sources import load_full_precision, resolve_source

pytestmark = pytest.mark.slow

TEXT = ("The quick brown fox jumps over the lazy dog. It was a bright cold day in April, and the clocks were striking "
        "thirteen. Call me Ishmael. Some years ago, never mind how long precisely, I thought I would sail about a little.")


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    out = tmp_path_factory.mktemp("real") / "ternary-smollm2"
    result = convert("smollm2-135m", out, progress=False)
    assert len(result.report.layers) == 30 * 7
    return out


def test_real_conversion_loads_in_stock_transformers_with_matching_logits(converted):
    tokenizer = AutoTokenizer.from_pretrained(converted)
    ids = tokenizer(TEXT, return_tensors="pt").input_ids
    with torch.no_grad():
        stock = AutoModelForCausalLM.from_pretrained(converted)(ids).logits
        ours = load(converted)(ids).logits
    # 30 layers: an fp32 rounding difference can flip one activation's int8 rounding deep in the stack, so compare
    # the distributions rather than every logit bit: top-1 agreement and a small mean difference.
    assert (stock.argmax(-1) == ours.argmax(-1)).float().mean() > 0.95
    assert (stock - ours).abs().mean() < 1e-2 * stock.abs().mean()


def test_real_perplexity_full_precision_good_ternary_damaged(converted):
    model, tokenizer = load_full_precision(resolve_source("smollm2-135m"))
    ids = tokenizer(TEXT, return_tensors="pt", add_special_tokens=False).input_ids[0]
    full = perplexity(model, ids, seq_len=64, stride=32, progress=False).perplexity
    ternary = perplexity(load(converted), ids, seq_len=64, stride=32, progress=False).perplexity
    assert full < 40  # data.md: about 6.4 on plain English with long context
    assert ternary > 5 * full  # direct conversion without training destroys it (method.md)


def test_real_layer_export_equals_fused_export(converted, tmp_path):
    """The real model's ONNX decoder with one DecoderLayer node per layer and the int8-row head gives the fused
    graph's logits bit for bit over a prompt and 16 greedy steps on a shared-buffer cache, at 2 threads (30 layers
    whose products are cut into parts); and its greedy tokens are bitconvert.load(lm_head="int8")'s."""
    import numpy as np
    import onnxruntime as ort

    from bitconvert.export import export_onnx, session
    from bitconvert.export.generate import OnnxDecoder

    def two_threads():
        options = ort.SessionOptions()
        options.intra_op_num_threads = 2
        return options

    decoders = [OnnxDecoder(session(export_onnx(converted, tmp_path / graph / "model.onnx", graph=graph,
                                                lm_head="int8-row", logits="last"), two_threads()))
                for graph in ("fused", "layer")]
    prompt = AutoTokenizer.from_pretrained(converted)(TEXT, return_tensors="np").input_ids[:, :12]
    steps = []
    for decoder in decoders:
        logits, cache = decoder.step(prompt, decoder.empty_cache(capacity=12 + 16))
        outputs = [logits]
        for _ in range(16):
            logits, cache = decoder.step(np.array([[int(np.argmax(logits[0, -1]))]]), cache)
            outputs.append(logits)
        steps.append(outputs)
    for fused, layer in zip(*steps):
        assert np.array_equal(fused.view(np.uint32), layer.view(np.uint32))
    tokens = [int(np.argmax(logits[0, -1])) for logits in steps[1]]
    model = load(converted, lm_head="int8")
    ids = torch.from_numpy(prompt)
    with torch.no_grad():
        for _ in range(16):
            ids = torch.cat([ids, model(ids).logits[:, -1:].argmax(-1)], dim=1)
    assert ids[0, 12:].tolist() == tokens[:16]
