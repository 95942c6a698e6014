"""The lean decoder (bitconvert.kernels.decode) against bitconvert.load's transformers model and stock transformers.

Exactness: the decoder's per-op path runs the same fp32 operations as transformers' LLaMA (fused norms, one C++
rotary + cache call, one SDPA call, fused ternary products with per-row scales), so its logits equal the loaded
model's in the same mode (full prompt; or prompt then cached steps) bit for bit here; the asserts allow 1e-5 (fp32
rounding of a different SDPA blocking, far below the logits' scale). The fused single-token step (the default for
decoding) sums in another order; its tolerance is argued above its tests at the end of this file. Against stock transformers (which multiplies the two scales
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
from bitconvert.kernels.decode import KV_CACHE_DTYPES, Decoder, fuse_projections, supported
from tiny import make_tiny_llama

IDS = torch.tensor([256, 72, 101, 108, 108, 111, 32, 119, 111, 114, 108, 100, 33, 10, 65, 66])


def packed_layers(sizes, in_features, seed=0):
    torch.manual_seed(seed)
    return [PackedBitLinear.from_bitlinear(BitLinear(in_features, size)) for size in sizes]


def default_path_layout(layout: str) -> int:
    """The index of ``layout``, skipping the test where the default ISA path does not compute on it."""
    index = kernels.LAYOUTS.index(layout)
    if not kernels.layout_supported(index, kernels.isa_index()):
        pytest.skip(f"the default ISA path lacks the {layout} layout")
    return index


@pytest.mark.parametrize("layout", kernels.LAYOUTS)
@pytest.mark.parametrize("sizes", [(64, 32, 32), (13, 5, 7), (96, 96), (128, 256)],
                         ids=["tiles", "repacked", "tiles-not-lut-groups", "lut-groups"])
def test_fused_projection_equals_separate_products_bit_for_bit(sizes, layout, monkeypatch):
    """Modules already repacked in ``layout`` (as ``bitconvert.load`` leaves them) fused into one product: their
    buffers are concatenated where each part is whole row blocks (16 rows; lut: 128-row groups), else repacked."""
    name, layout = layout, default_path_layout(layout)
    modules = packed_layers(sizes, 67)
    x = torch.randn(5, 67) * 3
    separate = [module(x) for module in modules]  # (the default backend re-prepares a module in its own layout)
    monkeypatch.setenv("BITCONVERT_LAYOUT", name)
    backend = kernels.KernelBackend()
    for module in modules:
        backend.prepare(module)
        assert module.kernel_layout == layout
    fused = fuse_projections(modules, layout)
    assert fused.layout == layout
    assert fused.out_features == sum(sizes)
    for got, want in zip(fused(x).split(sizes, dim=-1), separate):
        assert torch.equal(got, want)
    for module, want in zip(modules, separate):  # the modules still compute the same (views into the fused buffer)
        assert torch.equal(module(x), want)


def test_per_row_scales_equal_one_scale_per_product():
    (module,) = packed_layers((24,), 40, seed=3)
    x = torch.randn(3, 40)
    rows = module.weight_scale.expand(24).contiguous()
    weight, layout = module.kernel_weight, module.kernel_layout
    got = kernels.linear(x, weight, 24, rows, layout=layout)
    assert torch.equal(got, kernels.linear(x, weight, 24, module.weight_scale, layout=layout))
    with pytest.raises(RuntimeError, match="one per output row"):
        kernels.linear(x, weight, 24, torch.ones(5), layout=layout)


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


def test_rope_cache_write_fp16_cache_holds_the_fp32_values_rounded():
    """An fp16 cache gets what an fp32 cache gets, rounded to nearest fp16 (ties to even) as torch's .half() rounds it;
    values beyond fp16's range (65504) become inf, as .half() makes them."""
    heads, kv_heads, dim, count, start = 4, 2, 18, 5, 3
    generator = torch.Generator().manual_seed(0)
    width = (heads + 2 * kv_heads) * dim
    qkv = torch.randn(count, width, generator=generator) * torch.logspace(-8, 5, width)
    qkv[:, -1], qkv[:, -2] = 1e6, 1e-9  # in the last value head: beyond fp16's range, and below its smallest value
    cos, sin = torch.randn(16, dim, generator=generator), torch.randn(16, dim, generator=generator)
    kernels.load_library()
    caches = {dtype: (torch.zeros(kv_heads, 16, dim, dtype=dtype), torch.zeros(kv_heads, 16, dim, dtype=dtype))
              for dtype in (torch.float32, torch.float16)}
    queries = {dtype: torch.ops.bitconvert.rope_cache_write(qkv, cos, sin, *cache, start, heads)
               for dtype, cache in caches.items()}
    assert torch.equal(queries[torch.float16], queries[torch.float32])  # the queries stay fp32
    for full, half in zip(caches[torch.float32], caches[torch.float16]):
        assert torch.equal(half, full.half())
        assert (half[:, start:start + count] != 0).any() and half[:, :start].abs().sum() == 0
    values = caches[torch.float16][1][-1, start:start + count]
    assert values[:, -1].isinf().all() and (values[:, -2] == 0).all()  # overflow, underflow
    with pytest.raises(RuntimeError, match="fp32 or fp16 KV cache"):
        torch.ops.bitconvert.rope_cache_write(qkv, cos, sin, caches[torch.float32][0], caches[torch.float16][1],
                                              start, heads)


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
    """Prompt in two chunks (the second attends to the cache through a mask), then a single token on the per-op path
    (the fused step is compared with it below)."""
    model = bitconvert.load(tiny_ternary)
    decoder = Decoder(model, max_len=32, fused_step=False)
    with torch.no_grad():
        first = model(IDS[None, :7], use_cache=True)
        second = model(IDS[None, 7:12], past_key_values=first.past_key_values, use_cache=True)
        third = model(IDS[None, 12:13], past_key_values=second.past_key_values, use_cache=True)
    torch.testing.assert_close(decoder.forward(IDS[:7], logits="all"), first.logits[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(decoder.forward(IDS[7:12], logits="all"), second.logits[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(decoder.forward(IDS[12:13]), third.logits[0, -1], rtol=0, atol=1e-5)


def test_fp16_kv_cache_stays_close_to_the_exact_cache(tiny_ternary):
    """An fp16 cache rounds each key and value by at most 2^-11 of its size; through attention that moves the hidden
    states by about 1e-4 relative, and the int8 activation codes this flips in the next products move the logits
    further: by 0.3-2% of the logits' standard deviation on tiny random models (measured: 3 seeds x 2 shapes, the
    largest error over a 16-token prompt and 24 teacher-forced steps). Bound: 5%. Greedy tokens agreed in all six."""
    model = bitconvert.load(tiny_ternary)
    exact, half = Decoder(model, max_len=64), Decoder(model, max_len=64, kv_cache="fp16")
    tokens = exact.generate(IDS.tolist(), 24)
    assert half.generate(IDS.tolist(), 24) == tokens
    exact.reset()
    half.reset()
    errors, spread = [], None
    for ids in [IDS, *torch.tensor(tokens[:-1]).split(1)]:  # the prompt, then the same tokens fed to both
        want, got = exact.forward(ids, logits="all"), half.forward(ids, logits="all")
        spread = spread or float(want.std())
        errors.append(float((got - want).abs().max()))
    assert 0 < max(errors) <= 0.05 * spread, (max(errors), spread)  # rounded, and close
    with pytest.raises(ValueError, match="unknown KV cache type 'int8'"):
        Decoder(model, max_len=8, kv_cache="int8")


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


def test_generate_cli_refuses_an_fp16_cache_it_cannot_give(tiny_llama, tmp_path, capsys):
    from bitconvert.cli import main
    from bitconvert.convert import convert
    from bitconvert.convert.pipeline import ConvertOptions

    subln = tmp_path / "subln"
    convert(tiny_llama, subln, ConvertOptions(sub_norm=True), progress=False)
    onnx_file = tmp_path / "m.onnx"
    onnx_file.write_bytes(b"not read: the option is refused first")
    for model, message in ((subln, "needs the lean decoder"), (onnx_file, "applies to converted folders")):
        assert main(["generate", str(model), "--prompt", "Hi", "--kv-cache", "fp16"]) != 0
        error = capsys.readouterr().err.strip().splitlines()[-1]  # after the weights' loading bar, if any
        assert error.startswith("bitconvert: error:") and message in error and "--kv-cache" in error, error


def test_load_float_dtype_default_and_auto(tmp_path):
    from bitconvert.convert import convert

    out = tmp_path / "fp16-out"
    convert(make_tiny_llama(tmp_path / "fp16", dtype=torch.float16), out, progress=False)
    assert bitconvert.load(out).model.embed_tokens.weight.dtype == torch.float32
    assert bitconvert.load(out, dtype="auto").model.embed_tokens.weight.dtype == torch.float16
    with pytest.raises(BitconvertError, match="unknown lm_head"):
        bitconvert.load(out, lm_head="int3")


@pytest.mark.parametrize("lm_head, kv_cache", [("exact", "fp32"), ("int8", "fp32"), ("int6", "fp32"), ("int4", "fp32"),
                                               ("int8", "fp16")])
def test_generate_cli_runs_a_converted_folder(tiny_ternary, capsys, lm_head, kv_cache):
    from bitconvert.cli import main
    from transformers import AutoTokenizer

    assert main(["generate", str(tiny_ternary), "--prompt", "Hello", "--max-new-tokens", "6", "--lm-head", lm_head,
                 "--kv-cache", kv_cache]) == 0
    captured = capsys.readouterr()
    assert "tokens/s" in captured.err and "decoding" in captured.err
    tokenizer = AutoTokenizer.from_pretrained(tiny_ternary)
    prompt = tokenizer("Hello")["input_ids"]
    decoder = Decoder(bitconvert.load(tiny_ternary, lm_head=lm_head), max_len=16, kv_cache=kv_cache)
    tokens = decoder.generate(prompt, 6, eos=(tokenizer.eos_token_id,))
    assert captured.out.rstrip("\n") == "Hello" + tokenizer.decode(tokens, skip_special_tokens=True)


# The fused single-token step (decode_layer, csrc/decode_step.cpp) against the per-op path.
#
# Tolerance: the ternary products, the rotary embedding and the cache write are the same code on equal inputs; only
# the RMSNorm sum of squares and attention's dot products and softmax sums are added in another fp32 order than
# torch's. That moves those results by a few fp32 ulps (relative ~1e-7) and the logits (|logit| < 2 here) by
# 0.6e-7 to 2e-7 (measured on these models); FUSED_TOLERANCE = 1e-5 is ~50x that. Rarely, such an ulp moves a
# product's input across a rounding boundary of its int8 quantization (x * s within one ulp of k + 0.5), and that one
# code moves every logit by ~1e-4 to 1e-3 (3.8e-4 measured, one step in 72): FLIP_TOLERANCE bounds that step.
# So the test compares teacher-forced steps (each starts from the per-op path's cache, so a flip does not carry
# over) and requires nearly all of them within FUSED_TOLERANCE. A real error is systematic and fails that: a norm
# over n - 1 values, rotary at the next position, attention scaled by 1/D, the current or first position left out,
# gate and up swapped, or the wrong KV head for a query head each moved every step of these models by 1.5e-3 to
# 0.6 (checked on the per-op path with each mistake put in).
FUSED_TOLERANCE = 1e-5
FLIP_TOLERANCE = 2e-3
STEP_SHAPES = {
    "gqa-4x2-d16": {},
    "mha-2x2-d64": dict(hidden_size=128, num_attention_heads=2, num_key_value_heads=2, intermediate_size=96),
    # hidden not a multiple of 16 (padded tiles), head_dim not a multiple of the dot product's 8 lanes
    "gqa-6x2-d14-hidden84": dict(hidden_size=84, num_attention_heads=6, num_key_value_heads=2, intermediate_size=100),
}


@pytest.fixture(scope="module", params=list(STEP_SHAPES))
def step_model(request, tmp_path_factory):
    """A converted tiny random LLaMA of each shape in STEP_SHAPES, loaded."""
    from bitconvert.convert import convert

    root = tmp_path_factory.mktemp(request.param)
    convert(make_tiny_llama(root / "src", **STEP_SHAPES[request.param]), root / "out", progress=False)
    return bitconvert.load(root / "out")


@pytest.mark.parametrize("kv_cache", ["fp32", "fp16"])
@pytest.mark.parametrize("layout", kernels.LAYOUTS)
def test_fused_step_matches_per_op_path(step_model, layout, kv_cache, monkeypatch):
    """The same tolerances with an fp16 cache: both paths read the same fp16 values back to fp32 exactly (the fused
    step with F16C where the CPU has it), so what differs is still only the fp32 summation order."""
    monkeypatch.setenv("BITCONVERT_LAYOUT", kernels.LAYOUTS[default_path_layout(layout)])
    fused = Decoder(step_model, max_len=48, kv_cache=kv_cache)
    per_op = Decoder(step_model, max_len=48, fused_step=False, kv_cache=kv_cache)
    assert fused.keys.dtype == per_op.keys.dtype == KV_CACHE_DTYPES[kv_cache]
    assert fused.layout == per_op.layout == kernels.LAYOUTS.index(layout)
    want = per_op.forward(IDS[:5])
    assert torch.equal(fused.forward(IDS[:5]), want)  # prefill runs per operator in both
    errors = []
    for _ in range(24):
        fused.keys.copy_(per_op.keys)
        fused.values.copy_(per_op.values)
        token = want.argmax().reshape(1)
        got, want = fused.forward(token), per_op.forward(token)
        errors.append(float((got - want).abs().max()))
    assert sum(error <= FUSED_TOLERANCE for error in errors) >= 21, errors
    assert max(errors) <= FLIP_TOLERANCE, errors
    # the last step's k/v too; in an fp16 cache an fp32-ulp difference can move a value across a rounding boundary:
    # one fp16 step, 2^-8 for the |k| < 8 of these models
    cache_tolerance = FUSED_TOLERANCE if kv_cache == "fp32" else FUSED_TOLERANCE + 2**-11 * 8
    torch.testing.assert_close(fused.keys.float(), per_op.keys.float(), rtol=0, atol=cache_tolerance)
    torch.testing.assert_close(fused.values.float(), per_op.values.float(), rtol=0, atol=cache_tolerance)
    assert fused.position == per_op.position == 29 and fused.keys[:, :, 29:].abs().sum() == 0
    assert fused.generate(IDS.tolist(), 24) == per_op.generate(IDS.tolist(), 24)


@pytest.mark.parametrize("kv_cache", ["fp32", "fp16"])
def test_fused_step_attention_threads(tmp_path, kv_cache):
    """Attention over 600 positions with 9 query heads on 3 KV heads, so that two threads split a KV head's group
    (heads 0-4 and 5-8: both compute group 1's current key and value, the thread of its first head writes them to the
    cache): equal to one thread bit for bit (each head is computed alone; the products are exact), and close to the
    per-op path (one step: FLIP_TOLERANCE, see above), and so are the cache rows written. The steps run without the
    float lm_head, which is applied after, at one thread count: torch's BLAS sums it in an order that depends on the
    thread count on some CPUs (MKL on an AVX-512/AMX Xeon: logits 9e-8 apart from the same hidden state)."""
    from bitconvert.convert import convert

    convert(make_tiny_llama(tmp_path / "src", hidden_size=576, num_attention_heads=9, num_key_value_heads=3,
                            intermediate_size=64, num_hidden_layers=1, max_position_embeddings=1024),
            tmp_path / "out", progress=False)
    model = bitconvert.load(tmp_path / "out")
    prompt = torch.randint(0, 256, (600,), generator=torch.Generator().manual_seed(0))
    decoders = [Decoder(model, max_len=601, fused_step=fused, kv_cache=kv_cache) for fused in (True, True, False)]
    for decoder in decoders:
        decoder.lm_head = torch.nn.Identity()  # forward then returns the final-normed hidden state
    threads = torch.get_num_threads()
    try:
        hidden = []
        for decoder, count in zip(decoders, (1, 2, 2)):
            torch.set_num_threads(count)
            decoder.forward(prompt)
            hidden.append(decoder.forward(IDS[:1]))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(hidden[0], hidden[1])
    # every KV head's new position written once, by whichever thread: equal on 1 and 2 threads, and the per-op path's
    # up to the fp32 rounding of the norm before it (the cache test's tolerance, FUSED_TOLERANCE and one fp16 step)
    assert torch.equal(decoders[0].keys, decoders[1].keys) and torch.equal(decoders[0].values, decoders[1].values)
    cache_tolerance = FUSED_TOLERANCE if kv_cache == "fp32" else FUSED_TOLERANCE + 2**-11 * 8
    for cache in ("keys", "values"):
        fused, per_op = getattr(decoders[1], cache)[:, :, 600], getattr(decoders[2], cache)[:, :, 600]
        assert fused.abs().sum() > 0
        torch.testing.assert_close(fused.float(), per_op.float(), rtol=0, atol=cache_tolerance)
    with torch.inference_mode():
        logits = [model.lm_head(state) for state in hidden]
    torch.testing.assert_close(logits[0], logits[2], rtol=0, atol=FLIP_TOLERANCE)


@pytest.mark.parametrize("kv_cache", ["fp32", "fp16"])
def test_fused_step_cache_reads_equal_with_avx2_and_scalar(step_model, monkeypatch, kv_cache):
    """The fused step's AVX2 attention loops (F16C for the fp16 cache) against its scalar loops (BITCONVERT_ISA=scalar,
    which also runs the products and quantization on the scalar path: exact, so equal inputs give equal outputs):
    equal hidden states.
    This guards the fallback's wiring and any real error in either loop; a last-bit difference in attention would
    mostly vanish in o_proj's int8 quantization (summing the F16C lanes in reverse order passed), so the loops' exact
    equality rests on their shared lane order, which test_fused_step_matches_per_op_path bounds from outside."""
    decoder = Decoder(step_model, max_len=48, kv_cache=kv_cache)
    decoder.forward(IDS[:9])
    start = decoder.embed[IDS[9:10]]
    states = []
    for isa in ("", "scalar"):
        monkeypatch.setenv("BITCONVERT_ISA", isa)
        state = start.clone()
        keys, values = decoder.keys.clone(), decoder.values.clone()
        decoder._step_layers(state, 9)
        states.append(state)
        decoder.keys.copy_(keys)
        decoder.values.copy_(values)
    assert torch.equal(states[0], states[1])


def test_fused_step_exp_is_within_one_ulp_and_equal_on_both_paths():
    """csrc/fast_exp.h, the fused step's softmax and SiLU exp: against exp in float64 (correctly rounded to within
    far less than an fp32 ulp), below 1 ulp of the fp32 result wherever that is normal (a faithful exp: 0.96 measured
    over this range), below one subnormal step where it underflows gradually, 0 and inf where fp32's exp is; NaN stays
    NaN. The AVX2 loop (8 values at a time) gives the scalar reference's bits, which BITCONVERT_ISA=scalar runs."""
    x = torch.cat([torch.linspace(-110.0, 95.0, 400_003), torch.randn(10_000) * 3,
                   torch.tensor([0.0, -0.0, float("inf"), float("-inf"), 88.72, -87.33, -103.97, 1e-30, -1e-30])])
    got = torch.ops.bitconvert.exp_approx(x)
    reference = torch.ops.bitconvert.exp_approx(x, simd=False)
    assert torch.equal(got.view(torch.int32), reference.view(torch.int32))
    exact = torch.exp(x.double())
    rounded = exact.float()
    normal = torch.isfinite(rounded) & (rounded >= torch.finfo(torch.float32).tiny)
    ulp = (torch.nextafter(rounded, torch.tensor(float("inf"))) - rounded).double()
    assert ((got.double() - exact).abs() / ulp)[normal].max() < 1.0
    underflow = rounded < torch.finfo(torch.float32).tiny
    assert ((got.double() - exact).abs()[underflow] / 2.0**-149).max() < 1.0
    assert torch.equal(torch.isinf(got), torch.isinf(rounded)) and got[x == float("-inf")].item() == 0.0
    assert torch.ops.bitconvert.exp_approx(torch.tensor([float("nan")])).isnan().all()


def step_arguments(decoder, position=0, heads=None):
    """decode_layer's arguments for the first layer of ``decoder`` and a hidden state (1, hidden)."""
    return [torch.randn(1, decoder.embed.shape[1]), *decoder.step_arguments[0], position,
            heads or decoder.heads, decoder.eps, decoder.layout]


def test_decode_layer_refuses_bad_shapes(tiny_ternary):
    decoder = Decoder(bitconvert.load(tiny_ternary), max_len=8)
    step = torch.ops.bitconvert.decode_layer.default
    step(*step_arguments(decoder, position=7))  # the last position of the cache is fine
    cases = {
        "runs one token": lambda a: a.__setitem__(0, torch.randn(2, a[0].shape[1])),
        "input_norm must be": lambda a: a.__setitem__(1, a[1][:-1]),
        "qkv must be contiguous fp32": lambda a: a.__setitem__(2 + 1, a[3].double()),
        "repacked weight has": lambda a: a.__setitem__(3 + 1, a[4][:-16]),
        "expected hidden size": lambda a: (a.__setitem__(4, a[2]), a.__setitem__(5, a[3])),
        "exceed the cache": lambda a: a.__setitem__(15, 8),
        "not a multiple of": lambda a: a.__setitem__(16, 3),
        "qkv width": lambda a: a.__setitem__(16, 6),
        "rotary tables": lambda a: a.__setitem__(11, a[11].t()),
    }
    for message, corrupt in cases.items():
        arguments = step_arguments(decoder)
        corrupt(arguments)
        with pytest.raises(RuntimeError, match=message):
            step(*arguments)


def test_decode_layer_schema_and_fake_kernel(tiny_ternary):
    """The schema's mutation annotations match what the kernel writes, and the fake kernel traces."""
    decoder = Decoder(bitconvert.load(tiny_ternary), max_len=8)
    torch.library.opcheck(torch.ops.bitconvert.decode_layer.default, step_arguments(decoder, position=3),
                          test_utils=("test_schema", "test_faketensor"))
