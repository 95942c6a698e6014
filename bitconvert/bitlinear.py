"""BitLinear: the single source of BitNet b1.58's quantization math.

Weights (per tensor, BitNet b1.58):
    g = mean(|W|)            ("absmean"; or median(|W|), "absmedian", from BitNet b1.58 Reloaded), clamped to >= 1e-5
    T = clamp(round(W / g), -1, 1)           ternary, shape (out, in)
Activations (per token, i.e. per row of the last dimension):
    s = 127 / max(|x|, 1e-5)
    x_q = clamp(round(x * s), -128, 127)     int8, shape (..., in)
Training (straight-through estimator, lambda in [0, 1] interpolates for warm-up):
    W_eff = W + lambda * (T * g - W).detach(),   x_eff = x + lambda * (x_q / s - x).detach(),   y = x_eff @ W_eff^T + b
Learned scale (``weight_scale_method="learned"``, LSQ, arXiv 1902.08153): ``g = s``, an fp32 parameter of shape (1,),
    Q(W, s) = s * clamp(round(W / s), -1, 1),   W_eff = (1 - lambda) * W + lambda * Q(W, s)
    with straight-through gradients  dQ/dW = 1 where |W / s| <= 1 else 0,
                                      dQ/ds = round(W / s) - W / s where |W / s| <= 1 else sign(W / s).
Inference (exact integers, then scaled; the stored scale is ``weight_scale = 1 / g`` as in HF transformers' format):
    acc = x_q @ T^T                   int32, exact
    y = acc / weight_scale / s + b    fp32, the two scales divided one after the other (no overflowing product)

All rounding is round-half-to-even (``torch.round``) in fp32; the fast kernels reproduce it bit for bit.
``round`` has a zero gradient, so the STE is what lets gradients reach the latent weights.

Two modules hold these two states: :class:`BitLinear` (latent full-precision weights, for training) and
:class:`PackedBitLinear` (2-bit packed weights and a scale, never the float weights, for inference).
The integer product of :class:`PackedBitLinear` goes through a pluggable backend (:func:`set_backend`), the seam where
the compiled ternary kernels plug in; :class:`ReferenceBackend` is the pure-torch path.
"""

from __future__ import annotations

import os
from typing import Protocol

import torch
import torch.nn as nn
import torch.nn.functional as F

from .packing import pack_ternary, packed_rows, unpack_ternary

EPS = 1e-5
ACT_QMAX = 127.0
WEIGHT_SCALE_METHODS = ("absmean", "absmedian")
LEARNED_SCALE = "learned"
BITLINEAR_SCALE_METHODS = WEIGHT_SCALE_METHODS + (LEARNED_SCALE,)


def weight_scale(weight: torch.Tensor, method: str = "absmean") -> torch.Tensor:
    """Per-tensor scale ``g`` (fp32, 0-dim): mean or median of ``|W|``, clamped to >= 1e-5."""
    magnitude = weight.detach().float().abs()
    if method == "absmean":
        scale = magnitude.mean()
    elif method == "absmedian":
        scale = magnitude.median()
    else:
        raise ValueError(f"unknown weight scale method {method!r}; choose one of {', '.join(WEIGHT_SCALE_METHODS)}")
    return scale.clamp(min=EPS)


