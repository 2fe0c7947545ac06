// simt's bf16/fp16 conversions bit for bit against the host implementations in NVIDIA's
// cuda_bf16.h / cuda_fp16.h (compiled here by the host compiler), over every 16-bit pattern and a
// sweep of floats with all rounding cases (ties, subnormals, overflow, NaN).
#include <catch2/catch.hpp>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstring>
#include <random>

#include "simt/half.h"

namespace {

uint16_t bits_of(__nv_bfloat16 h) {
  uint16_t b;
  std::memcpy(&b, &h, 2);
  return b;
}
uint16_t bits_of(__half h) {
  uint16_t b;
  std::memcpy(&b, &h, 2);
  return b;
}

template <typename F>
void for_test_floats(F&& f) {
  // Every float whose top 16 bits vary with a few low patterns (ties, just above/below), plus randoms.
  const uint32_t lows[] = {0x0000u, 0x0001u, 0x0fffu, 0x1000u, 0x1001u, 0x7fffu, 0x8000u, 0x8001u, 0xffffu};
  for (uint32_t hi = 0; hi < 0x10000u; ++hi) {
    for (uint32_t lo : lows) f(simt::bits_float((hi << 16) | lo));
  }
  std::mt19937 rng(1);
  for (int i = 0; i < 1000000; ++i) f(simt::bits_float(rng()));
}

TEST_CASE("bf16 conversions are bit-exact against cuda_bf16.h", "[simt][half]") {
  for_test_floats([](float x) {
    const uint16_t ours = simt::float_to_bf16_bits(x);
    const uint16_t theirs = bits_of(__float2bfloat16_rn(x));
    if (ours != theirs) FAIL("bf16(" << x << " = 0x" << std::hex << simt::float_bits(x) << ") ours 0x" << ours
                                      << " cuda 0x" << theirs);
  });
  for (uint32_t b = 0; b < 0x10000u; ++b) {
    __nv_bfloat16 h;
    const auto u = static_cast<uint16_t>(b);
    std::memcpy(&h, &u, 2);
    const float ours = simt::bf16_bits_to_float(u), theirs = __bfloat162float(h);
    REQUIRE(std::memcmp(&ours, &theirs, 4) == 0);
  }
}

TEST_CASE("fp16 conversions are bit-exact against cuda_fp16.h", "[simt][half]") {
  for_test_floats([](float x) {
    const uint16_t ours = simt::float_to_f16_bits(x);
    const uint16_t theirs = bits_of(__float2half_rn(x));
    if (ours != theirs) FAIL("fp16(" << x << " = 0x" << std::hex << simt::float_bits(x) << ") ours 0x" << ours
                                      << " cuda 0x" << theirs);
  });
  for (uint32_t b = 0; b < 0x10000u; ++b) {
    __half h;
    const auto u = static_cast<uint16_t>(b);
    std::memcpy(&h, &u, 2);
    const float ours = simt::f16_bits_to_float(u), theirs = __half2float(h);
    if ((b & 0x7c00u) == 0x7c00u && (b & 0x3ffu) != 0) {
      REQUIRE(std::isnan(ours));
      REQUIRE(std::isnan(theirs));
    } else {
      REQUIRE(std::memcmp(&ours, &theirs, 4) == 0);
    }
  }
}

}  // namespace
