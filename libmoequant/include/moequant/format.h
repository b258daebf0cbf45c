// moequant/format.h -- one definition of a weight format: element type, group shape, scale kind, optional global
// scale; the bit-exact element codecs (FP8 E4M3, FP6 E2M3 / E3M2, FP4 E2M1, E8M0); the scale derivations of
// compressed-tensors; RTN quantize / dequantize of a [rows, cols] matrix; FP4 / FP6 / FP8 packing; and the decoders
// of the two source-checkpoint formats (DeepSeek-V3 / Kimi-K2 FP8 128x128 blocks, gpt-oss MXFP4 blocks).
//
// docs/formats.md restates the contract; the Python twin is moequant.ref.formats; the CUDA kernels
// (kernels/src/format.cu) run the very same scalar code below, so CPU and GPU agree bit for bit.
//
// Layout of this header:
//   1. the scalar part: plain functions of floats and bytes, `MQ_FORMAT_HD` (__host__ __device__ under nvcc), no
//      allocation, no Status, no fmt. This part is all nvcc sees (the .cu files include this header).
//   2. (host compilers only) the Format description, validate(), the shape helpers and the matrix functions, which
//      return Status (status.h) and never throw.
//
// Arithmetic rules shared by both parts (they are what makes CPU == GPU):
//   * all arithmetic is fp32, one IEEE operation at a time (mq_fmul / mq_fdiv / mq_fadd are the _rn intrinsics on
//     the device, so nvcc cannot contract a multiply and an add into an FMA);
//   * rounding to an integer is round-half-to-even (rintf on the device, std::nearbyint on the host);
//   * every minifloat encode is round-to-nearest-even done on the bits.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define MQ_FORMAT_HD __host__ __device__
#else
#define MQ_FORMAT_HD
#include <cmath>
#endif

