"""BitLinear math: exact values by hand, STE gradients, lambda interpolation, packed-vs-training parity, the swap."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import LlamaForCausalLM

import bitconvert.bitlinear as bitlinear
from bitconvert import BitLinear, PackedBitLinear, TernaryConfig, pack_, quantize_, set_quant_lambda
from bitconvert.packing import pack_ternary
from bitconvert.bitlinear import (
    ReferenceBackend,
    fake_quantize_activations,
    fake_quantize_weight,
    int_matmul_reference,
    quantize_activations,
    ternarize,
    weight_scale,
)
from tiny import tiny_config

W = torch.tensor([[0.4, -0.2, 0.0, 1.2], [-0.6, 0.2, 0.9, -0.1]])
X = torch.tensor([[1.0, -0.5, 0.25, 2.0]])


def _bitlinear(weight, **options) -> BitLinear:
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    linear.weight.data.copy_(weight)
    return BitLinear.from_linear(linear, **options)


def test_absmean_ternary_by_hand():
    scale = weight_scale(W)  # mean |W| = 3.6 / 8
    assert scale.item() == pytest.approx(0.45, rel=1e-6)
    assert ternarize(W, scale).tolist() == [[1, 0, 0, 1], [-1, 0, 1, 0]]


def test_absmedian_ternary_by_hand():
    scale = weight_scale(W, "absmedian")  # lower median of |W| = 0.2
    assert scale.item() == pytest.approx(0.2, rel=1e-6)
    # W / 0.2 = [2, -1, 0, 6, -3, 1, 4.5, -0.5]; -0.5 rounds half to even (0)
    assert ternarize(W, scale).tolist() == [[1, -1, 0, 1], [-1, 1, 1, 0]]


def test_scale_clamped_for_all_zero_weights():
    assert weight_scale(torch.zeros(3, 3)).item() == pytest.approx(1e-5)


def test_activation_quantization_by_hand():
    x_q, scale = quantize_activations(X)
    assert scale.item() == pytest.approx(127 / 2.0)
    # X * 63.5 = [63.5, -31.75, 15.875, 127]: 63.5 rounds half to even -> 64
    assert x_q.tolist() == [[64, -32, 16, 127]]


def test_freezing_off_the_cpu_leaves_the_kernel_layout_alone(monkeypatch):
    """A layer trained on a GPU is frozen where it lives (finetune's export): the CPU kernels' repacking must not
    run there. Packed codes on the meta device stand in for CUDA: like it, no bitconvert kernel is registered for it."""
    monkeypatch.setattr(bitlinear, "pack_ternary", lambda codes: pack_ternary(codes).to("meta"))
    packed = PackedBitLinear.from_bitlinear(_bitlinear(W))
    assert packed.weight.device.type == "meta" and not hasattr(packed, "kernel_weight")


def test_packed_forward_by_hand():
    packed = PackedBitLinear.from_bitlinear(_bitlinear(W))
    x_q, scale = quantize_activations(X)
    acc = int_matmul_reference(x_q, packed.ternary())
    assert acc.tolist() == [[64 + 127, -64 + 16]]
    expected = torch.tensor([[191 * 0.45 / 63.5, -48 * 0.45 / 63.5]])
    torch.testing.assert_close(packed(X), expected, rtol=1e-6, atol=0)


def test_integer_accumulators_exact_at_extremes():
    in_features = 4096
    x_q = torch.tensor([[-128] * in_features, [127] * in_features, [-128, 127] * (in_features // 2)], dtype=torch.int8)
    ternary = torch.stack([torch.full((in_features,), -1), torch.ones(in_features), torch.zeros(in_features)]).to(torch.int8)
    expected = x_q.long() @ ternary.long().t()
    assert torch.equal(int_matmul_reference(x_q, ternary).long(), expected)
    assert expected[0, 0].item() == 128 * in_features


def test_integer_accumulators_random_shapes():
    torch.manual_seed(1)
    for n, k, m in [(1, 1, 1), (4, 1, 7), (2, 2, 9), (3, 67, 5), (17, 576, 13)]:
        x_q = torch.randint(-128, 128, (n, k), dtype=torch.int8)
        ternary = torch.randint(-1, 2, (m, k), dtype=torch.int8)
        result = int_matmul_reference(x_q, ternary)
        assert result.dtype == torch.int32
        assert torch.equal(result.long(), x_q.long() @ ternary.long().t())


def test_ste_gradients_pass_straight_through():
    torch.manual_seed(2)
    layer = _bitlinear(torch.randn(6, 8))
    x = torch.randn(3, 8, requires_grad=True)
    upstream = torch.randn(3, 6)
    (layer(x) * upstream).sum().backward()
    w_eff = fake_quantize_weight(layer.weight.detach())
    x_eff = fake_quantize_activations(x.detach())
    # d/dW of x_eff @ W_eff^T with dW_eff/dW = I (STE), and likewise for x
    torch.testing.assert_close(layer.weight.grad, upstream.t() @ x_eff)
    torch.testing.assert_close(x.grad, upstream @ w_eff)


def test_lambda_interpolates_between_full_precision_and_ternary():
    torch.manual_seed(3)
    weight, x = torch.randn(5, 16), torch.randn(4, 16)
    layer = _bitlinear(weight, quant_lambda=0.0)
    assert torch.equal(layer(x), F.linear(x, weight))
    layer.quant_lambda = 0.25
    w_mix = weight + 0.25 * (fake_quantize_weight(weight) - weight)
    x_mix = x + 0.25 * (fake_quantize_activations(x) - x)
    torch.testing.assert_close(layer(x), F.linear(x_mix, w_mix))
    with pytest.raises(ValueError, match="quant_lambda"):
        layer.quant_lambda = 1.5


@pytest.mark.parametrize("in_features", [16, 576, 4096])
def test_packed_matches_training_forward_within_fp32_rounding(in_features):
    """The training forward (lambda = 1) sums fp32 products x_q/s * T*g; the packed forward sums integers exactly and
    scales once. Their difference is bounded by the fp32 error of a length-K dot product (K + 4 roundings of at most
    2^-24 relative each: K additions, the two dequantizations, the two divisions) times sum_k |x_q/s| |T g|."""
    torch.manual_seed(in_features)
    layer = _bitlinear(torch.randn(32, in_features) * 0.02)
    x = torch.randn(8, in_features)
    packed = PackedBitLinear.from_bitlinear(layer)
    with torch.no_grad():
        training, inference = layer(x), packed(x)
    magnitude = fake_quantize_activations(x).abs() @ fake_quantize_weight(layer.weight.detach()).abs().t()
    bound = (in_features + 4) * 2.0**-24 * magnitude
    assert ((training - inference).abs() <= bound).all()


def test_packed_state_dict_uses_transformers_names():
    packed = PackedBitLinear.from_bitlinear(_bitlinear(W))
    state = packed.state_dict()
    assert set(state) == {"weight", "weight_scale"}
    assert state["weight"].dtype == torch.uint8 and state["weight"].shape == (1, 4)
    assert state["weight_scale"].item() == pytest.approx(1 / 0.45, rel=1e-6)


def test_reference_backend_keeps_no_unpacked_copy():
    packed = PackedBitLinear(4, 2)
    packed.weight = pack_ternary(ternarize(W, weight_scale(W)))
    ReferenceBackend().prepare(packed)
    packed.weight_scale = torch.tensor([1 / 0.45])
    expected = torch.tensor([[191 * 0.45 / 63.5, -48 * 0.45 / 63.5]])  # as in test_packed_forward_by_hand
    torch.testing.assert_close(ReferenceBackend().linear(X, packed), expected, rtol=1e-6, atol=0)
    assert {name for name, _ in packed.named_buffers()} == {"weight", "weight_scale"}
    assert not any(isinstance(value, torch.Tensor) and value.is_floating_point() and value.numel() > 1
                   for value in vars(packed).values())


def _tiny_model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_config()).eval()


def test_quantize_swaps_only_attention_and_mlp_projections():
    model = quantize_(_tiny_model(), TernaryConfig(mode="train"))
    swapped = {name for name, module in model.named_modules() if isinstance(module, BitLinear)}
    assert len(swapped) == 2 * 7
    assert isinstance(model.lm_head, nn.Linear) and not isinstance(model.lm_head, BitLinear)
    assert isinstance(model.model.embed_tokens, nn.Embedding)


def test_sub_norm_only_before_o_proj_and_down_proj():
    model = quantize_(_tiny_model(), TernaryConfig(mode="train", sub_norm=True))
    with_norm = {name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                 if isinstance(module, BitLinear) and module.sub_norm is not None}
    assert with_norm == {"o_proj", "down_proj"}


def test_quantize_refuses_a_model_without_projections():
    with pytest.raises(ValueError, match="no attention/MLP"):
        quantize_(nn.Sequential(nn.Linear(4, 4)), TernaryConfig())


def test_pack_after_training_matches_training_forward():
    model = quantize_(_tiny_model(), TernaryConfig(mode="train"))
    ids = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        training = model(ids).logits
        pack_(model)
        packed = model(ids).logits
    assert not any(isinstance(module, BitLinear) for module in model.modules())
    # per-layer differences are fp32 rounding (see above); through 2 layers they stay far below 1e-3
    torch.testing.assert_close(packed, training, rtol=0, atol=1e-3)


def test_set_quant_lambda_reaches_every_layer():
    model = quantize_(_tiny_model(), TernaryConfig(mode="train", quant_lambda=0.0))
    set_quant_lambda(model, 0.5)
    assert {module.quant_lambda for module in model.modules() if isinstance(module, BitLinear)} == {0.5}


def test_sub_norm_keeps_a_bfloat16_model_in_bfloat16():
    model = _tiny_model().to(torch.bfloat16)
    quantize_(model, TernaryConfig(mode="train", sub_norm=True))
    ids = torch.randint(0, 256, (1, 8))
    with torch.no_grad():
        assert model(ids).logits.dtype == torch.bfloat16
        pack_(model)
        assert model(ids).logits.dtype == torch.bfloat16


def _learned(weight, scale, **options) -> BitLinear:
    layer = _bitlinear(weight, weight_scale_method="learned", **options)
    layer.learned_scale.data.fill_(scale)
    return layer


def test_learned_scale_starts_at_absmean_and_is_an_fp32_parameter():
    layer = _bitlinear(W, weight_scale_method="learned")
    assert isinstance(layer.learned_scale, nn.Parameter) and layer.learned_scale.shape == (1,)
    assert layer.learned_scale.dtype == torch.float32
    assert layer.learned_scale.item() == pytest.approx(0.45, rel=1e-6)
    assert "learned_scale" in dict(layer.named_parameters())


def test_learned_scale_forward_is_codes_times_scale_exactly():
    layer = _learned(W, 0.5)
    # W / 0.5 = [[0.8, -0.4, 0, 2.4], [-1.2, 0.4, 1.8, -0.2]] -> codes [[1, 0, 0, 1], [-1, 0, 1, 0]]
    codes = torch.tensor([[1.0, 0, 0, 1], [-1, 0, 1, 0]])
    y = layer(X)
    assert torch.equal(y, F.linear(fake_quantize_activations(X), codes * 0.5))


def test_learned_scale_lsq_gradients_by_hand():
    layer = _learned(W, 0.5)
    x = X.clone().requires_grad_(True)
    upstream = torch.tensor([[1.0, -2.0]])
    (layer(x) * upstream).sum().backward()
    grad_w_eff = upstream.t() @ fake_quantize_activations(X)  # dL/dW_eff, (2, 4)
    # dQ/dW = 1 where |W/s| <= 1: [[0.8, -0.4, 0, 2.4], [-1.2, 0.4, 1.8, -0.2]]
    inside = torch.tensor([[1.0, 1, 1, 0], [0, 1, 0, 1]])
    torch.testing.assert_close(layer.weight.grad, grad_w_eff * inside)
    # dQ/ds = round(v) - v inside, sign(v) outside
    d_scale = torch.tensor([[1 - 0.8, 0.4, 0.0, 1.0], [-1.0, -0.4, 1.0, 0.2]])
    torch.testing.assert_close(layer.learned_scale.grad, (grad_w_eff * d_scale).sum().reshape(1))
    # the activations still pass straight through
    torch.testing.assert_close(x.grad, upstream @ (torch.tensor([[1.0, 0, 0, 1], [-1, 0, 1, 0]]) * 0.5))


def test_learned_scale_lambda_interpolates():
    torch.manual_seed(4)
    weight, x = torch.randn(5, 16), torch.randn(4, 16)
    layer = _learned(weight, 0.7, quant_lambda=0.0)
    assert torch.equal(layer(x), F.linear(x, weight))
    layer.quant_lambda = 0.25
    quantized = (weight / 0.7).round().clamp(-1, 1) * 0.7
    w_mix = 0.75 * weight + 0.25 * quantized
    x_mix = x + 0.25 * (fake_quantize_activations(x) - x)
    torch.testing.assert_close(layer(x), F.linear(x_mix, w_mix))
    upstream = torch.randn(4, 5)
    (layer(x) * upstream).sum().backward()
    inside = ((weight / 0.7).abs() <= 1).float()
    torch.testing.assert_close(layer.weight.grad, (upstream.t() @ x_mix) * (0.75 + 0.25 * inside))


def test_init_from_ternary_reproduces_codes_and_scale_and_exports_them():
    torch.manual_seed(5)
    codes = torch.randint(-1, 2, (8, 16), dtype=torch.int8)
    layer = _bitlinear(torch.randn(8, 16), weight_scale_method="learned")
    layer.init_from_ternary(codes, torch.tensor(0.037))
    got_codes, got_scale = layer.ternary_and_scale()
    assert torch.equal(got_codes, codes) and got_scale.item() == pytest.approx(0.037, rel=1e-7)
    x = torch.randn(3, 16)
    with torch.no_grad():
        assert torch.equal(layer(x), F.linear(fake_quantize_activations(x), codes.float() * layer.learned_scale))
    # every latent weight sits on |W / s| in {0, 1}, inside the LSQ range: all of them get a gradient at step 0
    (layer(x) ** 2).sum().backward()
    assert (layer.weight.grad != 0).float().mean() > 0.9
    packed = PackedBitLinear.from_bitlinear(layer)
    assert torch.equal(packed.ternary(), codes)
    assert packed.weight_scale.item() == pytest.approx(1 / 0.037, rel=1e-6)


def test_learned_scale_config_swaps_and_packs():
    torch.manual_seed(6)
    model = LlamaForCausalLM(tiny_config()).eval()
    quantize_(model, TernaryConfig(weight_scale="learned"))
    scales = [name for name, _ in model.named_parameters() if name.endswith("learned_scale")]
    assert len(scales) == 7 * model.config.num_hidden_layers
    ids = torch.randint(0, 200, (1, 12))
    with torch.no_grad():
        before = model(ids).logits
        pack_(model)
        after = model(ids).logits
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)  # fp32 sum order only (see the parity test above)
