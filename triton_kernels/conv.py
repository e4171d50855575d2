"""Implicit-GEMM 2-D convolution with a fused prologue and epilogue (the forward; the backward
is conv_backward.py).

    y[n, oh, ow, co] = epilogue( sum_{r, s, ci} prologue(x[n, ih, iw, ci]) * w[co, ci, r, s] )
    ih = oh * stride_h - pad_h + r * dil_h,   iw likewise

as a GEMM of M = N * Ho * Wo rows (output pixels) by Cout / groups columns, K = Cin / groups *
KH * KW, one program per (BLOCK_M x BLOCK_N) output tile and group. Tensors are addressed
through their strides, so channels_last (the fast case: the K loop reads contiguous channels)
and NCHW both run without a copy.

- prologue (optional): a = act(x * scale[ci] + shift[ci]), rounded to x's dtype as the eager
  chain rounds its BN + activation output, and 0 at padded positions (the conv pads the
  activation, not x): the previous BN + ReLU applied while loading, never written.
- epilogue: + bias; then either the per-channel statistics of the result for training-mode BN
  (per output tile: count, mean and the sum of squared deviations from the tile's mean, of the
  result rounded to y's dtype; merged across tiles in a fixed order by `merge_stats`, so two
  runs give identical bits), or (eval, BN folded into weight and bias) + residual and the
  activation.

Accumulation is fp32 (fp64 for fp64 inputs); fp32 inputs use TF32 exactly when torch's
convolutions would (`torch.backends.cudnn.allow_tf32`).
"""
from __future__ import annotations

import contextlib
import os
from typing import NamedTuple, Optional, Tuple

import torch
import triton
import triton.language as tl

from .tiles import pick_tiles

# Activation codes: the order of resfuse.activations.KINDS.
(ACT_IDENTITY, ACT_RELU, ACT_LEAKY_RELU, ACT_SILU, ACT_GELU, ACT_GELU_TANH, ACT_RELU6,
 ACT_HARDSWISH, ACT_HARDSIGMOID, ACT_MISH) = range(10)


# torch's hardswish and hardsigmoid divide by 6 on the CPU but multiply by the fp32 constant
# 1/6 on CUDA (in fp64 too: ~3e-8 relative apart there). The kernels follow the torch of the
# tensors they run on: CPU tensors in the interpreter, CUDA tensors when compiled.
_SIXTH_AS_CUDA = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") in ("", "0"))


@triton.jit
def _tanh_softplus(u):
    """tanh(log1p(exp(u))) (mish's factor) as n / (n + 2), n = e^u (e^u + 2): no tanh or log1p
    needed, no cancellation for negative u; 1 above u = 20, where it rounds to 1 in fp32 and
    fp64 alike (and e^2u would overflow fp32 past 44)."""
    e = tl.exp(tl.where(u > 20.0, 0.0, u))
    n = e * (e + 2.0)
    return tl.where(u > 20.0, 1.0, n / (n + 2.0))


@triton.jit
def _act(u, ACT: tl.constexpr, SLOPE: tl.constexpr):
    """act(u) in u's (fp32 or fp64) precision. SLOPE (leaky_relu) is a constexpr: a float
    kernel argument would be fp32 on a GPU, and fp64 math needs it exact."""
    # (NaN stays NaN, as in torch: the comparisons are written so that NaN takes u.)
    if ACT == 1:
        u = tl.where(u < 0, 0.0, u)
    elif ACT == 2:
        u = tl.where(u < 0, u * SLOPE, u)
    elif ACT == 3:
        u = u / (1.0 + tl.exp(-u))
    elif ACT == 4:
        u = 0.5 * u * (1.0 + tl.erf(u * 0.7071067811865476))
    elif ACT == 5:
        inner = 0.7978845608028654 * (u + 0.044715 * u * u * u)
        t = 2.0 / (1.0 + tl.exp(-2.0 * inner)) - 1.0  # tanh
        u = 0.5 * u * (1.0 + t)
    elif ACT == 6:  # relu6 = clamp(u, 0, 6)
        u = tl.where(u < 0, 0.0, u)
        u = tl.where(u > 6.0, 6.0, u)
    elif ACT == 7:  # hardswish: u * clamp(u + 3, 0, 6) / 6 in torch's order of operations
        t = u + 3.0
        t = tl.where(t < 0, 0.0, t)
        t = tl.where(t > 6.0, 6.0, t)
        if _SIXTH_AS_CUDA:
            u = u * t * 0.1666666716337204
        else:
            u = (u * t) / 6.0
    elif ACT == 8:  # hardsigmoid: clamp(u + 3, 0, 6) / 6
        t = u + 3.0
        t = tl.where(t < 0, 0.0, t)
        t = tl.where(t > 6.0, 6.0, t)
        if _SIXTH_AS_CUDA:
            u = t * 0.1666666716337204
        else:
            u = t / 6.0
    elif ACT == 9:  # mish: u * tanh(softplus(u))
        u = u * _tanh_softplus(u)
    return u


