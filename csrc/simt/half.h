#pragma once
// Host bf16 and fp16: 16-bit storage types with the conversions of the hardware (cvt.rn): float →
// 16 bits rounds to nearest even, overflow goes to ±inf (fp16), subnormals are kept, NaN becomes
// the canonical 0x7fff; 16 bits → float is exact. Usable as the kernels' element type T on the host
// (mla_target.cuh aliases __nv_bfloat16 / __half to them).
#include <cmath>
#include <cstdint>
#include <cstring>

namespace simt {

inline uint32_t float_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

inline float bits_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline uint16_t float_to_bf16_bits(float f) {
  uint32_t u = float_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fffu;
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

inline float bf16_bits_to_float(uint16_t h) { return bits_float(static_cast<uint32_t>(h) << 16); }

inline uint16_t float_to_f16_bits(float f) {
  const uint32_t u = float_bits(f);
  const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
  const uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return 0x7fffu;                          // NaN
  if (a >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // ≥ 65520 rounds to inf
  if (a < 0x38800000u) {
    // |f| < 2^-14: a subnormal (or zero) of fp16, in units of 2^-24. f·2^24 is exact in float and
    // nearbyint rounds it to nearest even (the default rounding mode); 1024 is the smallest normal.
    const float scaled = bits_float(a) * 16777216.f;
    return static_cast<uint16_t>(sign | static_cast<uint16_t>(std::nearbyint(scaled)));
  }
  uint32_t r = a - 0x38000000u;  // rebias the exponent from 127 to 15
  r += 0xfffu + ((r >> 13) & 1u);
  return static_cast<uint16_t>(sign | (r >> 13));
}

inline float f16_bits_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t e = (h >> 10) & 0x1fu;
  const uint32_t m = h & 0x3ffu;
  if (e == 0) {
    const float v = static_cast<float>(m) * (1.f / 16777216.f);  // exact
    return sign ? -v : v;
  }
  if (e == 31) return bits_float(sign | 0x7f800000u | (m << 13));
  return bits_float(sign | ((e + 112u) << 23) | (m << 13));
}

struct bf16 {
  uint16_t bits = 0;
  bf16() = default;
  explicit bf16(float f) : bits(float_to_bf16_bits(f)) {}
  static bf16 from_bits(uint16_t b) {
    bf16 h;
    h.bits = b;
    return h;
  }
  explicit operator float() const { return bf16_bits_to_float(bits); }
  static float to_float(uint16_t b) { return bf16_bits_to_float(b); }
  static uint16_t to_bits(float f) { return float_to_bf16_bits(f); }
};

struct f16 {
  uint16_t bits = 0;
  f16() = default;
  explicit f16(float f) : bits(float_to_f16_bits(f)) {}
  static f16 from_bits(uint16_t b) {
    f16 h;
    h.bits = b;
    return h;
  }
  explicit operator float() const { return f16_bits_to_float(bits); }
  static float to_float(uint16_t b) { return f16_bits_to_float(b); }
  static uint16_t to_bits(float f) { return float_to_f16_bits(f); }
};

struct alignas(4) bf16x2 {
  bf16 x, y;
};
struct alignas(4) f16x2 {
  f16 x, y;
};
static_assert(sizeof(bf16) == 2 && sizeof(f16) == 2 && sizeof(bf16x2) == 4 && sizeof(f16x2) == 4);

}  // namespace simt
