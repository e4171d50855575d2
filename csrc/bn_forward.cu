// Forward kernels: BN batch statistics + finalize (running-stat update on the device), and the
// one-pass y = act(z * scale + shift + residual) with the 1-bit mask. CUDA headers only.
#include "channel_reduce.cuh"

namespace resfuse {
namespace detail {

// Sums of x - K and (x - K)^2, K = the channel's first element: shifting by a sample of the
// channel keeps fp32 sums of squares from cancelling when |mean| >> std.
template <typename T, typename A>
struct StatsOp {
  const T* z;
  int64_t pilot_stride;  // element index of channel c's first element is c * pilot_stride
  __device__ __forceinline__ A channel_const(int64_t c) const { return to_acc(z[c * pilot_stride]); }
  template <int VEC>
  __device__ __forceinline__ void accumulate(int64_t e, const A (&k)[VEC], A (&s1)[VEC], A (&s2)[VEC]) const {
    const Vec<T, VEC> v = load_vec<T, VEC>(z, e);
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const A x = to_acc(v.v[j]) - k[j];
      s1[j] += x;
      s2[j] += x * x;
    }
  }
};

template <typename T, typename A>
__global__ void __launch_bounds__(kThreads) stats_finalize_kernel(
    const A* partial, int chunks, int64_t C, const T* z, int64_t pilot_stride, A count, A eps,
    const A* weight, const A* bias, A* running_mean, A* running_var,
    const int64_t* num_batches_tracked, bool cumulative, A momentum, A* mean_out, A* invstd_out, A* scale_out,
    A* shift_out) {
  const int64_t c = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  if (c >= C) return;  // whole warps
  A s1, s2;
  chunk_sums(partial, chunks, C, c, s1, s2);
  if ((threadIdx.x & 31) != 0) return;
  const A d = s1 / count;
  const A mean = to_acc(z[c * pilot_stride]) + d;
  A var = s2 / count - d * d;
  var = var < A(0) ? A(0) : var;  // rounding below 0 clamped; a NaN (from NaN/inf data) stays NaN
  const A invstd = A(1) / sqrt(var + eps);
  const A scale = weight != nullptr ? weight[c] * invstd : invstd;
  const A shift = (bias != nullptr ? bias[c] : A(0)) - mean * scale;
  mean_out[c] = mean;
  invstd_out[c] = invstd;
  scale_out[c] = scale;
  shift_out[c] = shift;
  if (running_mean != nullptr) {
    // cumulative: momentum=None, the average 1 / num_batches_tracked (already incremented for
    // this batch), read here so the host never waits. Any other momentum, negative included, as is.
    const A factor = cumulative ? static_cast<A>(1.0 / static_cast<double>(*num_batches_tracked)) : momentum;
    const A unbiased = var * (count / (count - A(1)));
    running_mean[c] = mean * factor + running_mean[c] * (A(1) - factor);
    running_var[c] = unbiased * factor + running_var[c] * (A(1) - factor);
  }
}

// One pass: y = act(z * scale + shift + residual); the mask bit of each element and/or the
// pre-activation u when asked. A warp covers 32 * VEC consecutive elements, so the bits of
// each 32-element mask word come from 32 / VEC neighbouring lanes, OR-ed by shuffles and
// stored by the first of them.
template <typename T, typename A, int VEC, bool kNHWC>
__global__ void __launch_bounds__(kThreads) apply_forward_kernel(
    const T* z, const T* residual, const A* scale, const A* shift, Act act, A slope, T* y,
    uint32_t* mask, T* u_out, int64_t nvec, int64_t C, int64_t HW) {
  constexpr int kGroup = 32 / VEC;
  const int lane = threadIdx.x & 31;
  const int64_t rounded = (nvec + 31) & ~int64_t(31);  // whole warps stay in the loop
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t v = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; v < rounded; v += step) {
    const bool valid = v < nvec;
    const int64_t e = v * VEC;
    uint32_t bits = 0;
    if (valid) {
      const Vec<T, VEC> zv = load_vec<T, VEC>(z, e);
      Vec<T, VEC> rv;
      if (residual != nullptr) rv = load_vec<T, VEC>(residual, e);
      const int64_t c0 = channel_of<kNHWC>(e, C, HW);
      A sc[VEC], sh[VEC];
      if (scale != nullptr) {
        load_channels<A, VEC, kNHWC>(scale, c0, sc);
        load_channels<A, VEC, kNHWC>(shift, c0, sh);
      }
      Vec<T, VEC> yv, uv;
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        A u = to_acc(zv.v[j]);
        if (scale != nullptr) u = round_as<T, A>(u * sc[j] + sh[j]);  // eager stores bn(z) in T
        if (residual != nullptr) u = round_as<T, A>(u + to_acc(rv.v[j]));
        bits |= static_cast<uint32_t>(act_bit<A>(act, u)) << j;
        uv.v[j] = from_acc<T>(u);
        yv.v[j] = from_acc<T>(act_forward<A>(act, u, slope));
      }
      store_vec<T, VEC>(y, e, yv);
      if (u_out != nullptr) store_vec<T, VEC>(u_out, e, uv);
    }
    if (mask != nullptr) {
      bits <<= (e & 31);
#pragma unroll
      for (int o = 1; o < kGroup; o <<= 1) bits |= __shfl_xor_sync(0xffffffffu, bits, o);
      if (valid && (lane & (kGroup - 1)) == 0) mask[e >> 5] = bits;
    }
  }
}

