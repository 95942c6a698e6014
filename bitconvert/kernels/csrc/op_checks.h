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
    TORCH_CHECK(code != BC_ERR_SHAPE, "bitconvert: in_features exceeds ", BC_MAX_IN_FEATURES);
    TORCH_CHECK(code == BC_OK, "bitconvert: kernel error ", code);
}

// weight: the repacked layout (ternary_core.h) of an (out_features, in_features) matrix.
inline void check_weight(const at::Tensor &weight, int64_t out_features, int64_t in_features) {
    TORCH_CHECK(weight.dtype() == at::kByte && weight.is_contiguous() && weight.device().is_cpu(),
                "bitconvert: repacked weight must be a contiguous CPU uint8 tensor");
    TORCH_CHECK(size_t(weight.numel()) == bc_repacked_bytes(out_features, in_features),
                "bitconvert: repacked weight has ", weight.numel(), " bytes, expected ",
                bc_repacked_bytes(out_features, in_features), " for (", out_features, ", ", in_features, ")");
}

}  // namespace bitconvert

#endif
