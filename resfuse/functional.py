"""Public functions: check the arguments, pick the backend, call the op.

* `conv_bn_act(x, weight, bias, bn_weight, bn_bias, running_mean, running_var, ...)`
      y = act(bn(conv(x)) + residual)
* `bn_act(x, bn_weight, bn_bias, running_mean, running_var, ...)`
      y = act(bn(x) + residual)
* `bn_act_conv(x, bn_weight, bn_bias, running_mean, running_var, weight, bias, ...)`
      y = conv(act(bn(x))) + residual                 (pre-activation)

BN follows `F.batch_norm`'s convention plus the module's bookkeeping: `training=True` uses
batch statistics and, when `running_mean`/`running_var` are given, updates them (unbiased
variance; `momentum=None` is the cumulative average and needs `num_batches_tracked`, which is
incremented as `nn.BatchNorm2d` does); `running_mean=None` means track_running_stats=False.
Every argument is checked before anything is written (see `resfuse.validation`).
"""
from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn.functional as F

from . import backend as dispatch, reference
from .activations import ActivationLike, as_activation
from .backend.base import Case
from .ops import BNActConvFunction, ConvBNActFunction, OpConfig
from .validation import (ConvParams, ResfuseInputError, check_bn, check_conv, check_input,
                         check_residual, conv_params)

Tensor = torch.Tensor
_NO_CONV = ConvParams()


def _channels_last(x: Tensor) -> bool:
    return x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


def _pre_pad(x: Tensor, cp: ConvParams) -> Tensor:
    right, bottom = cp.pre_pad
    return F.pad(x, (0, right, 0, bottom)) if (right or bottom) else x


def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _check_weight_type(weight):
    if not isinstance(weight, Tensor):
        raise ResfuseInputError(f"weight: expected a Tensor, got {type(weight).__name__}")


def conv_bn_act(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor] = None,
                bn_weight: Optional[Tensor] = None, bn_bias: Optional[Tensor] = None,
                running_mean: Optional[Tensor] = None, running_var: Optional[Tensor] = None, *,
                training: bool = False, momentum: Optional[float] = 0.1, eps: float = 1e-5,
                num_batches_tracked: Optional[Tensor] = None,
                activation: ActivationLike = "relu", negative_slope: Optional[float] = None,
                residual: Optional[Tensor] = None, stride=1, padding: Union[int, tuple, str] = 0,
                dilation=1, groups: int = 1, backend: Optional[str] = None) -> Tensor:
    """act(bn(conv(x, weight, bias)) + residual). `weight=None`: no conv (see `bn_act`).

    `padding` may be an int, a pair, "same" or "valid" (as `F.conv2d`); `activation` a name
    ("identity", "relu", "leaky_relu", "silu", "gelu", "gelu_tanh"), an `nn.Module` of those
    kinds or an `Activation`; `negative_slope` sets leaky_relu's slope; `residual` must have
    the output's shape; `backend` forces "eager", "triton", "cuda" or "auto".
    """
    check_input(x)
    if weight is None:
        cp, out_shape = _NO_CONV, tuple(x.shape)
        if bias is not None:
            raise ResfuseInputError("bias: a conv bias needs a conv weight (got weight=None)")
    else:
        _check_weight_type(weight)
        cp = conv_params(weight, stride, padding, dilation, groups)
        c_out, oh, ow = check_conv(x, weight, bias, cp)
        out_shape = (x.shape[0], c_out, oh, ow)
    check_bn(x, out_shape[1], bn_weight, bn_bias, running_mean, running_var,
             num_batches_tracked, momentum, eps, training, out_shape)
    check_residual(residual, x, out_shape)
    act = as_activation(activation, negative_slope)
    be = dispatch.select(Case("conv_bn_act", x.device.type, x.dtype, _channels_last(x),
                              cp.groups, training), backend)
    if x.shape[0] == 0:  # empty batch: exactly what the module chain does (no stats update)
        return reference.conv_bn_act(
            x, weight, bias, bn_weight, bn_bias, running_mean, running_var, training=training,
            momentum=momentum, eps=eps, num_batches_tracked=num_batches_tracked, activation=act,
            residual=residual, stride=stride, padding=padding, dilation=dilation, groups=groups)
    x = _pre_pad(x, cp)
    c = OpConfig(cp.stride, cp.padding, cp.dilation, cp.groups, bool(training),
                 None if momentum is None else float(momentum), float(eps), act.kind,
                 act.negative_slope, be.name)
    if _needs_grad(x, weight, bias, bn_weight, bn_bias, residual):
        if be.autograd_chain:
            return be.conv_bn_act_chain(x, weight, bias, bn_weight, bn_bias, running_mean,
                                        running_var, num_batches_tracked, residual, cp,
                                        c.training, c.momentum, c.eps, act)
        return ConvBNActFunction.apply(x, weight, bias, bn_weight, bn_bias, running_mean,
                                       running_var, num_batches_tracked, residual, c)
    # Inference: the op alone, keeping nothing for backward.
    if weight is not None and not training and running_mean is not None:
        return torch.ops.resfuse.conv_bn_act_infer(  # BN folded into the conv
            x, weight, bias, bn_weight, bn_bias, running_mean, running_var, residual,
            list(c.stride), list(c.padding), list(c.dilation), c.groups, c.eps, c.activation,
            c.negative_slope, c.backend)
    return torch.ops.resfuse.conv_bn_act_fwd(
        x, weight, bias, bn_weight, bn_bias, running_mean, running_var, num_batches_tracked,
        residual, list(c.stride), list(c.padding), list(c.dilation), c.groups, c.training,
        c.momentum, c.eps, c.activation, c.negative_slope, c.backend, False)[0]


