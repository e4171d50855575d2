// Device helpers shared by the .cu kernel files: dtype conversion, 16-byte vectors, the
// activations and their derivatives (the formulas of PyTorch's CUDA kernels, so results match
// eager), the mask bit, channel lookup, dispatch. CUDA headers only.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "resfuse_kernels.h"

namespace resfuse {
namespace detail {

constexpr int kThreads = 256;

template <typename T> struct AccOf { using type = float; };
template <> struct AccOf<double> { using type = double; };
template <typename T> using acc_t = typename AccOf<T>::type;

__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }
__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T, typename A> __device__ __forceinline__ T from_acc(A v) {
  if constexpr (std::is_same_v<T, __half>) return __float2half_rn(v);
  else if constexpr (std::is_same_v<T, __nv_bfloat16>) return __float2bfloat16_rn(v);
  else return static_cast<T>(v);
}

// VEC consecutive elements, loaded and stored as one 16-byte (or narrower) access.
template <typename T, int VEC> struct alignas(sizeof(T) * VEC) Vec { T v[VEC]; };

template <typename T, int VEC>
__device__ __forceinline__ Vec<T, VEC> load_vec(const T* p, int64_t e) {
  return *reinterpret_cast<const Vec<T, VEC>*>(p + e);
}
template <typename T, int VEC>
__device__ __forceinline__ void store_vec(T* p, int64_t e, const Vec<T, VEC>& v) {
  *reinterpret_cast<Vec<T, VEC>*>(p + e) = v;
}

template <typename A> __device__ __forceinline__ A exp_(A x) {
  if constexpr (std::is_same_v<A, float>) return expf(x); else return exp(x);
}
template <typename A> __device__ __forceinline__ A erf_(A x) {
  if constexpr (std::is_same_v<A, float>) return erff(x); else return erf(x);
}
template <typename A> __device__ __forceinline__ A tanh_(A x) {
  if constexpr (std::is_same_v<A, float>) return tanhf(x); else return tanh(x);
}
template <typename A> __device__ __forceinline__ A log1p_(A x) {
  if constexpr (std::is_same_v<A, float>) return log1pf(x); else return log1p(x);
}
// std::max / std::min as torch's kernels call them: a NaN first argument is returned.
template <typename A> __device__ __forceinline__ A max_(A a, A b) { return a < b ? b : a; }
template <typename A> __device__ __forceinline__ A min_(A a, A b) { return b < a ? b : a; }
// torch's CUDA hardswish / hardsigmoid multiply by this fp32 constant, in fp64 too.
constexpr float kOneSixth = 1.0f / 6.0f;

constexpr double kSqrt1_2 = 0.70710678118654752440;           // M_SQRT1_2
constexpr double kGeluPdf = 1.12837916709551257390 * kSqrt1_2 * 0.5;  // M_2_SQRTPI*M_SQRT1_2/2
constexpr double kTanhBeta = 1.41421356237309504880 * 1.12837916709551257390 * 0.5;
constexpr double kTanhKappa = 0.044715;

// act(u), as torch.nn.functional computes it (NaN propagates: relu keeps a NaN).
template <typename A> __device__ __forceinline__ A act_forward(Act k, A u, A slope) {
  switch (k) {
    case Act::kRelu: return u < A(0) ? A(0) : u;
    case Act::kLeakyRelu: return u > A(0) ? u : u * slope;
    case Act::kSilu: return u / (A(1) + exp_(-u));
    case Act::kGelu: return u * A(0.5) * (A(1) + erf_(u * A(kSqrt1_2)));
    case Act::kGeluTanh: {
      const A inner = A(kTanhBeta) * (u + A(kTanhKappa) * u * u * u);
      return A(0.5) * u * (A(1) + tanh_(inner));
    }
    case Act::kRelu6: return min_(max_(u, A(0)), A(6));  // hardtanh(0, 6) = clamp
    case Act::kHardswish: return u * min_(max_(u + A(3), A(0)), A(6)) * A(kOneSixth);
    case Act::kHardsigmoid: return min_(max_(u + A(3), A(0)), A(6)) * A(kOneSixth);
    case Act::kMish: return u * tanh_(log1p_(exp_(u)));
    default: return u;
  }
}

// The mask bit, from the pre-activation u or (relu, relu6) the output y, with eager's tie and
// NaN rules: relu's backward passes the gradient where !(y <= 0) (threshold_backward on the
// output), leaky_relu's where u > 0, relu6's where !(v <= 0 || v >= 6) (hardtanh_backward;
// the same test on u or y), hardsigmoid's where -3 < u < 3.
template <typename A> __device__ __forceinline__ bool act_bit(Act k, A v) {
  switch (k) {
    case Act::kRelu: return !(v <= A(0));
    case Act::kRelu6: return !(v <= A(0) || v >= A(6));
    case Act::kHardsigmoid: return v > A(-3) && v < A(3);
    default: return v > A(0);
  }
}

// act'(u) * g. `bit` serves relu/leaky_relu/relu6/hardsigmoid, `u` the others.
template <typename A> __device__ __forceinline__ A act_backward(Act k, A g, bool bit, A u, A slope) {
  switch (k) {
    case Act::kRelu: return bit ? g : A(0);
    case Act::kLeakyRelu: return bit ? g : g * slope;
    case Act::kSilu: {
      const A s = A(1) / (A(1) + exp_(-u));
      return g * s * (A(1) + u * (A(1) - s));
    }
    case Act::kGelu: {
      const A cdf = A(0.5) * (A(1) + erf_(u * A(kSqrt1_2)));
      const A pdf = exp_(A(-0.5) * u * u) * A(kGeluPdf);
      return g * (cdf + u * pdf);
    }
    case Act::kGeluTanh: {
      const A u2 = u * u;
      const A inner = A(kTanhBeta) * (u + A(kTanhKappa) * u2 * u);
      const A t = tanh_(inner);
      const A left = A(0.5) * u;
      const A right = A(1) + t;
      const A left_d = A(0.5) * right;
      const A right_d = left * (A(1) - t * t) * A(kTanhBeta) * (A(1) + A(3 * kTanhKappa) * u2);
      return g * (left_d + right_d);
    }
    case Act::kRelu6: return bit ? g : A(0);
    case Act::kHardswish:  // NaN passes the gradient, as torch's CUDA kernel
      if (u <= A(-3)) return A(0);
      return u < A(3) ? g * ((u / A(3)) + A(0.5)) : g;
    case Act::kHardsigmoid: return bit ? g * A(kOneSixth) : A(0);
    case Act::kMish: {
      const A s = A(1) / (A(1) + exp_(-u));
      const A t = tanh_(log1p_(exp_(u)));
      return g * (t + u * s * (A(1) - t * t));
    }
    default: return g;
  }
}

// Rounds an accumulation-dtype value through T where T is narrower (fp16, bf16): the kernels
// round where eager PyTorch rounds (BN's output, the residual sum, the activation's gradient),
// so the ReLU mask and every stored value agree with the eager chain's.
template <typename T, typename A> __device__ __forceinline__ A round_as(A v) {
  if constexpr (std::is_same_v<T, A>) return v; else return to_acc(from_acc<T>(v));
}

// VEC per-channel values starting at channel c0 (NHWC: VEC consecutive channels, one vector
// load when VEC > 1 — c0 and C are multiples of VEC there; NCHW: one channel for all VEC).
// The vector path needs p 16-byte aligned (pick_vec checks it; VEC >= 16 / sizeof(A) there).
template <typename A, int VEC, bool kNHWC>
__device__ __forceinline__ void load_channels(const A* p, int64_t c0, A (&out)[VEC]) {
  constexpr int W = 16 / sizeof(A);  // values per 16-byte load
  if constexpr (kNHWC && VEC > 1 && VEC % W == 0) {
#pragma unroll
    for (int k = 0; k < VEC / W; ++k) {
      const Vec<A, W> v = *reinterpret_cast<const Vec<A, W>*>(p + c0 + k * W);
#pragma unroll
      for (int j = 0; j < W; ++j) out[k * W + j] = v.v[j];
    }
  } else if constexpr (kNHWC) {
#pragma unroll
    for (int j = 0; j < VEC; ++j) out[j] = p[c0 + j];
  } else {
    const A v = p[c0];
#pragma unroll
    for (int j = 0; j < VEC; ++j) out[j] = v;
  }
}

// Flat index -> channel. 32-bit division where the numbers fit (the common case; 64-bit
// division costs several times more).
__device__ __forceinline__ int64_t div_(int64_t a, int64_t b) {
  if ((static_cast<uint64_t>(a) | static_cast<uint64_t>(b)) <= 0xFFFFFFFFull)
    return static_cast<int64_t>(static_cast<uint32_t>(a) / static_cast<uint32_t>(b));
  return a / b;
}
template <bool kNHWC>
__device__ __forceinline__ int64_t channel_of(int64_t e, int64_t C, int64_t HW) {
  if constexpr (kNHWC) return e - div_(e, C) * C;
  const int64_t p = div_(e, HW);  // plane n * C + c
  return p - div_(p, C) * C;
}

// The activation gradient of VEC elements at flat index e from grad_y and what forward saved.
template <typename T, typename A, int VEC>
__device__ __forceinline__ void grad_u_vec(const T* grad_y, const void* saved, Saved kind, Act act,
                                           A slope, int64_t e, A (&g)[VEC]) {
  const Vec<T, VEC> gy = load_vec<T, VEC>(grad_y, e);
  if (kind == Saved::kMask) {
    const uint32_t word = static_cast<const uint32_t*>(saved)[e >> 5] >> (e & 31);
#pragma unroll
    for (int j = 0; j < VEC; ++j)
      g[j] = round_as<T, A>(act_backward<A>(act, to_acc(gy.v[j]), (word >> j) & 1u, A(0), slope));
  } else if (kind == Saved::kNone) {
#pragma unroll
    for (int j = 0; j < VEC; ++j) g[j] = to_acc(gy.v[j]);
  } else {
    const Vec<T, VEC> sv = load_vec<T, VEC>(static_cast<const T*>(saved), e);
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const A v = to_acc(sv.v[j]);
      g[j] = round_as<T, A>(act_backward<A>(act, to_acc(gy.v[j]), act_bit<A>(act, v), v, slope));
    }
  }
}

// Grid of an elementwise kernel over `nvec` vectors: enough blocks to fill the GPU, then a
// grid-stride loop.
inline unsigned elementwise_blocks(int64_t nvec, int num_sms) {
  const int64_t want = (nvec + kThreads - 1) / kThreads;
  const int64_t cap = 16LL * (num_sms > 0 ? num_sms : 1);
  return static_cast<unsigned>(want < 1 ? 1 : (want < cap ? want : cap));
}

inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

}  // namespace detail
}  // namespace resfuse

// Calls __VA_ARGS__ with `T` the element type of `dtype`.
#define RESFUSE_DISPATCH_DTYPE(dtype, ...)                                   \
  switch (dtype) {                                                           \
    case ::resfuse::DType::kFloat32: { using T = float; __VA_ARGS__; break; }  \
    case ::resfuse::DType::kFloat64: { using T = double; __VA_ARGS__; break; } \
    case ::resfuse::DType::kFloat16: { using T = __half; __VA_ARGS__; break; } \
    case ::resfuse::DType::kBFloat16: { using T = __nv_bfloat16; __VA_ARGS__; break; } \
    default: return cudaErrorInvalidValue;                                   \
  }
