"""The convolution's backward as implicit GEMMs, with BN's backward and BN's forward fused into
their loads:

    data gradient    g_x[n, ih, iw, ci] = sum_{r, s, co} g[n, oh, ow, co] * w[co, ci, r, s]
                     over the (oh, ow) with oh * stride_h - pad_h + r * dil_h = ih (likewise w)
    weight gradient  g_w[co, ci, r, s]  = sum_{n, oh, ow} g[n, oh, ow, co] * a[n, ih, iw, ci]

- grad prologue (both; optional): the conv output's gradient g is not read but computed as it
  is loaded, as BN-backward's apply  g_z = A[co] * g_u + B[co] + D[co] * (z - mean[co])  with
  g_u = act'(u) * grad_y from the 1-bit mask (or u, or y) of the forward: g_z is never written.
  It is rounded to z's dtype, where the eager chain stores it.
- input prologue (weight gradient; optional): a = act(x * scale[ci] + shift[ci]), the previous
  BN + activation recomputed as x is loaded, 0 at padded positions (as the forward's prologue):
  the pre-activation op's backward reads x, never a stored act(bn(x)).

The data gradient is one program per (input-pixel tile x input-channel tile) and group, its
reduction over (r, s, output channel) in a fixed order. The weight gradient's reduction over
N * Ho * Wo is split into a fixed number of slices (a function of the shape only), each
writing its partial [Cout, KH * KW * Cin/g] in the accumulation dtype, summed in slice order:
two runs give identical bits. Strided tensors (NCHW, channels_last) are read in place.
Accumulation is fp32 (fp64 for fp64 inputs), with TF32 for fp32 exactly as the forward.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

import torch
import triton
import triton.language as tl

from .bn_act import SAVE_NONE, _acc, _grad_u, _in_layout_of, _recompute_coef
from .conv import (Prologue, _act, _dot, _is_channels_last, _on_device, channels_contiguous,
                   precision_for)
from .tiles import pick_tiles


class GradPrologue(NamedTuple):
    """BN-backward's apply on the conv output's gradient, computed as it is loaded:
    g_z = coef[0] * g_u + coef[1] + coef[2] * (z - mean) per output channel (`coef` [3, C]),
    or g_z = coef[0] * g_u (`coef` [1, C]: eval-mode BN), g_u = act'(u) * grad_y recomputed
    from `saved` (`save` a bn_act SAVE_* code) — the arguments of bn_act.backward_apply."""
    saved: Optional[torch.Tensor]
    save: int
    z: torch.Tensor
    mean: torch.Tensor
    coef: torch.Tensor
    act: int
    slope: float


@triton.jit
def _channel_coef(coef_ptr, mean_ptr, saved_ptr, co, co_ok, C, GRAD_PRO: tl.constexpr,
                  SAVE: tl.constexpr, SCALE_ONLY: tl.constexpr, acc_t):
    """The grad prologue's per-channel values for channels co, as vectors of co's shape (the
    caller broadcasts them: a per-element gather of per-channel values would be staged in
    shared memory by the software pipeliner): (A, B, D, mean, recompute scale, shift)."""
    a = tl.zeros(co.shape, dtype=acc_t)
    b = a
    d = a
    mean = a
    if GRAD_PRO:
        a = tl.load(coef_ptr + co, mask=co_ok, other=0.0).to(acc_t)
        if not SCALE_ONLY:
            b = tl.load(coef_ptr + C + co, mask=co_ok, other=0.0).to(acc_t)
            d = tl.load(coef_ptr + 2 * C + co, mask=co_ok, other=0.0).to(acc_t)
            mean = tl.load(mean_ptr + co, mask=co_ok, other=0.0).to(acc_t)
    rsc, rsh = _recompute_coef(saved_ptr, co, co_ok, C, SAVE)
    return a, b, d, mean, rsc, rsh


@triton.jit
def _grad_tile(g_ptr, saved_ptr, z_ptr, idx, ok, a, b, d, mean, rsc, rsh,
               GRAD_PRO: tl.constexpr, ACT: tl.constexpr, SAVE: tl.constexpr,
               SLOPE: tl.constexpr, SCALE_ONLY: tl.constexpr, acc_t):
    """A tile of the conv output's gradient at offsets idx: read, or (GRAD_PRO) BN-backward's
    apply computed from grad_y, the saved mask / u and z, rounded to z's dtype (the channel
    values from `_channel_coef`, broadcast to idx's shape)."""
    if GRAD_PRO:
        gu = _grad_u(g_ptr, saved_ptr, z_ptr, idx, ok, rsc, rsh, ACT, SAVE, SLOPE, acc_t)
        if SCALE_ONLY:
            gz = a * gu
        else:
            z = tl.load(z_ptr + idx, mask=ok, other=0.0).to(acc_t)
            gz = a * gu + b + d * (z - mean)
        g = tl.where(ok, gz, 0.0).to(z_ptr.dtype.element_ty)
    else:
        g = tl.load(g_ptr + idx, mask=ok, other=0.0)
    return g


