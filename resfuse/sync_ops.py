"""Synchronised BatchNorm: the fused ops with batch statistics combined across processes.

Same semantics as `nn.SyncBatchNorm` (forward, every gradient, running statistics), for both
primitives of `resfuse.ops` (conv -> bn -> act (+ residual), and the pre-activation form). A
collective cannot run inside a kernel, so each op is split where the collective goes:

forward   sync_conv_stats        z = conv(x) and this process's per-channel
                                 [sum, sum of squares, count] (float64, 2C + 1 values)
          ALL-REDUCE (sum)       one collective per BN
          sync_bn_act_fwd        global mean / invstd, running-stat update, y = act(bn(z) + r)
          (or sync_bn_act_conv_fwd, y = conv(act(bn(x))) + r, for the pre-activation form)
backward  sync_bn_act_bwd_reduce g_u = act'(u) * g_y and this process's two per-channel sums
          (or sync_bn_act_conv_bwd_reduce, after the conv's backward, for the pre-activation form)
          ALL-REDUCE (sum)       one collective per BN, only when x's gradient is needed
          sync_bn_bwd_apply_conv g_z from the global sums, then the conv's backward

As in `nn.SyncBatchNorm`, the BN weight and bias gradients are this process's own share (DDP
averages them with every other gradient); the input gradient uses the global sums. Processes
with uneven batches, empty ones included, are handled: the counts travel with the sums.

The statistics are exchanged as float64 sums, each process's mean and variance coming from the
backend's fixed-order reduction (fp32, fp64 for fp64 data), so the combination does not cancel
when |mean| >> std. The collective is torch.distributed's functional all-reduce, which
`torch.compile` traces into the graph. BN's apply and backward pieces here are the torch-op
pieces of `backend.base.Backend` on every backend (the fused CUDA kernels run the
unsynchronised ops only); the convolutions and the statistics are the backend's.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch.autograd.function import once_differentiable

from . import backend as dispatch
from .activations import Activation
from .backend.base import acc_dtype, bn_scale_shift, finalize_stats
from .ops import (OpConfig, _empty, _op, _or_empty, _param_grad, _params, bn_act_conv_fake,
                  conv_add_outputs, conv_grads, conv_output, fake_conv, like, preact_saved)

Tensor = torch.Tensor


def _pieces():
    """BN's apply and backward pieces, as torch ops (any backend, any device)."""
    return dispatch.get("pieces")


def all_reduce_sum(t: Tensor, group) -> Tensor:
    """The sum of `t` over the processes of `group`: one functional all-reduce, which
    torch.compile keeps in the graph (an in-place `dist.all_reduce` would break it)."""
    import torch.distributed._functional_collectives as funcol
    return funcol.wait_tensor(funcol.all_reduce(t, "sum", group))


def _local_sums(be, z: Tensor) -> Tensor:
    """[sum(C), sum of squares(C), count(1)] of this process's z, float64."""
    c = z.shape[1]
    n = z.numel() // c if c else 0
    if n == 0:  # an empty batch: contributes nothing, but still joins the collective
        return z.new_zeros(2 * c + 1, dtype=torch.float64)
    mean, var = be.bn_stats(z)
    m, v = mean.to(torch.float64), var.to(torch.float64)
    count = torch.full((1,), n, dtype=torch.float64, device=z.device)
    return torch.cat([m * n, (v + m * m) * n, count])


def _global_stats(stats: Tensor, c: int, acc: torch.dtype) -> Tuple[Tensor, Tensor, Tensor]:
    """(mean, biased variance) in `acc`, and the total count (0-d float64) from summed stats."""
    total = stats[2 * c]
    mean = stats[:c] / total
    var = (stats[c:2 * c] / total - mean * mean).clamp_min(0)
    return mean.to(acc), var.to(acc), total


def _bn_act(z, stats, bn_weight, bn_bias, running_mean, running_var, num_batches_tracked,
            residual, momentum, eps, act: Activation, save: bool):
    """(y, mean, invstd, u): act(bn(z) + residual) with the global statistics; u is the
    pre-activation when `save` and the activation's backward reads it."""
    mean, var, total = _global_stats(stats, z.shape[1], acc_dtype(z.dtype))
    invstd = finalize_stats(mean, var, total, eps, running_mean, running_var,
                            num_batches_tracked, momentum)
    scale, shift = bn_scale_shift(mean, invstd, bn_weight, bn_bias)
    y, u = _pieces().scale_shift_add_act(z, scale, shift, residual, act, save)
    return y, mean, invstd, u