namespace moequant {
inline namespace v0 {

// =====================================================================================================================
// 1. Scalar part (host and device)
// =====================================================================================================================

/// The element type of a format. Values are part of the API (the Python binding passes them as ints).
enum class ElementKind : int {
  kInt = 0,      // signed integer of `bits` (2..8) bits, symmetric or asymmetric (quant.h's contract)
  kFp8E4M3 = 1,  // float8_e4m3fn: bias 7, no infinities, 0x7F / 0xFF are NaN, max 448
  kFp4E2M1 = 2,  // OCP FP4: bias 1, values +-{0, 0.5, 1, 1.5, 2, 3, 4, 6}
  kFp6E2M3 = 3,  // OCP FP6 E2M3: bias 1, max 7.5 (compressed-tensors' mxfp6-pack-quantized)
  kFp6E3M2 = 4,  // OCP FP6 E3M2: bias 3, max 28 (vLLM / AMD Quark OCP MX; not in compressed-tensors 0.20)
};

/// Which elements share a scale.
enum class GroupKind : int {
  kTensor = 0,   // one scale for the whole matrix
  kChannel = 1,  // one scale per row (output channel)
  kGroup = 2,    // one scale per `group_size` consecutive columns of a row (the last group of a row may be partial)
  kBlock = 3,    // one scale per block_rows x block_cols tile (edge tiles may be partial), DeepSeek-V3's 128x128
};

/// How a scale is stored.
enum class ScaleKind : int {
  kFloat = 0,    // a float of `scale_dtype` (fp32 / bf16 / fp16, rounded to nearest even)
  kFp8E4M3 = 1,  // a float8_e4m3fn byte (NVFP4's group scales)
  kE8M0 = 2,     // an E8M0 byte: the power of two 2^(e - 127), 0xFF NaN (OCP MX)
};

namespace fmt_detail {

MQ_FORMAT_HD inline uint32_t bits_of(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
#endif
}
MQ_FORMAT_HD inline float float_of(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, 4);
  return f;
#endif
}

// One IEEE operation each, never contracted.
MQ_FORMAT_HD inline float mq_fmul(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}
MQ_FORMAT_HD inline float mq_fdiv(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}
MQ_FORMAT_HD inline float mq_fadd(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}
MQ_FORMAT_HD inline float mq_fsub(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fsub_rn(a, b);
#else
  return a - b;
#endif
}
/// Round half to even (the default rounding mode).
MQ_FORMAT_HD inline float mq_rint(float a) {
#if defined(__CUDA_ARCH__)
  return rintf(a);
#else
  return std::nearbyint(a);
#endif
}
MQ_FORMAT_HD inline bool is_finite_bits(uint32_t u) { return (u & 0x7F800000u) != 0x7F800000u; }
MQ_FORMAT_HD inline bool is_nan_bits(uint32_t u) { return (u & 0x7FFFFFFFu) > 0x7F800000u; }
/// std::min / std::max exactly as libstdc++ defines them (the first argument wins ties, incl. -0 vs +0).
MQ_FORMAT_HD inline float std_min(float a, float b) { return (b < a) ? b : a; }
MQ_FORMAT_HD inline float std_max(float a, float b) { return (a < b) ? b : a; }

constexpr uint32_t kQuietNan = 0x7FC00000u;

}  // namespace fmt_detail

// ---- minifloat codecs ---------------------------------------------------------------------------------------------
// A minifloat with E exponent bits, M mantissa bits and exponent bias B: code = sign << (E + M) | exp << M | man;
// exp = 0 is subnormal (man * 2^(1 - B - M)), else (1 + man / 2^M) * 2^(exp - B). Encoding rounds |x| to the
// nearest representable magnitude, ties to even (the code with an even mantissa), and saturates to the largest
// finite magnitude `max_mag` (the magnitude code): |x| above it, and +-inf, give +-max. That is compressed-tensors'
// clamp-then-cast, torch's float -> float8_e4m3fn cast (torch >= 2.x saturates) and OCP MX's satfinite conversion.

struct MinifloatSpec {
  int exp_bits, man_bits, bias;
  uint32_t max_mag;  // largest finite magnitude code
};
// (functions rather than constants: device code cannot read host variables)
MQ_FORMAT_HD constexpr MinifloatSpec spec_e4m3() { return {4, 3, 7, 0x7E}; }  // max 448 (0x7F is NaN)
MQ_FORMAT_HD constexpr MinifloatSpec spec_e2m1() { return {2, 1, 1, 0x7}; }   // max 6
MQ_FORMAT_HD constexpr MinifloatSpec spec_e2m3() { return {2, 3, 1, 0x1F}; }  // max 7.5
MQ_FORMAT_HD constexpr MinifloatSpec spec_e3m2() { return {3, 2, 3, 0x1F}; }  // max 28

/// Magnitude code of |x| (x finite or +-inf; NaN is the caller's business): round to nearest even, saturating.
MQ_FORMAT_HD inline uint32_t minifloat_encode_magnitude(float x, MinifloatSpec s) {
  using namespace fmt_detail;
  const uint32_t a = bits_of(x) & 0x7FFFFFFFu;
  const int emin = 1 - s.bias;                                  // exponent of the smallest normal
  const int e = static_cast<int>(a >> 23) - 127;                // fp32 exponent (-127 for fp32 zero / subnormal)
  const bool normal = e >= emin;
  // Both cases are computed and one is selected (no branch: the GPU kernels interleave a chunk's elements).
  // Normal range of the target: the exponent rebiased, the mantissa rounded to M bits, ties to even.
  const int shift = 23 - s.man_bits;
  const uint32_t man = a & 0x7FFFFFu;
  uint32_t mn = (static_cast<uint32_t>(e + s.bias) << s.man_bits) | (man >> shift);
  const uint32_t rem = man & ((1u << shift) - 1u), half = 1u << (shift - 1);
  mn += (rem > half || (rem == half && (mn & 1u))) ? 1u : 0u;   // a carry moves into the exponent, as it should
  // Subnormal range of the target: |x| / 2^(emin - M) rounded to an integer in [0, 2^M] (2^M is the smallest
  // normal, whose code is exactly 2^M). The scaling by a power of two is exact; a normal |x| scales 0 instead, so
  // the conversion only ever sees a small value.
  const float scaled =
      mq_fmul(normal ? 0.0f : float_of(a), float_of(static_cast<uint32_t>(127 + s.man_bits - emin) << 23));
  const uint32_t ms = static_cast<uint32_t>(mq_rint(scaled));
  const uint32_t mag = normal ? mn : ms;
  return mag > s.max_mag ? s.max_mag : mag;
}

/// Value of a magnitude code (no NaN handling).
MQ_FORMAT_HD inline float minifloat_decode_magnitude(uint32_t mag, MinifloatSpec s) {
  using namespace fmt_detail;
  const uint32_t exp = mag >> s.man_bits, man = mag & ((1u << s.man_bits) - 1u);
  if (exp == 0)  // man * 2^(1 - B - M), exact
    return mq_fmul(static_cast<float>(man), float_of(static_cast<uint32_t>(127 + 1 - s.bias - s.man_bits) << 23));
  return float_of((static_cast<uint32_t>(static_cast<int>(exp) - s.bias + 127) << 23) | (man << (23 - s.man_bits)));
}

/// float8_e4m3fn encode, bit-identical to torch's `x.to(torch.float8_e4m3fn)` for every fp32 input: round to nearest
/// even, |x| >= 464 (the midpoint above 448) and +-inf saturate to +-448 (0x7E / 0xFE), NaN -> 0x7F | sign, -0 -> 0x80.
MQ_FORMAT_HD inline uint8_t e4m3_encode(float x) {
  using namespace fmt_detail;
  const uint32_t u = bits_of(x), sign = (u >> 24) & 0x80u;
  const uint32_t mag = is_nan_bits(u) ? 0x7Fu : minifloat_encode_magnitude(x, spec_e4m3());
  return static_cast<uint8_t>(sign | mag);
}
/// float8_e4m3fn decode: exact; 0x7F / 0xFF -> NaN (quiet, with the code's sign).
MQ_FORMAT_HD inline float e4m3_decode(uint8_t code) {
  using namespace fmt_detail;
  const uint32_t sign = static_cast<uint32_t>(code & 0x80u) << 24;
  if ((code & 0x7Fu) == 0x7Fu) return float_of(sign | kQuietNan);
  return float_of(sign | bits_of(minifloat_decode_magnitude(code & 0x7Fu, spec_e4m3())));
}

/// FP4 E2M1 encode (code = sign << 3 | magnitude index into {0, 0.5, 1, 1.5, 2, 3, 4, 6}): round to nearest even,
/// saturating at +-6, exactly compressed-tensors' cast_to_fp4 + pack (thresholds 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5
/// are ties that go to the even neighbour). The sign bit is set iff x < 0: a negative value that rounds to zero keeps
/// its sign (0x8), but x = -0.0 gives 0x0 -- compressed-tensors' quantize_and_pack_fp4 (CPU and Triton) behaviour.
/// NaN -> 0x7 (callers reject non-finite input before encoding).
MQ_FORMAT_HD inline uint8_t e2m1_encode(float x) {
  using namespace fmt_detail;
  const uint32_t sign = x < 0.0f ? 0x8u : 0u;  // false for NaN
  const uint32_t code = sign | minifloat_encode_magnitude(x, spec_e2m1());
  return static_cast<uint8_t>(is_nan_bits(bits_of(x)) ? 0x7u : code);
}
/// FP4 E2M1 decode of the low 4 bits of `code` (0x8 is -0.0).
MQ_FORMAT_HD inline float e2m1_decode(uint8_t code) {
  using namespace fmt_detail;
  const uint32_t sign = static_cast<uint32_t>(code & 0x8u) << 28;
  return float_of(sign | bits_of(minifloat_decode_magnitude(code & 0x7u, spec_e2m1())));
}

/// FP6 E2M3 encode (6-bit code, sign in bit 5): round to nearest even, saturating at +-7.5; the sign bit is the sign
/// bit of x (-0.0 -> 0x20), as compressed-tensors' cast_to_fp6 (copysign) + pack_fp6_to_uint8 (signbit). NaN -> 0x1F.
MQ_FORMAT_HD inline uint8_t e2m3_encode(float x) {
  using namespace fmt_detail;
  const uint32_t u = bits_of(x);
  if (is_nan_bits(u)) return 0x1F;
  return static_cast<uint8_t>(((u >> 26) & 0x20u) | minifloat_encode_magnitude(x, spec_e2m3()));
}
MQ_FORMAT_HD inline float e2m3_decode(uint8_t code) {
  using namespace fmt_detail;
  const uint32_t sign = static_cast<uint32_t>(code & 0x20u) << 26;
  return float_of(sign | bits_of(minifloat_decode_magnitude(code & 0x1Fu, spec_e2m3())));
}

/// FP6 E3M2 encode (OCP MX): round to nearest even, saturating at +-28, sign bit of x (-0.0 -> 0x20). NaN -> 0x1F.
MQ_FORMAT_HD inline uint8_t e3m2_encode(float x) {
  using namespace fmt_detail;
  const uint32_t u = bits_of(x);
  if (is_nan_bits(u)) return 0x1F;
  return static_cast<uint8_t>(((u >> 26) & 0x20u) | minifloat_encode_magnitude(x, spec_e3m2()));
}
MQ_FORMAT_HD inline float e3m2_decode(uint8_t code) {
  using namespace fmt_detail;
  const uint32_t sign = static_cast<uint32_t>(code & 0x20u) << 26;
  return float_of(sign | bits_of(minifloat_decode_magnitude(code & 0x1Fu, spec_e3m2())));
}

/// E8M0 decode: 2^(e - 127) (e = 0 is 2^-127, an fp32 subnormal), 0xFF -> NaN (OCP MX).
MQ_FORMAT_HD inline float e8m0_decode(uint8_t e) {
  using namespace fmt_detail;
  if (e == 0xFF) return float_of(kQuietNan);
  if (e == 0) return float_of(0x00400000u);
  return float_of(static_cast<uint32_t>(e) << 23);
}
/// E8M0 encode of a power of two 2^k, k in [-127, 127] (anything else: floor(log2 x) + 127 clamped to [0, 254];
/// zero and negative -> 0; NaN -> 0xFF).
MQ_FORMAT_HD inline uint8_t e8m0_encode(float x) {
  using namespace fmt_detail;
  const uint32_t u = bits_of(x);
  if (is_nan_bits(u)) return 0xFF;
  if (x <= 0.0f) return 0;
  const int e = static_cast<int>(u >> 23);  // floor(log2 x) + 127; 0 for subnormals (2^-127 and below)
  return static_cast<uint8_t>(e > 254 ? 254 : e);
}

/// The reciprocal of the E8M0 scale 2^(e - 127), e in [0, 254] (every code mx_scale_exponent gives): 2^(127 - e), a
/// normal float except 2^-127 (e = 254), a subnormal -- exact, so x * e8m0_reciprocal(e) and x / e8m0_decode(e) are
/// the correctly rounded value of the same real number: the same bits for every float x (infinities, zeros and
/// subnormal results included; NaN stays NaN). The CUDA kernels multiply by it where the reference divides.
MQ_FORMAT_HD inline float e8m0_reciprocal(uint8_t e) {
  using namespace fmt_detail;
  return e >= 254 ? float_of(0x00400000u) : float_of(static_cast<uint32_t>(254 - e) << 23);
}

// ---- float storage rounding (the scale dtypes of quant.h: 0 fp32, 1 bf16, 2 fp16) ---------------------------------

/// Rounds a finite float to the nearest bfloat16 (ties to even); the value as a float. Same bits as quant.h's
/// round_to_bf16.
MQ_FORMAT_HD inline float round_to_bf16_value(float f) {
  using namespace fmt_detail;
  uint32_t u = bits_of(f);
  u += 0x7FFFu + ((u >> 16) & 1u);
  return float_of(u & 0xFFFF0000u);
}
/// Rounds a finite float to the nearest IEEE half (ties to even; +-inf from 65520 up); the value as a float. Same as
/// quant.h's round_to_fp16.
MQ_FORMAT_HD inline float round_to_fp16_value(float f) {
  using namespace fmt_detail;
  const uint32_t sign = bits_of(f) & 0x80000000u;
  const float a = float_of(bits_of(f) & 0x7FFFFFFFu);
  if (a >= 65520.0f) return float_of(sign | 0x7F800000u);
  if (a < 6.103515625e-05f) {  // subnormal half: a multiple of 2^-24
    const float q = mq_fdiv(mq_rint(mq_fmul(a, 16777216.0f)), 16777216.0f);
    return float_of(sign | bits_of(q));
  }
  uint32_t u = bits_of(f);
  u += 0x0FFFu + ((u >> 13) & 1u);
  return float_of(u & 0xFFFFE000u);
}
MQ_FORMAT_HD inline float round_to_storage(float s, int dtype) {
  if (dtype == 1) return round_to_bf16_value(s);
  if (dtype == 2) return round_to_fp16_value(s);
  return s;
}
/// torch.finfo(dtype).eps: the scale of an all-zero group (quant.h's scale_epsilon).
MQ_FORMAT_HD inline float storage_epsilon(int dtype) {
  if (dtype == 1) return 0.0078125f;     // 2^-7
  if (dtype == 2) return 0.0009765625f;  // 2^-10
  return 1.1920928955078125e-07f;        // 2^-23
}
/// bfloat16 bits of a float, round to nearest even; NaN -> 0x7FC0 (torch's float -> bfloat16; the same on CPU and GPU).
MQ_FORMAT_HD inline uint16_t bf16_bits_of(float f) {
  using namespace fmt_detail;
  const uint32_t u = bits_of(f);
  if (is_nan_bits(u)) return 0x7FC0u;
  return static_cast<uint16_t>(bits_of(round_to_bf16_value(f)) >> 16);
}
/// A bfloat16 / IEEE half widened exactly to float.
MQ_FORMAT_HD inline float float_of_bf16_bits(uint16_t h) { return fmt_detail::float_of(static_cast<uint32_t>(h) << 16); }
MQ_FORMAT_HD inline float float_of_fp16_bits(uint16_t h) {
  using namespace fmt_detail;
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1Fu, man = h & 0x3FFu;
  if (exp == 0x1F) return float_of(sign | 0x7F800000u | (man << 13));
  if (exp == 0) return float_of(sign | bits_of(mq_fmul(static_cast<float>(man), 5.9604644775390625e-08f)));  // 2^-24
  return float_of(sign | ((exp - 15 + 127) << 23) | (man << 13));
}

// ---- the per-group arithmetic of a format ---------------------------------------------------------------------------

/// A Format flattened for the scalar functions (and the CUDA kernels): everything except the group shape.
struct FormatCore {
  int element = static_cast<int>(ElementKind::kFp8E4M3);  // ElementKind
  int bits = 8;                                           // kInt: 2..8
  bool symmetric = true;                                  // kInt only (floats are symmetric)
  int scale_kind = static_cast<int>(ScaleKind::kFloat);   // ScaleKind
  int scale_dtype = 0;                                    // kFloat: 0 fp32, 1 bf16, 2 fp16 (ScaleDtype's values)
  bool global_scale = false;                              // NVFP4's per-tensor global scale
};

/// Largest finite magnitude of a float element kind (448, 6, 7.5, 28); 0 for kInt.
MQ_FORMAT_HD inline float element_max(int element) {
  switch (element) {
    case 1: return 448.0f;
    case 2: return 6.0f;
    case 3: return 7.5f;
    case 4: return 28.0f;
    default: return 0.0f;
  }
}
/// OCP MX emax of the element (floor(log2 max)): E4M3 8, E2M1 2, E2M3 2, E3M2 4.
MQ_FORMAT_HD inline int element_emax(int element) {
  switch (element) {
    case 1: return 8;
    case 3: return 2;
    case 4: return 4;
    default: return 2;
  }
}
/// The mantissa width compressed-tensors rounds a group's absmax with before taking its exponent (round_to_power_2's
/// elem_mantissa): 3 for FP6 E2M3, 1 for FP4 and FP8 (generate_mx_scales), 2 for FP6 E3M2 (ours: its own mantissa,
/// the rule compressed-tensors applies to E2M3).
MQ_FORMAT_HD inline int element_mx_round_mantissa(int element) {
  if (element == 3) return 3;
  if (element == 4) return 2;
  return 1;
}

/// Element code of a float element kind for the value v (already divided by its scale).
MQ_FORMAT_HD inline uint8_t encode_element(int element, float v) {
  switch (element) {
    case 1: return e4m3_encode(v);
    case 2: return e2m1_encode(v);
    case 3: return e2m3_encode(v);
    default: return e3m2_encode(v);
  }
}
/// Value of an element code of a float element kind (FP4: low 4 bits read; FP6: low 6 bits read).
MQ_FORMAT_HD inline float decode_element(int element, uint8_t code) {
  switch (element) {
    case 1: return e4m3_decode(code);
    case 2: return e2m1_decode(code);
    case 3: return e2m3_decode(code);
    default: return e3m2_decode(code);
  }
}

/// The parameters of one scale group.
struct GroupParams {
  float scale = 1.0f;      // the stored scale's value (fp32 / bf16 / fp16 value, FP8 value or 2^(e - 127))
  float effective = 1.0f;  // the multiplier of the dequantization: scale, or fl(scale / global) with a global scale
  int32_t zero = 0;        // kInt asymmetric: the zero point in [qmin, qmax]; else 0
  uint8_t scale_code = 0;  // kFp8E4M3: the FP8 byte; kE8M0: the exponent byte; kFloat: 0
};

/// NVFP4's global scale from the tensor's absmax: (448 * element_max) * fl(1 / max(amax, FLT_MIN)) in fp32, 1 when that
/// is not finite (compressed-tensors' generate_gparam: `2688 / amax` of a Python float by a tensor, which torch computes
/// as `amax.reciprocal() * 2688` -- two roundings, not one division; 1 for an all-zero tensor).
MQ_FORMAT_HD inline float global_scale_from_amax(const FormatCore& f, float amax) {
  using namespace fmt_detail;
  const float num = mq_fmul(448.0f, element_max(f.element));
  const float g = mq_fmul(mq_fdiv(1.0f, std_max(amax, 1.17549435e-38f)), num);
  return is_finite_bits(bits_of(g)) ? g : 1.0f;
}

/// E8M0 exponent byte of a group with absmax `amax` (compressed-tensors' generate_mx_scales + round_to_quantized_type_
/// dtype(uint8)): p = amax rounded to a power of two (upwards when its mantissa fraction is >= 1 - 2^-(m+1), m =
/// element_mx_round_mantissa), e = clamp(127 + log2(p) - emax, 0, 254). amax = 0 gives 0 (2^-127). When amax rounds up
/// to 2^128 (amax >= 1.75 * 2^127 for FP4) compressed-tensors' float power of two overflows to inf and it stores 255 (an
/// infinite scale); this uses log2(p) = 128 (e = 253 for FP4), the scale the rule means.
MQ_FORMAT_HD inline uint8_t mx_scale_exponent(int element, float amax) {
  using namespace fmt_detail;
  const uint32_t add = 1u << (23 - element_mx_round_mantissa(element) - 1);
  const uint32_t p = (bits_of(amax) + add) & 0xFF800000u;  // sign (0) and exponent of the rounded power of two
  if (p == 0) return 0;
  const int log2p = static_cast<int>(p >> 23) - 127;       // 128 when the rounding overflowed to inf
  const int e = 127 + log2p - element_emax(element);
  return static_cast<uint8_t>(e < 0 ? 0 : (e > 254 ? 254 : e));
}

/// The parameters of a kE8M0-scaled group (no global scale) of absmax `amax` (derive_group_params' kE8M0 case).
MQ_FORMAT_HD inline GroupParams mx_group_params(int element, float amax) {
  GroupParams p;
  p.scale_code = mx_scale_exponent(element, amax);
  p.scale = e8m0_decode(p.scale_code);
  p.effective = p.scale;
  return p;
}

/// The parameters of a group whose values span [lo, hi] (widened here to include 0). `global` is the global scale
/// (used only when f.global_scale). Bit-exact with compressed-tensors' calculate_qparams on fp32 inputs:
///   kInt:           quant.h's qparams_from_range (scale rounded to scale_dtype, zero scale -> its eps);
///   float + kFloat: s = round_to_storage(amax / element_max); 0 -> eps of the storage dtype;
///   float + kFp8E4M3: s = e4m3(amax / element_max [* global]) saturating; a zero scale becomes 0.125 (eps of FP8);
///   float + kE8M0:  s = 2^(mx_scale_exponent - 127).
/// effective = fl(s / global) with a global scale, else s.
MQ_FORMAT_HD inline GroupParams derive_group_params(const FormatCore& f, float lo, float hi, float global) {
  using namespace fmt_detail;
  lo = std_min(lo, 0.0f);
  hi = std_max(hi, 0.0f);
  GroupParams p;
  if (f.element == static_cast<int>(ElementKind::kInt)) {
    const int qmin = -(1 << (f.bits - 1)), qmax = (1 << (f.bits - 1)) - 1;
    if (f.symmetric) {
      const float amax = std_max(-lo, hi);
      p.scale = mq_fdiv(amax, mq_fdiv(static_cast<float>(qmax - qmin), 2.0f));
    } else {
      p.scale = mq_fdiv(mq_fsub(hi, lo), static_cast<float>(qmax - qmin));
    }
    p.scale = round_to_storage(p.scale, f.scale_dtype);
    if (p.scale == 0.0f) p.scale = storage_epsilon(f.scale_dtype);
    if (!f.symmetric) {
      const float z = mq_rint(mq_fsub(static_cast<float>(qmin), mq_fdiv(lo, p.scale)));
      p.zero = static_cast<int32_t>(std_min(std_max(z, static_cast<float>(qmin)), static_cast<float>(qmax)));
    }
    p.effective = p.scale;
    return p;
  }
  const float amax = std_max(mq_fsub(0.0f, lo), hi);  // +0 for an all-zero group (-lo would be -0.0)
  if (f.scale_kind == static_cast<int>(ScaleKind::kE8M0)) {
    const GroupParams mx = mx_group_params(f.element, amax);
    p.scale_code = mx.scale_code;
    p.scale = mx.scale;
  } else if (f.scale_kind == static_cast<int>(ScaleKind::kFp8E4M3)) {
    float local = mq_fdiv(amax, element_max(f.element));
    if (f.global_scale) local = mq_fmul(global, local);
    p.scale_code = e4m3_encode(local);
    p.scale = e4m3_decode(p.scale_code);
    if (p.scale == 0.0f) {
      p.scale_code = 0x20;  // 0.125
      p.scale = 0.125f;
    }
  } else {
    p.scale = round_to_storage(mq_fdiv(amax, element_max(f.element)), f.scale_dtype);
    if (p.scale == 0.0f) p.scale = storage_epsilon(f.scale_dtype);
  }
  p.effective = f.global_scale ? mq_fdiv(p.scale, global) : p.scale;
  return p;
}

/// The kInt part of quantize_element (the CUDA kernels call it for int formats without the element dispatch).
MQ_FORMAT_HD inline uint8_t quantize_int_element(int bits, float x, const GroupParams& p) {
  using namespace fmt_detail;
  const float v = mq_rint(mq_fadd(mq_fdiv(x, p.scale), static_cast<float>(p.zero)));
  const float c = std_min(std_max(v, static_cast<float>(-(1 << (bits - 1)))), static_cast<float>((1 << (bits - 1)) - 1));
  return static_cast<uint8_t>(static_cast<int8_t>(static_cast<int32_t>(c)));
}
/// The code of x in a group with parameters p:
///   kInt: q = clamp(rint(x / scale + zero), qmin, qmax) stored as its two's-complement byte (quant.h);
///   float: encode(x / effective), round to nearest even, saturating (compressed-tensors: x / scale, clamp, cast).
MQ_FORMAT_HD inline uint8_t quantize_element(const FormatCore& f, float x, const GroupParams& p) {
  if (f.element == static_cast<int>(ElementKind::kInt)) return quantize_int_element(f.bits, x, p);
  return encode_element(f.element, fmt_detail::mq_fdiv(x, p.effective));
}

/// NaN results are returned as the one quiet NaN 0x7FC00000 (CPUs and GPUs produce different NaN bits for 0 * inf or
/// NaN * x; torch's default NaN is this one), so outputs compare bit for bit everywhere.
MQ_FORMAT_HD inline float canonical_nan(float v) {
  return fmt_detail::is_nan_bits(fmt_detail::bits_of(v)) ? fmt_detail::float_of(fmt_detail::kQuietNan) : v;
}

/// The dequantized value of a code: kInt (int8(code) - zero) * scale; float decode(code) * effective. NaN (an FP8 NaN
/// code, or 0 * an infinite fp16 scale) is the canonical quiet NaN.
/// The two parts of dequantize_element (the CUDA kernels call them without the element dispatch): an int code, and
/// a float element's decoded value, times the effective scale.
MQ_FORMAT_HD inline float dequantize_int_element(uint8_t code, float effective, int32_t zero) {
  return canonical_nan(
      fmt_detail::mq_fmul(static_cast<float>(static_cast<int32_t>(static_cast<int8_t>(code)) - zero), effective));
}
MQ_FORMAT_HD inline float dequantize_decoded(float decoded, float effective) {
  return canonical_nan(fmt_detail::mq_fmul(decoded, effective));
}
MQ_FORMAT_HD inline float dequantize_element(const FormatCore& f, uint8_t code, float effective, int32_t zero) {
  if (f.element == static_cast<int>(ElementKind::kInt)) return dequantize_int_element(code, effective, zero);
  return dequantize_decoded(decode_element(f.element, code), effective);
}

/// gpt-oss MXFP4 (transformers' convert_moe_packed_tensors): byte j of a 16-byte block holds elements 2j (low nibble)
/// and 2j + 1 (high nibble) of the block's 32, each an E2M1 code (sign << 3 | index into 0, 0.5, 1, 1.5, 2, 3, 4, 6);
/// the block's scale byte e gives x = value * 2^(e - 127) (ldexp). The product is exact in fp32; e = 0xFF (NaN in
/// E8M0) gives NaN for every element of the block.
MQ_FORMAT_HD inline float mxfp4_block_value(uint8_t byte, int high, uint8_t scale_exp) {
  return canonical_nan(
      fmt_detail::mq_fmul(e2m1_decode(static_cast<uint8_t>(high ? byte >> 4 : byte & 0xF)), e8m0_decode(scale_exp)));
}

}  // namespace v0
}  // namespace moequant

