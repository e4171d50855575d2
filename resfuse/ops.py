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
from .backend.base import InputPrologue, acc_dtype, bn_scale_shift, memory_format_of
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
    # "default" or "low": with "low", `ConvBNActFunction` keeps the conv's input instead of its
    # output z and recomputes z in backward (see `conv_fwd`).
    memory: str = "default"


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


def conv_format(x: Tensor, weight: Tensor) -> torch.memory_format:
    """The memory format of a conv's output, on every backend and in the fake
    implementations: channels_last when x or the weight is channels_last
    (`memory_format_of`), else NCHW — what eager's convolution gives on cuDNN and oneDNN.
    One rule, so that real and fake outputs agree, as torch.compile requires (aten's other
    convolution paths may differ: their output is copied)."""
    cl = torch.channels_last
    return cl if cl in (memory_format_of(x), memory_format_of(weight)) else torch.contiguous_format


def _with_strides(t: Optional[Tensor], target: Tensor) -> Optional[Tensor]:
    """t, or a copy of it with `target`'s strides (a meta tensor of t's shape) if they differ."""
    if t is None or t.numel() == 0 or t.stride() == target.stride():
        return t
    return torch.empty_strided(t.shape, target.stride(), dtype=t.dtype,
                               device=t.device).copy_(t)


def conv_output(y: Tensor, x: Tensor, weight: Tensor) -> Tensor:
    """A conv output (real) in `conv_format(x, weight)`, as the fake implementations promise."""
    return _with_strides(y, torch.empty(y.shape, device="meta",
                                        memory_format=conv_format(x, weight)))


def like(t: Optional[Tensor], ref: Tensor) -> Optional[Tensor]:
    """A gradient (real) with the strides `torch.empty_like(ref)` has, as the fakes promise
    (aten's convolution backward may return another layout for mixed-format inputs)."""
    return _with_strides(t, torch.empty_like(ref, device="meta"))


def fake_conv(x: Tensor, weight: Tensor, bias: Optional[Tensor], stride, padding, dilation,
              groups: int) -> Tensor:
    """The fake conv output: aten's shape, `conv_format(x, weight)`."""
    y = torch.ops.aten.convolution(x, weight, bias, stride, padding, dilation, False, [0, 0],
                                   groups)
    return torch.empty(y.shape, dtype=y.dtype, device=y.device,
                       memory_format=conv_format(x, weight))


def _not_aliasing(t: Tensor, *inputs: Optional[Tensor]) -> Tensor:
    """t, or a copy of it where it is one of `inputs` (op outputs may not alias inputs: given
    batch statistics come back as the statistics BN used)."""
    return t.clone() if any(t is i for i in inputs) else t


def _or_empty(like: Tensor, *ts: Optional[Tensor]) -> Tuple[Tensor, ...]:
    """Each None as its own empty tensor (op outputs may not alias one another)."""
    return tuple(_empty(like) if t is None else t for t in ts)


# ============================================================== conv -> bn -> (+res) -> act

@_op("conv_bn_act_fwd(Tensor x, Tensor? weight, Tensor? bias, Tensor? bn_weight, "
     "Tensor? bn_bias, Tensor(a!)? running_mean, Tensor(b!)? running_var, "
     "Tensor(c!)? num_batches_tracked, Tensor? residual, int[] stride, int[] padding, "
     "int[] dilation, int groups, bool training, float? momentum, float eps, str activation, "
     "float negative_slope, str backend, bool save_for_backward, Tensor? z_mean=None, "
     "Tensor? z_var=None) -> (Tensor, Tensor, Tensor, Tensor, Tensor)")
