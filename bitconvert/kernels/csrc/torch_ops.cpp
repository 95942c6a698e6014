// Thin torch bindings of ternary_core: the bitconvert::ternary_* operators (CPU). Shapes and math: ternary_core.h.
#include <torch/library.h>
#include <ATen/ATen.h>

#include <cstdlib>
#include <string>

#include "int8_core.h"
#include "op_checks.h"
#include "ternary_core.h"

namespace {

using bitconvert::check_layout;
using bitconvert::check_result;
using bitconvert::check_weight;
using bitconvert::resolve_threads;

// packed: uint8 (ceil(out/4), in) in HF BitNet layout -> uint8 (bc_repacked_bytes,) in kernel layout `layout`.
at::Tensor ternary_repack(const at::Tensor &packed, int64_t out_features, int64_t layout) {
    check_layout(layout);
    TORCH_CHECK(packed.dtype() == at::kByte && packed.dim() == 2, "bitconvert: packed weight must be 2-D uint8");
    TORCH_CHECK(packed.size(0) == (out_features + 3) / 4, "bitconvert: packed weight has ", packed.size(0),
                " rows, expected ceil(", out_features, "/4)");
    const at::Tensor src = packed.contiguous().cpu();
    at::Tensor dst = at::empty({int64_t(bc_repacked_bytes(out_features, src.size(1), int(layout)))}, src.options());
    bc_repack(src.data_ptr<uint8_t>(), out_features, src.size(1), int(layout), dst.data_ptr<uint8_t>());
    return dst;
}

int64_t ternary_repacked_bytes(int64_t out_features, int64_t in_features, int64_t layout) {
    check_layout(layout);
    TORCH_CHECK(out_features >= 0 && in_features >= 0, "bitconvert: negative matrix shape");
    return int64_t(bc_repacked_bytes(out_features, in_features, int(layout)));
}

// x_q: int8 (n, in); returns int32 (n, out) = x_q @ T^T.
at::Tensor ternary_matmul_int(const at::Tensor &x_q, const at::Tensor &weight, int64_t out_features, int64_t isa,
                              int64_t threads, int64_t layout) {
    TORCH_CHECK(x_q.dtype() == at::kChar && x_q.dim() == 2, "bitconvert: x_q must be 2-D int8");
    const at::Tensor x = x_q.contiguous();
    check_weight(weight, layout, out_features, x.size(1));
    at::Tensor acc = at::empty({x.size(0), out_features}, x.options().dtype(at::kInt));
    check_result(bc_matmul_int(x.data_ptr<int8_t>(), x.size(0), weight.data_ptr<uint8_t>(), int(layout), out_features,
                               x.size(1), acc.data_ptr<int32_t>(), int(isa), resolve_threads(threads)),
                 isa);
    return acc;
}

// x: float (n, in); weight_scale: fp32 (1,) = 1/g, or (out,) one per row (concatenated projections);
// returns fp32 (n, out) = (x_q @ T^T) / weight_scale / s.
at::Tensor ternary_linear(const at::Tensor &x, const at::Tensor &weight, int64_t out_features,
                          const at::Tensor &weight_scale, int64_t isa, int64_t threads, int64_t layout) {
    TORCH_CHECK(x.dim() == 2, "bitconvert: x must be 2-D (tokens, in_features)");
    TORCH_CHECK(weight_scale.numel() == 1 || weight_scale.numel() == out_features,
                "bitconvert: weight_scale must hold one value or one per output row");
    const at::Tensor xf = x.to(at::kFloat).contiguous();
    check_weight(weight, layout, out_features, xf.size(1));
    at::Tensor y = at::empty({xf.size(0), out_features}, xf.options());
    int code;
    if (weight_scale.numel() == 1 && out_features != 1) {
        code = bc_linear(xf.data_ptr<float>(), xf.size(0), weight.data_ptr<uint8_t>(), int(layout), out_features,
                         xf.size(1),
                         weight_scale.to(at::kFloat).item<float>(), y.data_ptr<float>(), int(isa),
                         resolve_threads(threads));
    } else {
        const at::Tensor scales = weight_scale.to(at::kFloat).contiguous();
        code = bc_linear_rows(xf.data_ptr<float>(), xf.size(0), weight.data_ptr<uint8_t>(), int(layout), out_features,
                              xf.size(1),
                              scales.data_ptr<float>(), y.data_ptr<float>(), int(isa), resolve_threads(threads));
    }
    check_result(code, isa);
    return y;
}

// w: float (out, in) -> (int8 (out, bc_int8_row_stride(in)), fp32 (out,) row scales d), as int8_core.h states.
std::tuple<at::Tensor, at::Tensor> int8_quantize_rows(const at::Tensor &w) {
    TORCH_CHECK(w.dim() == 2, "bitconvert: int8_quantize_rows takes a 2-D weight");
    const at::Tensor wf = w.to(at::kFloat).contiguous().cpu();
    at::Tensor w_q = at::empty({wf.size(0), bc_int8_row_stride(wf.size(1))}, wf.options().dtype(at::kChar));
    at::Tensor d = at::empty({wf.size(0)}, wf.options());
    bc_int8_quantize_rows(wf.data_ptr<float>(), wf.size(0), wf.size(1), w_q.data_ptr<int8_t>(), d.data_ptr<float>());
    return {w_q, d};
}

// x: float (n, in) -> fp32 contiguous, after checking that the rows w_q (out, row_bytes(in)) of `dtype` and their
// scales d (out, scales_per_row(in)) of `scale_dtype` fit it; `format` names them in the messages.
template <class RowBytes, class ScalesPerRow>
at::Tensor checked_input(const at::Tensor &x, const at::Tensor &w_q, const at::Tensor &d, at::ScalarType dtype,
                         const char *format, RowBytes row_bytes, ScalesPerRow scales_per_row,
                         at::ScalarType scale_dtype = at::kFloat) {
    TORCH_CHECK(x.dim() == 2 && x.is_floating_point(), "bitconvert: x must be a 2-D float tensor (tokens, in_features)");
    TORCH_CHECK(w_q.dtype() == dtype && w_q.dim() == 2 && w_q.is_contiguous() && w_q.device().is_cpu(), "bitconvert: ",
                format, " weight must be a contiguous 2-D CPU ", c10::toString(dtype), " tensor (out, row bytes)");
    const int64_t in_features = x.size(1), scales = w_q.size(0) * scales_per_row(in_features);
    TORCH_CHECK(w_q.size(1) == row_bytes(in_features), "bitconvert: ", format, " weight rows hold ", w_q.size(1),
                " bytes, expected ", row_bytes(in_features), " for in_features ", in_features);
    TORCH_CHECK(d.dtype() == scale_dtype && d.is_contiguous() && d.numel() == scales, "bitconvert: ", format,
                " scales must be contiguous ", scale_dtype == at::kFloat ? "fp32" : "fp16", " with ", scales,
                " values (", w_q.size(0), " rows x ",
                scales_per_row(in_features), "), got ", d.numel(), " ", c10::toString(d.scalar_type()));
    return x.to(at::kFloat).contiguous();
}

// x: float (n, in); w_q, d from int8_quantize_rows; returns fp32 (n, out).
at::Tensor int8_linear(const at::Tensor &x, const at::Tensor &w_q, const at::Tensor &d, int64_t isa,
                       int64_t threads) {
    const at::Tensor xf = checked_input(x, w_q, d, at::kChar, "int8", bc_int8_row_stride, [](int64_t) { return 1; });
    at::Tensor y = at::empty({xf.size(0), w_q.size(0)}, xf.options());
    check_result(bc_int8_linear(xf.data_ptr<float>(), xf.size(0), w_q.data_ptr<int8_t>(), d.data_ptr<float>(),
                                w_q.size(0), xf.size(1), y.data_ptr<float>(), int(isa), resolve_threads(threads)),
                 isa);
    return y;
}

// w: float (out, in) -> wf fp32 contiguous and the empty (codes uint8 (out, row_bytes(in)), scales (out,
// row_blocks(in)) of scale_dtype) that the block quantizer `format` fills.
std::tuple<at::Tensor, at::Tensor, at::Tensor> block_quantize_buffers(const at::Tensor &w, const char *format,
                                                                      int64_t (*row_bytes)(int64_t),
                                                                      int64_t (*row_blocks)(int64_t),
                                                                      at::ScalarType scale_dtype) {
    TORCH_CHECK(w.dim() == 2, "bitconvert: ", format, "_quantize_rows takes a 2-D weight");
    at::Tensor wf = w.to(at::kFloat).contiguous().cpu();
    at::Tensor w_q = at::empty({wf.size(0), row_bytes(wf.size(1))}, wf.options().dtype(at::kByte));
    at::Tensor d = at::empty({wf.size(0), row_blocks(wf.size(1))}, wf.options().dtype(scale_dtype));
    return {wf, w_q, d};
}

// w: float (out, in) -> (uint8 (out, bc_int4_row_bytes(in)) nibble codes, fp32 (out, bc_int4_row_blocks(in)) block
// scales d), as int8_core.h states.
std::tuple<at::Tensor, at::Tensor> int4_quantize_rows(const at::Tensor &w) {
    auto [wf, w_q, d] = block_quantize_buffers(w, "int4", bc_int4_row_bytes, bc_int4_row_blocks, at::kFloat);
    bc_int4_quantize_rows(wf.data_ptr<float>(), wf.size(0), wf.size(1), w_q.data_ptr<uint8_t>(), d.data_ptr<float>());
    return {w_q, d};
}

// x: float (n, in); w_q, d from int4_quantize_rows; returns fp32 (n, out).
at::Tensor int4_linear(const at::Tensor &x, const at::Tensor &w_q, const at::Tensor &d, int64_t isa,
                       int64_t threads) {
    const at::Tensor xf = checked_input(x, w_q, d, at::kByte, "int4", bc_int4_row_bytes, bc_int4_row_blocks);
    at::Tensor y = at::empty({xf.size(0), w_q.size(0)}, xf.options());
    check_result(bc_int4_linear(xf.data_ptr<float>(), xf.size(0), w_q.data_ptr<uint8_t>(), d.data_ptr<float>(),
                                w_q.size(0), xf.size(1), y.data_ptr<float>(), int(isa), resolve_threads(threads)),
                 isa);
    return y;
}

// The largest |w| int6's fp16 block scales represent: 31 * 65504 (int8_core.h).
constexpr double kInt6MaxWeight = 31.0 * 65504.0;

// w: float (out, in) -> (uint8 (out, bc_int6_row_bytes(in)) ql/qh codes, fp16 (out, bc_int6_row_blocks(in)) block
// scales d), as int8_core.h states; refuses weights beyond the fp16 scales' range (or not finite).
std::tuple<at::Tensor, at::Tensor> int6_quantize_rows(const at::Tensor &w) {
    auto [wf, w_q, d] = block_quantize_buffers(w, "int6", bc_int6_row_bytes, bc_int6_row_blocks, at::kHalf);
    const double amax = wf.numel() ? wf.abs().max().item<double>() : 0.0;
    TORCH_CHECK(amax <= kInt6MaxWeight, "bitconvert: int6 takes finite weights with |w| <= ", kInt6MaxWeight,
                " (fp16 block scales), got max |w| = ", amax, "; use int8");
    bc_int6_quantize_rows(wf.data_ptr<float>(), wf.size(0), wf.size(1), w_q.data_ptr<uint8_t>(),
                          reinterpret_cast<uint16_t *>(d.data_ptr<at::Half>()));
    return {w_q, d};
}

// x: float (n, in); w_q, d from int6_quantize_rows; returns fp32 (n, out).
at::Tensor int6_linear(const at::Tensor &x, const at::Tensor &w_q, const at::Tensor &d, int64_t isa,
                       int64_t threads) {
    const at::Tensor xf =
        checked_input(x, w_q, d, at::kByte, "int6", bc_int6_row_bytes, bc_int6_row_blocks, at::kHalf);
    at::Tensor y = at::empty({xf.size(0), w_q.size(0)}, xf.options());
    check_result(bc_int6_linear(xf.data_ptr<float>(), xf.size(0), w_q.data_ptr<uint8_t>(),
                                reinterpret_cast<const uint16_t *>(d.data_ptr<at::Half>()), w_q.size(0), xf.size(1),
                                y.data_ptr<float>(), int(isa), resolve_threads(threads)),
                 isa);
    return y;
}

// name "" -> the default path (BITCONVERT_ISA or the best supported); else that path. Errors if unknown/unsupported.
int64_t ternary_isa(c10::string_view name) {
    const std::string text(name);
    const int isa = text.empty() ? bc_default_isa() : bc_isa_from_name(text.c_str());
    TORCH_CHECK(isa != -2, "bitconvert: unknown ISA path '", text.empty() ? std::getenv("BITCONVERT_ISA") : text,
                "'; choose scalar, avx2, avxvnni or avx512");
    TORCH_CHECK(isa >= 0 && bc_isa_supported(isa), "bitconvert: this CPU cannot run the ISA path '",
                text.empty() ? std::getenv("BITCONVERT_ISA") : text, "'");
    return isa;
}

bool ternary_isa_supported(int64_t isa) { return bc_isa_supported(int(isa)) != 0; }

// The layout to repack into for path isa: BITCONVERT_LAYOUT or the best the path computes on (bc_default_layout).
int64_t ternary_layout(int64_t isa) {
    const int path = isa < 0 ? int(ternary_isa("")) : int(isa);
    TORCH_CHECK(bc_isa_supported(path), "bitconvert: this CPU cannot run the ISA path ", isa);
    const int layout = bc_default_layout(path);
    const char *name = std::getenv("BITCONVERT_LAYOUT");
    TORCH_CHECK(layout != -2, "bitconvert: unknown weight layout '", name,
                "' in BITCONVERT_LAYOUT; choose 2bit, base3 or lut");
    TORCH_CHECK(layout != -3, "bitconvert: the ISA path ", bc_isa_name(path), " does not compute on the layout '", name,
                "' that BITCONVERT_LAYOUT names");
    return layout;
}

bool ternary_layout_supported(int64_t layout, int64_t isa) { return bc_layout_supported(int(layout), int(isa)) != 0; }

}  // namespace

