"""The fused ops: `torch.library` custom ops composed from a backend's pieces, and the public
`torch.autograd.Function`s that call them.

Two primitives, each a forward and a backward op under `torch.ops.resfuse`:

* `conv_bn_act_fwd/bwd`  y = act(bn(conv(x)) + residual)  (no conv when `weight` is None)
* `bn_act_conv_fwd/bwd`  y = conv(act(bn(x))) + residual  (pre-activation)

and `conv_bn_act_infer` (eval inference with BN folded into the conv).

The ops take only tensors and primitives (so `torch.compile` keeps each one whole, through its
fake implementation) plus the *name* of the backend that runs them, already chosen by
`resfuse.functional`, which also checks the arguments (they are assumed valid here). Outputs
never alias inputs or one another; outputs a call does not need come back as empty tensors
(ops return no None).
"""
from __future__ import annotations

from typing import List, NamedTuple, Optional, Tuple

import torch
from torch.autograd.function import once_differentiable

from . import backend as dispatch
from .activations import Activation
from .backend.base import acc_dtype, bn_scale_shift, per_channel
from .folding import folded
from .validation import ConvParams

Tensor = torch.Tensor


class OpConfig(NamedTuple):
    """Everything but the tensors of a fused-op call, as the autograd Functions take it."""
    stride: Tuple[int, int] = (1, 1)
    padding: Tuple[int, int] = (0, 0)
    dilation: Tuple[int, int] = (1, 1)
    groups: int = 1
    training: bool = True
    momentum: Optional[float] = 0.1
    eps: float = 1e-5
    activation: str = "relu"  # an `Activation.kind`
    negative_slope: float = 0.01
    backend: str = "eager"  # a resolved backend name, never "auto"


# FRAGMENT: the CUDA extension adds its ops to the same namespace from C++.
_lib = torch.library.Library("resfuse", "FRAGMENT")


def _op(schema: str):
    """Define `torch.ops.resfuse.<name>` with `schema` and the decorated function as its
    kernel on every device. (Plain `Library.define/impl` rather than `torch.library.custom_op`,
    whose Python wrapper costs several times more per call, at 4 ops per conv layer.) The
    function gets `.register_fake` for its fake (meta) implementation."""
    name = schema.split("(", 1)[0]

    def deco(fn):
        _lib.define(schema)
        _lib.impl(name, fn, "CompositeExplicitAutograd")
        fn.register_fake = lambda fake: torch.library.register_fake(f"resfuse::{name}", fake, lib=_lib)
        return fn
    return deco


def _params(stride, padding, dilation, groups) -> ConvParams:
    return ConvParams(tuple(stride), tuple(padding), tuple(dilation), int(groups))


def _empty(t: Tensor) -> Tensor:
    return t.new_empty(0)


def _or_empty(like: Tensor, *ts: Optional[Tensor]) -> Tuple[Tensor, ...]:
    """Each None as its own empty tensor (op outputs may not alias one another)."""
    return tuple(_empty(like) if t is None else t for t in ts)


# ============================================================== conv -> bn -> (+res) -> act

@_op("conv_bn_act_fwd(Tensor x, Tensor? weight, Tensor? bias, Tensor? bn_weight, "
     "Tensor? bn_bias, Tensor(a!)? running_mean, Tensor(b!)? running_var, "
     "Tensor(c!)? num_batches_tracked, Tensor? residual, int[] stride, int[] padding, "
     "int[] dilation, int groups, bool training, float? momentum, float eps, str activation, "
     "float negative_slope, str backend, bool save_for_backward) "
     "-> (Tensor, Tensor, Tensor, Tensor, Tensor)")