# ------------------------------------------------------------------------------- forward

@_op("sync_conv_stats(Tensor x, Tensor? weight, Tensor? bias, int[] stride, int[] padding, "
     "int[] dilation, int groups, str backend) -> (Tensor, Tensor)")
def sync_conv_stats(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                    stride: List[int], padding: List[int], dilation: List[int], groups: int,
                    backend: str) -> Tuple[Tensor, Tensor]:
    """(z, stats): z = conv(x) (empty when there is no conv: z is x) and this process's
    float64 [sum, sum of squares, count] of z per channel, for the all-reduce."""
    be = dispatch.get(backend)
    if weight is None:
        return _empty(x), _local_sums(be, x)
    z = conv_output(be.conv(x, weight, bias, _params(stride, padding, dilation, groups)), x,
                    weight)
    return z, _local_sums(be, z)


@sync_conv_stats.register_fake
def _(x, weight, bias, stride, padding, dilation, groups, backend):
    z = x if weight is None else fake_conv(x, weight, bias, stride, padding, dilation, groups)
    return (torch.empty_like(z) if weight is not None else _empty(x),
            x.new_empty(2 * z.shape[1] + 1, dtype=torch.float64))


@_op("sync_bn_act_fwd(Tensor z, Tensor stats, Tensor? bn_weight, Tensor? bn_bias, "
     "Tensor(a!)? running_mean, Tensor(b!)? running_var, Tensor(c!)? num_batches_tracked, "
     "Tensor? residual, float? momentum, float eps, str activation, float negative_slope, "
     "bool save_for_backward) -> (Tensor, Tensor, Tensor, Tensor)")