// =====================================================================================================================
// 2. Host part: Format, validation, matrix functions (Status, never throws)
// =====================================================================================================================
#if !defined(__CUDACC__)

#include <moequant/quant.h>
#include <moequant/status.h>

#include <algorithm>
#include <limits>

namespace moequant {
inline namespace v0 {

static_assert(static_cast<int>(ScaleDtype::kFloat32) == 0 && static_cast<int>(ScaleDtype::kBFloat16) == 1 &&
                  static_cast<int>(ScaleDtype::kFloat16) == 2,
              "FormatCore::scale_dtype uses ScaleDtype's values");

inline const char* element_kind_name(ElementKind k) noexcept {
  switch (k) {
    case ElementKind::kInt: return "int";
    case ElementKind::kFp8E4M3: return "fp8_e4m3";
    case ElementKind::kFp4E2M1: return "fp4_e2m1";
    case ElementKind::kFp6E2M3: return "fp6_e2m3";
    case ElementKind::kFp6E3M2: return "fp6_e3m2";
  }
  return "unknown";
}
inline const char* group_kind_name(GroupKind k) noexcept {
  switch (k) {
    case GroupKind::kTensor: return "tensor";
    case GroupKind::kChannel: return "channel";
    case GroupKind::kGroup: return "group";
    case GroupKind::kBlock: return "block";
  }
  return "unknown";
}
inline const char* scale_kind_name(ScaleKind k) noexcept {
  switch (k) {
    case ScaleKind::kFloat: return "float";
    case ScaleKind::kFp8E4M3: return "fp8_e4m3";
    case ScaleKind::kE8M0: return "e8m0";
  }
  return "unknown";
}

/// A weight format. Construct with the presets below or field by field, then validate().
struct Format {
  ElementKind element = ElementKind::kFp8E4M3;
  int bits = 8;             // kInt: 2..8 (floats: implied by the element, 8 / 4 / 6)
  bool symmetric = true;    // kInt: false for a zero point per group; floats must be symmetric
  GroupKind group = GroupKind::kChannel;
  int64_t group_size = 0;   // kGroup: columns per group (> 0)
  int64_t block_rows = 0;   // kBlock: rows per block (> 0)
  int64_t block_cols = 0;   // kBlock: columns per block (> 0)
  ScaleKind scale = ScaleKind::kFloat;
  ScaleDtype scale_dtype = ScaleDtype::kFloat32;  // kFloat: the storage dtype the scale is rounded to
  bool global_scale = false;  // a per-tensor global scale divides every group scale (NVFP4); needs kFp8E4M3 scales

  FormatCore core() const noexcept {
    FormatCore c;
    c.element = static_cast<int>(element);
    c.bits = element_bits();
    c.symmetric = symmetric;
    c.scale_kind = static_cast<int>(scale);
    c.scale_dtype = static_cast<int>(scale_dtype);
    c.global_scale = global_scale;
    return c;
  }
  /// Bits of one element (kInt: `bits`).
  int element_bits() const noexcept {
    switch (element) {
      case ElementKind::kFp8E4M3: return 8;
      case ElementKind::kFp4E2M1: return 4;
      case ElementKind::kFp6E2M3:
      case ElementKind::kFp6E3M2: return 6;
      case ElementKind::kInt: break;
    }
    return bits;
  }
};

// ---- presets (compressed-tensors scheme names in brackets) ------------------------------------------------------------

/// Integers, quant.h's contract [W4A16 etc.; pack-quantized]. group_size <= 0: per channel.
inline Format format_int(int bits, bool symmetric, int64_t group_size, ScaleDtype scale_dtype = ScaleDtype::kFloat32) {
  Format f;
  f.element = ElementKind::kInt;
  f.bits = bits;
  f.symmetric = symmetric;
  f.group = group_size > 0 ? GroupKind::kGroup : GroupKind::kChannel;
  f.group_size = group_size > 0 ? group_size : 0;
  f.scale_dtype = scale_dtype;
  return f;
}
/// FP8 E4M3 per output channel, scale in the weight dtype [FP8_DYNAMIC weights; float-quantized].
inline Format format_fp8_channel(ScaleDtype scale_dtype = ScaleDtype::kFloat32) {
  Format f;
  f.group = GroupKind::kChannel;
  f.scale_dtype = scale_dtype;
  return f;
}
/// FP8 E4M3 with one scale for the tensor [FP8 weights; float-quantized].
inline Format format_fp8_tensor(ScaleDtype scale_dtype = ScaleDtype::kFloat32) {
  Format f;
  f.group = GroupKind::kTensor;
  f.scale_dtype = scale_dtype;
  return f;
}
/// FP8 E4M3 with one scale per block (DeepSeek-V3 / Kimi-K2: 128 x 128, fp32 weight_scale_inv = the dequantization
/// multiplier) [FP8_BLOCK; float-quantized].
inline Format format_fp8_block(int64_t block_rows = 128, int64_t block_cols = 128,
                               ScaleDtype scale_dtype = ScaleDtype::kFloat32) {
  Format f;
  f.group = GroupKind::kBlock;
  f.block_rows = block_rows;
  f.block_cols = block_cols;
  f.scale_dtype = scale_dtype;
  return f;
}
/// NVFP4: FP4 E2M1, groups of 16, FP8 E4M3 group scales, fp32 global scale [NVFP4A16; nvfp4-pack-quantized].
inline Format format_nvfp4() {
  Format f;
  f.element = ElementKind::kFp4E2M1;
  f.bits = 4;
  f.group = GroupKind::kGroup;
  f.group_size = 16;
  f.scale = ScaleKind::kFp8E4M3;
  f.global_scale = true;
  return f;
}
/// OCP MX: groups of 32 with E8M0 scales: MXFP4 (E2M1) [MXFP4A16; mxfp4-pack-quantized], MXFP6 (E2M3 [MXFP6A16;
/// mxfp6-pack-quantized] or E3M2 [vLLM / Quark only]), MXFP8 (E4M3) [MXFP8A16; mxfp8-quantized].
inline Format format_mx(ElementKind element) {
  Format f;
  f.element = element;
  f.group = GroupKind::kGroup;
  f.group_size = 32;
  f.scale = ScaleKind::kE8M0;
  f.bits = f.element_bits();
  return f;
}
inline Format format_mxfp4() { return format_mx(ElementKind::kFp4E2M1); }

// ---- validation ---------------------------------------------------------------------------------------------------

/// Checks the format alone; the message names the field, the expected and the actual value.
inline Status validate(const Format& f) {
  const int ek = static_cast<int>(f.element);
  if (ek < 0 || ek > 4)
    return Status::invalid("element: expected 0 (int), 1 (fp8_e4m3), 2 (fp4_e2m1), 3 (fp6_e2m3) or 4 (fp6_e3m2), got {}",
                           ek);
  const int gk = static_cast<int>(f.group);
  if (gk < 0 || gk > 3)
    return Status::invalid("group: expected 0 (tensor), 1 (channel), 2 (group) or 3 (block), got {}", gk);
  const int sk = static_cast<int>(f.scale);
  if (sk < 0 || sk > 2) return Status::invalid("scale: expected 0 (float), 1 (fp8_e4m3) or 2 (e8m0), got {}", sk);
  const int sd = static_cast<int>(f.scale_dtype);
  if (sd < 0 || sd > 2)
    return Status::invalid("scale_dtype: expected 0 (float32), 1 (bfloat16) or 2 (float16), got {}", sd);
  if (f.element == ElementKind::kInt) {
    if (f.bits < kMinBits || f.bits > kMaxBits)
      return Status::invalid("bits: expected an integer in [{}, {}] for int elements, got {}", kMinBits, kMaxBits,
                             f.bits);
    if (f.scale != ScaleKind::kFloat)
      return Status::not_supported("scale: expected float (0) for int elements, got {}", scale_kind_name(f.scale));
  } else {
    if (f.bits != f.element_bits())
      return Status::invalid("bits: expected {} for {} elements, got {}", f.element_bits(), element_kind_name(f.element),
                             f.bits);
    if (!f.symmetric)
      return Status::not_supported("symmetric: expected true for {} elements (compressed-tensors has no asymmetric "
                                   "float formats), got false",
                                   element_kind_name(f.element));
  }
  if (f.group == GroupKind::kGroup && f.group_size <= 0)
    return Status::invalid("group_size: expected > 0 for group scales, got {}", f.group_size);
  if (f.group == GroupKind::kBlock && (f.block_rows <= 0 || f.block_cols <= 0))
    return Status::invalid("block_rows, block_cols: expected > 0 for block scales, got [{}, {}]", f.block_rows,
                           f.block_cols);
  if (f.global_scale && f.scale != ScaleKind::kFp8E4M3)
    return Status::not_supported("global_scale: expected only with fp8_e4m3 scales (NVFP4), got scale {}",
                                 scale_kind_name(f.scale));
  return {};
}

/// Checks the format against a [rows, cols] matrix (non-negative shape).
inline Status validate(const Format& f, int64_t rows, int64_t cols) {
  MQ_RETURN_IF_ERROR(validate(f));
  if (rows < 0 || cols < 0) return Status::invalid("w: expected a non-negative shape, got [{}, {}]", rows, cols);
  return {};
}

// ---- shapes -------------------------------------------------------------------------------------------------------

/// Rows x columns of elements that share one scale (the last tile of a row / column may be partial).
inline int64_t tile_rows(const Format& f, int64_t rows) noexcept {
  if (f.group == GroupKind::kTensor) return rows > 0 ? rows : 1;
  if (f.group == GroupKind::kBlock) return f.block_rows;
  return 1;
}
inline int64_t tile_cols(const Format& f, int64_t cols) noexcept {
  if (f.group == GroupKind::kGroup) return f.group_size;
  if (f.group == GroupKind::kBlock) return f.block_cols;
  return cols > 0 ? cols : 1;
}
/// Shape of the scale tensor: tensor [1, 1], channel [rows, 1], group [rows, ceil(cols / g)], block
/// [ceil(rows / R), ceil(cols / C)].
inline int64_t scale_rows(const Format& f, int64_t rows) noexcept {
  if (f.group == GroupKind::kTensor) return 1;
  const int64_t t = tile_rows(f, rows);
  return (rows + t - 1) / t;
}
inline int64_t scale_cols(const Format& f, int64_t cols) noexcept {
  if (f.group == GroupKind::kTensor || f.group == GroupKind::kChannel) return 1;
  const int64_t t = tile_cols(f, cols);
  return (cols + t - 1) / t;
}

/// Bytes of one packed row of `cols` codes: FP4 two per byte (ceil(cols / 2)), FP6 four per three bytes
/// (3 * ceil(cols / 4)), FP8 and int one per byte (cols).
inline int64_t packed_row_bytes(ElementKind k, int64_t cols) noexcept {
  if (k == ElementKind::kFp4E2M1) return (cols + 1) / 2;
  if (k == ElementKind::kFp6E2M3 || k == ElementKind::kFp6E3M2) return 3 * ((cols + 3) / 4);
  return cols;
}

// ---- matrix functions ---------------------------------------------------------------------------------------------

/// A row-major [rows, cols] matrix of float32 / bfloat16 / float16 (ScaleDtype's codes) with leading dimension ld.
struct FloatMatrix {
  const void* data = nullptr;
  ScaleDtype dtype = ScaleDtype::kFloat32;
  int64_t rows = 0, cols = 0, ld = 0;
  float at(int64_t r, int64_t c) const noexcept {
    const int64_t i = r * ld + c;
    if (dtype == ScaleDtype::kFloat32) return static_cast<const float*>(data)[i];
    const uint16_t h = static_cast<const uint16_t*>(data)[i];
    return dtype == ScaleDtype::kBFloat16 ? float_of_bf16_bits(h) : float_of_fp16_bits(h);
  }
};

/// Outputs of format_quantize (row-major, contiguous); any pointer may be null to skip it.
struct FormatQuantized {
  uint8_t* codes = nullptr;        // [rows, cols]: float kinds the element's bits (FP4 low nibble, FP6 low 6 bits),
                                   // kInt the two's-complement byte of q in [qmin, qmax]
  float* scales = nullptr;         // [scale_rows, scale_cols]: the value of each stored scale
  uint8_t* scale_codes = nullptr;  // [scale_rows, scale_cols]: the FP8 / E8M0 byte (kFp8E4M3 / kE8M0 scales only)
  int32_t* zeros = nullptr;        // [scale_rows, scale_cols]: kInt asymmetric zero points (0 otherwise)
  float* global_scale = nullptr;   // [1]: the global scale used (formats with a global scale)
  float* dequantized = nullptr;    // [rows, cols] float32
};

/// min / max of w (0 included), as the groups see them; the first non-finite element is an error naming `w`.
inline Status matrix_range(const FloatMatrix& w, float* lo, float* hi) {
  float l = 0.0f, h = 0.0f;
  for (int64_t r = 0; r < w.rows; ++r)
    for (int64_t c = 0; c < w.cols; ++c) {
      const float v = w.at(r, c);
      if (!std::isfinite(v))
        return Status::invalid("w: expected finite values, got {} at ({}, {})", std::isnan(v) ? "NaN" : "Inf", r, c);
      l = fmt_detail::std_min(l, v);
      h = fmt_detail::std_max(h, v);
    }
  *lo = l;
  *hi = h;
  return {};
}

namespace fmt_detail {
inline Status check_global_scale(float g) {
  if (!(std::isfinite(g) && g > 0.0f))
    return Status::invalid("global_scale: expected a finite value > 0, got {}", g);
  return {};
}
inline Status check_out_dtype(ScaleDtype d) {
  if (d != ScaleDtype::kFloat32 && d != ScaleDtype::kBFloat16)
    return Status::invalid("out_dtype: expected 0 (float32) or 1 (bfloat16), got {}", static_cast<int>(d));
  return {};
}
inline void store_out(void* out, ScaleDtype d, int64_t i, float v) {
  if (d == ScaleDtype::kBFloat16) static_cast<uint16_t*>(out)[i] = bf16_bits_of(v);
  else static_cast<float*>(out)[i] = v;
}
}  // namespace fmt_detail

/// Round-to-nearest quantization of w in format f. Each scale group's range [lo, hi] (0 included) gives its
/// parameters (derive_group_params); with f.global_scale the global scale is `*global_scale_in` when given (e.g. shared
/// by fused gate/up projections; finite, > 0), else global_scale_from_amax of w's absmax. Non-finite w is an error
/// naming the first (row, col); outputs are then unspecified.
inline Status format_quantize(const FloatMatrix& w, const Format& f, const float* global_scale_in,
                              const FormatQuantized& out) {
  MQ_RETURN_IF_ERROR(validate(f, w.rows, w.cols));
  if (w.ld < w.cols) return Status::invalid("ld: expected >= cols={}, got {}", w.cols, w.ld);
  const FormatCore core = f.core();
  float g = 1.0f;
  float tlo = 0.0f, thi = 0.0f;
  MQ_RETURN_IF_ERROR(matrix_range(w, &tlo, &thi));
  if (f.global_scale) {
    if (global_scale_in) {
      MQ_RETURN_IF_ERROR(fmt_detail::check_global_scale(*global_scale_in));
      g = *global_scale_in;
    } else {
      g = global_scale_from_amax(core, fmt_detail::std_max(fmt_detail::mq_fsub(0.0f, tlo), thi));
    }
    if (out.global_scale) *out.global_scale = g;
  }
  // A group without elements (the one scale of an empty tensor, the row scales of a [rows, 0] matrix) gets the
  // parameters of an all-zero group.
  const int64_t tr = tile_rows(f, w.rows), tc = tile_cols(f, w.cols);
  const int64_t sr = scale_rows(f, w.rows), sc = scale_cols(f, w.cols);
  for (int64_t br = 0; br < sr; ++br)
    for (int64_t bc = 0; bc < sc; ++bc) {
      const int64_t r0 = br * tr, r1 = std::min(w.rows, r0 + tr), c0 = bc * tc, c1 = std::min(w.cols, c0 + tc);
      float lo = 0.0f, hi = 0.0f;
      for (int64_t r = r0; r < r1; ++r)
        for (int64_t c = c0; c < c1; ++c) {
          const float v = w.at(r, c);
          lo = fmt_detail::std_min(lo, v);
          hi = fmt_detail::std_max(hi, v);
        }
      const GroupParams p = derive_group_params(core, lo, hi, g);
      const int64_t s = br * sc + bc;
      if (out.scales) out.scales[s] = p.scale;
      if (out.scale_codes) out.scale_codes[s] = p.scale_code;
      if (out.zeros) out.zeros[s] = p.zero;
      for (int64_t r = r0; r < r1; ++r)
        for (int64_t c = c0; c < c1; ++c) {
          const uint8_t q = quantize_element(core, w.at(r, c), p);
          if (out.codes) out.codes[r * w.cols + c] = q;
          if (out.dequantized) out.dequantized[r * w.cols + c] = dequantize_element(core, q, p.effective, p.zero);
        }
    }
  return {};
}

/// out [rows, cols] (float32 or bfloat16, rounded to nearest even) = the dequantized codes [rows, cols] of format f:
/// kInt (int8(code) - zero) * scale; floats decode(code) * scale, or decode(code) * fl(scale / global) with a global
/// scale. `scales` [scale_rows, scale_cols] holds the scale values (FP8 / E8M0 scales decoded to float), `zeros` the
/// zero points (kInt asymmetric; null = 0), `global_scale` [1] (formats with a global scale; finite, > 0). Only the low
/// 4 (FP4) / 6 (FP6) bits of a code are read; FP8 codes 0x7F / 0xFF decode to NaN.
inline Status format_dequantize(const uint8_t* codes, int64_t rows, int64_t cols, const float* scales,
                                const int32_t* zeros, const float* global_scale, const Format& f, void* out,
                                ScaleDtype out_dtype) {
  MQ_RETURN_IF_ERROR(validate(f, rows, cols));
  MQ_RETURN_IF_ERROR(fmt_detail::check_out_dtype(out_dtype));
  float g = 1.0f;
  if (f.global_scale) {
    if (global_scale == nullptr)
      return Status::invalid("global_scale: expected the global scale of a {} format, got null",
                             element_kind_name(f.element));
    MQ_RETURN_IF_ERROR(fmt_detail::check_global_scale(*global_scale));
    g = *global_scale;
  }
  const FormatCore core = f.core();
  const int64_t tr = tile_rows(f, rows), tc = tile_cols(f, cols), sc = scale_cols(f, cols);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) {
      const int64_t s = (r / tr) * sc + c / tc;
      const float eff = f.global_scale ? fmt_detail::mq_fdiv(scales[s], g) : scales[s];
      const int32_t z = zeros ? zeros[s] : 0;
      fmt_detail::store_out(out, out_dtype, r * cols + c, dequantize_element(core, codes[r * cols + c], eff, z));
    }
  return {};
}

namespace fmt_detail {
inline Status check_packable(ElementKind k) {
  if (k == ElementKind::kInt)
    return Status::not_supported("element: expected a float element (fp8_e4m3, fp4_e2m1, fp6_e2m3, fp6_e3m2); int "
                                 "codes use the int32 pack-quantized layout of pack.h");
  if (static_cast<int>(k) < 0 || static_cast<int>(k) > 4)
    return Status::invalid("element: expected 1 (fp8_e4m3), 2 (fp4_e2m1), 3 (fp6_e2m3) or 4 (fp6_e3m2), got {}",
                           static_cast<int>(k));
  return {};
}
inline int code_bits(ElementKind k) {
  return k == ElementKind::kFp4E2M1 ? 4 : (k == ElementKind::kFp8E4M3 ? 8 : 6);
}
}  // namespace fmt_detail

/// Packs codes [rows, cols] (one per byte) along the rows into [rows, packed_row_bytes(k, cols)] bytes:
///   FP4 (compressed-tensors nvfp4 / mxfp4 weight_packed, gpt-oss *_blocks): byte j = code[2j] | code[2j + 1] << 4
///     (the low nibble first); an odd row ends with a zero high nibble;
///   FP6 (compressed-tensors mxfp6 pack_fp6_to_uint8): four codes c0..c3 make the 24-bit little-endian word
///     c0 | c1 << 6 | c2 << 12 | c3 << 18, stored as its three bytes (low first); a row is padded with zero codes to a
///     multiple of 4;
///   FP8: the bytes themselves.
/// A code wider than the element (FP4 > 15, FP6 > 63) is an error naming the first one.
inline Status pack_codes(const uint8_t* codes, int64_t rows, int64_t cols, ElementKind k, uint8_t* out) {
  MQ_RETURN_IF_ERROR(fmt_detail::check_packable(k));
  if (rows < 0 || cols < 0) return Status::invalid("codes: expected a non-negative shape, got [{}, {}]", rows, cols);
  const int b = fmt_detail::code_bits(k);
  const int64_t pb = packed_row_bytes(k, cols);
  for (int64_t r = 0; r < rows; ++r) {
    const uint8_t* q = codes + r * cols;
    uint8_t* o = out + r * pb;
    for (int64_t c = 0; c < cols; ++c)
      if (b < 8 && q[c] >> b)
        return Status::invalid("codes: expected {} codes in [0, {}], got {} at ({}, {})", element_kind_name(k),
                               (1 << b) - 1, static_cast<int>(q[c]), r, c);
    if (b == 8) {
      if (cols) std::memcpy(o, q, static_cast<size_t>(cols));
    } else if (b == 4) {
      for (int64_t j = 0; j < pb; ++j) {
        const uint8_t lo = q[2 * j], hi = 2 * j + 1 < cols ? q[2 * j + 1] : 0;
        o[j] = static_cast<uint8_t>(lo | (hi << 4));
      }
    } else {
      for (int64_t u = 0; u < pb / 3; ++u) {
        uint32_t word = 0;
        for (int i = 0; i < 4; ++i) {
          const int64_t c = 4 * u + i;
          word |= static_cast<uint32_t>(c < cols ? q[c] : 0) << (6 * i);
        }
        o[3 * u] = static_cast<uint8_t>(word & 0xFF);
        o[3 * u + 1] = static_cast<uint8_t>((word >> 8) & 0xFF);
        o[3 * u + 2] = static_cast<uint8_t>((word >> 16) & 0xFF);
      }
    }
  }
  return {};
}

/// Inverse of pack_codes: [rows, packed_row_bytes(k, cols)] bytes -> codes [rows, cols].
inline Status unpack_codes(const uint8_t* packed, int64_t rows, int64_t cols, ElementKind k, uint8_t* codes) {
  MQ_RETURN_IF_ERROR(fmt_detail::check_packable(k));
  if (rows < 0 || cols < 0) return Status::invalid("codes: expected a non-negative shape, got [{}, {}]", rows, cols);
  const int b = fmt_detail::code_bits(k);
  const int64_t pb = packed_row_bytes(k, cols);
  for (int64_t r = 0; r < rows; ++r) {
    const uint8_t* p = packed + r * pb;
    uint8_t* q = codes + r * cols;
    for (int64_t c = 0; c < cols; ++c) {
      if (b == 8) {
        q[c] = p[c];
      } else if (b == 4) {
        q[c] = static_cast<uint8_t>((c & 1) ? p[c / 2] >> 4 : p[c / 2] & 0xF);
      } else {
        const int64_t u = c / 4;
        const uint32_t word = p[3 * u] | (static_cast<uint32_t>(p[3 * u + 1]) << 8) |
                              (static_cast<uint32_t>(p[3 * u + 2]) << 16);
        q[c] = static_cast<uint8_t>((word >> (6 * (c % 4))) & 0x3F);
      }
    }
  }
  return {};
}

// ---- source-checkpoint decoders -------------------------------------------------------------------------------------

/// DeepSeek-V3 / Kimi-K2 FP8 weights: `weight` float8_e4m3fn [rows, cols] (one byte each) and `weight_scale_inv` fp32
/// [ceil(rows / block_rows), ceil(cols / block_cols)] (the block's dequantization multiplier; edge blocks are partial):
/// out[r, c] = e4m3(weight[r, c]) * scale_inv[r / block_rows, c / block_cols] in fp32, stored as float32 or bfloat16
/// (round to nearest even). Exactly format_dequantize with format_fp8_block(block_rows, block_cols).
inline Status decode_fp8_block_scaled(const uint8_t* weight, int64_t rows, int64_t cols, const float* scale_inv,
                                      int64_t block_rows, int64_t block_cols, void* out, ScaleDtype out_dtype) {
  if (block_rows <= 0 || block_cols <= 0)
    return Status::invalid("block_size: expected two values > 0, got [{}, {}]", block_rows, block_cols);
  return format_dequantize(weight, rows, cols, scale_inv, nullptr, nullptr, format_fp8_block(block_rows, block_cols),
                           out, out_dtype);
}

/// gpt-oss MXFP4 weights: `*_blocks` uint8 [rows, groups, 16] (32 E2M1 codes per group, element 2j in the low nibble
/// of byte j, 2j + 1 in the high nibble) and `*_scales` uint8 [rows, groups] (E8M0, bias 127): out [rows, groups * 32]
/// (float32 or bfloat16) = mxfp4_block_value, bit-identical to transformers' convert_moe_packed_tensors before its
/// final transpose (which the caller applies: gpt-oss stores [E, out, G, 16] and transformers returns [E, in, out]).
inline Status decode_mxfp4_blocks(const uint8_t* blocks, const uint8_t* scales, int64_t rows, int64_t groups,
                                  void* out, ScaleDtype out_dtype) {
  if (rows < 0 || groups < 0)
    return Status::invalid("blocks: expected a non-negative shape, got [{}, {}, 16]", rows, groups);
  MQ_RETURN_IF_ERROR(fmt_detail::check_out_dtype(out_dtype));
  for (int64_t i = 0; i < rows * groups; ++i)
    for (int j = 0; j < 32; ++j)
      fmt_detail::store_out(out, out_dtype, i * 32 + j, mxfp4_block_value(blocks[i * 16 + j / 2], j & 1, scales[i]));
  return {};
}

}  // namespace v0
}  // namespace moequant

#endif  // !__CUDACC__