template <typename T>
cudaError_t bn_stats_t(const BnStatsArgs& a, cudaStream_t stream) {
  using A = acc_t<T>;
  const Geometry& g = a.geo;
  const T* z = static_cast<const T*>(a.z);
  A* partial = static_cast<A*>(a.workspace);
  const int64_t pilot_stride = g.channels_last ? 1 : g.hw;
  const StatsOp<T, A> op{z, pilot_stride};
  int chunks = 1;
  cudaError_t err;
  if (pick_vec<T>(g, {a.z}) > 1) err = launch_reduce<StatsOp<T, A>, A, 16 / sizeof(T)>(op, g, partial, a.num_sms, stream, &chunks);
  else err = launch_reduce<StatsOp<T, A>, A, 1>(op, g, partial, a.num_sms, stream, &chunks);
  if (err != cudaSuccess) return err;
  const unsigned blocks = static_cast<unsigned>((g.c * 32 + kThreads - 1) / kThreads);
  stats_finalize_kernel<T, A><<<blocks, kThreads, 0, stream>>>(
      partial, chunks, g.c, z, pilot_stride, static_cast<A>(g.per_channel()), static_cast<A>(a.eps),
      static_cast<const A*>(a.weight), static_cast<const A*>(a.bias), static_cast<A*>(a.running_mean),
      static_cast<A*>(a.running_var), a.num_batches_tracked, a.cumulative && a.num_batches_tracked != nullptr,
      static_cast<A>(a.momentum),
      static_cast<A*>(a.mean), static_cast<A*>(a.invstd), static_cast<A*>(a.scale), static_cast<A*>(a.shift));
  return cudaGetLastError();
}

template <typename T, int VEC>
cudaError_t apply_forward_launch(const ApplyForwardArgs& a, cudaStream_t stream) {
  using A = acc_t<T>;
  const Geometry& g = a.geo;
  const int64_t nvec = g.numel() / VEC;
  const unsigned blocks = elementwise_blocks(nvec, a.num_sms);
  auto* z = static_cast<const T*>(a.z);
  auto* r = static_cast<const T*>(a.residual);
  auto* sc = static_cast<const A*>(a.scale);
  auto* sh = static_cast<const A*>(a.shift);
  auto* y = static_cast<T*>(a.y);
  auto* u = static_cast<T*>(a.u);
  if (g.channels_last)
    apply_forward_kernel<T, A, VEC, true><<<blocks, kThreads, 0, stream>>>(
        z, r, sc, sh, a.act, static_cast<A>(a.slope), y, a.mask, u, nvec, g.c, g.hw);
  else
    apply_forward_kernel<T, A, VEC, false><<<blocks, kThreads, 0, stream>>>(
        z, r, sc, sh, a.act, static_cast<A>(a.slope), y, a.mask, u, nvec, g.c, g.hw);
  return cudaGetLastError();
}

template <typename T>
cudaError_t apply_forward_t(const ApplyForwardArgs& a, cudaStream_t stream) {
  if (pick_vec<T>(a.geo, {a.z, a.residual, a.y, a.u, a.scale, a.shift}) > 1)
    return apply_forward_launch<T, 16 / sizeof(T)>(a, stream);
  return apply_forward_launch<T, 1>(a, stream);
}

}  // namespace detail

cudaError_t bn_stats(const BnStatsArgs& a, cudaStream_t stream) {
  if (a.geo.numel() == 0 || a.geo.c == 0) return cudaErrorInvalidValue;
  RESFUSE_DISPATCH_DTYPE(a.dtype, return detail::bn_stats_t<T>(a, stream));
}

cudaError_t bn_apply_forward(const ApplyForwardArgs& a, cudaStream_t stream) {
  if (a.geo.numel() == 0) return cudaSuccess;
  if ((a.scale == nullptr) != (a.shift == nullptr)) return cudaErrorInvalidValue;
  RESFUSE_DISPATCH_DTYPE(a.dtype, return detail::apply_forward_t<T>(a, stream));
}

}  // namespace resfuse
