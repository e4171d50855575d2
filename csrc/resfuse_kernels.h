// Launchers of resfuse's CUDA kernels: raw pointers, sizes and a stream; no torch anywhere.
//
// The kernels compute the BN + residual + activation parts of the fused ops (docs/design.md);
// the convolutions go through cuDNN from the binding file (resfuse_ext.cpp), which checks the
// arguments, allocates every output and workspace, and calls these launchers.
//
// Tensors are (N, C, H, W) and contiguous in NCHW or in NHWC (channels_last) order; the binding
// makes every tensor of one call contiguous in the same order, so a flat element index means
// the same (n, c, h, w) in all of them (the 1-bit ReLU mask is indexed by it too).
// Per-channel vectors (statistics, scale, shift, coefficients) are in the accumulation dtype:
// double for fp64 data, float otherwise. Indices are 64-bit throughout.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace resfuse {

enum class DType : int { kFloat32 = 0, kFloat64 = 1, kFloat16 = 2, kBFloat16 = 3 };

// Same numbering as the binding's activation names (resfuse.activations.KINDS: identity,
// relu, leaky_relu, silu, gelu, gelu_tanh, relu6, hardswish, hardsigmoid, mish).
enum class Act : int {
  kIdentity = 0, kRelu = 1, kLeakyRelu = 2, kSilu = 3, kGelu = 4, kGeluTanh = 5,
  kRelu6 = 6, kHardswish = 7, kHardsigmoid = 8, kMish = 9,
};
constexpr int kNumActs = 10;

// What the backward kernels get from forward to differentiate the activation:
// nothing (identity), the 1-bit mask (relu, leaky_relu, relu6, hardsigmoid), the activation's
// output y (relu, relu6: the mask's test holds on y) or its input u (leaky_relu, silu, gelu,
// hardswish, mish).
enum class Saved : int { kNone = 0, kMask = 1, kOutput = 2, kInput = 3 };

struct Geometry {
  int64_t n = 0, c = 0, hw = 0;
  bool channels_last = false;
  int64_t numel() const { return n * c * hw; }
  int64_t per_channel() const { return n * hw; }
};

// Words of the 1-bit mask: bit (e % 32) of word (e / 32) belongs to flat element e.
inline int64_t mask_words(int64_t numel) { return (numel + 31) / 32; }

// Elements (accumulation dtype) the two-level reductions need as workspace: two partial sums
// per channel for each of at most 4 * num_sms chunks.
inline int64_t reduce_workspace_elems(const Geometry& g, int num_sms) {
  return 2 * 4 * static_cast<int64_t>(num_sms > 0 ? num_sms : 1) * g.c;
}

// ---- forward -----------------------------------------------------------------------------------

// Per-channel batch statistics of z (mean and biased variance, from sums shifted by one sample
// of the channel so fp32 does not cancel), two-level reduction in a fixed order
// (bit-identical across runs), then on the device: invstd, scale = weight * invstd,
// shift = bias - mean * scale, and the running-statistics update of nn.BatchNorm2d in training
// (unbiased variance; `cumulative` means momentum=None, the cumulative average, whose factor
// 1 / num_batches_tracked is read on the device after the caller has incremented it).
struct BnStatsArgs {
  const void* z = nullptr;
  DType dtype = DType::kFloat32;
  Geometry geo;
  const void* weight = nullptr;  // [C] or null (affine=False)
  const void* bias = nullptr;    // [C] or null
  void* running_mean = nullptr;  // [C] or null: no update
  void* running_var = nullptr;
  const int64_t* num_batches_tracked = nullptr;  // read only when cumulative
  bool cumulative = false;                       // momentum=None
  double momentum = 0.1;                         // otherwise (any value, as nn.BatchNorm2d)
  double eps = 1e-5;
  void* workspace = nullptr;  // reduce_workspace_elems
  int num_sms = 1;
  void* mean = nullptr;  // [C] outputs
  void* invstd = nullptr;
  void* scale = nullptr;
  void* shift = nullptr;
};
cudaError_t bn_stats(const BnStatsArgs& a, cudaStream_t stream);

// y = act(z * scale + shift + residual) in one pass; also the mask (relu, leaky_relu) or the
// pre-activation u when asked. scale/shift null means 1/0 (the eval path after a folded conv).
// y may be z itself (in place).
struct ApplyForwardArgs {
  const void* z = nullptr;
  const void* residual = nullptr;  // or null
  DType dtype = DType::kFloat32;
  Geometry geo;
  const void* scale = nullptr;
  const void* shift = nullptr;
  Act act = Act::kIdentity;
  double slope = 0.01;
  void* y = nullptr;
  uint32_t* mask = nullptr;  // mask_words(numel) words, or null
  void* u = nullptr;         // or null
  int num_sms = 1;
};
cudaError_t bn_apply_forward(const ApplyForwardArgs& a, cudaStream_t stream);

// ---- backward ----------------------------------------------------------------------------------

// One pass over grad_y, the saved mask/value and z: g_u = act'(u) * grad_y (written to grad_u
// when that is not null: it is the residual's gradient), and per channel sum(g_u) and
// sum(g_u * (z - mean)), reduced like bn_stats. Then per channel the coefficients of the apply
// pass, coef = [alpha, gamma, beta] (3 x C), with g_z = alpha * g_u + gamma * (z - mean) + beta:
//   batch statistics:  alpha = w * invstd, gamma = -alpha * invstd^2 * sum_gz / M,
//                      beta = -alpha * sum_g / M          (M = N * H * W)
//   running statistics: alpha = w * invstd, gamma = beta = 0.
struct BnBackwardReduceArgs {
  const void* grad_y = nullptr;
  const void* saved = nullptr;  // uint32 mask words, or a tensor like z, or null
  Saved saved_kind = Saved::kNone;
  const void* z = nullptr;
  DType dtype = DType::kFloat32;
  Geometry geo;
  Act act = Act::kIdentity;
  double slope = 0.01;
  const void* mean = nullptr;    // [C]
  const void* invstd = nullptr;  // [C]
  const void* weight = nullptr;  // [C] or null
  bool use_batch_stats = true;
  void* grad_u = nullptr;  // or null
  void* workspace = nullptr;
  int num_sms = 1;
  void* sum_g = nullptr;  // [C] outputs
  void* sum_gz = nullptr;
  void* coef = nullptr;  // [3, C]
};
cudaError_t bn_backward_reduce(const BnBackwardReduceArgs& a, cudaStream_t stream);

// g_z = alpha * g_u + gamma * (z - mean) + beta, with g_u recomputed from grad_y and the saved
// mask/value (so g_u need not be written when the residual needs no gradient).
struct BnBackwardApplyArgs {
  const void* grad_y = nullptr;
  const void* saved = nullptr;
  Saved saved_kind = Saved::kNone;
  const void* z = nullptr;
  DType dtype = DType::kFloat32;
  Geometry geo;
  Act act = Act::kIdentity;
  double slope = 0.01;
  const void* mean = nullptr;
  const void* coef = nullptr;
  void* grad_z = nullptr;
  int num_sms = 1;
};
cudaError_t bn_backward_apply(const BnBackwardApplyArgs& a, cudaStream_t stream);

}  // namespace resfuse
