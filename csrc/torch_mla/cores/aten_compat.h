#pragma once
// What the stock cores (cores/cudnn/cudnn_core.cpp, cores/efficient/efficient_core.cpp) assume of ATen's private attention entry
// points, in one place (docs/design.md §11). Checked against the headers of torch 2.11.0 (the GPU
// machine's) and 2.14.1 (CI's): at::_scaled_dot_product_cudnn_attention{,_backward} and
// at::_efficient_attention_{forward,backward} have the same C++ signatures in both; the layouts
// below are those of both versions' CUDA implementations.
#include <cstdint>

namespace torch_mla::cuda::aten_compat {

// _efficient_attention_forward returns logsumexp as (sequences, H, M) in float32 with M the longest
// query sequence rounded up to this multiple; row i of sequence b is that sequence's i-th query.
constexpr int64_t kEfficientLseAlign = 32;

// custom_mask_type of _efficient_attention_{forward,backward}: 0 none, 1 causal from the top left
// (query i sees keys 0..i of its sequence; q and k lengths are equal in training).
constexpr int64_t kEfficientNoMask = 0;
constexpr int64_t kEfficientCausal = 1;

// cuDNN attention takes (B, H, S, D) tensors of any strides and returns out in q's memory layout;
// its logsumexp is float32 in (B, H, S) memory order (returned as (B, H, S) or (B, H, S, 1)); the
// backward reads it from that layout, which a contiguous (B, H, S, 1) tensor gives in either case.
// Dropout is 0 throughout, so the philox seed and offset the backward takes are never read.

}  // namespace torch_mla::cuda::aten_compat
