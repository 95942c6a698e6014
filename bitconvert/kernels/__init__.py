"""Compiled ternary CPU kernels and the :class:`KernelBackend` that plugs them into :class:`PackedBitLinear`.

The C++ core (``csrc/ternary_core.{h,cpp}``, no torch types) computes, for int8 per-token activations and ternary
weights ``T`` (out, in), the exact int32 product ``acc = x_q @ T^T`` and the layer output
``y = acc / weight_scale / s`` (fp32), bit for bit equal to :class:`bitconvert.bitlinear.ReferenceBackend`.
It has a scalar reference path and AVX2, AVX-VNNI and AVX-512 VNNI paths, chosen from CPUID at run time or forced
with ``BITCONVERT_ISA=scalar|avx2|avxvnni|avx512``, and runs on ``torch.get_num_threads()`` threads (OpenMP).
The weights are repacked once into one of three layouts (:data:`LAYOUTS`, ``csrc/ternary_core.h``): ``2bit``, which
every path computes on, ``base3`` (3 weights per 5-bit index, 1.67 bits: 17% fewer bytes to stream per
decoded token), which every path computes on (AVX-512 only with VBMI), and ``lut`` (1.78 bits, three 5-bit indices
per 16-bit word, read by ``vpermw`` table lookups; scalar and AVX-512 only, never the default). :func:`layout_index` picks base3 for the
AVX-512 path with VBMI, 2bit otherwise (the AVX2 and AVX-VNNI base3 loops decode a weight with about 1.7x the work
of their 2-bit loop, more than the bytes they save at 2 threads; ``docs/kernels.md``) and for the scalar reference
(``BITCONVERT_LAYOUT=2bit|base3|lut`` forces one). A repacked weight does not record its layout: keep it beside the weight (``KernelBackend`` sets
``module.kernel_layout``).
``csrc/int8_core.{h,cpp}`` holds the int8 x int8, int4 x int8 and int6 x int8 products of the optional int8, int4 and
int6 ``lm_head`` (:mod:`.lm_head`) on the same paths (int4: scalar and AVX2; int6: scalar, AVX2 and AVX-512 VNNI);
:mod:`.decode` is the lean decoding loop built on both.

``csrc/torch_ops.cpp`` registers the operators (all CPU):

    torch.ops.bitconvert.ternary_repack(packed uint8 (ceil(out/4), in), out_features, layout=0) -> uint8 (bytes,)
    torch.ops.bitconvert.ternary_repacked_bytes(out_features, in_features, layout) -> int
    torch.ops.bitconvert.ternary_matmul_int(x_q int8 (n, in), weight, out_features, isa=-1, threads=0, layout=0)
        -> int32 (n, out)
    torch.ops.bitconvert.ternary_linear(x float (n, in), weight, out_features, weight_scale fp32 (1,) or (out,),
                                        isa=-1, threads=0, layout=0) -> fp32 (n, out)
    torch.ops.bitconvert.int8_quantize_rows(w float (out, in)) -> (int8 (out, stride), fp32 (out,))
    torch.ops.bitconvert.int8_linear(x float (n, in), w_q, d, isa=-1, threads=0) -> fp32 (n, out)
    torch.ops.bitconvert.int4_quantize_rows(w float (out, in)) -> (uint8 (out, stride / 2), fp32 (out, stride / 32))
    torch.ops.bitconvert.int4_linear(x float (n, in), w_q, d, isa=-1, threads=0) -> fp32 (n, out)
    torch.ops.bitconvert.int6_quantize_rows(w float (out, in)) -> (uint8 (out, stride * 3 / 4), fp16 (out, stride / 32))
    torch.ops.bitconvert.int6_linear(x float (n, in), w_q, d, isa=-1, threads=0) -> fp32 (n, out)
    torch.ops.bitconvert.rope_cache_write(qkv, cos, sin, keys, values, start, heads) -> q   (csrc/decode_ops.cpp)
    torch.ops.bitconvert.decode_layer(x, input_norm, qkv_weight, qkv_scales, o_weight, o_scales, post_norm,
        gate_up_weight, gate_up_scales, down_weight, down_scales, cos, sin, keys, values, position, heads, eps,
        layout=0) -> None: one decoder layer for one token, in place on x, keys, values (csrc/decode_step.cpp)
    torch.ops.bitconvert.exp_approx(x fp32, simd=True) -> fp32: the fused step's exp (csrc/fast_exp.h), for tests
    torch.ops.bitconvert.ternary_isa(name="") -> int          ("" = BITCONVERT_ISA or the best path)
    torch.ops.bitconvert.ternary_isa_supported(isa) -> bool
    torch.ops.bitconvert.ternary_layout(isa) -> int           (BITCONVERT_LAYOUT or the best layout of the path)
    torch.ops.bitconvert.ternary_layout_supported(layout, isa) -> bool

where ``weight`` is repacked in ``layout`` (an index into :data:`LAYOUTS`), ``isa`` an index into :data:`ISAS` (-1:
default) and ``threads`` <= 0 means ``torch.get_num_threads()``. The library is compiled on first use with
``torch.utils.cpp_extension.load`` (ninja, no network) into ``$TORCH_EXTENSIONS_DIR`` or
``~/.cache/bitconvert/torch_extensions`` and reused from there.
"""