def ternarize(weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``T = clamp(round(W / g), -1, 1)`` as int8, same shape as ``weight``."""
    return (weight.float() / scale).round().clamp(-1, 1).to(torch.int8)


def quantize_activations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token absmax int8 quantization of ``x`` (..., in).

    Returns ``x_q`` int8 (..., in) and ``s`` fp32 (..., 1) with ``x ~= x_q / s``.
    """
    x = x.float()
    scale = ACT_QMAX / x.abs().amax(dim=-1, keepdim=True).clamp(min=EPS)
    return (x * scale).round().clamp(-128, 127).to(torch.int8), scale


def fake_quantize_weight(weight: torch.Tensor, method: str = "absmean") -> torch.Tensor:
    """Dequantized ternary weight ``T * g`` in ``weight``'s dtype (no gradient path; see :class:`BitLinear`)."""
    scale = weight_scale(weight, method)
    return (ternarize(weight, scale).float() * scale).to(weight.dtype)


def learned_fake_quantize_weight(weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``s * clamp(round(W / s), -1, 1)`` (in ``weight``'s dtype) with LSQ's straight-through gradients to ``W`` and
    ``s`` (see the module docstring); ``scale`` fp32 (1,) is clamped to >= 1e-5.

    ``v + (round(v) - v).detach()`` equals ``round(v)`` exactly for ``|v| <= 1`` in fp32 (Sterbenz), so the forward
    value is the ternary code times ``s`` bit for bit."""
    scale = scale.clamp(min=EPS)
    ratio = (weight.float() / scale).clamp(-1, 1)
    codes = ratio + (ratio.round() - ratio).detach()
    return (codes * scale).to(weight.dtype)


def fake_quantize_activations(x: torch.Tensor) -> torch.Tensor:
    """Dequantized 8-bit activations ``x_q / s`` in ``x``'s dtype."""
    x_q, scale = quantize_activations(x)
    return (x_q.float() / scale).to(x.dtype)


class RMSNorm(nn.Module):
    """RMSNorm ``y = x / sqrt(mean(x^2) + eps) * gain`` over the last dimension (gain initialised to 1), in fp32."""

    def __init__(self, hidden_size: int, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class BitLinear(nn.Linear):
    """Training-mode BitLinear: full-precision latent weights, ternary/int8 forward through the STE.

    ``quant_lambda`` in [0, 1] interpolates between the full-precision forward (0) and the quantized one (1).
    ``weight_scale_method`` "absmean" / "absmedian" recompute ``g`` from the weights on every call; "learned" holds it
    in the fp32 parameter ``learned_scale`` (1,), initialised to absmean (or by :meth:`init_from_ternary`).
    With ``sub_norm`` an :class:`RMSNorm` (SubLN, BitNet b1.58 2B4T) normalises the input first.
    Shapes: x (..., in) -> y (..., out).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = False,
        *,
        weight_scale_method: str = "absmean",
        sub_norm: bool = False,
        sub_norm_eps: float = 1e-5,
        quant_lambda: float = 1.0,
        device=None,
        dtype=None,
    ):
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        if weight_scale_method not in BITLINEAR_SCALE_METHODS:
            raise ValueError(f"weight_scale_method must be one of {BITLINEAR_SCALE_METHODS}, got {weight_scale_method!r}")
        self.weight_scale_method = weight_scale_method
        self.learned_scale = None
        if weight_scale_method == LEARNED_SCALE:
            self.learned_scale = nn.Parameter(torch.ones(1, dtype=torch.float32, device=device))
            if self.weight.device.type != "meta":
                self.learned_scale.data.copy_(weight_scale(self.weight).reshape(1))
        self.sub_norm = RMSNorm(in_features, sub_norm_eps).to(device=device, dtype=dtype) if sub_norm else None
        self.quant_lambda = quant_lambda

    @property
    def quant_lambda(self) -> float:
        return self._quant_lambda

    @quant_lambda.setter
    def quant_lambda(self, value: float) -> None:
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"quant_lambda must lie in [0, 1], got {value}")
        self._quant_lambda = float(value)

    @classmethod
    def from_linear(cls, linear: nn.Linear, **options) -> "BitLinear":
        """A BitLinear whose latent weights (and bias) are ``linear``'s, shared, not copied."""
        module = cls(linear.in_features, linear.out_features, linear.bias is not None, device="meta", **options)
        module.weight = linear.weight
        module.bias = linear.bias
        if module.learned_scale is not None:
            module.learned_scale = nn.Parameter(weight_scale(linear.weight).reshape(1).to(linear.weight.device))
        if module.sub_norm is not None:
            module.sub_norm = RMSNorm(linear.in_features, module.sub_norm.eps).to(linear.weight.device, linear.weight.dtype)
        return module

    @torch.no_grad()
    def init_from_ternary(self, codes: torch.Tensor, scale: torch.Tensor) -> None:
        """Learned mode: set the latent weights to ``codes * scale`` and ``s = scale``, so that the quantized forward
        reproduces ``codes`` (int (out, in), values in {-1, 0, 1}) and ``scale`` (> 0, one element) exactly."""
        if self.learned_scale is None:
            raise ValueError("init_from_ternary needs weight_scale_method='learned'")
        scale = scale.detach().float().reshape(1).to(self.learned_scale.device)
        self.learned_scale.copy_(scale)
        self.weight.copy_((codes.float().to(scale.device) * scale).to(self.weight.dtype))

    def ternary_and_scale(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The weights at lambda = 1: codes ``T`` int8 (out, in) and the scale ``g`` fp32 (0-dim)."""
        if self.learned_scale is None:
            scale = weight_scale(self.weight, self.weight_scale_method)
        else:
            scale = self.learned_scale.detach().float().clamp(min=EPS).reshape(())
        return ternarize(self.weight.detach(), scale), scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.sub_norm is not None:
            x = self.sub_norm(x)
        lam = self._quant_lambda
        weight = self.weight
        if lam > 0.0:
            if self.learned_scale is not None:
                weight = (1.0 - lam) * weight + lam * learned_fake_quantize_weight(weight, self.learned_scale)
            else:
                weight = weight + lam * (fake_quantize_weight(weight, self.weight_scale_method) - weight).detach()
            x = x + lam * (fake_quantize_activations(x) - x).detach()
        return F.linear(x, weight, self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, scale={self.weight_scale_method}, quant_lambda={self._quant_lambda}"


class TernaryBackend(Protocol):
    """How :class:`PackedBitLinear` computes ``acc / weight_scale / s`` from float activations (N, in) -> fp32 (N, out).

    ``prepare`` is called once per module (at load or after packing) to repack weights into the backend's own layout;
    ``linear`` must quantize the activations exactly as :func:`quantize_activations` does.
    """

    name: str

    def prepare(self, module: "PackedBitLinear") -> None: ...

    def linear(self, x: torch.Tensor, module: "PackedBitLinear") -> torch.Tensor: ...


def int_matmul_reference(x_q: torch.Tensor, ternary: torch.Tensor) -> torch.Tensor:
    """Exact ``x_q @ T^T``: int8 (N, in) x int8 (out, in) -> int32 (N, out), with int32 accumulation.

    ``torch._int_mm`` (oneDNN) returns wrong values when ``in == 1``; that shape takes a plain int32 matmul.
    Off the CPU (where ``_int_mm`` has shape limits) the product runs in fp32, exact while ``|acc| <= 128 * in``
    stays below 2^24, i.e. ``in < 131072``."""
    if x_q.device.type != "cpu":
        if x_q.shape[1] >= 1 << 17:
            raise ValueError(f"in_features {x_q.shape[1]} is too large for the exact fp32 product off the CPU")
        return (x_q.float() @ ternary.float().t()).int()
    if x_q.shape[1] == 1:
        return x_q.int() @ ternary.int().t()
    return torch._int_mm(x_q.contiguous(), ternary.t())


def reference_linear(x: torch.Tensor, packed: torch.Tensor, inverse_scale: torch.Tensor, out_features: int) -> torch.Tensor:
    """BitLinear's inference output in pure torch: float x (N, in), packed codes uint8 (ceil(out/4), in), the stored
    scale 1/g (1,) -> fp32 (N, out) = (x_q @ T^T) / (1/g) / s."""
    x_q, act_scale = quantize_activations(x)
    acc = int_matmul_reference(x_q, unpack_ternary(packed, out_features))
    return acc.float() / inverse_scale / act_scale


class ReferenceBackend:
    """Pure-torch path: unpack the 2-bit codes on every call (nothing cached), int8 x int8 -> int32 matmul."""

    name = "torch"

    def prepare(self, module: "PackedBitLinear") -> None:
        return None

    def linear(self, x: torch.Tensor, module: "PackedBitLinear") -> torch.Tensor:
        return reference_linear(x, module.weight, module.weight_scale, module.out_features)


_backend: TernaryBackend | None = None
_OFF_CPU_BACKEND = ReferenceBackend()


def set_backend(backend: TernaryBackend) -> None:
    """Select the backend every :class:`PackedBitLinear` uses from now on (modules must be ``prepare``d for it)."""
    global _backend
    _backend = backend


def get_backend() -> TernaryBackend:
    """The current backend; chosen on first use: the compiled kernels (:mod:`bitconvert.kernels`, built on first use)
    if they build and load, else :class:`ReferenceBackend` with one warning (a bad ``BITCONVERT_ISA`` or
    ``BITCONVERT_LAYOUT`` is an error instead). ``BITCONVERT_BACKEND=torch`` forces the reference."""
    global _backend
    if _backend is None:
        if os.environ.get("BITCONVERT_BACKEND", "").lower() == "torch":
            _backend = ReferenceBackend()
        else:
            from .kernels import default_backend  # imported here: no cycle, and nothing compiles at import time

            _backend = default_backend()
    return _backend


class PackedBitLinear(nn.Module):
    """Inference-mode BitLinear: packed 2-bit weights and one scale; exact integer product.

    Buffers (the names and layout of HF transformers' BitNet format, so state dicts are interchangeable):
        weight        uint8 (ceil(out/4), in)   codes T + 1, see :mod:`bitconvert.packing`
        weight_scale  fp32 (1,)                 1 / g
        bias          (out,) or absent
    Shapes: x (..., in) -> y (..., out) in x's dtype.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False, *, sub_norm_eps: float | None = None):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.register_buffer("weight", torch.full((packed_rows(out_features), in_features), 0x55, dtype=torch.uint8))
        self.register_buffer("weight_scale", torch.ones(1, dtype=torch.float32))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)
        self.sub_norm = RMSNorm(in_features, sub_norm_eps) if sub_norm_eps is not None else None

    @classmethod
    def from_bitlinear(cls, module: BitLinear) -> "PackedBitLinear":
        """Freeze a training-mode :class:`BitLinear` into its packed inference form (the result of lambda = 1)."""
        eps = module.sub_norm.eps if module.sub_norm is not None else None
        packed = cls(module.in_features, module.out_features, module.bias is not None, sub_norm_eps=eps)
        codes, scale = module.ternary_and_scale()
        packed.weight = pack_ternary(codes)
        packed.weight_scale = (1.0 / scale).reshape(1)
        if module.bias is not None:
            packed.bias = module.bias.detach().clone()
        if module.sub_norm is not None:
            packed.sub_norm.load_state_dict(module.sub_norm.state_dict())
            packed.sub_norm.to(module.sub_norm.weight.dtype)
        if packed.weight.device.type == "cpu":  # the kernels' layout is CPU code; elsewhere forward() uses torch ops
            get_backend().prepare(packed)
        return packed

    def ternary(self) -> torch.Tensor:
        """The ternary matrix T, int8 (out, in)."""
        return unpack_ternary(self.weight, self.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.sub_norm is not None:
            x = self.sub_norm(x)
        flat = x.reshape(-1, self.in_features)
        backend = get_backend() if flat.device.type == "cpu" else _OFF_CPU_BACKEND  # the kernels are CPU code
        y = backend.linear(flat, self).to(x.dtype).reshape(*x.shape[:-1], self.out_features)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"