def bn_act(x: Tensor, bn_weight: Optional[Tensor] = None, bn_bias: Optional[Tensor] = None,
           running_mean: Optional[Tensor] = None, running_var: Optional[Tensor] = None, *,
           training: bool = False, momentum: Optional[float] = 0.1, eps: float = 1e-5,
           num_batches_tracked: Optional[Tensor] = None, activation: ActivationLike = "relu",
           negative_slope: Optional[float] = None, residual: Optional[Tensor] = None,
           backend: Optional[str] = None) -> Tensor:
    """act(bn(x) + residual): the scale-bias-add-activation op (timm's BatchNormAct2d)."""
    return conv_bn_act(x, None, None, bn_weight, bn_bias, running_mean, running_var,
                       training=training, momentum=momentum, eps=eps,
                       num_batches_tracked=num_batches_tracked, activation=activation,
                       negative_slope=negative_slope, residual=residual, backend=backend)


def bn_act_conv(x: Tensor, bn_weight: Optional[Tensor], bn_bias: Optional[Tensor],
                running_mean: Optional[Tensor], running_var: Optional[Tensor], weight: Tensor,
                bias: Optional[Tensor] = None, *, training: bool = False,
                momentum: Optional[float] = 0.1, eps: float = 1e-5,
                num_batches_tracked: Optional[Tensor] = None, activation: ActivationLike = "relu",
                negative_slope: Optional[float] = None, residual: Optional[Tensor] = None,
                stride=1, padding: Union[int, tuple, str] = 0, dilation=1, groups: int = 1,
                backend: Optional[str] = None) -> Tensor:
    """conv(act(bn(x)), weight, bias) + residual — the pre-activation form (ResNet v2)."""
    check_input(x)
    _check_weight_type(weight)
    cp = conv_params(weight, stride, padding, dilation, groups)
    c_out, oh, ow = check_conv(x, weight, bias, cp)
    check_bn(x, x.shape[1], bn_weight, bn_bias, running_mean, running_var, num_batches_tracked,
             momentum, eps, training, tuple(x.shape))
    check_residual(residual, x, (x.shape[0], c_out, oh, ow))
    act = as_activation(activation, negative_slope)
    be = dispatch.select(Case("bn_act_conv", x.device.type, x.dtype, _channels_last(x),
                              cp.groups, training), backend)
    if x.shape[0] == 0 or cp.pre_pad != (0, 0):
        # Empty batch, or an asymmetric "same" padding (which must pad act(bn(x)), not x):
        # the module chain itself.
        return reference.bn_act_conv(
            x, bn_weight, bn_bias, running_mean, running_var, weight, bias, training=training,
            momentum=momentum, eps=eps, num_batches_tracked=num_batches_tracked, activation=act,
            residual=residual, stride=stride, padding=padding, dilation=dilation, groups=groups)
    c = OpConfig(cp.stride, cp.padding, cp.dilation, cp.groups, bool(training),
                 None if momentum is None else float(momentum), float(eps), act.kind,
                 act.negative_slope, be.name)
    if _needs_grad(x, weight, bias, bn_weight, bn_bias, residual):
        if be.autograd_chain:
            return be.bn_act_conv_chain(x, bn_weight, bn_bias, running_mean, running_var,
                                        num_batches_tracked, weight, bias, residual, cp,
                                        c.training, c.momentum, c.eps, act)
        return BNActConvFunction.apply(x, bn_weight, bn_bias, running_mean, running_var,
                                       num_batches_tracked, weight, bias, residual, c)
    return torch.ops.resfuse.bn_act_conv_fwd(
        x, bn_weight, bn_bias, running_mean, running_var, num_batches_tracked, weight, bias,
        residual, list(c.stride), list(c.padding), list(c.dilation), c.groups, c.training,
        c.momentum, c.eps, c.activation, c.negative_slope, c.backend, False)[0]