@triton.jit
def _dot(a, b, acc, ACC_FP64: tl.constexpr, PRECISION: tl.constexpr):
    """acc + a @ b: fp64 exactly (out_dtype fp64), else at PRECISION ("tf32" or "ieee").
    Both calls written as branches: a `return` inside a constexpr `if` does not stop Triton
    from compiling the statement after it (fp64 accumulators reject the second call)."""
    if ACC_FP64:
        acc = tl.dot(a, b, acc, input_precision="ieee", out_dtype=tl.float64)
    else:
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    return acc


@triton.jit
def _conv_fwd_kernel(
    x_ptr, w_ptr, bias_ptr, y_ptr,
    pro_scale_ptr, pro_shift_ptr,      # prologue: per input channel (Cin), accumulation dtype
    res_ptr,                           # epilogue residual, y's shape
    st_mean_ptr, st_m2_ptr,            # statistics partials: [tiles_m, Cout] each
    M, H, W, Ho, Wo, CIN_G, COUT_G,
    sxn, sxc, sxh, sxw,                # x strides (elements), NCHW order of dims
    swo, swi, swh, sww,                # weight strides: [Cout, Cin/g, KH, KW]
    syn, syc, syh, syw,                # y strides
    srn, src, srh, srw,                # residual strides
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    KH: tl.constexpr, KW: tl.constexpr, PRO_SLOPE: tl.constexpr, EPI_SLOPE: tl.constexpr,
    HAS_BIAS: tl.constexpr, PROLOGUE: tl.constexpr, PRO_ACT: tl.constexpr,
    STATS: tl.constexpr, HAS_RES: tl.constexpr, EPI_ACT: tl.constexpr,
    ACC_FP64: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    g = tl.program_id(2)
    acc_t = tl.float64 if ACC_FP64 else tl.float32

    m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = m < M
    hw = Ho * Wo
    n = m // hw
    oh = (m % hw) // Wo
    ow = m % Wo
    co_g = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    co_ok = co_g < COUT_G
    co = g * COUT_G + co_g
    x_row = n.to(tl.int64) * sxn

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=acc_t)
    for r in range(KH):
        ih = oh * stride_h - pad_h + r * dil_h
        for s in range(KW):
            iw = ow * stride_w - pad_w + s * dil_w
            pix_ok = m_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            x_pix = x_row + ih.to(tl.int64) * sxh + iw.to(tl.int64) * sxw
            for k0 in range(0, CIN_G, BLOCK_K):
                ci_g = k0 + tl.arange(0, BLOCK_K)
                ci_ok = ci_g < CIN_G
                ci = g * CIN_G + ci_g
                a_mask = pix_ok[:, None] & ci_ok[None, :]
                a = tl.load(x_ptr + x_pix[:, None] + ci.to(tl.int64)[None, :] * sxc,
                            mask=a_mask, other=0.0)
                if PROLOGUE:
                    sc = tl.load(pro_scale_ptr + ci, mask=ci_ok, other=0.0)
                    sh = tl.load(pro_shift_ptr + ci, mask=ci_ok, other=0.0)
                    # BN's output rounds to x's dtype before the activation, as in eager.
                    u = (a.to(sc.dtype) * sc[None, :] + sh[None, :]).to(x_ptr.dtype.element_ty)
                    u = _act(u.to(sc.dtype), PRO_ACT, PRO_SLOPE)
                    a = tl.where(a_mask, u, 0.0).to(x_ptr.dtype.element_ty)
                b = tl.load(w_ptr + co.to(tl.int64)[None, :] * swo + ci_g[:, None] * swi
                            + r * swh + s * sww,
                            mask=ci_ok[:, None] & co_ok[None, :], other=0.0)
                acc = _dot(a, b, acc, ACC_FP64, PRECISION)

    if HAS_BIAS:
        acc += tl.load(bias_ptr + co, mask=co_ok, other=0.0).to(acc_t)[None, :]
    out_mask = m_ok[:, None] & co_ok[None, :]
    y_off = (n.to(tl.int64) * syn + oh.to(tl.int64) * syh + ow.to(tl.int64) * syw)[:, None] \
        + co.to(tl.int64)[None, :] * syc
    if STATS:
        # The tile's count, mean and sum of squared deviations per channel, of z as stored.
        z = acc.to(y_ptr.dtype.element_ty).to(acc_t)
        cnt = tl.sum(m_ok.to(acc_t), 0)
        zm = tl.where(out_mask, z, 0.0)
        mean = tl.sum(zm, 0) / cnt
        d = tl.where(out_mask, z - mean[None, :], 0.0)
        tl.store(st_mean_ptr + pid_m * (COUT_G * tl.num_programs(2)) + co, mean, mask=co_ok)
        tl.store(st_m2_ptr + pid_m * (COUT_G * tl.num_programs(2)) + co, tl.sum(d * d, 0),
                 mask=co_ok)
    else:
        if HAS_RES:
            r_off = (n.to(tl.int64) * srn + oh.to(tl.int64) * srh
                     + ow.to(tl.int64) * srw)[:, None] + co.to(tl.int64)[None, :] * src
            # Rounded to y's dtype where the eager chain stores: the conv output, the sum.
            acc = (acc.to(y_ptr.dtype.element_ty).to(acc_t)
                   + tl.load(res_ptr + r_off, mask=out_mask, other=0.0).to(acc_t))
            acc = acc.to(y_ptr.dtype.element_ty).to(acc_t)
        acc = _act(acc, EPI_ACT, EPI_SLOPE)
    tl.store(y_ptr + y_off, acc.to(y_ptr.dtype.element_ty), mask=out_mask)