@triton.jit
def _conv_dgrad_kernel(
    g_ptr, saved_ptr, z_ptr, mean_ptr, coef_ptr,   # the output's gradient (or its prologue)
    w_ptr, gx_ptr,
    M, H, W, Ho, Wo, CIN_G, COUT_G, C_OUT,
    sgn, sgc, sgh, sgw,                # g strides (z's layout when GRAD_PRO)
    swo, swi, swh, sww,                # weight strides: [Cout, Cin/g, KH, KW]
    sxn, sxc, sxh, sxw,                # g_x strides
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    KH: tl.constexpr, KW: tl.constexpr, SLOPE: tl.constexpr, GRAD_PRO: tl.constexpr,
    ACT: tl.constexpr, SAVE: tl.constexpr, SCALE_ONLY: tl.constexpr,
    ACC_FP64: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    grp = tl.program_id(2)
    acc_t = tl.float64 if ACC_FP64 else tl.float32

    m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)   # input pixels (n, ih, iw)
    m_ok = m < M
    hw = H * W
    n = m // hw
    ih = (m % hw) // W
    iw = m % W
    ci_g = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ci_ok = ci_g < CIN_G
    g_row = n.to(tl.int64) * sgn

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=acc_t)
    for r in range(KH):
        h_num = ih + pad_h - r * dil_h
        oh = h_num // stride_h
        h_ok = (h_num >= 0) & (h_num % stride_h == 0) & (oh < Ho)
        for s in range(KW):
            w_num = iw + pad_w - s * dil_w
            ow = w_num // stride_w
            pix_ok = m_ok & h_ok & (w_num >= 0) & (w_num % stride_w == 0) & (ow < Wo)
            g_pix = g_row + oh.to(tl.int64) * sgh + ow.to(tl.int64) * sgw
            for k0 in range(0, COUT_G, BLOCK_K):
                co_g = k0 + tl.arange(0, BLOCK_K)
                co_ok = co_g < COUT_G
                co = grp * COUT_G + co_g
                t_ok = pix_ok[:, None] & co_ok[None, :]
                idx = g_pix[:, None] + co.to(tl.int64)[None, :] * sgc
                ca, cb, cd, cm, rsc, rsh = _channel_coef(coef_ptr, mean_ptr, saved_ptr, co,
                                                         co_ok, C_OUT, GRAD_PRO, SAVE,
                                                         SCALE_ONLY, acc_t)
                a = _grad_tile(g_ptr, saved_ptr, z_ptr, idx, t_ok, ca[None, :], cb[None, :],
                               cd[None, :], cm[None, :], rsc[None, :], rsh[None, :], GRAD_PRO,
                               ACT, SAVE, SLOPE, SCALE_ONLY, acc_t)
                b = tl.load(w_ptr + co.to(tl.int64)[:, None] * swo + ci_g[None, :] * swi
                            + r * swh + s * sww,
                            mask=co_ok[:, None] & ci_ok[None, :], other=0.0)
                acc = _dot(a.to(b.dtype), b, acc, ACC_FP64, PRECISION)

    ci = grp * CIN_G + ci_g
    off = (n.to(tl.int64) * sxn + ih.to(tl.int64) * sxh + iw.to(tl.int64) * sxw)[:, None] \
        + ci.to(tl.int64)[None, :] * sxc
    tl.store(gx_ptr + off, acc.to(gx_ptr.dtype.element_ty), mask=m_ok[:, None] & ci_ok[None, :])


