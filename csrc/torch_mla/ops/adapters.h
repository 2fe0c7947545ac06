#pragma once
// Kernels that only forward their arguments, written once from the op's typed signature (`Sig`,
// e.g. decltype(mla_attention_block)) instead of restating its argument list.
#include <tuple>
#include <utility>

namespace torch_mla {

// A kernel returning the first output of `fn`, which takes the same arguments (an op whose
// result is the first of a sibling op's).
template <typename Sig, auto fn>
struct FirstOutputOf;
template <typename R, typename... Args, auto fn>
struct FirstOutputOf<R(Args...), fn> {
  static R call(Args... args) { return std::get<0>(fn(std::forward<Args>(args)...)); }
};

// The Autograd kernel of a torch::autograd::Function whose forward takes the op's arguments.
template <typename Sig, typename Function>
struct ApplyOf;
template <typename R, typename... Args, typename Function>
struct ApplyOf<R(Args...), Function> {
  static R call(Args... args) { return Function::apply(std::forward<Args>(args)...); }
};

}  // namespace torch_mla