class Prologue(NamedTuple):
    """act(x * scale + shift) per input channel, applied as x is loaded."""
    scale: torch.Tensor
    shift: torch.Tensor
    act: int = ACT_RELU
    slope: float = 0.0


def _conv_tf32() -> bool:
    """Whether torch's fp32 convolutions use TF32 now (then ours do: "exactly when PyTorch's
    convolution would"). Torch's newer `fp32_precision` setting makes the old flag raise."""
    conv = getattr(torch.backends.cudnn, "conv", None)
    try:
        if conv is not None and getattr(conv, "fp32_precision", "none") not in ("none", None):
            return conv.fp32_precision == "tf32"
    except Exception:  # noqa: BLE001
        pass
    try:
        return bool(torch.backends.cudnn.allow_tf32)
    except Exception:  # noqa: BLE001
        return False


def precision_for(x: torch.Tensor) -> str:
    """The dot's input precision for x: "tf32" for fp32 on a GPU exactly when torch's
    convolutions use TF32, else "ieee"."""
    return "tf32" if x.dtype == torch.float32 and x.is_cuda and _conv_tf32() else "ieee"


def _on_device(t: torch.Tensor):
    """Launch on t's GPU (Triton launches on the current device and its stream)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _is_channels_last(t: torch.Tensor) -> bool:
    return t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()


def channels_contiguous(weight: torch.Tensor) -> torch.Tensor:
    """The weight with input channels contiguous ([Cout, KH, KW, Cin/g] in memory: torch's
    channels_last), so a tile of (input channels x output channels) at one (r, s) is read
    with coalesced loads; a no-op for a channels_last model's weights, else one copy of the
    (small) weight per call."""
    return weight.contiguous(memory_format=torch.channels_last)


def _out_size(size: int, k: int, stride: int, pad: int, dil: int) -> int:
    return (size + 2 * pad - dil * (k - 1) - 1) // stride + 1


def conv2d(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
           stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups: int = 1, *,
           prologue: Optional[Prologue] = None, stats: bool = False,
           residual: Optional[torch.Tensor] = None, act: int = ACT_IDENTITY,
           slope: float = 0.0) -> Tuple[torch.Tensor, Optional[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]]:
    """y = conv2d(prologue(x), weight, bias) (+ residual, act) channels_last when x or the weight
    is (as eager's convolution), else NCHW.

    With `stats=True` (no residual or activation then) also returns the per-tile statistics
    partials (count per tile, mean, M2) for `merge_stats`. Arguments are checked by the
    caller (resfuse.validation); this launcher assumes them valid."""
    N, C, H, W = x.shape
    weight_in, weight = weight, channels_contiguous(weight)
    Cout, cin_g, KH, KW = weight.shape
    cout_g = Cout // groups
    Ho = _out_size(H, KH, stride[0], padding[0], dilation[0])
    Wo = _out_size(W, KW, stride[1], padding[1], dilation[1])
    fmt = torch.channels_last if (_is_channels_last(x) or _is_channels_last(weight_in)) \
        else torch.contiguous_format  # as eager's convolution (cuDNN, oneDNN)
    M = N * Ho * Wo
    precision = precision_for(x)
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    if stats and (residual is not None or act != ACT_IDENTITY):
        raise ValueError("conv2d: stats=True computes the conv output's statistics; "
                         "residual and activation come after BN")
    pro = prologue

    def run(t):
        y = torch.empty((N, Cout, Ho, Wo), device=x.device, dtype=x.dtype, memory_format=fmt)
        BM, BN, BK = t.rows, t.cols, t.red
        tiles_m = triton.cdiv(M, BM)
        if stats:
            st_mean = torch.empty((tiles_m, Cout), device=x.device, dtype=acc)
            st_m2 = torch.empty_like(st_mean)
        else:
            st_mean = st_m2 = y  # unused
        dummy = y
        res = residual if residual is not None else y
        grid = (tiles_m, triton.cdiv(cout_g, BN), groups)
        with _on_device(x):
            _conv_fwd_kernel[grid](
                x, weight, bias if bias is not None else dummy, y,
                pro.scale if pro is not None else dummy, pro.shift if pro is not None else dummy,
                res, st_mean, st_m2,
                M, H, W, Ho, Wo, cin_g, cout_g,
                *x.stride(), *weight.stride(), *y.stride(), *res.stride(),
                stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1],
                KH=KH, KW=KW, PRO_SLOPE=float(pro.slope) if pro is not None else 0.0,
                EPI_SLOPE=float(slope), HAS_BIAS=bias is not None, PROLOGUE=pro is not None,
                PRO_ACT=pro.act if pro is not None else 0, STATS=stats,
                HAS_RES=residual is not None, EPI_ACT=act, ACC_FP64=x.dtype == torch.float64,
                PRECISION=precision, BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK, **t.launch(),
            )
        if not stats:
            return y, None
        counts = torch.full((tiles_m, 1), BM, device=x.device, dtype=acc)
        counts[-1] = M - BM * (tiles_m - 1)
        return y, (counts, st_mean, st_m2)

    key = (tuple(x.shape), _is_channels_last(x), tuple(weight.shape), tuple(stride),
           tuple(padding), tuple(dilation), groups, x.dtype, fmt, bias is not None,
           pro.act if pro is not None else None, stats, residual is not None, act, precision)
    t = pick_tiles("conv_fwd", key, run, x.device, M, cout_g, cin_g, x.dtype,
                   precision=precision)
    return run(t)


def merge_stats(partials: Tuple[torch.Tensor, torch.Tensor, torch.Tensor]
                ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (mean, biased variance) from per-tile (count, mean, M2), in a fixed order
    (Chan et al.'s pairwise formula, as one weighted sum over the tiles)."""
    cnt, mean_t, m2_t = partials
    total = cnt.sum()
    mean = (cnt * mean_t).sum(0) / total
    m2 = m2_t.sum(0) + (cnt * (mean_t - mean) ** 2).sum(0)
    return mean, m2 / total