TORCH_LIBRARY(bitconvert, m) {
    m.def("ternary_repack(Tensor packed, int out_features, int layout=0) -> Tensor");
    m.def("ternary_repacked_bytes(int out_features, int in_features, int layout) -> int", &ternary_repacked_bytes);
    m.def(
        "ternary_matmul_int(Tensor x_q, Tensor weight, int out_features, int isa=-1, int threads=0, int layout=0)"
        " -> Tensor");
    m.def(
        "ternary_linear(Tensor x, Tensor weight, int out_features, Tensor weight_scale, int isa=-1, int threads=0,"
        " int layout=0) -> Tensor");
    m.def("int8_quantize_rows(Tensor w) -> (Tensor, Tensor)");
    m.def("int8_linear(Tensor x, Tensor w_q, Tensor d, int isa=-1, int threads=0) -> Tensor");
    m.def("int4_quantize_rows(Tensor w) -> (Tensor, Tensor)");
    m.def("int4_linear(Tensor x, Tensor w_q, Tensor d, int isa=-1, int threads=0) -> Tensor");
    m.def("int6_quantize_rows(Tensor w) -> (Tensor, Tensor)");
    m.def("int6_linear(Tensor x, Tensor w_q, Tensor d, int isa=-1, int threads=0) -> Tensor");
    m.def("ternary_isa(str name='') -> int", &ternary_isa);
    m.def("ternary_isa_supported(int isa) -> bool", &ternary_isa_supported);
    m.def("ternary_layout(int isa) -> int", &ternary_layout);
    m.def("ternary_layout_supported(int layout, int isa) -> bool", &ternary_layout_supported);
}

TORCH_LIBRARY_IMPL(bitconvert, CPU, m) {
    m.impl("ternary_repack", &ternary_repack);
    m.impl("ternary_matmul_int", &ternary_matmul_int);
    m.impl("ternary_linear", &ternary_linear);
    m.impl("int8_quantize_rows", &int8_quantize_rows);
    m.impl("int8_linear", &int8_linear);
    m.impl("int4_quantize_rows", &int4_quantize_rows);
    m.impl("int4_linear", &int4_linear);
    m.impl("int6_quantize_rows", &int6_quantize_rows);
    m.impl("int6_linear", &int6_linear);
}
