"""The lean decoder (bitconvert.kernels.decode) against bitconvert.load's transformers model and stock transformers.

Exactness: the decoder runs the same fp32 operations as transformers' LLaMA (fused norms, one C++ rotary + cache
call, one SDPA call, fused ternary products with per-row scales), so its logits equal the loaded model's in the
same mode (full prompt; or prompt then cached steps) bit for bit here; the asserts allow 1e-5 (fp32 rounding of a
different SDPA blocking, far below the logits' scale). Against stock transformers (which multiplies the two scales
before dividing) the existing tolerance of tests/test_convert.py, 1e-4, applies.
"""

import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

import bitconvert
from bitconvert import kernels
from bitconvert.bitlinear import BitLinear, PackedBitLinear
from bitconvert.errors import BitconvertError
from bitconvert.kernels.decode import Decoder, fuse_projections, supported
from tiny import make_tiny_llama

IDS = torch.tensor([256, 72, 101, 108, 108, 111, 32, 119, 111, 114, 108, 100, 33, 10, 65, 66])


def packed_layers(sizes, in_features, seed=0):
    torch.manual_seed(seed)
    return [PackedBitLinear.from_bitlinear(BitLinear(in_features, size)) for size in sizes]


@pytest.mark.parametrize("sizes", [(64, 32, 32), (13, 5, 7)], ids=["concatenated-tiles", "repacked"])
def test_fused_projection_equals_separate_products_bit_for_bit(sizes):
    modules = packed_layers(sizes, 67)
    x = torch.randn(5, 67) * 3
    separate = [module(x) for module in modules]
    fused = fuse_projections(modules)
    assert fused.out_features == sum(sizes)
    for got, want in zip(fused(x).split(sizes, dim=-1), separate):
        assert torch.equal(got, want)
    for module, want in zip(modules, separate):  # the modules still compute the same (views into the fused buffer)
        assert torch.equal(module(x), want)


def test_per_row_scales_equal_one_scale_per_product():
    (module,) = packed_layers((24,), 40, seed=3)
    x = torch.randn(3, 40)
    rows = module.weight_scale.expand(24).contiguous()
    got = kernels.linear(x, module.kernel_weight, 24, rows)
    assert torch.equal(got, kernels.linear(x, module.kernel_weight, 24, module.weight_scale))
    with pytest.raises(RuntimeError, match="one per output row"):
        kernels.linear(x, module.kernel_weight, 24, torch.ones(5))


def test_rope_cache_write_equals_transformers_rotary():
    heads, kv_heads, dim, count, start = 4, 2, 16, 3, 5
    qkv = torch.randn(count, (heads + 2 * kv_heads) * dim)
    cos, sin = torch.randn(16, dim), torch.randn(16, dim)
    keys, values = torch.zeros(kv_heads, 16, dim), torch.zeros(kv_heads, 16, dim)
    kernels.load_library()
    q = torch.ops.bitconvert.rope_cache_write(qkv, cos, sin, keys, values, start, heads)
    q_in, k_in, v_in = qkv.view(count, -1, dim).split([heads, kv_heads, kv_heads], dim=1)
    positions = slice(start, start + count)
    q_ref, k_ref = apply_rotary_pos_emb(q_in.transpose(0, 1)[None], k_in.transpose(0, 1)[None], cos[positions][None],
                                        sin[positions][None])
    assert torch.equal(q, q_ref[0])
    assert torch.equal(keys[:, positions], k_ref[0]) and torch.equal(values[:, positions], v_in.transpose(0, 1))
    assert keys[:, :start].abs().sum() == 0 and keys[:, start + count:].abs().sum() == 0