from __future__ import annotations

import hashlib
import os
import sys
import time
import warnings
from pathlib import Path

import torch

from .pages import on_huge_pages

ISAS = ("scalar", "avx2", "avxvnni", "avx512")
LAYOUTS = ("2bit", "base3", "lut")
# The paths that compute on each layout (base3 on avx512 also needs VBMI: ``ternary_layout_supported`` checks the CPU).
LAYOUT_ISAS = {"2bit": ISAS, "base3": ISAS, "lut": ("scalar", "avx512")}
# Rows a repacked matrix stores in whole, contiguous blocks (16-row tiles; lut: 128-row groups of interleaved tiles):
# repacked buffers of parts that are whole blocks concatenate into the repacked buffer of the stacked matrix.
ROW_BLOCKS = {"2bit": 16, "base3": 16, "lut": 128}
CSRC = Path(__file__).parent / "csrc"
SOURCES = (CSRC / "ternary_core.cpp", CSRC / "int8_core.cpp", CSRC / "torch_ops.cpp", CSRC / "decode_ops.cpp",
           CSRC / "decode_step.cpp")
HEADERS = (CSRC / "ternary_core.h", CSRC / "int8_core.h", CSRC / "op_checks.h", CSRC / "decode_ops.h",
           CSRC / "attention_core.h", CSRC / "norm_core.h", CSRC / "fp16.h", CSRC / "avxvnni.h",
           CSRC / "fast_exp.h")
# Exact float rounding: no fused multiply-add contraction, no fast-math.
CFLAGS = ["-O3", "-fopenmp", "-ffp-contract=off", "-fno-fast-math"]

# A build takes 1-3 minutes on a 2-core machine. torch's builder holds `lock` in the build folder while it compiles and
# every other process waits for it to go away, forever: a build killed midway (Ctrl-C, OOM killer) would leave every
# later load hanging. A lock older than this is taken to be such a leftover and removed.
STALE_LOCK_SECONDS = 15 * 60

_loaded = False


def _build_directory() -> Path:
    """A build folder keyed by the sources, flags and torch version, so different checkouts never clash."""
    digest = hashlib.sha256(torch.__version__.encode() + " ".join(CFLAGS).encode())
    for path in (*SOURCES, *HEADERS):
        digest.update(path.read_bytes())
    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or Path.home() / ".cache" / "bitconvert" / "torch_extensions")
    directory = root / f"bitconvert_kernels_{digest.hexdigest()[:16]}"
    directory.mkdir(parents=True, exist_ok=True)
    _remove_stale_lock(directory / "lock")
    return directory


def _remove_stale_lock(lock: Path) -> None:
    """Delete ``lock`` if it is older than :data:`STALE_LOCK_SECONDS` (left by a killed build), saying so on stderr."""
    try:
        age = time.time() - lock.stat().st_mtime
    except FileNotFoundError:
        return
    if age > STALE_LOCK_SECONDS:
        print(f"bitconvert: removing a stale kernel-build lock ({age / 60:.0f} min old, left by an interrupted "
              f"build): {lock}", file=sys.stderr)
        lock.unlink(missing_ok=True)


def load_library() -> None:
    """Compile (first time) and load the operators into ``torch.ops.bitconvert``; raises if the build fails."""
    global _loaded
    if _loaded:
        return
    from torch.utils.cpp_extension import load

    load(
        name="bitconvert_kernels",
        sources=[str(path) for path in SOURCES],
        extra_cflags=CFLAGS,
        extra_ldflags=["-fopenmp"],
        build_directory=str(_build_directory()),
        is_python_module=False,
        verbose=False,
    )
    _register_fake_kernels()
    _loaded = True


