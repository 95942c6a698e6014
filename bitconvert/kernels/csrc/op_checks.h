// Argument checks and thread resolution shared by the torch bindings (torch_ops.cpp, decode_step.cpp).
#ifndef BITCONVERT_OP_CHECKS_H
#define BITCONVERT_OP_CHECKS_H

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include "ternary_core.h"

namespace bitconvert {

// threads <= 0: torch's thread count.
inline int resolve_threads(int64_t threads) { return threads > 0 ? int(threads) : at::get_num_threads(); }

// A BC_* code returned by the core as a clear error.
inline void check_result(int code, int64_t isa) {
    TORCH_CHECK(code != BC_ERR_ISA, "bitconvert: ISA path ", isa, " is unknown or not supported by this CPU");
    TORCH_CHECK(code != BC_ERR_LAYOUT, "bitconvert: ISA path ", isa,
                " does not compute on this weight layout; repack for the path (ternary_layout)");
    TORCH_CHECK(code != BC_ERR_SHAPE, "bitconvert: in_features exceeds ", BC_MAX_IN_FEATURES);
    TORCH_CHECK(code == BC_OK, "bitconvert: kernel error ", code);
}

// layout: a BC_LAYOUT_* index.
inline void check_layout(int64_t layout) {
    TORCH_CHECK(bc_layout_name(int(layout)) != nullptr, "bitconvert: unknown weight layout ", layout,
                "; choose 0 (2bit), 1 (base3) or 2 (lut)");
}

// weight: `layout` (ternary_core.h) of an (out_features, in_features) matrix. The size tells 2bit and base3 apart for
// every in_features but 73-80, lut from them for most shapes only (not e.g. 128 rows of 10-16 columns), so the
// caller keeps the layout beside the weight (KernelBackend: kernel_layout).
inline void check_weight(const at::Tensor &weight, int64_t layout, int64_t out_features, int64_t in_features) {
    check_layout(layout);
    TORCH_CHECK(weight.dtype() == at::kByte && weight.is_contiguous() && weight.device().is_cpu(),
                "bitconvert: repacked weight must be a contiguous CPU uint8 tensor");
    const size_t expected = bc_repacked_bytes(out_features, in_features, int(layout));
    TORCH_CHECK(size_t(weight.numel()) == expected, "bitconvert: repacked weight has ", weight.numel(),
                " bytes, expected ", expected, " for (", out_features, ", ", in_features, ") in the ",
                bc_layout_name(int(layout)), " layout");
}

}  // namespace bitconvert

#endif