def sync_bn_act_fwd(z: Tensor, stats: Tensor, bn_weight: Optional[Tensor],
                    bn_bias: Optional[Tensor], running_mean: Optional[Tensor],
                    running_var: Optional[Tensor], num_batches_tracked: Optional[Tensor],
                    residual: Optional[Tensor], momentum: Optional[float], eps: float,
                    activation: str, negative_slope: float, save_for_backward: bool
                    ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """(y, mean, invstd, u) from the all-reduced `stats`; updates the running statistics
    (when given) as nn.SyncBatchNorm does; u as `Activation.saves` says, when saving."""
    y, mean, invstd, u = _bn_act(z, stats, bn_weight, bn_bias, running_mean, running_var,
                                 num_batches_tracked, residual, momentum, eps,
                                 Activation(activation, negative_slope), save_for_backward)
    return y, mean, invstd, (u if u is not None else _empty(z))


@sync_bn_act_fwd.register_fake
def _(z, stats, bn_weight, bn_bias, running_mean, running_var, num_batches_tracked, residual,
      momentum, eps, activation, negative_slope, save_for_backward):
    c = z.new_empty(z.shape[1], dtype=acc_dtype(z.dtype))
    keeps_u = save_for_backward and Activation(activation, negative_slope).saves == "input"
    return (torch.empty_like(z), c, torch.empty_like(c),
            torch.empty_like(z) if keeps_u else _empty(z))


@_op("sync_bn_act_conv_fwd(Tensor x, Tensor stats, Tensor? bn_weight, Tensor? bn_bias, "
     "Tensor(a!)? running_mean, Tensor(b!)? running_var, Tensor(c!)? num_batches_tracked, "
     "Tensor weight, Tensor? bias, Tensor? residual, int[] stride, int[] padding, "
     "int[] dilation, int groups, float? momentum, float eps, str activation, "
     "float negative_slope, str backend, bool save_for_backward) "
     "-> (Tensor, Tensor, Tensor, Tensor)")
def sync_bn_act_conv_fwd(x: Tensor, stats: Tensor, bn_weight: Optional[Tensor],
                         bn_bias: Optional[Tensor], running_mean: Optional[Tensor],
                         running_var: Optional[Tensor], num_batches_tracked: Optional[Tensor],
                         weight: Tensor, bias: Optional[Tensor], residual: Optional[Tensor],
                         stride: List[int], padding: List[int], dilation: List[int],
                         groups: int, momentum: Optional[float], eps: float, activation: str,
                         negative_slope: float, backend: str, save_for_backward: bool
                         ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """(y, a, mean, invstd): y = conv(a) + residual with a = act(bn(x)) under the global
    statistics; a, mean and invstd only when saving."""
    be = dispatch.get(backend)
    a, mean, invstd, _ = _bn_act(x, stats, bn_weight, bn_bias, running_mean, running_var,
                                 num_batches_tracked, None, momentum, eps,
                                 Activation(activation, negative_slope), False)
    return conv_add_outputs(be, x, a, mean, invstd, weight, bias, residual,
                            _params(stride, padding, dilation, groups), save_for_backward)


@sync_bn_act_conv_fwd.register_fake
def _(x, stats, bn_weight, bn_bias, running_mean, running_var, num_batches_tracked, weight,
      bias, residual, stride, padding, dilation, groups, momentum, eps, activation,
      negative_slope, backend, save_for_backward):
    return bn_act_conv_fake(x, weight, bias, stride, padding, dilation, groups, save_for_backward)


# ------------------------------------------------------------------------------ backward

def _reduce(grad: Tensor, saved: Optional[Tensor], z: Tensor, mean: Tensor, act: Activation):
    g_u, sum_g, sum_gz = _pieces().act_backward_reduce(grad, saved, z, mean, act, need_sums=True)
    return g_u, torch.cat([sum_g, sum_gz])


@_op("sync_bn_act_bwd_reduce(Tensor grad_y, Tensor? saved, Tensor z, Tensor mean, "
     "str activation, float negative_slope) -> (Tensor, Tensor)")
def sync_bn_act_bwd_reduce(grad_y: Tensor, saved: Optional[Tensor], z: Tensor, mean: Tensor,
                           activation: str, negative_slope: float) -> Tuple[Tensor, Tensor]:
    """(g_u, sums): g_u = act'(u) * grad_y (the residual's gradient) and this process's
    [sum(g_u), sum(g_u * (z - mean))] per channel, in the statistics' dtype."""
    g_u, sums = _reduce(grad_y, saved, z, mean, Activation(activation, negative_slope))
    return (g_u.clone() if g_u is grad_y else g_u), sums  # outputs never alias inputs


@sync_bn_act_bwd_reduce.register_fake
def _(grad_y, saved, z, mean, activation, negative_slope):
    return torch.empty_like(grad_y), mean.new_empty(2 * mean.shape[0])


@_op("sync_bn_act_conv_bwd_reduce(Tensor grad_y, Tensor x, Tensor a, Tensor weight, "
     "Tensor mean, Tensor invstd, Tensor? bn_weight, Tensor? bn_bias, int[] stride, "
     "int[] padding, int[] dilation, int groups, str activation, float negative_slope, "
     "str backend, bool has_bias, bool[] output_mask) -> (Tensor, Tensor, Tensor, Tensor)")
def sync_bn_act_conv_bwd_reduce(grad_y: Tensor, x: Tensor, a: Tensor, weight: Tensor,
                                mean: Tensor, invstd: Tensor, bn_weight: Optional[Tensor],
                                bn_bias: Optional[Tensor], stride: List[int], padding: List[int],
                                dilation: List[int], groups: int, activation: str,
                                negative_slope: float, backend: str, has_bias: bool,
                                output_mask: List[bool]) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Pre-activation form: (g_weight, g_bias, g_u, sums) with output_mask = (BN side,
    weight, bias); g_u and sums (as in `sync_bn_act_bwd_reduce`) only for the BN side."""
    be = dispatch.get(backend)
    act = Activation(activation, negative_slope)
    need_bn, m_w, m_b = output_mask
    g_a, g_w, g_b = be.conv_backward(grad_y, a, weight, has_bias,
                                     _params(stride, padding, dilation, groups),
                                     [need_bn, m_w, m_b and has_bias])
    g_u = sums = None
    if need_bn:
        g_u, sums = _reduce(g_a, preact_saved(act, x, a, mean, invstd, bn_weight, bn_bias), x,
                            mean, act)
    return _or_empty(grad_y, like(g_w, weight) if m_w else None,
                     g_b if (m_b and has_bias) else None, like(g_u, x), sums)


@sync_bn_act_conv_bwd_reduce.register_fake
def _(grad_y, x, a, weight, mean, invstd, bn_weight, bn_bias, stride, padding, dilation, groups,
      activation, negative_slope, backend, has_bias, output_mask):
    need_bn, m_w, m_b = output_mask
    return _or_empty(grad_y, torch.empty_like(weight) if m_w else None,
                     grad_y.new_empty(weight.shape[0]) if (m_b and has_bias) else None,
                     torch.empty_like(x) if need_bn else None,
                     mean.new_empty(2 * mean.shape[0]) if need_bn else None)


@_op("sync_bn_bwd_apply_conv(Tensor g_u, Tensor z, Tensor mean, Tensor invstd, "
     "Tensor? bn_weight, Tensor sums, Tensor stats, Tensor x, Tensor? weight, int[] stride, "
     "int[] padding, int[] dilation, int groups, str backend, bool has_bias, "
     "bool[] output_mask) -> (Tensor, Tensor, Tensor)")
def sync_bn_bwd_apply_conv(g_u: Tensor, z: Tensor, mean: Tensor, invstd: Tensor,
                           bn_weight: Optional[Tensor], sums: Tensor, stats: Tensor, x: Tensor,
                           weight: Optional[Tensor], stride: List[int], padding: List[int],
                           dilation: List[int], groups: int, backend: str, has_bias: bool,
                           output_mask: List[bool]) -> Tuple[Tensor, Tensor, Tensor]:
    """(g_x, g_weight, g_bias): BN's backward with the all-reduced `sums` and the global count
    (from `stats`), then the conv's backward (none when `weight` is None: g_x is g_z)."""
    c = z.shape[1]
    g_z = _pieces().bn_backward_apply(g_u, z, mean, invstd, bn_weight, sums[:c], sums[c:],
                                      stats[2 * c])
    if weight is None:
        return like(g_z, z), _empty(g_u), _empty(g_u)
    return conv_grads(g_z, x, weight, stride, padding, dilation, groups, backend, has_bias,
                      output_mask, empty_like=g_u)


@sync_bn_bwd_apply_conv.register_fake
def _(g_u, z, mean, invstd, bn_weight, sums, stats, x, weight, stride, padding, dilation,
      groups, backend, has_bias, output_mask):
    if weight is None:
        return torch.empty_like(z), _empty(g_u), _empty(g_u)
    m_x, m_w, m_b = output_mask
    return _or_empty(g_u, torch.empty_like(x) if m_x else None,
                     torch.empty_like(weight) if m_w else None,
                     g_u.new_empty(weight.shape[0]) if (m_b and has_bias) else None)


# ------------------------------------------------------------------- autograd Functions

def _local_bn_grads(sums: Tensor, invstd: Tensor, bn_weight, bn_bias, need_w: bool, need_b: bool):
    """This process's BN weight and bias gradients (nn.SyncBatchNorm's: not all-reduced)."""
    c = invstd.shape[0]
    return (_param_grad(sums[c:] * invstd, bn_weight, need_w),
            _param_grad(sums[:c].clone(), bn_bias, need_b))


class SyncConvBNActFunction(torch.autograd.Function):
    """`ConvBNActFunction` with batch statistics synchronised over `group`:
    `SyncConvBNActFunction.apply(x, weight, bias, bn_weight, bn_bias, running_mean,
    running_var, num_batches_tracked, residual, config, group)` (training mode only)."""

    @staticmethod
    def forward(ctx, x, weight, bias, bn_weight, bn_bias, running_mean, running_var,
                num_batches_tracked, residual, config: OpConfig, group):
        c = config
        n = ctx.needs_input_grad
        save = any(n[:5]) or n[8]
        z, stats = torch.ops.resfuse.sync_conv_stats(
            x, weight, bias, list(c.stride), list(c.padding), list(c.dilation), c.groups, c.backend)
        z = z if weight is not None else x
        stats = all_reduce_sum(stats, group)
        y, mean, invstd, u = torch.ops.resfuse.sync_bn_act_fwd(
            z, stats, bn_weight, bn_bias, running_mean, running_var, num_batches_tracked,
            residual, c.momentum, c.eps, c.activation, c.negative_slope, save)
        if save:
            saves = Activation(c.activation, c.negative_slope).saves
            saved = y if saves == "output" else (u if saves == "input" else None)
            ctx.save_for_backward(x, weight, z, saved, mean, invstd, bn_weight, bn_bias, bias,
                                  stats)
            ctx.config, ctx.group = c, group
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y):
        x, weight, z, saved, mean, invstd, bn_weight, bn_bias, bias, stats = ctx.saved_tensors
        c = ctx.config
        n = ctx.needs_input_grad
        mask = [n[0], n[1] and weight is not None, n[2] and bias is not None]
        g_u, sums = torch.ops.resfuse.sync_bn_act_bwd_reduce(grad_y, saved, z, mean,
                                                             c.activation, c.negative_slope)
        g_bnw, g_bnb = _local_bn_grads(sums, invstd, bn_weight, bn_bias, n[3], n[4])
        g_x = g_w = g_b = None
        if any(mask):
            sums = all_reduce_sum(sums, ctx.group)
            g = torch.ops.resfuse.sync_bn_bwd_apply_conv(
                g_u, z, mean, invstd, bn_weight, sums, stats, x, weight, list(c.stride),
                list(c.padding), list(c.dilation), c.groups, c.backend, bias is not None, mask)
            g_x, g_w, g_b = (t if m else None for t, m in zip(g, mask))
        return (g_x, g_w, g_b, g_bnw, g_bnb, None, None, None, g_u if n[8] else None, None, None)


class SyncBNActConvFunction(torch.autograd.Function):
    """`BNActConvFunction` with batch statistics synchronised over `group`:
    `SyncBNActConvFunction.apply(x, bn_weight, bn_bias, running_mean, running_var,
    num_batches_tracked, weight, bias, residual, config, group)` (training mode only)."""

    @staticmethod
    def forward(ctx, x, bn_weight, bn_bias, running_mean, running_var, num_batches_tracked,
                weight, bias, residual, config: OpConfig, group):
        c = config
        n = ctx.needs_input_grad
        save = any(n[:3]) or n[6] or n[7]
        _, stats = torch.ops.resfuse.sync_conv_stats(x, None, None, [1, 1], [0, 0], [1, 1], 1,
                                                     c.backend)
        stats = all_reduce_sum(stats, group)
        y, a, mean, invstd = torch.ops.resfuse.sync_bn_act_conv_fwd(
            x, stats, bn_weight, bn_bias, running_mean, running_var, num_batches_tracked, weight,
            bias, residual, list(c.stride), list(c.padding), list(c.dilation), c.groups,
            c.momentum, c.eps, c.activation, c.negative_slope, c.backend, save)
        if save:
            ctx.save_for_backward(x, a, weight, mean, invstd, bn_weight, bn_bias, bias, stats)
            ctx.config, ctx.group = c, group
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y):
        n = ctx.needs_input_grad
        g_x = g_bnw = g_bnb = g_w = g_b = None
        if any(n[:3]) or n[6] or n[7]:
            x, a, weight, mean, invstd, bn_weight, bn_bias, bias, stats = ctx.saved_tensors
            c = ctx.config
            need_bn = n[0] or (n[1] and bn_weight is not None) or (n[2] and bn_bias is not None)
            g_w, g_b, g_u, sums = torch.ops.resfuse.sync_bn_act_conv_bwd_reduce(
                grad_y, x, a, weight, mean, invstd, bn_weight, bn_bias, list(c.stride),
                list(c.padding), list(c.dilation), c.groups, c.activation, c.negative_slope,
                c.backend, bias is not None, [need_bn, n[6], n[7] and bias is not None])
            g_w = g_w if n[6] else None
            g_b = g_b if (n[7] and bias is not None) else None
            if need_bn:
                g_bnw, g_bnb = _local_bn_grads(sums, invstd, bn_weight, bn_bias, n[1], n[2])
            if n[0]:
                sums = all_reduce_sum(sums, ctx.group)
                g_x = torch.ops.resfuse.sync_bn_bwd_apply_conv(
                    g_u, x, mean, invstd, bn_weight, sums, stats, x, None, [1, 1], [0, 0],
                    [1, 1], 1, c.backend, False, [True, False, False])[0]
        return g_x, g_bnw, g_bnb, None, None, None, g_w, g_b, grad_y if n[8] else None, None, None