def conv_bn_act_fwd(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                    bn_weight: Optional[Tensor], bn_bias: Optional[Tensor],
                    running_mean: Optional[Tensor], running_var: Optional[Tensor],
                    num_batches_tracked: Optional[Tensor], residual: Optional[Tensor],
                    stride: List[int], padding: List[int], dilation: List[int], groups: int,
                    training: bool, momentum: Optional[float], eps: float, activation: str,
                    negative_slope: float, backend: str, save_for_backward: bool,
                    z_mean: Optional[Tensor] = None, z_var: Optional[Tensor] = None
                    ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Returns (y, z, mean, invstd, u): z (the conv output), mean/invstd (what BN used) and
    u (what the backend's `forward_saves` names: the pre-activation, or a packed 1-bit mask)
    only when `save_for_backward`; z only when there is a conv. `z_mean`, `z_var`: z's batch
    mean and biased variance already computed (the op before it in a block's chain), used
    when BN uses batch statistics instead of another pass over z."""
    be = dispatch.get(backend)
    act = Activation(activation, negative_slope)
    p = _params(stride, padding, dilation, groups)
    stats = None
    if z_mean is not None and z_var is not None and (training or running_mean is None):
        stats = (z_mean, z_var)
    if stats is not None or weight is None:
        z = x if weight is None else be.conv(x, weight, bias, p)
    elif training or running_mean is None:  # batch statistics: from the conv's epilogue if it can
        z, stats = be.conv_stats(x, weight, bias, p)
    else:
        z = be.conv(x, weight, bias, p)
    if weight is not None:
        z = conv_output(z, x, weight)
    y, mean, invstd, u = be.bn_act_forward(z, bn_weight, bn_bias, running_mean, running_var,
                                           num_batches_tracked, training, momentum, eps,
                                           residual, act, save_for_backward,
                                           **({} if stats is None else {"batch_stats": stats}))
    if not save_for_backward:
        return y, _empty(x), _empty(x), _empty(x), _empty(x)
    return (y, z if weight is not None else _empty(x), _not_aliasing(mean, z_mean), invstd,
            u if u is not None else _empty(x))


@conv_bn_act_fwd.register_fake
def _(x, weight, bias, bn_weight, bn_bias, running_mean, running_var, num_batches_tracked,
      residual, stride, padding, dilation, groups, training, momentum, eps, activation,
      negative_slope, backend, save_for_backward, z_mean=None, z_var=None):
    z = x if weight is None else fake_conv(x, weight, bias, stride, padding, dilation, groups)
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
    return conv_output(be.conv_eval_folded(x, residual, Activation(activation, negative_slope),
                                           _params(stride, padding, dilation, groups), fw),
                       x, weight)


@conv_bn_act_infer.register_fake
def _(x, weight, bias, bn_weight, bn_bias, running_mean, running_var, residual, stride,
      padding, dilation, groups, eps, activation, negative_slope, backend):
    return fake_conv(x, weight, bias, stride, padding, dilation, groups)


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
    g_x, g_w, g_b, g_bnw, g_bnb, g_res = be.conv_bn_act_backward(
        grad_y, saved, x, weight, z, mean, invstd, bn_weight, use_batch_stats,
        Activation(activation, negative_slope), _params(stride, padding, dilation, groups),
        has_bias, output_mask)
    if g_res is not None and g_res is grad_y:
        g_res = g_res.clone()  # an op output must not alias an input
    m_x, m_w, m_b, m_bnw, m_bnb, m_res = output_mask
    return _or_empty(grad_y, like(g_x, x) if m_x else None,
                     like(g_w, weight) if m_w else None,
                     g_b if (m_b and has_bias) else None, g_bnw if m_bnw else None,
                     g_bnb if m_bnb else None, like(g_res, grad_y) if m_res else None)


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
    num_batches_tracked, residual, config[, z_mean, z_var])` with `config` an `OpConfig`;
    `z_mean`, `z_var`: the batch statistics of the BN input when already computed (a block's
    chain: `ConvStatsFunction`, `BNActConvFunction` with `out_stats`), then trusted and treated
    as functions of that input in the backward. With `config.memory == "low"` the conv's
    output z is not kept: the backward recomputes it from x with the same kernel (`conv_fwd`).
    Arguments are not checked here; `resfuse.functional.conv_bn_act` checks them and picks the
    backend. Not twice differentiable.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, bn_weight, bn_bias, running_mean, running_var,
                num_batches_tracked, residual, config: OpConfig, z_mean=None, z_var=None):
        c = config
        n = ctx.needs_input_grad
        save = any(n[:5]) or n[8]
        y, z, mean, invstd, u = torch.ops.resfuse.conv_bn_act_fwd(
            x, weight, bias, bn_weight, bn_bias, running_mean, running_var, num_batches_tracked,
            residual, list(c.stride), list(c.padding), list(c.dilation), c.groups, c.training,
            c.momentum, c.eps, c.activation, c.negative_slope, c.backend, save, z_mean, z_var)
        if save:
            saves = dispatch.get(c.backend).forward_saves(Activation(c.activation, c.negative_slope))
            saved = y if saves == "output" else (u if saves in ("input", "mask") else None)
            ctx.use_batch_stats = c.training or running_mean is None
            # Low memory: z is recomputed in backward by the kernel that made it (the conv with
            # its statistics epilogue when the forward computed the statistics there).
            ctx.recompute = weight is not None and c.memory == "low"
            ctx.epilogue_stats = ctx.use_batch_stats and z_mean is None
            kept_z = None if ctx.recompute else (z if weight is not None else x)
            ctx.save_for_backward(x, weight, kept_z, saved, mean, invstd, bn_weight, bn_bias,
                                  bias)
            ctx.config = c
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y):
        x, weight, z, saved, mean, invstd, bn_weight, bn_bias, bias = ctx.saved_tensors
        c = ctx.config
        n = ctx.needs_input_grad
        if ctx.recompute:
            z = torch.ops.resfuse.conv_fwd(x, weight, bias, list(c.stride), list(c.padding),
                                           list(c.dilation), c.groups, c.backend,
                                           ctx.epilogue_stats)
        mask = [n[0], n[1] and weight is not None, n[2] and bias is not None,
                n[3] and bn_weight is not None, n[4] and bn_bias is not None, n[8]]
        g = torch.ops.resfuse.conv_bn_act_bwd(
            grad_y, x, weight, z, saved, mean, invstd, bn_weight, list(c.stride),
            list(c.padding), list(c.dilation), c.groups, ctx.use_batch_stats, c.activation,
            c.negative_slope, c.backend, bias is not None, mask)
        g_x, g_w, g_b, g_bnw, g_bnb, g_res = (t if m else None for t, m in zip(g, mask))
        return (g_x, g_w, g_b, _param_grad(g_bnw, bn_weight, mask[3]),
                _param_grad(g_bnb, bn_bias, mask[4]), None, None, None, g_res, None, None, None)


# ============================================================== bn -> act -> conv (+res)

@_op("bn_act_conv_fwd(Tensor x, Tensor? bn_weight, Tensor? bn_bias, "
     "Tensor(a!)? running_mean, Tensor(b!)? running_var, Tensor(c!)? num_batches_tracked, "
     "Tensor weight, Tensor? bias, Tensor? residual, int[] stride, int[] padding, "
     "int[] dilation, int groups, bool training, float? momentum, float eps, str activation, "
     "float negative_slope, str backend, bool save_for_backward, Tensor? x_mean=None, "
     "Tensor? x_var=None, bool out_stats=False) "
     "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)")
def bn_act_conv_fwd(x: Tensor, bn_weight: Optional[Tensor], bn_bias: Optional[Tensor],
                    running_mean: Optional[Tensor], running_var: Optional[Tensor],
                    num_batches_tracked: Optional[Tensor], weight: Tensor, bias: Optional[Tensor],
                    residual: Optional[Tensor], stride: List[int], padding: List[int],
                    dilation: List[int], groups: int, training: bool, momentum: Optional[float],
                    eps: float, activation: str, negative_slope: float, backend: str,
                    save_for_backward: bool, x_mean: Optional[Tensor] = None,
                    x_var: Optional[Tensor] = None, out_stats: bool = False
                    ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Returns (y, a, mean, invstd, y_mean, y_var): a = act(bn(x)) (the conv's input) when
    saving and the backend wrote it (else empty: the backward recomputes it), the statistics
    BN used when saving, and y's batch mean and biased variance when `out_stats` (for the
    next BN of a block's chain). `x_mean`, `x_var`: x's batch statistics already computed."""
    be = dispatch.get(backend)
    act = Activation(activation, negative_slope)
    p = _params(stride, padding, dilation, groups)
    given = None
    if x_mean is not None and x_var is not None and (training or running_mean is None):
        given = (x_mean, x_var)
    y, a, mean, invstd, stats = be.bn_act_conv(x, bn_weight, bn_bias, running_mean, running_var,
                                               num_batches_tracked, training, momentum, eps,
                                               given, act, weight, bias, residual, p, out_stats)
    y = conv_output(y, x, weight)
    y_mean, y_var = stats if stats is not None else (_empty(x), _empty(x))
    if not save_for_backward:
        return y, _empty(x), _empty(x), _empty(x), y_mean, y_var
    return (y, (like(a, x) if a is not None else _empty(x)), _not_aliasing(mean, x_mean),
            invstd, y_mean, y_var)


def conv_add_outputs(be, x: Tensor, a: Tensor, mean: Tensor, invstd: Tensor, weight: Tensor,
                     bias: Optional[Tensor], residual: Optional[Tensor], p: ConvParams,
                     save_for_backward: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """The pre-activation forward's end: y = conv(a) + residual, and (y, a, mean, invstd)
    with a and the statistics only when saving."""
    y = conv_output(be.conv(a, weight, bias, p), x, weight)
    if residual is not None:
        y = y.add_(residual)
    if not save_for_backward:
        return y, _empty(x), _empty(x), _empty(x)
    return y, like(a, x), mean, invstd


def bn_act_conv_fake(x: Tensor, weight: Tensor, bias: Optional[Tensor], stride, padding,
                     dilation, groups: int, save_for_backward: bool):
    """Fake outputs (y, a, mean, invstd) of a pre-activation forward op."""
    y = fake_conv(x, weight, bias, stride, padding, dilation, groups)
    if not save_for_backward:
        return y, _empty(x), _empty(x), _empty(x)
    stats = x.new_empty(x.shape[1], dtype=acc_dtype(x.dtype))
    return y, torch.empty_like(x), stats, torch.empty_like(stats)


@bn_act_conv_fwd.register_fake
def _(x, bn_weight, bn_bias, running_mean, running_var, num_batches_tracked, weight, bias,
      residual, stride, padding, dilation, groups, training, momentum, eps, activation,
      negative_slope, backend, save_for_backward, x_mean=None, x_var=None, out_stats=False):
    y, a, mean, invstd = bn_act_conv_fake(x, weight, bias, stride, padding, dilation, groups,
                                          save_for_backward)
    if save_for_backward:
        a = _empty(x)  # never kept: the backward recomputes it
    stats = y.new_empty(y.shape[1], dtype=acc_dtype(x.dtype)) if out_stats else _empty(x)
    return y, a, mean, invstd, stats, (torch.empty_like(stats) if out_stats else _empty(x))


def preact_saved(act: Activation, x: Tensor, a: Tensor, mean: Tensor, invstd: Tensor,
                 bn_weight: Optional[Tensor], bn_bias: Optional[Tensor]) -> Optional[Tensor]:
    """`Backend.preact_saved` of the torch-op pieces (the synchronised ops' backward)."""
    return dispatch.get("pieces").preact_saved(act, x, a, mean, invstd, bn_weight, bn_bias)


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
    written = a.numel() == x.numel()
    if not written and not be.conv_backward_prologue:
        # The forward did not keep a = act(bn(x)) and this backend's conv backward reads its
        # input as it is: recompute a once, for the weight gradient and the activation's
        # backward, freed when this op returns.
        scale, shift = bn_scale_shift(mean, invstd, bn_weight, bn_bias)
        a, _ = be.scale_shift_add_act(x, scale, shift, None, act, False)
        written = True
    prologue = None
    if not written:
        # The forward applied BN + activation in the conv's prologue and never wrote
        # a = act(bn(x)): the weight gradient takes x with the same prologue.
        prologue = InputPrologue(*bn_scale_shift(mean, invstd, bn_weight, bn_bias), act)
    g_a, g_w, g_b = be.conv_backward(grad_y, a if written else x, weight, has_bias, p,
                                     [need_ga, m_w, m_b and has_bias], prologue)
    g_x = g_bnw = g_bnb = None
    if need_ga:
        saved = be.preact_saved(act, x, a if written else None, mean, invstd, bn_weight,
                                bn_bias)
        _, g_x, g_bnw, g_bnb = be.bn_act_backward(g_a, saved, x, mean, invstd, bn_weight,
                                                  use_batch_stats, act, m_x, m_bnw or m_bnb,
                                                  need_gu=False)
    return _or_empty(grad_y, like(g_x, x) if m_x else None, g_bnw if m_bnw else None,
                     g_bnb if m_bnb else None, like(g_w, weight) if m_w else None,
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
    num_batches_tracked, weight, bias, residual, config[, x_mean, x_var, out_stats])` with
    `config` an `OpConfig`; `x_mean`, `x_var` as `ConvBNActFunction`'s `z_mean`, `z_var`;
    `out_stats=True` returns (y, y_mean, y_var), y's batch statistics (not differentiable:
    the next op's backward accounts for them). Arguments as for `ConvBNActFunction`. Not twice differentiable.
    """

    @staticmethod
    def forward(ctx, x, bn_weight, bn_bias, running_mean, running_var, num_batches_tracked,
                weight, bias, residual, config: OpConfig, x_mean=None, x_var=None,
                out_stats=False):
        c = config
        n = ctx.needs_input_grad
        save = any(n[:3]) or n[6] or n[7]
        y, a, mean, invstd, y_mean, y_var = torch.ops.resfuse.bn_act_conv_fwd(
            x, bn_weight, bn_bias, running_mean, running_var, num_batches_tracked, weight, bias,
            residual, list(c.stride), list(c.padding), list(c.dilation), c.groups, c.training,
            c.momentum, c.eps, c.activation, c.negative_slope, c.backend, save, x_mean, x_var,
            bool(out_stats))
        if save:
            ctx.save_for_backward(x, a, weight, mean, invstd, bn_weight, bn_bias, bias)
            ctx.config = c
            ctx.use_batch_stats = c.training or running_mean is None
        if not out_stats:
            return y
        ctx.mark_non_differentiable(y_mean, y_var)
        return y, y_mean, y_var

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y, *_stats_grads):
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
        return g_x, g_bnw, g_bnb, None, None, None, g_w, g_b, g_res, None, None, None, None


# ============================================================== conv (+ its output's statistics)

@_op("conv_stats_fwd(Tensor x, Tensor weight, Tensor? bias, int[] stride, int[] padding, "
     "int[] dilation, int groups, str backend) -> (Tensor, Tensor, Tensor)")
def conv_stats_fwd(x: Tensor, weight: Tensor, bias: Optional[Tensor], stride: List[int],
                   padding: List[int], dilation: List[int], groups: int, backend: str
                   ) -> Tuple[Tensor, Tensor, Tensor]:
    """(z, mean, var): z = conv(x, weight, bias) and its per-channel batch mean and biased
    variance (fp32, fp64 for fp64 data), from the conv's epilogue where the backend can: the
    head of a residual block's chain, whose next op applies the BN."""
    be = dispatch.get(backend)
    z, stats = be.conv_stats(x, weight, bias, _params(stride, padding, dilation, groups))
    mean, var = stats if stats is not None else be.bn_stats(z)
    return conv_output(z, x, weight), mean, var


@conv_stats_fwd.register_fake
def _(x, weight, bias, stride, padding, dilation, groups, backend):
    z = fake_conv(x, weight, bias, stride, padding, dilation, groups)
    stats = x.new_empty(z.shape[1], dtype=acc_dtype(x.dtype))
    return torch.empty_like(z), stats, torch.empty_like(stats)


@_op("conv_fwd(Tensor x, Tensor weight, Tensor? bias, int[] stride, int[] padding, "
     "int[] dilation, int groups, str backend, bool epilogue_stats) -> Tensor")
def conv_fwd(x: Tensor, weight: Tensor, bias: Optional[Tensor], stride: List[int],
             padding: List[int], dilation: List[int], groups: int, backend: str,
             epilogue_stats: bool) -> Tensor:
    """z = conv(x, weight, bias) by the backend's kernel, with its statistics epilogue when
    `epilogue_stats` (the statistics themselves dropped): the low-memory backward's recompute
    of a conv output, by the very kernel the forward ran, so the bits are the forward's."""
    be = dispatch.get(backend)
    p = _params(stride, padding, dilation, groups)
    z = be.conv_stats(x, weight, bias, p)[0] if epilogue_stats else be.conv(x, weight, bias, p)
    return conv_output(z, x, weight)


@conv_fwd.register_fake
def _(x, weight, bias, stride, padding, dilation, groups, backend, epilogue_stats):
    return fake_conv(x, weight, bias, stride, padding, dilation, groups)


@_op("conv_bwd(Tensor grad, Tensor x, Tensor weight, int[] stride, int[] padding, "
     "int[] dilation, int groups, str backend, bool has_bias, bool[] output_mask) "
     "-> (Tensor, Tensor, Tensor)")
def conv_bwd(grad: Tensor, x: Tensor, weight: Tensor, stride: List[int], padding: List[int],
             dilation: List[int], groups: int, backend: str, has_bias: bool,
             output_mask: List[bool]) -> Tuple[Tensor, Tensor, Tensor]:
    """Gradients (x, weight, bias) of the conv; empty where `output_mask` is False."""
    return conv_grads(grad, x, weight, stride, padding, dilation, groups, backend, has_bias,
                      output_mask)


def conv_grads(grad: Tensor, x: Tensor, weight: Tensor, stride, padding, dilation, groups: int,
               backend: str, has_bias: bool, output_mask, empty_like: Optional[Tensor] = None
               ) -> Tuple[Tensor, Tensor, Tensor]:
    """The backend's conv backward laid out by the layout rule, empty (like `empty_like`,
    default `grad`) where not asked for (`conv_bwd`, and synchronised BN's last backward op)."""
    m_x, m_w, m_b = output_mask
    g_x, g_w, g_b = dispatch.get(backend).conv_backward(
        grad, x, weight, has_bias, _params(stride, padding, dilation, groups),
        [m_x, m_w, m_b and has_bias])
    return _or_empty(grad if empty_like is None else empty_like,
                     like(g_x, x) if m_x else None, like(g_w, weight) if m_w else None,
                     g_b if (m_b and has_bias) else None)


@conv_bwd.register_fake
def _(grad, x, weight, stride, padding, dilation, groups, backend, has_bias, output_mask):
    m_x, m_w, m_b = output_mask
    return _or_empty(grad, torch.empty_like(x) if m_x else None,
                     torch.empty_like(weight) if m_w else None,
                     grad.new_empty(weight.shape[0]) if (m_b and has_bias) else None)


class ConvStatsFunction(torch.autograd.Function):
    """(z, mean, var) = (conv(x, weight, bias), z's per-channel batch mean and biased variance).

    `ConvStatsFunction.apply(x, weight, bias, config)`; only `config`'s conv fields and
    backend are read. mean and var are not differentiable: they are for the next op of a
    block's chain (`BNActConvFunction` / `ConvBNActFunction` given them), whose backward
    treats them as functions of z.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, config: OpConfig):
        c = config
        z, mean, var = torch.ops.resfuse.conv_stats_fwd(
            x, weight, bias, list(c.stride), list(c.padding), list(c.dilation), c.groups,
            c.backend)
        ctx.mark_non_differentiable(mean, var)
        if any(ctx.needs_input_grad[:3]):
            ctx.save_for_backward(x, weight, bias)
            ctx.config = c
        return z, mean, var

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_z, *_stats_grads):
        x, weight, bias = ctx.saved_tensors
        c = ctx.config
        n = ctx.needs_input_grad
        mask = [n[0], n[1], n[2] and bias is not None]
        g = torch.ops.resfuse.conv_bwd(grad_z, x, weight, list(c.stride), list(c.padding),
                                       list(c.dilation), c.groups, c.backend, bias is not None,
                                       mask)
        g_x, g_w, g_b = (t if m else None for t, m in zip(g, mask))
        return g_x, g_w, g_b, None


# ============================================================== a block's tail, low memory

class BNActConvBNActFunction(torch.autograd.Function):
    """y = act(bn_out(conv(act(bn_in(x)), weight, bias)) + residual): the last conv of a
    residual block's chain with the block's last BN, residual add and activation, keeping
    neither the conv's output z nor act(bn_in(x)): the backward recomputes z from x with the
    same kernel on the same inputs (bn_in's statistics as the forward used them, no running
    statistics touched), then runs the two ops' backwards as the default mode does.

    `BNActConvBNActFunction.apply(x, bn_weight, bn_bias, running_mean, running_var,
    num_batches_tracked, weight, bias, out_bn_weight, out_bn_bias, out_running_mean,
    out_running_var, out_num_batches_tracked, residual, config, out_config, x_mean, x_var)`:
    `config` (an `OpConfig`) gives the conv, bn_in and the activation; `out_config` bn_out's
    training, momentum and eps; `x_mean`, `x_var` as `BNActConvFunction`'s. Kept: x, bn_in's
    and bn_out's statistics (per channel) and what the activation's backward reads (a 1-bit
    mask for relu on the kernel backends). Not twice differentiable.
    """

    @staticmethod
    def forward(ctx, x, bn_weight, bn_bias, running_mean, running_var, num_batches_tracked,
                weight, bias, out_bn_weight, out_bn_bias, out_running_mean, out_running_var,
                out_num_batches_tracked, residual, config: OpConfig, out_config: OpConfig,
                x_mean=None, x_var=None):
        c, co = config, out_config
        n = ctx.needs_input_grad
        save = any(n[:3]) or any(n[6:10]) or n[13]
        in_batch = c.training or running_mean is None
        out_batch = co.training or out_running_mean is None
        if in_batch and x_mean is None:  # the statistics the recompute will be handed
            with torch.no_grad():
                x_var, x_mean = torch.var_mean(x.to(acc_dtype(x.dtype)), dim=(0, 2, 3),
                                               correction=0)
        z, _, mean, invstd, z_mean, z_var = torch.ops.resfuse.bn_act_conv_fwd(
            x, bn_weight, bn_bias, running_mean, running_var, num_batches_tracked, weight, bias,
            None, list(c.stride), list(c.padding), list(c.dilation), c.groups, c.training,
            c.momentum, c.eps, c.activation, c.negative_slope, c.backend, save,
            x_mean if in_batch else None, x_var if in_batch else None, out_batch)
        y, _, out_mean, out_invstd, u = torch.ops.resfuse.conv_bn_act_fwd(
            z, None, None, out_bn_weight, out_bn_bias, out_running_mean, out_running_var,
            out_num_batches_tracked, residual, [1, 1], [0, 0], [1, 1], 1, co.training,
            co.momentum, co.eps, c.activation, c.negative_slope, c.backend, save,
            z_mean if out_batch else None, z_var if out_batch else None)
        if save:
            saves = dispatch.get(c.backend).forward_saves(Activation(c.activation, c.negative_slope))
            saved = y if saves == "output" else (u if saves in ("input", "mask") else None)
            if in_batch:
                stats = (x_mean, x_var)
            else:  # the running statistics as they are now (a later update must not matter)
                stats = (running_mean.clone(), running_var.clone())
            ctx.save_for_backward(x, weight, bias, bn_weight, bn_bias, mean, invstd, *stats,
                                  out_bn_weight, out_bn_bias, out_mean, out_invstd, saved)
            ctx.flags = (in_batch, out_batch)
            ctx.configs = (c, co)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y):
        (x, weight, bias, bn_weight, bn_bias, mean, invstd, s_mean, s_var, out_bn_weight,
         out_bn_bias, out_mean, out_invstd, saved) = ctx.saved_tensors
        c, co = ctx.configs
        in_batch, out_batch = ctx.flags
        n = ctx.needs_input_grad
        conv_args = (list(c.stride), list(c.padding), list(c.dilation), c.groups)
        # z again: the forward's kernel on the forward's inputs (with its statistics epilogue
        # where the forward had it), BN statistics given, nothing updated.
        z = torch.ops.resfuse.bn_act_conv_fwd(
            x, bn_weight, bn_bias, None if in_batch else s_mean, None if in_batch else s_var,
            None, weight, bias, None, *conv_args, in_batch, None, c.eps, c.activation,
            c.negative_slope, c.backend, False, s_mean if in_batch else None,
            s_var if in_batch else None, out_batch)[0]
        need_front = any(n[:3]) or n[6] or n[7]
        mask_out = [need_front, False, False, n[8] and out_bn_weight is not None,
                    n[9] and out_bn_bias is not None, n[13]]
        g = torch.ops.resfuse.conv_bn_act_bwd(
            grad_y, z, None, z, saved, out_mean, out_invstd, out_bn_weight, [1, 1], [0, 0],
            [1, 1], 1, out_batch, c.activation, c.negative_slope, c.backend, False, mask_out)
        del z
        g_z, g_obnw, g_obnb, g_res = g[0], g[3], g[4], g[5]
        g_x = g_bnw = g_bnb = g_w = g_b = None
        if need_front:
            mask_in = [n[0], n[1] and bn_weight is not None, n[2] and bn_bias is not None,
                       n[6], n[7] and bias is not None]
            gi = torch.ops.resfuse.bn_act_conv_bwd(
                g_z, x, _empty(x), weight, mean, invstd, bn_weight, bn_bias, *conv_args,
                in_batch, c.activation, c.negative_slope, c.backend, bias is not None, mask_in)
            g_x, g_bnw, g_bnb, g_w, g_b = (t if m else None for t, m in zip(gi, mask_in))
            g_bnw = _param_grad(g_bnw, bn_weight, mask_in[1])
            g_bnb = _param_grad(g_bnb, bn_bias, mask_in[2])
        return (g_x, g_bnw, g_bnb, None, None, None, g_w, g_b,
                _param_grad(g_obnw, out_bn_weight, mask_out[3]),
                _param_grad(g_obnb, out_bn_bias, mask_out[4]), None, None, None,
                g_res if n[13] else None, None, None, None, None)