def test_decoder_matches_loaded_model_and_stock_transformers(tiny_ternary):
    model = bitconvert.load(tiny_ternary)
    with torch.no_grad():
        reference = model(IDS[None]).logits[0]
        stock = AutoModelForCausalLM.from_pretrained(tiny_ternary)(IDS[None]).logits[0]
    decoder = Decoder(model, max_len=32)
    torch.testing.assert_close(decoder.forward(IDS, logits="all"), reference, rtol=0, atol=1e-5)
    torch.testing.assert_close(decoder.forward(IDS[:0].new_tensor([5]), logits="all")[0],
                               model(torch.cat([IDS, IDS.new_tensor([5])])[None]).logits[0, -1].detach(),
                               rtol=0, atol=1e-5)
    decoder.reset()
    torch.testing.assert_close(decoder.forward(IDS), stock[-1], rtol=0, atol=1e-4)


def test_decoder_incremental_matches_cached_transformers(tiny_ternary):
    """Prompt in two chunks (the second attends to the cache through a mask), then single tokens."""
    model = bitconvert.load(tiny_ternary)
    decoder = Decoder(model, max_len=32)
    with torch.no_grad():
        first = model(IDS[None, :7], use_cache=True)
        second = model(IDS[None, 7:12], past_key_values=first.past_key_values, use_cache=True)
        third = model(IDS[None, 12:13], past_key_values=second.past_key_values, use_cache=True)
    torch.testing.assert_close(decoder.forward(IDS[:7], logits="all"), first.logits[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(decoder.forward(IDS[7:12], logits="all"), second.logits[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(decoder.forward(IDS[12:13]), third.logits[0, -1], rtol=0, atol=1e-5)


def test_greedy_parity_with_generate(tiny_ternary):
    model = bitconvert.load(tiny_ternary)
    expected = model.generate(IDS[None], max_new_tokens=12, do_sample=False)[0, len(IDS):].tolist()
    decoder = Decoder(model, max_len=64)
    assert decoder.generate(IDS.tolist(), 12) == expected
    assert decoder.generate(IDS.tolist(), 12, eos=(expected[2],)) == expected[:3]
    with pytest.raises(ValueError, match="exceed the cache"):
        decoder.generate(IDS.tolist(), 60)


def test_decoder_refuses_what_it_does_not_run(tiny_llama, tiny_ternary, tmp_path):
    from bitconvert.convert import convert
    from bitconvert.convert.pipeline import ConvertOptions

    assert supported(bitconvert.load(tiny_ternary)) is None
    assert "PackedBitLinear" in supported(AutoModelForCausalLM.from_pretrained(tiny_llama))
    subln = tmp_path / "subln"
    convert(tiny_llama, subln, ConvertOptions(sub_norm=True), progress=False)
    with pytest.raises(ValueError, match="does not support"):
        Decoder(bitconvert.load(subln))


def test_load_float_dtype_default_and_auto(tmp_path):
    from bitconvert.convert import convert

    out = tmp_path / "fp16-out"
    convert(make_tiny_llama(tmp_path / "fp16", dtype=torch.float16), out, progress=False)
    assert bitconvert.load(out).model.embed_tokens.weight.dtype == torch.float32
    assert bitconvert.load(out, dtype="auto").model.embed_tokens.weight.dtype == torch.float16
    with pytest.raises(BitconvertError, match="unknown lm_head"):
        bitconvert.load(out, lm_head="int4")


@pytest.mark.parametrize("lm_head", ["exact", "int8"])
def test_generate_cli_runs_a_converted_folder(tiny_ternary, capsys, lm_head):
    from bitconvert.cli import main
    from transformers import AutoTokenizer

    assert main(["generate", str(tiny_ternary), "--prompt", "Hello", "--max-new-tokens", "6", "--lm-head", lm_head]) == 0
    captured = capsys.readouterr()
    assert "tokens/s" in captured.err and "decoding" in captured.err
    tokenizer = AutoTokenizer.from_pretrained(tiny_ternary)
    prompt = tokenizer("Hello")["input_ids"]
    decoder = Decoder(bitconvert.load(tiny_ternary, lm_head=lm_head), max_len=16)
    tokens = decoder.generate(prompt, 6, eos=(tokenizer.eos_token_id,))
    assert captured.out.rstrip("\n") == "Hello" + tokenizer.decode(tokens, skip_special_tokens=True)