def conv_bn_act_fwd(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                    bn_weight: Optional[Tensor], bn_bias: Optional[Tensor],
                    running_mean: Optional[Tensor], running_var: Optional[Tensor],
                    num_batches_tracked: Optional[Tensor], residual: Optional[Tensor],
                    stride: List[int], padding: List[int], dilation: List[int], groups: int,
                    training: bool, momentum: Optional[float], eps: float, activation: str,
                    negative_slope: float, backend: str, save_for_backward: bool
                    ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Returns (y, z, mean, invstd, u): z (the conv output), mean/invstd (what BN used) and
    u (what the backend's `forward_saves` names: the pre-activation, or a packed 1-bit mask)
    only when `save_for_backward`; z only when there is a conv."""
    be = dispatch.get(backend)
    act = Activation(activation, negative_slope)
    p = _params(stride, padding, dilation, groups)
    stats = None
    if weight is None:
        z = x
    elif training or running_mean is None:  # batch statistics: from the conv's epilogue if it can
        z, stats = be.conv_stats(x, weight, bias, p)
    else:
        z = be.conv(x, weight, bias, p)
    y, mean, invstd, u = be.bn_act_forward(z, bn_weight, bn_bias, running_mean, running_var,
                                           num_batches_tracked, training, momentum, eps,
                                           residual, act, save_for_backward,
                                           **({} if stats is None else {"batch_stats": stats}))
    if not save_for_backward:
        return y, _empty(x), _empty(x), _empty(x), _empty(x)
    return (y, z if weight is not None else _empty(x), mean, invstd,
            u if u is not None else _empty(x))


@conv_bn_act_fwd.register_fake
def _(x, weight, bias, bn_weight, bn_bias, running_mean, running_var, num_batches_tracked,
      residual, stride, padding, dilation, groups, training, momentum, eps, activation,
      negative_slope, backend, save_for_backward):
    z = x if weight is None else torch.ops.aten.convolution(
        x, weight, bias, stride, padding, dilation, False, [0, 0], groups)
    y = torch.empty_like(z)
    if not save_for_backward:
        return y, _empty(x), _empty(x), _empty(x), _empty(x)
    stats = x.new_empty(z.shape[1], dtype=acc_dtype(x.dtype))
    saves = dispatch.get(backend).forward_saves(Activation(activation, negative_slope))
    if saves == "input":
        u = torch.empty_like(z)
    elif saves == "mask":  # 1 bit per element, packed into int32 words
        u = x.new_empty((z.numel() + 31) // 32, dtype=torch.int32)
    else:
        u = _empty(x)
    return (y, torch.empty_like(z) if weight is not None else _empty(x), stats,
            torch.empty_like(stats), u)


@_op("conv_bn_act_infer(Tensor x, Tensor weight, Tensor? bias, Tensor? bn_weight, "
     "Tensor? bn_bias, Tensor running_mean, Tensor running_var, Tensor? residual, "
     "int[] stride, int[] padding, int[] dilation, int groups, float eps, str activation, "
     "float negative_slope, str backend) -> Tensor")
def conv_bn_act_infer(x: Tensor, weight: Tensor, bias: Optional[Tensor],
                      bn_weight: Optional[Tensor], bn_bias: Optional[Tensor],
                      running_mean: Tensor, running_var: Tensor, residual: Optional[Tensor],
                      stride: List[int], padding: List[int], dilation: List[int], groups: int,
                      eps: float, activation: str, negative_slope: float, backend: str) -> Tensor:
    """Eval-mode inference: BN (running statistics) folded into the conv, the fold cached per
    parameter version; residual add and activation in the conv's epilogue. A separate op
    because it mutates nothing (an op declared mutating bumps its buffers' versions, which
    would invalidate the cached fold on every call)."""
    be = dispatch.get(backend)
    fw = folded(weight, bias, bn_weight, bn_bias, running_mean, running_var, eps)
    return be.conv_eval_folded(x, residual, Activation(activation, negative_slope),
                               _params(stride, padding, dilation, groups), fw)


@conv_bn_act_infer.register_fake
def _(x, weight, bias, bn_weight, bn_bias, running_mean, running_var, residual, stride,
      padding, dilation, groups, eps, activation, negative_slope, backend):
    return torch.empty_like(torch.ops.aten.convolution(
        x, weight, bias, stride, padding, dilation, False, [0, 0], groups))


@_op("conv_bn_act_bwd(Tensor grad_y, Tensor x, Tensor? weight, Tensor z, Tensor? saved, "
     "Tensor mean, Tensor invstd, Tensor? bn_weight, int[] stride, int[] padding, "
     "int[] dilation, int groups, bool use_batch_stats, str activation, float negative_slope, "
     "str backend, bool has_bias, bool[] output_mask) "
     "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)")
def conv_bn_act_bwd(grad_y: Tensor, x: Tensor, weight: Optional[Tensor], z: Tensor,
                    saved: Optional[Tensor], mean: Tensor, invstd: Tensor,
                    bn_weight: Optional[Tensor], stride: List[int], padding: List[int],
                    dilation: List[int], groups: int, use_batch_stats: bool, activation: str,
                    negative_slope: float, backend: str, has_bias: bool, output_mask: List[bool]
                    ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients (x, weight, bias, bn_weight, bn_bias, residual); empty where `output_mask`
    is False. `z` is the BN input (x itself when there is no conv); `saved` is what the
    activation's backward reads (output y or pre-activation u). BN parameter gradients come
    in the statistics' dtype."""
    be = dispatch.get(backend)
    act = Activation(activation, negative_slope)
    p = _params(stride, padding, dilation, groups)
    m_x, m_w, m_b, m_bnw, m_bnb, m_res = output_mask
    need_gz = m_x or m_w or m_b
    g_u, g_z, g_bnw, g_bnb = be.bn_act_backward(grad_y, saved, z, mean, invstd, bn_weight,
                                                use_batch_stats, act, need_gz, m_bnw or m_bnb,
                                                need_gu=m_res)
    g_x = g_w = g_b = None
    if need_gz:
        if weight is None:
            g_x = g_z
        else:
            g_x, g_w, g_b = be.conv_backward(g_z, x, weight, has_bias, p, [m_x, m_w, m_b and has_bias])
    g_res = None
    if m_res:
        g_res = g_u.clone() if g_u is grad_y else g_u  # an op output must not alias an input
    return _or_empty(grad_y, g_x if m_x else None, g_w if m_w else None,
                     g_b if (m_b and has_bias) else None, g_bnw if m_bnw else None,
                     g_bnb if m_bnb else None, g_res)


@conv_bn_act_bwd.register_fake
def _(grad_y, x, weight, z, saved, mean, invstd, bn_weight, stride, padding, dilation, groups,
      use_batch_stats, activation, negative_slope, backend, has_bias, output_mask):
    m_x, m_w, m_b, m_bnw, m_bnb, m_res = output_mask
    return _or_empty(grad_y, torch.empty_like(x) if m_x else None,
                     torch.empty_like(weight) if (m_w and weight is not None) else None,
                     grad_y.new_empty(weight.shape[0]) if (m_b and has_bias and weight is not None)
                     else None, torch.empty_like(mean) if m_bnw else None,
                     torch.empty_like(mean) if m_bnb else None,
                     torch.empty_like(grad_y) if m_res else None)


def _param_grad(g: Tensor, like: Optional[Tensor], needed: bool) -> Optional[Tensor]:
    if not needed or like is None:
        return None
    return g.to(like.dtype)


class ConvBNActFunction(torch.autograd.Function):
    """y = act(bn(conv(x, weight, bias)) + residual), with `weight=None` meaning no conv.

    `ConvBNActFunction.apply(x, weight, bias, bn_weight, bn_bias, running_mean, running_var,
    num_batches_tracked, residual, config)` with `config` an `OpConfig`. Arguments are not
    checked here; `resfuse.functional.conv_bn_act` checks them and picks the backend. Not
    twice differentiable.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, bn_weight, bn_bias, running_mean, running_var,
                num_batches_tracked, residual, config: OpConfig):
        c = config
        n = ctx.needs_input_grad
        save = any(n[:5]) or n[8]
        y, z, mean, invstd, u = torch.ops.resfuse.conv_bn_act_fwd(
            x, weight, bias, bn_weight, bn_bias, running_mean, running_var, num_batches_tracked,
            residual, list(c.stride), list(c.padding), list(c.dilation), c.groups, c.training,
            c.momentum, c.eps, c.activation, c.negative_slope, c.backend, save)
        if save:
            saves = dispatch.get(c.backend).forward_saves(Activation(c.activation, c.negative_slope))
            saved = y if saves == "output" else (u if saves in ("input", "mask") else None)
            ctx.save_for_backward(x, weight, z if weight is not None else x, saved, mean,
                                  invstd, bn_weight, bn_bias, bias)
            ctx.config = c
            ctx.use_batch_stats = c.training or running_mean is None
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y):
        x, weight, z, saved, mean, invstd, bn_weight, bn_bias, bias = ctx.saved_tensors
        c = ctx.config
        n = ctx.needs_input_grad
        mask = [n[0], n[1] and weight is not None, n[2] and bias is not None,
                n[3] and bn_weight is not None, n[4] and bn_bias is not None, n[8]]
        g = torch.ops.resfuse.conv_bn_act_bwd(
            grad_y, x, weight, z, saved, mean, invstd, bn_weight, list(c.stride),
            list(c.padding), list(c.dilation), c.groups, ctx.use_batch_stats, c.activation,
            c.negative_slope, c.backend, bias is not None, mask)
        g_x, g_w, g_b, g_bnw, g_bnb, g_res = (t if m else None for t, m in zip(g, mask))
        return (g_x, g_w, g_b, _param_grad(g_bnw, bn_weight, mask[3]),
                _param_grad(g_bnb, bn_bias, mask[4]), None, None, None, g_res, None)


# ============================================================== bn -> act -> conv (+res)

@_op("bn_act_conv_fwd(Tensor x, Tensor? bn_weight, Tensor? bn_bias, "
     "Tensor(a!)? running_mean, Tensor(b!)? running_var, Tensor(c!)? num_batches_tracked, "
     "Tensor weight, Tensor? bias, Tensor? residual, int[] stride, int[] padding, "
     "int[] dilation, int groups, bool training, float? momentum, float eps, str activation, "
     "float negative_slope, str backend, bool save_for_backward) "
     "-> (Tensor, Tensor, Tensor, Tensor)")
def bn_act_conv_fwd(x: Tensor, bn_weight: Optional[Tensor], bn_bias: Optional[Tensor],
                    running_mean: Optional[Tensor], running_var: Optional[Tensor],
                    num_batches_tracked: Optional[Tensor], weight: Tensor, bias: Optional[Tensor],
                    residual: Optional[Tensor], stride: List[int], padding: List[int],
                    dilation: List[int], groups: int, training: bool, momentum: Optional[float],
                    eps: float, activation: str, negative_slope: float, backend: str,
                    save_for_backward: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Returns (y, a, mean, invstd); a = act(bn(x)) (the conv's input) and the statistics
    only when `save_for_backward`."""
    be = dispatch.get(backend)
    act = Activation(activation, negative_slope)
    p = _params(stride, padding, dilation, groups)
    if not save_for_backward:
        y = be.bn_act_conv_unsaved(x, bn_weight, bn_bias, running_mean, running_var,
                                   num_batches_tracked, training, momentum, eps, weight, bias,
                                   residual, act, p)
        return y, _empty(x), _empty(x), _empty(x)
    a, mean, invstd, _ = be.bn_act_forward(x, bn_weight, bn_bias, running_mean, running_var,
                                           num_batches_tracked, training, momentum, eps, None,
                                           act, False)
    return conv_add_outputs(be, x, a, mean, invstd, weight, bias, residual, p, save_for_backward)


def conv_add_outputs(be, x: Tensor, a: Tensor, mean: Tensor, invstd: Tensor, weight: Tensor,
                     bias: Optional[Tensor], residual: Optional[Tensor], p: ConvParams,
                     save_for_backward: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """The pre-activation forward's end: y = conv(a) + residual, and (y, a, mean, invstd)
    with a and the statistics only when saving."""
    y = be.conv(a, weight, bias, p)
    if residual is not None:
        y = y.add_(residual)
    if not save_for_backward:
        return y, _empty(x), _empty(x), _empty(x)
    return y, a, mean, invstd


def bn_act_conv_fake(x: Tensor, weight: Tensor, bias: Optional[Tensor], stride, padding,
                     dilation, groups: int, save_for_backward: bool):
    """Fake outputs (y, a, mean, invstd) of a pre-activation forward op."""
    y = torch.ops.aten.convolution(x, weight, bias, stride, padding, dilation, False, [0, 0], groups)
    if not save_for_backward:
        return y, _empty(x), _empty(x), _empty(x)
    stats = x.new_empty(x.shape[1], dtype=acc_dtype(x.dtype))
    return y, torch.empty_like(x), stats, torch.empty_like(stats)


@bn_act_conv_fwd.register_fake
def _(x, bn_weight, bn_bias, running_mean, running_var, num_batches_tracked, weight, bias,
      residual, stride, padding, dilation, groups, training, momentum, eps, activation,
      negative_slope, backend, save_for_backward):
    return bn_act_conv_fake(x, weight, bias, stride, padding, dilation, groups, save_for_backward)


def preact_saved(act: Activation, x: Tensor, a: Tensor, mean: Tensor, invstd: Tensor,
                 bn_weight: Optional[Tensor], bn_bias: Optional[Tensor]) -> Optional[Tensor]:
    """What the activation's backward reads in the pre-activation form: a = act(bn(x)) itself,
    or the pre-activation bn(x), recomputed rather than stored (one tensor less to keep)."""
    if act.saves == "output":
        return a
    if act.saves == "input":
        scale, shift = bn_scale_shift(mean, invstd, bn_weight, bn_bias)
        return torch.addcmul(per_channel(shift), x, per_channel(scale)).to(x.dtype)
    return None


@_op("bn_act_conv_bwd(Tensor grad_y, Tensor x, Tensor a, Tensor weight, Tensor mean, "
     "Tensor invstd, Tensor? bn_weight, Tensor? bn_bias, int[] stride, int[] padding, "
     "int[] dilation, int groups, bool use_batch_stats, str activation, float negative_slope, "
     "str backend, bool has_bias, bool[] output_mask) -> (Tensor, Tensor, Tensor, Tensor, Tensor)")
def bn_act_conv_bwd(grad_y: Tensor, x: Tensor, a: Tensor, weight: Tensor, mean: Tensor,
                    invstd: Tensor, bn_weight: Optional[Tensor], bn_bias: Optional[Tensor],
                    stride: List[int], padding: List[int], dilation: List[int], groups: int,
                    use_batch_stats: bool, activation: str, negative_slope: float, backend: str,
                    has_bias: bool, output_mask: List[bool]
                    ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients (x, bn_weight, bn_bias, weight, bias); empty where `output_mask` is False.
    The residual's gradient is grad_y itself and never passes through here."""
    be = dispatch.get(backend)
    act = Activation(activation, negative_slope)
    p = _params(stride, padding, dilation, groups)
    m_x, m_bnw, m_bnb, m_w, m_b = output_mask
    need_ga = m_x or m_bnw or m_bnb
    g_a, g_w, g_b = be.conv_backward(grad_y, a, weight, has_bias, p, [need_ga, m_w, m_b and has_bias])
    g_x = g_bnw = g_bnb = None
    if need_ga:
        saved = preact_saved(act, x, a, mean, invstd, bn_weight, bn_bias)
        _, g_x, g_bnw, g_bnb = be.bn_act_backward(g_a, saved, x, mean, invstd, bn_weight,
                                                  use_batch_stats, act, m_x, m_bnw or m_bnb,
                                                  need_gu=False)
    return _or_empty(grad_y, g_x if m_x else None, g_bnw if m_bnw else None,
                     g_bnb if m_bnb else None, g_w if m_w else None,
                     g_b if (m_b and has_bias) else None)


@bn_act_conv_bwd.register_fake
def _(grad_y, x, a, weight, mean, invstd, bn_weight, bn_bias, stride, padding, dilation, groups,
      use_batch_stats, activation, negative_slope, backend, has_bias, output_mask):
    m_x, m_bnw, m_bnb, m_w, m_b = output_mask
    return _or_empty(grad_y, torch.empty_like(x) if m_x else None,
                     torch.empty_like(mean) if m_bnw else None,
                     torch.empty_like(mean) if m_bnb else None,
                     torch.empty_like(weight) if m_w else None,
                     grad_y.new_empty(weight.shape[0]) if (m_b and has_bias) else None)


class BNActConvFunction(torch.autograd.Function):
    """y = conv(act(bn(x)), weight, bias) + residual (pre-activation).

    `BNActConvFunction.apply(x, bn_weight, bn_bias, running_mean, running_var,
    num_batches_tracked, weight, bias, residual, config)` with `config` an `OpConfig`.
    Arguments as for `ConvBNActFunction`. Not twice differentiable.
    """

    @staticmethod
    def forward(ctx, x, bn_weight, bn_bias, running_mean, running_var, num_batches_tracked,
                weight, bias, residual, config: OpConfig):
        c = config
        n = ctx.needs_input_grad
        save = any(n[:3]) or n[6] or n[7]
        y, a, mean, invstd = torch.ops.resfuse.bn_act_conv_fwd(
            x, bn_weight, bn_bias, running_mean, running_var, num_batches_tracked, weight, bias,
            residual, list(c.stride), list(c.padding), list(c.dilation), c.groups, c.training,
            c.momentum, c.eps, c.activation, c.negative_slope, c.backend, save)
        if save:
            ctx.save_for_backward(x, a, weight, mean, invstd, bn_weight, bn_bias, bias)
            ctx.config = c
            ctx.use_batch_stats = c.training or running_mean is None
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y):
        n = ctx.needs_input_grad
        g_x = g_bnw = g_bnb = g_w = g_b = None
        if any(n[:3]) or n[6] or n[7]:
            x, a, weight, mean, invstd, bn_weight, bn_bias, bias = ctx.saved_tensors
            c = ctx.config
            mask = [n[0], n[1] and bn_weight is not None, n[2] and bn_bias is not None, n[6],
                    n[7] and bias is not None]
            g = torch.ops.resfuse.bn_act_conv_bwd(
                grad_y, x, a, weight, mean, invstd, bn_weight, bn_bias, list(c.stride),
                list(c.padding), list(c.dilation), c.groups, ctx.use_batch_stats, c.activation,
                c.negative_slope, c.backend, bias is not None, mask)
            g_x, g_bnw, g_bnb, g_w, g_b = (t if m else None for t, m in zip(g, mask))
            g_bnw = _param_grad(g_bnw, bn_weight, mask[1])
            g_bnb = _param_grad(g_bnb, bn_bias, mask[2])
        g_res = grad_y if n[8] else None
        return g_x, g_bnw, g_bnb, None, None, None, g_w, g_b, g_res, None
