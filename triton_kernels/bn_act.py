"""BatchNorm's per-channel passes around a convolution (work in progress: not yet wired into a
backend): batch statistics, scale-shift + residual + activation writing y and what backward
needs (a 1-bit mask for relu, leaky_relu, relu6 and hardsigmoid, else the pre-activation), BN-backward's reduction
(the residual's gradient and the two per-channel sums) and BN-backward's apply.

Every kernel reads a tensor that is contiguous in NCHW or in channels_last as [outer, C, inner]:
element (o, c, i) at ((o * C) + c) * INNER + i, so NCHW is (N, C, H*W) and channels_last
(N*H*W, C, 1). Per-channel reductions are two-level and in a fixed order: each program reduces
a chunk of rows to partials, and `_merge` adds the chunks' partials in order, so two runs give
identical bits. Statistics accumulate in fp32 (fp64 for fp64 inputs), shifted by the channel's
first element (sums of x - K and (x - K)^2, K close to the mean: no cancellation).

The mask: bit j of int32 word w is element 32 * w + j of the tensor in memory order; the bit is
the test torch's own backward makes (relu: not u <= 0; leaky_relu: u > 0; relu6: not
(u <= 0 or u >= 6); hardsigmoid: -3 < u < 3).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from .conv import _act, _on_device, _tanh_softplus

# What the forward keeps for backward; SAVE_RECOMPUTE: nothing, u = z * scale + shift is
# recomputed from z with the [2, C] (scale; shift) passed as `saved` (the pre-activation op,
# whose forward applied BN + activation in its conv's prologue).
SAVE_NONE, SAVE_MASK, SAVE_INPUT, SAVE_OUTPUT, SAVE_RECOMPUTE = range(5)
_ROWS = 64  # rows (outer x inner positions) per program and step
_CHANNELS = 32


def _layout(z: torch.Tensor) -> Tuple[int, int, int]:
    """(outer, C, inner) of a 4-D tensor contiguous in NCHW or channels_last."""
    N, C, H, W = z.shape
    if z.is_contiguous():
        return N, C, H * W
    if z.is_contiguous(memory_format=torch.channels_last):
        return N * H * W, C, 1
    raise ValueError("bn_act kernels take NCHW- or channels_last-contiguous tensors")


def _in_layout_of(t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """t (z's shape) with z's strides: the kernels index both with z's layout."""
    if t.stride() == z.stride():
        return t
    fmt = torch.channels_last if _layout(z)[2] == 1 else torch.contiguous_format
    return t.contiguous(memory_format=fmt)


@triton.jit
def _offsets(rows, c, C, INNER):
    o = rows // INNER
    i = rows % INNER
    return ((o.to(tl.int64) * C)[:, None] + c[None, :]) * INNER + i.to(tl.int64)[:, None]


@triton.jit
def _apply_kernel(z_ptr, scale_ptr, shift_ptr, r_ptr, y_ptr, saved_ptr, TOTAL, N_WORDS, C, INNER,
                  SLOPE: tl.constexpr, HAS_AFFINE: tl.constexpr, HAS_RES: tl.constexpr, ACT: tl.constexpr,
                  SAVE: tl.constexpr, BLOCK: tl.constexpr):
    """y = act(round(round(z * scale + shift) + r)), rounding to z's dtype where the eager
    chain's BN output and residual sum are stored; saves the mask (u > 0) or u."""
    pid = tl.program_id(0)
    idx = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = idx < TOTAL
    c = ((idx // INNER) % C).to(tl.int32)
    dt = y_ptr.dtype.element_ty
    z = tl.load(z_ptr + idx, mask=ok, other=0.0)
    if HAS_AFFINE:
        sc = tl.load(scale_ptr + c, mask=ok, other=0.0)
        sh = tl.load(shift_ptr + c, mask=ok, other=0.0)
        u = (z.to(sc.dtype) * sc + sh).to(dt)
    else:
        u = z
    if HAS_RES:
        u = (u.to(tl.float32 if dt != tl.float64 else tl.float64)
             + tl.load(r_ptr + idx, mask=ok, other=0.0)).to(dt)
    uf = u.to(tl.float32 if dt != tl.float64 else tl.float64)
    y = _act(uf, ACT, SLOPE).to(dt)
    tl.store(y_ptr + idx, y, mask=ok)
    if SAVE == 1:
        bit = _mask_bit(uf, ACT)
        bits = tl.reshape(bit.to(tl.int32), (BLOCK // 32, 32))
        words = tl.sum(bits << tl.arange(0, 32)[None, :], 1)
        w_idx = pid.to(tl.int64) * (BLOCK // 32) + tl.arange(0, BLOCK // 32)
        tl.store(saved_ptr + w_idx, words, mask=w_idx < N_WORDS)
    elif SAVE == 2:
        tl.store(saved_ptr + idx, u, mask=ok)


@triton.jit
def _mask_bit(u, ACT: tl.constexpr):
    """The bit torch's backward tests: relu passes the gradient unless u <= 0 (NaN passes),
    leaky_relu where u > 0 (NaN takes the slope), relu6 unless u <= 0 or u >= 6 (NaN passes,
    as hardtanh_backward's scalar loop and CUDA kernel), hardsigmoid where -3 < u < 3."""
    if ACT == 1:
        bit = (u <= 0) == 0
    elif ACT == 6:
        bit = ((u <= 0) | (u >= 6.0)) == 0
    elif ACT == 8:
        bit = (u > -3.0) & (u < 3.0)
    else:
        bit = u > 0
    return bit


@triton.jit
def _recompute_coef(saved_ptr, c, c_ok, C, SAVE: tl.constexpr):
    """(scale, shift) of channels c for SAVE_RECOMPUTE (else zeros, unused): loaded as
    vectors of c's shape, for the caller to broadcast (a per-element gather of per-channel
    values would be staged in shared memory by the software pipeliner)."""
    if SAVE == 4:
        sc = tl.load(saved_ptr + c, mask=c_ok, other=0.0)
        sh = tl.load(saved_ptr + C + c, mask=c_ok, other=0.0)
    else:
        sc = tl.zeros(c.shape, dtype=tl.float32)
        sh = sc
    return sc, sh


@triton.jit
def _grad_u(g_ptr, saved_ptr, z_ptr, idx, ok, sc, sh, ACT: tl.constexpr, SAVE: tl.constexpr,
            SLOPE: tl.constexpr, acc_t):
    """act'(u) * grad_y for elements idx, from the mask, u or y, or u = z * sc + sh recomputed
    from z (SAVE_RECOMPUTE; sc, sh from `_recompute_coef`, broadcast to idx's shape)."""
    g = tl.load(g_ptr + idx, mask=ok, other=0.0).to(acc_t)
    if SAVE == 1:
        word = tl.load(saved_ptr + idx // 32, mask=ok, other=0)
        pos = ((word >> (idx % 32).to(tl.int32)) & 1) != 0
        if (ACT == 1) | (ACT == 6):
            g = tl.where(pos, g, 0.0)
        elif ACT == 8:
            g = tl.where(pos, g * 0.1666666716337204, 0.0)  # torch's fp32 one_sixth, see below
        else:
            g = tl.where(pos, g, g * SLOPE)
    elif SAVE >= 2:
        if SAVE == 4:
            z = tl.load(z_ptr + idx, mask=ok, other=0.0)
            # BN's output as the forward's prologue rounded it.
            u = (z.to(sc.dtype) * sc + sh).to(z_ptr.dtype.element_ty).to(acc_t)
        else:
            u = tl.load(saved_ptr + idx, mask=ok, other=0.0).to(acc_t)
        if ACT == 1:
            g = tl.where(u <= 0, 0.0, g)
        elif ACT == 2:
            g = tl.where(u > 0, g, g * SLOPE)
        elif ACT == 3:
            sig = 1.0 / (1.0 + tl.exp(-u))
            g = g * sig * (1.0 + u * (1.0 - sig))
        elif ACT == 4:
            cdf = 0.5 * (1.0 + tl.erf(u * 0.7071067811865476))
            pdf = 0.3989422804014327 * tl.exp(-0.5 * u * u)
            g = g * (cdf + u * pdf)
        elif ACT == 5:
            # (Constants inline: a Python float bound to a name becomes an fp32 scalar.)
            inner = 0.7978845608028654 * (u + 0.044715 * u * u * u)
            t = 2.0 / (1.0 + tl.exp(-2.0 * inner)) - 1.0
            g = g * (0.5 * (1.0 + t) + 0.5 * u * (1.0 - t * t) * 0.7978845608028654
                     * (1.0 + 0.134145 * u * u))
        elif ACT == 6:  # hardtanh_backward(0, 6), from u or y alike
            g = tl.where((u <= 0) | (u >= 6.0), 0.0, g)
        elif ACT == 7:  # hardswish_backward (NaN passes, as its scalar loop and CUDA kernel)
            g = tl.where(u <= -3.0, 0.0, tl.where(u < 3.0, g * (u / 3.0 + 0.5), g))
        elif ACT == 8:  # hardsigmoid_backward: grad * one_sixth, a float constant in torch
            g = tl.where((u > -3.0) & (u < 3.0), g * 0.1666666716337204, 0.0)
        elif ACT == 9:  # mish_backward
            sig = 1.0 / (1.0 + tl.exp(-u))
            t = _tanh_softplus(u)
            g = g * (t + u * sig * (1.0 - t * t))
    return g


@triton.jit
def _channel_sums_kernel(z_ptr, ref_ptr, g_ptr, saved_ptr, gu_ptr, s1_ptr, s2_ptr,
                         R, C, INNER, ROWS_PER_PROG, SLOPE: tl.constexpr, STATS: tl.constexpr,
                         ACT: tl.constexpr, SAVE: tl.constexpr, WRITE_GU: tl.constexpr,
                         ACC_FP64: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """Per chunk of rows and per channel, the two sums of a BN pass over z:
    STATS: sum(z - ref) and sum((z - ref)^2), ref close to the mean (the statistics);
    else: sum(g_u) and sum(g_u * (z - ref)), ref the mean, g_u = act'(u) * grad_y recomputed
    from the mask or u, and written if WRITE_GU (BN-backward's reduction)."""
    chunk = tl.program_id(0)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    acc_t = tl.float64 if ACC_FP64 else tl.float32
    ref = tl.load(ref_ptr + c, mask=c_ok, other=0.0).to(acc_t)
    rsc, rsh = _recompute_coef(saved_ptr, c, c_ok, C, SAVE)
    s1 = tl.zeros((BLOCK_C,), dtype=acc_t)
    s2 = tl.zeros((BLOCK_C,), dtype=acc_t)
    start = chunk * ROWS_PER_PROG
    for r0 in range(start, start + ROWS_PER_PROG, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        ok = (rows < R)[:, None] & c_ok[None, :]
        idx = _offsets(rows, c, C, INNER)
        d = tl.where(ok, tl.load(z_ptr + idx, mask=ok, other=0.0).to(acc_t) - ref[None, :], 0.0)
        if STATS:
            a = d
        else:
            a = tl.where(ok, _grad_u(g_ptr, saved_ptr, z_ptr, idx, ok, rsc[None, :],
                                     rsh[None, :], ACT, SAVE, SLOPE, acc_t), 0.0)
            if WRITE_GU:
                tl.store(gu_ptr + idx, a.to(gu_ptr.dtype.element_ty), mask=ok)
        s1 += tl.sum(a, 0)
        s2 += tl.sum(a * d, 0)
    tl.store(s1_ptr + chunk * C + c, s1, mask=c_ok)
    tl.store(s2_ptr + chunk * C + c, s2, mask=c_ok)


@triton.jit
def _bwd_apply_kernel(g_ptr, saved_ptr, z_ptr, mean_ptr, coef_ptr, gz_ptr, TOTAL, C, INNER,
                      SLOPE: tl.constexpr, ACT: tl.constexpr, SAVE: tl.constexpr, SCALE_ONLY: tl.constexpr,
                      ACC_FP64: tl.constexpr, BLOCK: tl.constexpr):
    """g_z = A[c] * g_u + B[c] + D[c] * (z - mean[c]), g_u recomputed from the mask or u;
    SCALE_ONLY: g_z = A[c] * g_u (eval-mode BN, or g_u itself), z not read (a NaN in z then
    stays out of g_z, as in torch)."""
    pid = tl.program_id(0)
    idx = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = idx < TOTAL
    c = ((idx // INNER) % C).to(tl.int32)
    acc_t = tl.float64 if ACC_FP64 else tl.float32
    rsc, rsh = _recompute_coef(saved_ptr, c, ok, C, SAVE)
    gu = _grad_u(g_ptr, saved_ptr, z_ptr, idx, ok, rsc, rsh, ACT, SAVE, SLOPE, acc_t)
    a = tl.load(coef_ptr + c, mask=ok, other=0.0).to(acc_t)
    if SCALE_ONLY:
        gz = a * gu
    else:
        b = tl.load(coef_ptr + C + c, mask=ok, other=0.0).to(acc_t)
        d = tl.load(coef_ptr + 2 * C + c, mask=ok, other=0.0).to(acc_t)
        mean = tl.load(mean_ptr + c, mask=ok, other=0.0).to(acc_t)
        z = tl.load(z_ptr + idx, mask=ok, other=0.0).to(acc_t)
        gz = a * gu + b + d * (z - mean)
    tl.store(gz_ptr + idx, gz.to(gz_ptr.dtype.element_ty), mask=ok)


# ---------------------------------------------------------------------------------- launchers
def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _chunks(R: int) -> Tuple[int, int]:
    """(number of row chunks, rows per chunk): a fixed function of the shape (determinism)."""
    per = max(_ROWS, triton.cdiv(triton.cdiv(R, 256), _ROWS) * _ROWS)
    return triton.cdiv(R, per), per


def batch_stats(z: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and biased variance of z (accumulation dtype)."""
    outer, C, inner = _layout(z)
    R = outer * inner
    acc = _acc(z.dtype)
    # K: the channel's first element (z[0, c, 0, 0]); any value close to the mean will do.
    k = z[0, :, 0, 0].to(acc).contiguous()
    n_chunks, per = _chunks(R)
    s1 = torch.empty((n_chunks, C), device=z.device, dtype=acc)
    s2 = torch.empty_like(s1)
    with _on_device(z):
        _channel_sums_kernel[(n_chunks, triton.cdiv(C, _CHANNELS))](
            z, k, z, z, z, s1, s2, R, C, inner, per, SLOPE=0.0, STATS=True, ACT=0, SAVE=SAVE_NONE,
            WRITE_GU=False, ACC_FP64=acc == torch.float64, BLOCK_R=_ROWS, BLOCK_C=_CHANNELS)
    m1 = s1.sum(0) / R
    return k + m1, (s2.sum(0) / R - m1 * m1).clamp_min(0)


def apply(z: torch.Tensor, scale: Optional[torch.Tensor], shift: Optional[torch.Tensor],
          residual: Optional[torch.Tensor], act: int, slope: float, save: int
          ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(y, saved): saved is the packed mask (int32, SAVE_MASK), u (SAVE_INPUT) or None."""
    outer, C, inner = _layout(z)
    total = z.numel()
    y = torch.empty_like(z)
    if residual is not None:
        residual = _in_layout_of(residual, z)
    if save == SAVE_MASK:
        saved = torch.empty((total + 31) // 32, device=z.device, dtype=torch.int32)
    elif save == SAVE_INPUT:
        saved = torch.empty_like(z)
    else:
        saved = None
    BLOCK = 1024
    with _on_device(z):
        _apply_kernel[(triton.cdiv(total, BLOCK),)](
            z, scale if scale is not None else z, shift if shift is not None else z,
            residual if residual is not None else z, y, saved if saved is not None else y,
            total, (total + 31) // 32, C, inner, SLOPE=float(slope),
            HAS_AFFINE=scale is not None, HAS_RES=residual is not None, ACT=act, SAVE=save,
            BLOCK=BLOCK)
    return y, saved


def backward_reduce(grad_y: torch.Tensor, saved: Optional[torch.Tensor], save: int,
                    z: torch.Tensor, mean: torch.Tensor, act: int, slope: float, write_gu: bool
                    ) -> Tuple[Optional[torch.Tensor], torch.Tensor, torch.Tensor]:
    """(g_u or None, sum(g_u), sum(g_u * (z - mean))) per channel."""
    outer, C, inner = _layout(z)
    grad_y = _in_layout_of(grad_y, z)
    R = outer * inner
    acc = _acc(z.dtype)
    n_chunks, per = _chunks(R)
    s1 = torch.empty((n_chunks, C), device=z.device, dtype=acc)
    s2 = torch.empty_like(s1)
    gu = torch.empty_like(z) if write_gu else None
    with _on_device(z):
        _channel_sums_kernel[(n_chunks, triton.cdiv(C, _CHANNELS))](
            z, mean, grad_y, saved if saved is not None else z, gu if gu is not None else z,
            s1, s2, R, C, inner, per, SLOPE=float(slope), STATS=False, ACT=act,
            SAVE=save if saved is not None else SAVE_NONE, WRITE_GU=write_gu,
            ACC_FP64=acc == torch.float64, BLOCK_R=_ROWS, BLOCK_C=_CHANNELS)
    return gu, s1.sum(0), s2.sum(0)


def backward_apply(grad_y: torch.Tensor, saved: Optional[torch.Tensor], save: int,
                   z: torch.Tensor, mean: torch.Tensor, coef: torch.Tensor, act: int,
                   slope: float) -> torch.Tensor:
    """g_z = coef[0] * g_u + coef[1] + coef[2] * (z - mean) per channel; `coef` of one row
    ([1, C]): g_z = coef[0] * g_u."""
    outer, C, inner = _layout(z)
    grad_y = _in_layout_of(grad_y, z)
    gz = torch.empty_like(z)
    BLOCK = 1024
    with _on_device(z):
        _bwd_apply_kernel[(triton.cdiv(z.numel(), BLOCK),)](
            grad_y, saved if saved is not None else z, z, mean, coef.contiguous(), gz,
            z.numel(), C, inner, SLOPE=float(slope), ACT=act,
            SAVE=save if saved is not None else SAVE_NONE, SCALE_ONLY=coef.shape[0] == 1,
            ACC_FP64=z.dtype == torch.float64, BLOCK=BLOCK)
    return gz
