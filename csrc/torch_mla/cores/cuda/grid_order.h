#pragma once
// The order of our kernels' CTAs in their 1-D grids (docs/design.md §10.2), a process-wide setting.
// query_fastest (the default) is FlashAttention's: consecutive CTAs are the blocks of one (head,
// sequence), so CTAs resident together read the same K/V and find it in L2. head_fastest is the
// former order, kept selectable for the A/B benchmark through the private op
// torch.ops.torch_mla._set_grid_order (ops/cores.cpp). The host reads the setting once per launch
// into MlaParams::grid_order; the kernels read only that field. Host code only: no CUDA headers.
#include <atomic>
#include <cstdint>
#include <optional>
#include <string_view>

namespace torch_mla::cuda {

enum class GridOrder : int32_t {
  query_fastest,  // blockIdx.x = query block (key block in the dK/dV pass), then head, then sequence
  head_fastest,   // blockIdx.x = head, then sequence, then the block
};

inline constexpr std::string_view grid_order_name(GridOrder order) {
  return order == GridOrder::query_fastest ? "query_fastest" : "head_fastest";
}

inline constexpr std::optional<GridOrder> grid_order_from_name(std::string_view name) {
  if (name == "query_fastest") return GridOrder::query_fastest;
  if (name == "head_fastest") return GridOrder::head_fastest;
  return std::nullopt;
}

// A relaxed atomic so that a change from another thread is not a data race; its load is a plain
// load on every host we build for, and it is read once per launch, never per CTA.
inline std::atomic<GridOrder> grid_order_setting{GridOrder::query_fastest};

}  // namespace torch_mla::cuda