@triton.jit
def _conv_wgrad_kernel(
    g_ptr, saved_ptr, z_ptr, mean_ptr, coef_ptr,   # the output's gradient (or its prologue)
    x_ptr, pro_scale_ptr, pro_shift_ptr,           # the input (and its prologue)
    part_ptr,                                      # [SPLIT, Cout, KH * KW * Cin/g]
    L, H, W, Ho, Wo, CIN_G, COUT_G, C_OUT, CRS, SPLIT, L_PER_SPLIT,
    sgn, sgc, sgh, sgw,
    sxn, sxc, sxh, sxw,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    KH: tl.constexpr, KW: tl.constexpr, SLOPE: tl.constexpr, PRO_SLOPE: tl.constexpr,
    GRAD_PRO: tl.constexpr, ACT: tl.constexpr, SAVE: tl.constexpr, SCALE_ONLY: tl.constexpr,
    PROLOGUE: tl.constexpr, PRO_ACT: tl.constexpr,
    ACC_FP64: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    grp = tl.program_id(2) // SPLIT
    split = tl.program_id(2) % SPLIT
    acc_t = tl.float64 if ACC_FP64 else tl.float32

    co_g = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)   # output channels
    co_ok = co_g < COUT_G
    co = grp * COUT_G + co_g
    j = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)       # (r, s, ci) flattened, ci fastest
    j_ok = j < CRS
    ci_g = j % CIN_G
    rs = j // CIN_G
    r = rs // KW
    s = rs % KW
    ci = grp * CIN_G + ci_g
    if PROLOGUE:
        sc = tl.load(pro_scale_ptr + ci, mask=j_ok, other=0.0)
        sh = tl.load(pro_shift_ptr + ci, mask=j_ok, other=0.0)
    ca, cb, cd, cm, rsc, rsh = _channel_coef(coef_ptr, mean_ptr, saved_ptr, co, co_ok, C_OUT,
                                             GRAD_PRO, SAVE, SCALE_ONLY, acc_t)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=acc_t)
    hw = Ho * Wo
    start = split * L_PER_SPLIT
    for l0 in range(start, start + L_PER_SPLIT, BLOCK_K):
        l = l0 + tl.arange(0, BLOCK_K)             # output pixels (n, oh, ow)
        l_ok = l < L
        n = l // hw
        oh = (l % hw) // Wo
        ow = l % Wo
        t_ok = co_ok[:, None] & l_ok[None, :]
        idx = co.to(tl.int64)[:, None] * sgc + (n.to(tl.int64) * sgn + oh.to(tl.int64) * sgh
                                                 + ow.to(tl.int64) * sgw)[None, :]
        a = _grad_tile(g_ptr, saved_ptr, z_ptr, idx, t_ok, ca[:, None], cb[:, None],
                       cd[:, None], cm[:, None], rsc[:, None], rsh[:, None], GRAD_PRO, ACT,
                       SAVE, SLOPE, SCALE_ONLY, acc_t)
        ih = oh[:, None] * stride_h - pad_h + r[None, :] * dil_h
        iw = ow[:, None] * stride_w - pad_w + s[None, :] * dil_w
        x_ok = l_ok[:, None] & j_ok[None, :] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        xv = tl.load(x_ptr + n.to(tl.int64)[:, None] * sxn + ci.to(tl.int64)[None, :] * sxc
                     + ih.to(tl.int64) * sxh + iw.to(tl.int64) * sxw, mask=x_ok, other=0.0)
        if PROLOGUE:
            # As the forward's prologue: BN's output rounded to x's dtype, then the activation.
            u = (xv.to(sc.dtype) * sc[None, :] + sh[None, :]).to(x_ptr.dtype.element_ty)
            u = _act(u.to(sc.dtype), PRO_ACT, PRO_SLOPE)
            xv = tl.where(x_ok, u, 0.0).to(x_ptr.dtype.element_ty)
        acc = _dot(a.to(xv.dtype), xv, acc, ACC_FP64, PRECISION)

    off = (split * C_OUT + co).to(tl.int64)[:, None] * CRS + j[None, :]
    tl.store(part_ptr + off, acc, mask=co_ok[:, None] & j_ok[None, :])


# ---------------------------------------------------------------------------------- launchers
def _grad_args(grad: torch.Tensor, pro: Optional[GradPrologue]):
    """(g, saved, z, mean, coef, act, save, slope, scale_only) kernel arguments: with a grad
    prologue, grad_y in z's layout (the mask's bit order)."""
    if pro is None:
        return grad, grad, grad, grad, grad, 0, SAVE_NONE, 0.0, True
    g = _in_layout_of(grad, pro.z)
    saved = pro.saved if pro.saved is not None else pro.z
    save = pro.save if pro.saved is not None else SAVE_NONE
    return (g, saved, pro.z, pro.mean, pro.coef.contiguous(), pro.act, save, float(pro.slope),
            pro.coef.shape[0] == 1)