def _register_fake_kernels() -> None:
    """Shape-only (fake/meta) versions of the compute operators, so ``torch.compile`` traces through them without
    a graph break (the compiled graph then calls the real CPU kernels)."""
    fake = torch.library.register_fake

    @fake("bitconvert::ternary_linear")
    def _(x, weight, out_features, weight_scale, isa=-1, threads=0, layout=0):
        return x.new_empty((x.shape[0], out_features), dtype=torch.float32)

    @fake("bitconvert::ternary_matmul_int")
    def _(x_q, weight, out_features, isa=-1, threads=0, layout=0):
        return x_q.new_empty((x_q.shape[0], out_features), dtype=torch.int32)

    @fake("bitconvert::int8_linear")
    def _(x, w_q, d, isa=-1, threads=0):
        return x.new_empty((x.shape[0], w_q.shape[0]), dtype=torch.float32)

    fake("bitconvert::int4_linear")(_)  # the same shape rule: (tokens, rows of w_q)
    fake("bitconvert::int6_linear")(_)

    @fake("bitconvert::rope_cache_write")
    def _(qkv, cos, sin, keys, values, start, heads):
        return qkv.new_empty((heads, qkv.shape[0], keys.shape[2]))

    @fake("bitconvert::decode_layer")
    def _(x, input_norm, qkv_weight, qkv_scales, o_weight, o_scales, post_norm, gate_up_weight, gate_up_scales,
          down_weight, down_scales, cos, sin, keys, values, position, heads, eps, layout=0):
        return None


def isa_index(name: str | None = None) -> int:
    """Index into :data:`ISAS` of the path ``name``, or of the default (``BITCONVERT_ISA`` or the best) if None.

    Raises ``RuntimeError`` for an unknown name or a path this CPU cannot run.
    """
    load_library()
    return int(torch.ops.bitconvert.ternary_isa(name or ""))


def supported_isas() -> list[str]:
    """The paths this CPU can run, slowest first."""
    load_library()
    return [name for i, name in enumerate(ISAS) if torch.ops.bitconvert.ternary_isa_supported(i)]


def layout_index(isa: int | None = None) -> int:
    """Index into :data:`LAYOUTS` of the layout to repack into for the path ``isa`` (None: the default path):
    ``BITCONVERT_LAYOUT`` if set, else base3 for the AVX-512 path with VBMI, else 2bit (also for scalar).

    Raises ``RuntimeError`` for an unknown name or a layout the path cannot compute on.
    """
    load_library()
    return int(torch.ops.bitconvert.ternary_layout(isa_index() if isa is None else isa))


def layout_supported(layout: int, isa: int) -> bool:
    """Whether the path ``isa`` computes on ``layout`` on this CPU."""
    load_library()
    return bool(torch.ops.bitconvert.ternary_layout_supported(layout, isa))


def repacked_bytes(out_features: int, in_features: int, layout: int) -> int:
    """Bytes of an (out, in) ternary matrix repacked in ``layout``."""
    load_library()
    return int(torch.ops.bitconvert.ternary_repacked_bytes(out_features, in_features, layout))


def repack(packed: torch.Tensor, out_features: int, layout: int = 0) -> torch.Tensor:
    """HF BitNet 2-bit layout uint8 (ceil(out/4), in) -> the kernels' ``layout`` (see ``csrc/ternary_core.h``)."""
    load_library()
    return torch.ops.bitconvert.ternary_repack(packed, out_features, layout)


def matmul_int(x_q: torch.Tensor, weight: torch.Tensor, out_features: int, isa: int = -1, threads: int = 0,
               layout: int = 0):
    """Exact int32 ``x_q @ T^T``: int8 (n, in) x ``weight`` repacked in ``layout`` -> int32 (n, out)."""
    load_library()
    return torch.ops.bitconvert.ternary_matmul_int(x_q, weight, out_features, isa, threads, layout)


def linear(x: torch.Tensor, weight: torch.Tensor, out_features: int, weight_scale: torch.Tensor, isa: int = -1,
           threads: int = 0, layout: int = 0) -> torch.Tensor:
    """Fused ``quantize_activations`` + exact product + ``acc / weight_scale / s``: float (n, in) -> fp32 (n, out)."""
    load_library()
    return torch.ops.bitconvert.ternary_linear(x, weight, out_features, weight_scale, isa, threads, layout)


