// Backward kernels: one pass producing g_u = act'(u) * grad_y (the residual's gradient) and
// BN-backward's two per-channel sums, a finalize turning the sums into the apply pass's
// per-channel coefficients, and the apply pass g_z = alpha * g_u + gamma * (z - mean) + beta.
// CUDA headers only.
#include "channel_reduce.cuh"

namespace resfuse {
namespace detail {

// Sums of g_u and g_u * (z - mean); writes g_u when grad_u is not null.
template <typename T, typename A>
struct BackwardOp {
  const T* grad_y;
  const void* saved;
  Saved kind;
  const T* z;
  const A* mean;
  Act act;
  A slope;
  T* grad_u;
  __device__ __forceinline__ A channel_const(int64_t c) const { return mean[c]; }
  template <int VEC>
  __device__ __forceinline__ void accumulate(int64_t e, const A (&k)[VEC], A (&s1)[VEC], A (&s2)[VEC]) const {
    A g[VEC];
    grad_u_vec<T, A, VEC>(grad_y, saved, kind, act, slope, e, g);
    const Vec<T, VEC> zv = load_vec<T, VEC>(z, e);
    Vec<T, VEC> gv;
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      s1[j] += g[j];
      s2[j] += g[j] * (to_acc(zv.v[j]) - k[j]);
      gv.v[j] = from_acc<T>(g[j]);
    }
    if (grad_u != nullptr) store_vec<T, VEC>(grad_u, e, gv);
  }
};

template <typename A>
__global__ void __launch_bounds__(kThreads) backward_finalize_kernel(
    const A* partial, int chunks, int64_t C, A count, const A* invstd, const A* weight,
    bool use_batch_stats, A* sum_g, A* sum_gz, A* coef) {
  const int64_t c = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  if (c >= C) return;  // whole warps
  A s1, s2;
  chunk_sums(partial, chunks, C, c, s1, s2);
  if ((threadIdx.x & 31) != 0) return;
  sum_g[c] = s1;
  sum_gz[c] = s2;
  const A is = invstd[c];
  const A alpha = weight != nullptr ? weight[c] * is : is;
  coef[c] = alpha;
  coef[C + c] = use_batch_stats ? -(alpha * is * is * s2 / count) : A(0);
  coef[2 * C + c] = use_batch_stats ? -(alpha * s1 / count) : A(0);
}

template <typename T, typename A, int VEC, bool kNHWC>
__global__ void __launch_bounds__(kThreads) apply_backward_kernel(
    const T* grad_y, const void* saved, Saved kind, const T* z, const A* mean, const A* coef, Act act,
    A slope, T* grad_z, int64_t nvec, int64_t C, int64_t HW) {
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t v = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; v < nvec; v += step) {
    const int64_t e = v * VEC;
    A g[VEC];
    grad_u_vec<T, A, VEC>(grad_y, saved, kind, act, slope, e, g);
    const Vec<T, VEC> zv = load_vec<T, VEC>(z, e);
    const int64_t c0 = channel_of<kNHWC>(e, C, HW);
    A alpha[VEC], gamma[VEC], beta[VEC], mu[VEC];
    load_channels<A, VEC, kNHWC>(coef, c0, alpha);
    load_channels<A, VEC, kNHWC>(coef + C, c0, gamma);
    load_channels<A, VEC, kNHWC>(coef + 2 * C, c0, beta);
    load_channels<A, VEC, kNHWC>(mean, c0, mu);
    Vec<T, VEC> out;
#pragma unroll
    for (int j = 0; j < VEC; ++j)
      // gamma is 0 with running statistics: skip the term, so an inf in z gives g_u * alpha
      // as eager does, not 0 * inf = NaN.
      out.v[j] = from_acc<T>(alpha[j] * g[j] + (gamma[j] != A(0) ? gamma[j] * (to_acc(zv.v[j]) - mu[j]) : A(0)) + beta[j]);
    store_vec<T, VEC>(grad_z, e, out);
  }
}