def conv2d_input_grad(grad: torch.Tensor, weight: torch.Tensor, input_shape, stride=(1, 1),
                      padding=(0, 0), dilation=(1, 1), groups: int = 1, *,
                      grad_prologue: Optional[GradPrologue] = None,
                      channels_last: Optional[bool] = None) -> torch.Tensor:
    """g_x of y = conv2d(x, weight): `grad` is y's gradient (with `grad_prologue`: the
    grad_y from which BN-backward's apply computes it on load). g_x is channels_last when
    `channels_last` (default: as `grad`), else NCHW."""
    N, C, H, W = input_shape
    weight = channels_contiguous(weight)
    Cout, cin_g, KH, KW = weight.shape
    cout_g = Cout // groups
    Ho, Wo = grad.shape[2], grad.shape[3]
    if channels_last is None:
        channels_last = _is_channels_last(grad)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    g, saved, z, mean, coef, act, save, slope, scale_only = _grad_args(grad, grad_prologue)
    M = N * H * W
    precision = precision_for(grad)
    operands = 3 if grad_prologue is not None else 1

    def run(t):
        gx = torch.empty((N, C, H, W), device=grad.device, dtype=grad.dtype, memory_format=fmt)
        BM, BN, BK = t.rows, t.cols, t.red
        grid = (triton.cdiv(M, BM), triton.cdiv(cin_g, BN), groups)
        with _on_device(grad):
            _conv_dgrad_kernel[grid](
                g, saved, z, mean, coef, weight, gx,
                M, H, W, Ho, Wo, cin_g, cout_g, Cout,
                *g.stride(), *weight.stride(), *gx.stride(),
                stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1],
                KH=KH, KW=KW, SLOPE=slope, GRAD_PRO=grad_prologue is not None, ACT=act,
                SAVE=save, SCALE_ONLY=scale_only, ACC_FP64=grad.dtype == torch.float64,
                PRECISION=precision, BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK, **t.launch())
        return gx

    key = (tuple(input_shape), _is_channels_last(g), tuple(weight.shape), tuple(stride),
           tuple(padding), tuple(dilation), groups, grad.dtype, fmt, grad_prologue is not None,
           act, save, scale_only, precision)
    t = pick_tiles("conv_dgrad", key, run, grad.device, M, cin_g, cout_g, grad.dtype,
                   operands=operands, precision=precision)
    return run(t)


def _splits(L: int, programs: int, block_k: int) -> Tuple[int, int]:
    """(slices, rows per slice) of the weight gradient's reduction: enough programs to fill a
    GPU (~512), each slice a whole number of BLOCK_K steps; a fixed function of the shape."""
    want = max(1, min(triton.cdiv(512, programs), triton.cdiv(L, 8 * block_k)))
    per = triton.cdiv(triton.cdiv(L, want), block_k) * block_k
    return triton.cdiv(L, per), per


def conv2d_weight_grad(grad: torch.Tensor, x: torch.Tensor, weight_shape, stride=(1, 1),
                       padding=(0, 0), dilation=(1, 1), groups: int = 1, *,
                       grad_prologue: Optional[GradPrologue] = None,
                       prologue: Optional[Prologue] = None) -> torch.Tensor:
    """g_w of y = conv2d(a, w) in the accumulation dtype ([Cout, Cin/g, KH, KW], contiguous),
    with a = x, or act(x * scale + shift) recomputed on load (`prologue`); `grad` is y's
    gradient (or grad_y, with `grad_prologue`)."""
    N, C, H, W = x.shape
    Cout, cin_g, KH, KW = weight_shape
    cout_g = Cout // groups
    Ho, Wo = grad.shape[2], grad.shape[3]
    g, saved, z, mean, coef, act, save, slope, scale_only = _grad_args(grad, grad_prologue)
    L = N * Ho * Wo
    CRS = cin_g * KH * KW
    precision = precision_for(x)
    operands = 3 if grad_prologue is not None else 1
    acc = _acc(x.dtype)
    pro = prologue

    def run(t):
        BM, BN, BK = t.rows, t.cols, t.red
        tiles = triton.cdiv(cout_g, BM) * triton.cdiv(CRS, BN) * groups
        split, per = _splits(L, tiles, BK)
        part = torch.empty((split, Cout, CRS), device=x.device, dtype=acc)
        grid = (triton.cdiv(cout_g, BM), triton.cdiv(CRS, BN), groups * split)
        with _on_device(x):
            _conv_wgrad_kernel[grid](
                g, saved, z, mean, coef, x,
                pro.scale if pro is not None else x, pro.shift if pro is not None else x, part,
                L, H, W, Ho, Wo, cin_g, cout_g, Cout, CRS, split, per,
                *g.stride(), *x.stride(),
                stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1],
                KH=KH, KW=KW, SLOPE=slope, PRO_SLOPE=float(pro.slope) if pro is not None else 0.0,
                GRAD_PRO=grad_prologue is not None, ACT=act, SAVE=save, SCALE_ONLY=scale_only,
                PROLOGUE=pro is not None, PRO_ACT=pro.act if pro is not None else 0,
                ACC_FP64=x.dtype == torch.float64, PRECISION=precision,
                BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK, **t.launch())
        return part[0] if split == 1 else part.sum(0)

    key = (tuple(x.shape), _is_channels_last(x), _is_channels_last(g), tuple(weight_shape),
           tuple(stride), tuple(padding), tuple(dilation), groups, x.dtype,
           grad_prologue is not None, act, save, scale_only,
           pro.act if pro is not None else None, precision)
    t = pick_tiles("conv_wgrad", key, run, x.device, cout_g, CRS, L, x.dtype,
                   operands=operands, precision=precision)
    gw = run(t)
    return gw.view(Cout, KH, KW, cin_g).permute(0, 3, 1, 2).contiguous()
