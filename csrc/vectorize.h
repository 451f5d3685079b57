// Helpers that let the kernels' inner loops vectorise well in an extension built for the
// baseline ISA (torch's build flags carry no -march).
//
// DYNENC_MULTIVERSION: on x86-64 Linux with GCC, a function so marked is compiled three times,
// for x86-64-v4 (AVX-512), x86-64-v3 (AVX2, FMA, F16C) and the SSE2 baseline, and the dynamic
// loader picks the best one the CPU supports (GNU ifunc). Built as ISO C++ (torch passes
// -std=c++20), GCC keeps FMA contraction off, so every clone computes bit-identical results.
//
// to_opmath / from_opmath: element conversions between a storage dtype and its opmath type. On
// x86, c10's float <-> Half conversions (outside ATen's own per-CPU builds) are scalar code
// with branches the vectoriser rejects, which made float16 kernels several times slower than
// float32; the versions below are c10's algorithm in branchless form and give identical bits.
// Elsewhere (aarch64 converts in hardware) and for the other dtypes the c10 conversions are
// used as they are.
#pragma once
#include <ATen/OpMathType.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

// The x86-64-v* names need GCC 11; clang does not take them in target_clones.
#if defined(__x86_64__) && defined(__linux__) && !defined(__clang__) && __GNUC__ >= 11
#define DYNENC_MULTIVERSION __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define DYNENC_MULTIVERSION
#endif

namespace dynenc {
namespace detail {

inline float float_from_bits(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

inline uint32_t float_to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
}

// c10::detail::fp16_ieee_to_fp32_value with the normal / subnormal choice as a bit mask.
inline float half_bits_to_float(uint16_t h) {
  const uint32_t w = uint32_t(h) << 16;
  const uint32_t two_w = w + w;
  const float normal = float_from_bits((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
  const float subnormal = float_from_bits((two_w >> 17) | (126u << 23)) - 0.5f;
  const uint32_t is_subnormal = 0u - uint32_t(two_w < (1u << 27));
  return float_from_bits((w & 0x80000000u) | (float_to_bits(subnormal) & is_subnormal) |
                         (float_to_bits(normal) & ~is_subnormal));
}

// c10::detail::fp16_ieee_from_fp32_value (round to nearest even) with its two selections as
// bit masks, and its unsigned compares recast as signed ones on the magnitude bits.
inline uint16_t float_to_half_bits(float f) {
  const uint32_t w = float_to_bits(f);
  const int32_t magnitude = int32_t(w & 0x7FFFFFFFu);
  const int32_t exponent = magnitude & 0x7F800000;
  const int32_t tiny = -int32_t(exponent < 0x38800000);
  const uint32_t bias = uint32_t((exponent & ~tiny) | (0x38800000 & tiny));
  const float base =
      float_from_bits(bias + 0x07800000u) + (float_from_bits(uint32_t(magnitude)) * 0x1.0p+112f) * 0x1.0p-110f;
  const uint32_t bits = float_to_bits(base);
  const uint32_t finite = ((bits >> 13) & 0x00007C00u) + (bits & 0x00000FFFu);
  const uint32_t is_nan = 0u - uint32_t(magnitude > 0x7F800000);
  return uint16_t(((w & 0x80000000u) >> 16) | (0x7E00u & is_nan) | (finite & ~is_nan));
}

}  // namespace detail

#if defined(__x86_64__) || defined(_M_X64)
constexpr bool kBranchlessHalf = true;
#else
constexpr bool kBranchlessHalf = false;
#endif

template <typename scalar_t>
inline at::opmath_type<scalar_t> to_opmath(scalar_t v) {
  if constexpr (kBranchlessHalf && std::is_same_v<scalar_t, c10::Half>) {
    return detail::half_bits_to_float(v.x);
  } else {
    return v;
  }
}

template <typename scalar_t>
inline scalar_t from_opmath(at::opmath_type<scalar_t> v) {
  if constexpr (kBranchlessHalf && std::is_same_v<scalar_t, c10::Half>) {
    return c10::Half(detail::float_to_half_bits(v), c10::Half::from_bits());
  } else {
    return scalar_t(v);
  }
}

}  // namespace dynenc
