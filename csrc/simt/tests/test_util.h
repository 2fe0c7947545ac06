#pragma once
// Helpers shared by the emulator's tests: streams in each lane order, random 16-bit tiles.
#include <cstdint>
#include <random>
#include <vector>

#include "simt/simt.h"

namespace simt_test {

inline const simt::Order kOrders[] = {simt::Order::forward, simt::Order::reverse, simt::Order::random};

inline simt::Stream make_stream(simt::Order order, uint64_t seed = 1) {
  simt::Stream s;
  s.order = order;
  s.seed = seed;
  return s;
}

template <typename H>
std::vector<H> random_tile(size_t n, uint64_t seed, float scale = 1.f) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> dist(0.f, scale);
  std::vector<H> v(n);
  for (auto& x : v) x = H(dist(rng));
  return v;
}

}  // namespace simt_test