def int8_quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row symmetric int8: float (out, in) -> int8 (out, stride) codes and fp32 (out,) scales (``csrc/int8_core.h``)."""
    load_library()
    return torch.ops.bitconvert.int8_quantize_rows(weight)


def int8_linear(x: torch.Tensor, w_q: torch.Tensor, d: torch.Tensor, isa: int = -1, threads: int = 0) -> torch.Tensor:
    """``x`` float (n, in) quantized per 32-column block to int8, times the int8 rows: fp32 (n, out)."""
    load_library()
    return torch.ops.bitconvert.int8_linear(x, w_q, d, isa, threads)


def int4_quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row, per-32-column-block symmetric int4: float (out, in) -> uint8 (out, stride / 2) nibble codes and fp32
    (out, stride / 32) block scales (``csrc/int8_core.h``)."""
    load_library()
    return torch.ops.bitconvert.int4_quantize_rows(weight)


def int4_linear(x: torch.Tensor, w_q: torch.Tensor, d: torch.Tensor, isa: int = -1, threads: int = 0) -> torch.Tensor:
    """``x`` float (n, in) quantized per 32-column block to int8, times the int4 rows: fp32 (n, out)."""
    load_library()
    return torch.ops.bitconvert.int4_linear(x, w_q, d, isa, threads)


def int6_quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row, per-32-column-block symmetric int6: float (out, in) -> uint8 (out, stride * 3 / 4) codes (ql/qh
    layout) and fp16 (out, stride / 32) block scales (``csrc/int8_core.h``); refuses |w| > 31 * 65504 (the fp16
    scales' range)."""
    load_library()
    return torch.ops.bitconvert.int6_quantize_rows(weight)


def int6_linear(x: torch.Tensor, w_q: torch.Tensor, d: torch.Tensor, isa: int = -1, threads: int = 0) -> torch.Tensor:
    """``x`` float (n, in) quantized per 32-column block to int8, times the int6 rows: fp32 (n, out)."""
    load_library()
    return torch.ops.bitconvert.int6_linear(x, w_q, d, isa, threads)


class KernelBackend:
    """:class:`~bitconvert.bitlinear.TernaryBackend` on the compiled kernels.

    ``prepare`` repacks ``module.weight`` once, in the backend's ``layout``, into the non-persistent buffer
    ``module.kernel_weight`` (not saved in state dicts; ``module.kernel_layout`` says which layout);
    ``linear`` re-prepares a module whose ``weight`` was replaced or modified in place since.
    ``isa``: a name from :data:`ISAS` or None for the default; ``threads`` <= 0: ``torch.get_num_threads()``.
    """

    def __init__(self, isa: str | None = None, threads: int = 0):
        self.isa = isa_index(isa)
        self.layout = layout_index(self.isa)
        self.threads = threads
        self.name = f"kernels-{ISAS[self.isa]}"

    def prepare(self, module) -> None:
        weight = on_huge_pages(repack(module.weight, module.out_features, self.layout))
        module.register_buffer("kernel_weight", weight, persistent=False)
        module.kernel_layout = self.layout
        module._kernel_source = (module.weight, module.weight._version, self.layout)

    def linear(self, x: torch.Tensor, module) -> torch.Tensor:
        source = getattr(module, "_kernel_source", None)
        if source is None or source[0] is not module.weight or source[1:] != (module.weight._version, self.layout):
            self.prepare(module)
        return torch.ops.bitconvert.ternary_linear(
            x, module.kernel_weight, module.out_features, module.weight_scale, self.isa, self.threads, self.layout
        )


def default_backend():
    """:class:`KernelBackend` if the library builds and loads, else the pure-torch backend with one warning.

    A ``BITCONVERT_ISA`` or ``BITCONVERT_LAYOUT`` that this CPU cannot honour is the user's own setting, not a build
    failure: it raises :class:`~bitconvert.errors.BitconvertError` (one line naming the variable) rather than
    running the several times slower pure-torch path."""
    try:
        return KernelBackend()
    except Exception as error:  # a compiler or loader failure must not stop inference
        from ..bitlinear import ReferenceBackend
        from ..errors import BitconvertError

        settings = [f"{name}={os.environ[name]}" for name in ("BITCONVERT_ISA", "BITCONVERT_LAYOUT")
                    if os.environ.get(name)]
        if _loaded and settings:
            reason = str(error).strip().splitlines()[0].removeprefix("bitconvert: ")
            raise BitconvertError(f"{reason} ({', '.join(settings)}); fix it or unset it for the default") from None

        warnings.warn(
            f"bitconvert: the ternary CPU kernels are unavailable ({type(error).__name__}: {error}); "
            "using the slower pure-torch path",
            RuntimeWarning,
            stacklevel=2,
        )
        return ReferenceBackend()
