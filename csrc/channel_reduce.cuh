// The per-channel two-level reduction both BN statistics (forward) and BN-backward's two sums
// use: level 1 (here) writes, for each of `chunks` slices of the batch, two partial sums per
// channel; level 2 (each .cu file's finalize kernel) adds the chunks of a channel in a fixed
// order. Every thread's share of the work depends only on the shape and the SM count, and every
// tree is fixed, so two runs give the same bits (no atomics).
//
// An Op supplies a per-channel constant (`channel_const(c)`) and adds VEC elements at a flat
// index to two running sums (`accumulate`).
#pragma once

#include "kernel_common.cuh"

namespace resfuse {
namespace detail {

inline int pow2_at_least(int64_t v, int cap) {
  int p = 1;
  while (p < v && p < cap) p <<= 1;
  return p;
}

struct ReducePlan {
  dim3 grid, block;
  int chunks = 1;
  size_t smem = 0;
};

// NHWC: rows of C channels. A block is (tx, ty): tx threads across the channels (VEC each),
// ty rows; blockIdx.y picks a chunk of rows (interleaved by gridDim.y * ty).
template <typename A, int VEC>
inline ReducePlan plan_nhwc(const Geometry& g, int num_sms) {
  ReducePlan p;
  const int64_t cv = g.c / VEC;
  const int tx = pow2_at_least(cv, 32);
  const int ty = kThreads / tx;
  const int64_t gx = (cv + tx - 1) / tx;
  const int64_t rows = g.n * g.hw;
  int64_t chunks = (4LL * num_sms + gx - 1) / gx;
  const int64_t max_useful = (rows + ty - 1) / ty;
  if (chunks > max_useful) chunks = max_useful;
  if (chunks < 1) chunks = 1;
  p.grid = dim3(static_cast<unsigned>(gx), static_cast<unsigned>(chunks));
  p.block = dim3(tx, ty);
  p.chunks = static_cast<int>(chunks);
  p.smem = sizeof(A) * 2 * VEC * kThreads;
  return p;
}

// NCHW: one channel per blockIdx.x; blockIdx.y picks a chunk of the (n, hw) vectors.
inline ReducePlan plan_nchw(const Geometry& g, int vec, int num_sms) {
  ReducePlan p;
  const int64_t work = g.n * (g.hw / vec);
  int64_t chunks = (4LL * num_sms + g.c - 1) / g.c;
  const int64_t max_useful = (work + kThreads - 1) / kThreads;
  if (chunks > max_useful) chunks = max_useful;
  if (chunks < 1) chunks = 1;
  p.grid = dim3(static_cast<unsigned>(g.c), static_cast<unsigned>(chunks));
  p.block = dim3(kThreads);
  p.chunks = static_cast<int>(chunks);
  return p;
}

template <typename Op, typename A, int VEC>
__global__ void __launch_bounds__(kThreads) reduce_nhwc_kernel(Op op, int64_t rows, int64_t C, A* partial) {
  const int tx = blockDim.x, ty = blockDim.y;
  const int64_t c0 = (static_cast<int64_t>(blockIdx.x) * tx + threadIdx.x) * VEC;
  A s1[VEC], s2[VEC];
#pragma unroll
  for (int j = 0; j < VEC; ++j) s1[j] = s2[j] = A(0);
  if (c0 < C) {
    A k[VEC];
#pragma unroll
    for (int j = 0; j < VEC; ++j) k[j] = op.channel_const(c0 + j);
    const int64_t step = static_cast<int64_t>(gridDim.y) * ty;
    for (int64_t r = static_cast<int64_t>(blockIdx.y) * ty + threadIdx.y; r < rows; r += step)
      op.template accumulate<VEC>(r * C + c0, k, s1, s2);
  }
  extern __shared__ __align__(16) unsigned char smem_raw[];
  A* mine = reinterpret_cast<A*>(smem_raw) + (threadIdx.y * tx + threadIdx.x) * 2 * VEC;
#pragma unroll
  for (int j = 0; j < VEC; ++j) { mine[j] = s1[j]; mine[VEC + j] = s2[j]; }
  __syncthreads();
  for (int s = ty / 2; s > 0; s >>= 1) {  // fixed tree over the rows of the block
    if (threadIdx.y < s) {
      const A* other = mine + static_cast<int64_t>(s) * tx * 2 * VEC;
#pragma unroll
      for (int j = 0; j < 2 * VEC; ++j) mine[j] += other[j];
    }
    __syncthreads();
  }
  if (threadIdx.y == 0 && c0 < C) {
    const int64_t base = static_cast<int64_t>(blockIdx.y) * C + c0;
    const int64_t second = static_cast<int64_t>(gridDim.y) * C;
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      partial[base + j] = mine[j];
      partial[second + base + j] = mine[VEC + j];
    }
  }
}

template <typename A>
__device__ __forceinline__ A warp_sum(A v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

template <typename Op, typename A, int VEC>
__global__ void __launch_bounds__(kThreads) reduce_nchw_kernel(Op op, int64_t n, int64_t C, int64_t HW, A* partial) {
  const int64_t c = blockIdx.x;
  const int64_t hwv = HW / VEC;
  const int64_t work = n * hwv;
  A k[VEC], s1[VEC], s2[VEC];
  const A kc = op.channel_const(c);
#pragma unroll
  for (int j = 0; j < VEC; ++j) { k[j] = kc; s1[j] = s2[j] = A(0); }
  const int64_t step = static_cast<int64_t>(gridDim.y) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x; i < work; i += step) {
    const int64_t ni = div_(i, hwv);
    const int64_t v = i - ni * hwv;
    op.template accumulate<VEC>((ni * C + c) * HW + v * VEC, k, s1, s2);
  }
  A a = A(0), b = A(0);
#pragma unroll
  for (int j = 0; j < VEC; ++j) { a += s1[j]; b += s2[j]; }
  a = warp_sum(a);
  b = warp_sum(b);
  __shared__ A wa[kThreads / 32], wb[kThreads / 32];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  if (lane == 0) { wa[warp] = a; wb[warp] = b; }
  __syncthreads();
  if (threadIdx.x == 0) {
    A ta = A(0), tb = A(0);
    for (int w = 0; w < kThreads / 32; ++w) { ta += wa[w]; tb += wb[w]; }
    const int64_t idx = static_cast<int64_t>(blockIdx.y) * C + c;
    partial[idx] = ta;
    partial[static_cast<int64_t>(gridDim.y) * C + idx] = tb;
  }
}

// Level 1 for tensor geometry `g`; returns the number of chunks written (partial holds
// [2][chunks][C]).
template <typename Op, typename A, int VEC>
inline cudaError_t launch_reduce(const Op& op, const Geometry& g, A* partial, int num_sms,
                                 cudaStream_t stream, int* chunks) {
  if (g.channels_last) {
    const ReducePlan p = plan_nhwc<A, VEC>(g, num_sms);
    reduce_nhwc_kernel<Op, A, VEC><<<p.grid, p.block, p.smem, stream>>>(op, g.n * g.hw, g.c, partial);
    *chunks = p.chunks;
  } else {
    const ReducePlan p = plan_nchw(g, VEC, num_sms);
    reduce_nchw_kernel<Op, A, VEC><<<p.grid, p.block, 0, stream>>>(op, g.n, g.c, g.hw, partial);
    *chunks = p.chunks;
  }
  return cudaGetLastError();
}

// The widest vector (16 bytes) this call can use: every pointer 16-byte aligned and the
// contiguous run of one channel group (C for NHWC, H*W for NCHW) a multiple of it.
template <typename T>
inline int pick_vec(const Geometry& g, std::initializer_list<const void*> ptrs) {
  constexpr int kVec = 16 / sizeof(T);
  const int64_t run = g.channels_last ? g.c : g.hw;
  if (run % kVec != 0) return 1;
  for (const void* p : ptrs)
    if (p != nullptr && !aligned16(p)) return 1;
  return kVec;
}

// Level 2 helper: sum of chunk partials of channel c, in a fixed order, by one warp
// (lane l takes chunks l, l+32, ...; then a fixed butterfly). Every lane gets the same value.
template <typename A>
__device__ __forceinline__ void chunk_sums(const A* partial, int chunks, int64_t C, int64_t c, A& s1, A& s2) {
  const int lane = threadIdx.x & 31;
  s1 = A(0);
  s2 = A(0);
  for (int k = lane; k < chunks; k += 32) {
    s1 += partial[static_cast<int64_t>(k) * C + c];
    s2 += partial[(static_cast<int64_t>(chunks) + k) * C + c];
  }
  s1 = warp_sum(s1);
  s2 = warp_sum(s2);
}

}  // namespace detail
}  // namespace resfuse