template <typename T, int VEC>
cudaError_t backward_reduce_launch(const BnBackwardReduceArgs& a, cudaStream_t stream) {
  using A = acc_t<T>;
  const Geometry& g = a.geo;
  const BackwardOp<T, A> op{static_cast<const T*>(a.grad_y), a.saved, a.saved_kind, static_cast<const T*>(a.z),
                            static_cast<const A*>(a.mean), a.act, static_cast<A>(a.slope),
                            static_cast<T*>(a.grad_u)};
  A* partial = static_cast<A*>(a.workspace);
  int chunks = 1;
  cudaError_t err = launch_reduce<BackwardOp<T, A>, A, VEC>(op, g, partial, a.num_sms, stream, &chunks);
  if (err != cudaSuccess) return err;
  const unsigned blocks = static_cast<unsigned>((g.c * 32 + kThreads - 1) / kThreads);
  backward_finalize_kernel<A><<<blocks, kThreads, 0, stream>>>(
      partial, chunks, g.c, static_cast<A>(g.per_channel()), static_cast<const A*>(a.invstd),
      static_cast<const A*>(a.weight), a.use_batch_stats, static_cast<A*>(a.sum_g), static_cast<A*>(a.sum_gz),
      static_cast<A*>(a.coef));
  return cudaGetLastError();
}

template <typename T, int VEC>
cudaError_t backward_apply_launch(const BnBackwardApplyArgs& a, cudaStream_t stream) {
  using A = acc_t<T>;
  const Geometry& g = a.geo;
  const int64_t nvec = g.numel() / VEC;
  const unsigned blocks = elementwise_blocks(nvec, a.num_sms);
  auto* gy = static_cast<const T*>(a.grad_y);
  auto* z = static_cast<const T*>(a.z);
  auto* mean = static_cast<const A*>(a.mean);
  auto* coef = static_cast<const A*>(a.coef);
  auto* gz = static_cast<T*>(a.grad_z);
  if (g.channels_last)
    apply_backward_kernel<T, A, VEC, true><<<blocks, kThreads, 0, stream>>>(
        gy, a.saved, a.saved_kind, z, mean, coef, a.act, static_cast<A>(a.slope), gz, nvec, g.c, g.hw);
  else
    apply_backward_kernel<T, A, VEC, false><<<blocks, kThreads, 0, stream>>>(
        gy, a.saved, a.saved_kind, z, mean, coef, a.act, static_cast<A>(a.slope), gz, nvec, g.c, g.hw);
  return cudaGetLastError();
}

// A saved value tensor is read like z; the mask is read by words and needs no alignment.
inline const void* value_ptr(const void* saved, Saved kind) {
  return (kind == Saved::kOutput || kind == Saved::kInput) ? saved : nullptr;
}

template <typename T>
cudaError_t backward_reduce_t(const BnBackwardReduceArgs& a, cudaStream_t stream) {
  if (pick_vec<T>(a.geo, {a.grad_y, a.z, a.grad_u, value_ptr(a.saved, a.saved_kind)}) > 1)
    return backward_reduce_launch<T, 16 / sizeof(T)>(a, stream);
  return backward_reduce_launch<T, 1>(a, stream);
}

template <typename T>
cudaError_t backward_apply_t(const BnBackwardApplyArgs& a, cudaStream_t stream) {
  using A = acc_t<T>;
  const A* coef = static_cast<const A*>(a.coef);
  if (pick_vec<T>(a.geo, {a.grad_y, a.z, a.grad_z, value_ptr(a.saved, a.saved_kind), a.mean, coef,
                          coef + a.geo.c, coef + 2 * a.geo.c}) > 1)
    return backward_apply_launch<T, 16 / sizeof(T)>(a, stream);
  return backward_apply_launch<T, 1>(a, stream);
}

}  // namespace detail

cudaError_t bn_backward_reduce(const BnBackwardReduceArgs& a, cudaStream_t stream) {
  if (a.geo.numel() == 0 || a.geo.c == 0) return cudaErrorInvalidValue;
  if (a.saved_kind != Saved::kNone && a.saved == nullptr) return cudaErrorInvalidValue;
  RESFUSE_DISPATCH_DTYPE(a.dtype, return detail::backward_reduce_t<T>(a, stream));
}

cudaError_t bn_backward_apply(const BnBackwardApplyArgs& a, cudaStream_t stream) {
  if (a.geo.numel() == 0) return cudaSuccess;
  if (a.saved_kind != Saved::kNone && a.saved == nullptr) return cudaErrorInvalidValue;
  RESFUSE_DISPATCH_DTYPE(a.dtype, return detail::backward_apply_t<T>(a, stream));
}

}  // namespace resfuse
