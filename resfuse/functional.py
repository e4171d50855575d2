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

`process_group=` (a `torch.distributed` process group) synchronises the batch statistics across
the group's processes in training, as `nn.SyncBatchNorm` does (see `resfuse.sync_ops`); with
one process, or in eval mode, it changes nothing.

Under `torch.autocast` the ops do what the eager chain does: the convolution runs in the
autocast dtype (x, weight and bias cast to it), BN keeps its parameters and accumulates its
statistics in fp32, and the output has the dtype the chain's would. A residual of another
dtype joins in the BN output's dtype, as torchvision's in-place `out += identity` does.
"""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F

from . import backend as dispatch, one_d, reference
from .activations import ActivationLike, as_activation
from .backend.base import Case
from .backend.base import BackendUnavailable, acc_dtype, memory_format_of
from .ops import (BNActConvBNActFunction, BNActConvFunction, ConvBNActFunction,
                  ConvStatsFunction, OpConfig)
from .sync_ops import SyncBNActConvFunction, SyncConvBNActFunction
from .validation import (ConvParams, ResfuseInputError, check_batch_stats, check_bn, check_conv,
                         check_input, check_memory, check_residual, conv_params)

Tensor = torch.Tensor
_NO_CONV = ConvParams()


def _channels_last(x: Tensor) -> bool:
    return memory_format_of(x) == torch.channels_last


def _pre_pad(x: Tensor, cp: ConvParams) -> Tensor:
    right, bottom = cp.pre_pad
    return F.pad(x, (0, right, 0, bottom)) if (right or bottom) else x


def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _check_weight_type(weight):
    if not isinstance(weight, Tensor):
        raise ResfuseInputError(f"weight: expected a Tensor, got {type(weight).__name__}")


def _sync_group(process_group, training: bool):
    """The process group to synchronise BN statistics over, or None: as nn.SyncBatchNorm,
    only in training and only with more than one process in the group."""
    if process_group is None:
        return None
    import torch.distributed as dist
    if not (dist.is_available() and isinstance(process_group, dist.ProcessGroup)):
        raise ResfuseInputError("process_group: expected a torch.distributed ProcessGroup or "
                                f"None, got {type(process_group).__name__}")
    if not training:
        return None
    return process_group if dist.get_world_size(process_group) > 1 else None


def _autocast_dtype(x: Tensor) -> Optional[torch.dtype]:
    """The autocast dtype for x's device when autocast is on there, else None."""
    device_type = x.device.type
    if not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


def _amp_cast(t: Optional[Tensor], dtype: torch.dtype) -> Optional[Tensor]:
    """What autocast does to a conv's argument: floating tensors other than fp64 take `dtype`."""
    if isinstance(t, Tensor) and t.is_floating_point() and t.dtype != torch.float64:
        return t.to(dtype)
    return t


def _is_1d(x) -> bool:
    """A 1-D call (Conv1d / BatchNorm1d): x is (N, C, L); it runs as the 2-D op with H = 1."""
    return isinstance(x, Tensor) and x.dim() == 3


def _same_dtype(residual: Optional[Tensor], dtype: torch.dtype) -> Optional[Tensor]:
    if isinstance(residual, Tensor) and residual.is_floating_point() and residual.dtype != dtype:
        return residual.to(dtype)
    return residual


def conv_bn_act(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor] = None,
                bn_weight: Optional[Tensor] = None, bn_bias: Optional[Tensor] = None,
                running_mean: Optional[Tensor] = None, running_var: Optional[Tensor] = None, *,
                training: bool = False, momentum: Optional[float] = 0.1, eps: float = 1e-5,
                num_batches_tracked: Optional[Tensor] = None,
                activation: ActivationLike = "relu", negative_slope: Optional[float] = None,
                residual: Optional[Tensor] = None, stride=1, padding: Union[int, tuple, str] = 0,
                dilation=1, groups: int = 1, backend: Optional[str] = None,
                process_group=None, batch_stats: Optional[Tuple[Tensor, Tensor]] = None,
                memory: str = "default") -> Tensor:
    """act(bn(conv(x, weight, bias)) + residual). `weight=None`: no conv (see `bn_act`).

    `padding` may be an int, a pair, "same" or "valid" (as `F.conv2d`); `activation` a name
    ("identity", "relu", "leaky_relu", "silu", "gelu", "gelu_tanh"), an `nn.Module` of those
    kinds or an `Activation`; `negative_slope` sets leaky_relu's slope; `residual` must have
    the output's shape; `backend` forces "eager", "triton", "cuda" or "auto";
    `process_group` synchronises the batch statistics in training (nn.SyncBatchNorm);
    `batch_stats` (mean, biased variance) of BN's input, when already computed (`conv_stats`,
    `bn_act_conv(return_stats=True)`): trusted, used instead of another pass over it when BN
    uses batch statistics (gradients still flow through them to the BN input).
    1-D (Conv1d / BatchNorm1d): x (N, C, L), weight (C_out, C_in/groups, K), stride /
    padding / dilation an int or a 1-tuple (or "same" / "valid"), residual (N, C_out, L_out);
    the output is (N, C_out, L_out).

    `memory="low"`: the conv's output is not kept for backward, which recomputes it from x
    with the same kernel (kept: x, the statistics, what the activation's backward reads), on
    every backend (the eager one then runs its autograd Function instead of torch's chain).
    Synchronised BN (`process_group`) keeps the default.
    """
    check_memory(memory)
    if _is_1d(x):
        x, weight, residual, g = one_d.to_2d(x, weight, residual, stride, padding, dilation,
                                             groups)
        return one_d.to_1d(conv_bn_act(
            x, weight, bias, bn_weight, bn_bias, running_mean, running_var, training=training,
            momentum=momentum, eps=eps, num_batches_tracked=num_batches_tracked,
            activation=activation, negative_slope=negative_slope, residual=residual,
            stride=g.stride, padding=g.padding, dilation=g.dilation, groups=groups,
            backend=backend, process_group=process_group, batch_stats=batch_stats,
            memory=memory))
    check_input(x)
    amp = _autocast_dtype(x)
    if amp is not None:  # the chain's dtypes, then the op with autocast off
        if weight is not None:
            x, weight, bias = _amp_cast(x, amp), _amp_cast(weight, amp), _amp_cast(bias, amp)
        with torch.autocast(x.device.type, enabled=False):
            return conv_bn_act(
                x, weight, bias, bn_weight, bn_bias, running_mean, running_var,
                training=training, momentum=momentum, eps=eps,
                num_batches_tracked=num_batches_tracked, activation=activation,
                negative_slope=negative_slope, residual=_same_dtype(residual, x.dtype),
                stride=stride, padding=padding, dilation=dilation, groups=groups,
                backend=backend, process_group=process_group, batch_stats=batch_stats,
                memory=memory)
    if weight is None:
        cp, out_shape = _NO_CONV, tuple(x.shape)
        if bias is not None:
            raise ResfuseInputError("bias: a conv bias needs a conv weight (got weight=None)")
    else:
        _check_weight_type(weight)
        cp = conv_params(weight, stride, padding, dilation, groups)
        c_out, oh, ow = check_conv(x, weight, bias, cp)
        out_shape = (x.shape[0], c_out, oh, ow)
    group = _sync_group(process_group, training)
    check_bn(x, out_shape[1], bn_weight, bn_bias, running_mean, running_var,
             num_batches_tracked, momentum, eps, training, out_shape, synced=group is not None)
    check_batch_stats(batch_stats, x, out_shape[1], group is not None)
    check_residual(residual, x, out_shape)
    z_mean, z_var = batch_stats if batch_stats is not None else (None, None)
    act = as_activation(activation, negative_slope)
    be = dispatch.select_for_call(Case("conv_bn_act", x.device.type, x.dtype,
                                       _channels_last(x), cp.groups, training), backend)
    if x.shape[0] == 0 and group is None:
        # Empty batch: exactly what the module chain does (no stats update). (A synchronised
        # call goes on: every process must join the collective.)
        return reference.conv_bn_act(
            x, weight, bias, bn_weight, bn_bias, running_mean, running_var, training=training,
            momentum=momentum, eps=eps, num_batches_tracked=num_batches_tracked, activation=act,
            residual=residual, stride=stride, padding=padding, dilation=dilation, groups=groups)
    x = _pre_pad(x, cp)
    c = OpConfig(cp.stride, cp.padding, cp.dilation, cp.groups, bool(training),
                 None if momentum is None else float(momentum), float(eps), act.kind,
                 act.negative_slope, be.name, memory)
    if group is not None:
        return SyncConvBNActFunction.apply(x, weight, bias, bn_weight, bn_bias, running_mean,
                                           running_var, num_batches_tracked, residual, c, group)
    if _needs_grad(x, weight, bias, bn_weight, bn_bias, residual):
        if be.autograd_chain and memory == "default":
            return be.conv_bn_act_chain(x, weight, bias, bn_weight, bn_bias, running_mean,
                                        running_var, num_batches_tracked, residual, cp,
                                        c.training, c.momentum, c.eps, act)
        return ConvBNActFunction.apply(x, weight, bias, bn_weight, bn_bias, running_mean,
                                       running_var, num_batches_tracked, residual, c, z_mean,
                                       z_var)
    # Inference: the op alone, keeping nothing for backward.
    if weight is not None and not training and running_mean is not None:
        return torch.ops.resfuse.conv_bn_act_infer(  # BN folded into the conv
            x, weight, bias, bn_weight, bn_bias, running_mean, running_var, residual,
            list(c.stride), list(c.padding), list(c.dilation), c.groups, c.eps, c.activation,
            c.negative_slope, c.backend)
    return torch.ops.resfuse.conv_bn_act_fwd(
        x, weight, bias, bn_weight, bn_bias, running_mean, running_var, num_batches_tracked,
        residual, list(c.stride), list(c.padding), list(c.dilation), c.groups, c.training,
        c.momentum, c.eps, c.activation, c.negative_slope, c.backend, False, z_mean, z_var)[0]


def bn_act(x: Tensor, bn_weight: Optional[Tensor] = None, bn_bias: Optional[Tensor] = None,
           running_mean: Optional[Tensor] = None, running_var: Optional[Tensor] = None, *,
           training: bool = False, momentum: Optional[float] = 0.1, eps: float = 1e-5,
           num_batches_tracked: Optional[Tensor] = None, activation: ActivationLike = "relu",
           negative_slope: Optional[float] = None, residual: Optional[Tensor] = None,
           backend: Optional[str] = None, process_group=None,
           batch_stats: Optional[Tuple[Tensor, Tensor]] = None, memory: str = "default"
           ) -> Tensor:
    """act(bn(x) + residual): the scale-bias-add-activation op (timm's BatchNormAct2d).
    `batch_stats`: x's (mean, biased variance), as for `conv_bn_act`. `memory="low"` keeps
    what the default keeps (there is no conv to recompute), through the autograd Function on
    every backend."""
    return conv_bn_act(x, None, None, bn_weight, bn_bias, running_mean, running_var,
                       training=training, momentum=momentum, eps=eps,
                       num_batches_tracked=num_batches_tracked, activation=activation,
                       negative_slope=negative_slope, residual=residual, backend=backend,
                       process_group=process_group, batch_stats=batch_stats, memory=memory)


def bn_act_conv(x: Tensor, bn_weight: Optional[Tensor], bn_bias: Optional[Tensor],
                running_mean: Optional[Tensor], running_var: Optional[Tensor], weight: Tensor,
                bias: Optional[Tensor] = None, *, training: bool = False,
                momentum: Optional[float] = 0.1, eps: float = 1e-5,
                num_batches_tracked: Optional[Tensor] = None, activation: ActivationLike = "relu",
                negative_slope: Optional[float] = None, residual: Optional[Tensor] = None,
                stride=1, padding: Union[int, tuple, str] = 0, dilation=1, groups: int = 1,
                backend: Optional[str] = None, process_group=None,
                batch_stats: Optional[Tuple[Tensor, Tensor]] = None, return_stats: bool = False,
                memory: str = "default"):
    """conv(act(bn(x)), weight, bias) + residual — the pre-activation form (ResNet v2).

    `batch_stats`: x's (mean, biased variance) when already computed, as for `conv_bn_act`.
    `return_stats=True` returns (y, mean, var) with y's per-channel batch mean and biased
    variance (not differentiable; for the next BN of a chain, which may take them as its
    `batch_stats`), computed in the conv's epilogue where the backend can.
    Kept for backward: x and BN's statistics, never act(bn(x)) (recomputed), except on the
    eager backend's default path (torch's own chain, CPU speed); `memory="low"` takes that
    backend through the autograd Function too. Synchronised BN keeps act(bn(x)).
    """
    check_memory(memory)
    if not isinstance(return_stats, bool):
        raise ResfuseInputError(f"return_stats: expected a bool, got {return_stats!r}")
    if _is_1d(x):  # 1-D (Conv1d): as `conv_bn_act`
        x, weight, residual, g = one_d.to_2d(x, weight, residual, stride, padding, dilation,
                                             groups)
        return one_d.to_1d(bn_act_conv(
            x, bn_weight, bn_bias, running_mean, running_var, weight, bias, training=training,
            momentum=momentum, eps=eps, num_batches_tracked=num_batches_tracked,
            activation=activation, negative_slope=negative_slope, residual=residual,
            stride=g.stride, padding=g.padding, dilation=g.dilation, groups=groups,
            backend=backend, process_group=process_group, batch_stats=batch_stats,
            return_stats=return_stats, memory=memory))
    out = _bn_act_conv(x, bn_weight, bn_bias, running_mean, running_var, weight, bias,
                       training, momentum, eps, num_batches_tracked, activation, negative_slope,
                       residual, stride, padding, dilation, groups, backend, process_group,
                       batch_stats, return_stats, memory)
    if not return_stats:
        return out
    return out if isinstance(out, tuple) else (out, *_batch_stats_of(out))


def _batch_stats_of(y: Tensor) -> Tuple[Tensor, Tensor]:
    """y's per-channel batch (mean, biased variance) in the statistics' dtype, not recorded
    by autograd (for a path whose op does not compute them)."""
    with torch.no_grad():
        var, mean = torch.var_mean(y.to(acc_dtype(y.dtype)), dim=(0, 2, 3), correction=0)
    return mean, var


def _bn_act_conv(x, bn_weight, bn_bias, running_mean, running_var, weight, bias, training,
                 momentum, eps, num_batches_tracked, activation, negative_slope, residual, stride,
                 padding, dilation, groups, backend, process_group, batch_stats, return_stats,
                 memory="default"):
    """`bn_act_conv`: y, or (y, mean, var) where the op computed y's statistics itself."""
    check_input(x)
    amp = _autocast_dtype(x)
    if amp is not None:
        _check_weight_type(weight)
        if _amp_cast(x, amp).dtype != x.dtype:
            # BN runs in x's dtype and only the conv in the autocast dtype, as in the eager
            # chain: two ops, the conv under autocast.
            a = bn_act(x, bn_weight, bn_bias, running_mean, running_var, training=training,
                       momentum=momentum, eps=eps, num_batches_tracked=num_batches_tracked,
                       activation=activation, negative_slope=negative_slope, backend=backend,
                       process_group=process_group, batch_stats=batch_stats, memory=memory)
            y = F.conv2d(a, weight, bias, stride, padding, dilation, groups)
            return y if residual is None else y.add_(_same_dtype(residual, y.dtype))
        weight, bias = _amp_cast(weight, amp), _amp_cast(bias, amp)
        with torch.autocast(x.device.type, enabled=False):
            return _bn_act_conv(
                x, bn_weight, bn_bias, running_mean, running_var, weight, bias, training,
                momentum, eps, num_batches_tracked, activation, negative_slope,
                _same_dtype(residual, x.dtype), stride, padding, dilation, groups, backend,
                process_group, batch_stats, return_stats, memory)
    _check_weight_type(weight)
    cp = conv_params(weight, stride, padding, dilation, groups)
    c_out, oh, ow = check_conv(x, weight, bias, cp)
    group = _sync_group(process_group, training)
    check_bn(x, x.shape[1], bn_weight, bn_bias, running_mean, running_var, num_batches_tracked,
             momentum, eps, training, tuple(x.shape), synced=group is not None)
    check_batch_stats(batch_stats, x, x.shape[1], group is not None)
    check_residual(residual, x, (x.shape[0], c_out, oh, ow))
    act = as_activation(activation, negative_slope)
    be = dispatch.select_for_call(Case("bn_act_conv", x.device.type, x.dtype,
                                       _channels_last(x), cp.groups, training), backend)
    if (x.shape[0] == 0 and group is None) or cp.pre_pad != (0, 0):
        # Empty batch, or an asymmetric "same" padding (which must pad act(bn(x)), not x):
        # the module chain itself (synchronised: normalize with the group, then the conv).
        if group is not None:
            a = bn_act(x, bn_weight, bn_bias, running_mean, running_var, training=training,
                       momentum=momentum, eps=eps, num_batches_tracked=num_batches_tracked,
                       activation=act, backend=backend, process_group=process_group)
            y = F.conv2d(a, weight, bias, stride, padding, dilation, groups)
            return y if residual is None else y + residual
        return reference.bn_act_conv(
            x, bn_weight, bn_bias, running_mean, running_var, weight, bias, training=training,
            momentum=momentum, eps=eps, num_batches_tracked=num_batches_tracked, activation=act,
            residual=residual, stride=stride, padding=padding, dilation=dilation, groups=groups)
    c = OpConfig(cp.stride, cp.padding, cp.dilation, cp.groups, bool(training),
                 None if momentum is None else float(momentum), float(eps), act.kind,
                 act.negative_slope, be.name)
    if group is not None:
        return SyncBNActConvFunction.apply(x, bn_weight, bn_bias, running_mean, running_var,
                                           num_batches_tracked, weight, bias, residual, c, group)
    x_mean, x_var = batch_stats if batch_stats is not None else (None, None)
    if _needs_grad(x, weight, bias, bn_weight, bn_bias, residual):
        if be.autograd_chain and memory == "default":  # (x's statistics: its own BN pass)
            return be.bn_act_conv_chain(x, bn_weight, bn_bias, running_mean, running_var,
                                        num_batches_tracked, weight, bias, residual, cp,
                                        c.training, c.momentum, c.eps, act)
        return BNActConvFunction.apply(x, bn_weight, bn_bias, running_mean, running_var,
                                       num_batches_tracked, weight, bias, residual, c, x_mean,
                                       x_var, return_stats)
    y, _, _, _, y_mean, y_var = torch.ops.resfuse.bn_act_conv_fwd(
        x, bn_weight, bn_bias, running_mean, running_var, num_batches_tracked, weight, bias,
        residual, list(c.stride), list(c.padding), list(c.dilation), c.groups, c.training,
        c.momentum, c.eps, c.activation, c.negative_slope, c.backend, False, x_mean, x_var,
        return_stats)
    return (y, y_mean, y_var) if return_stats else y


def bn_act_conv_bn_act(x: Tensor, bn_weight: Optional[Tensor], bn_bias: Optional[Tensor],
                       running_mean: Optional[Tensor], running_var: Optional[Tensor],
                       weight: Tensor, bias: Optional[Tensor] = None,
                       out_bn_weight: Optional[Tensor] = None,
                       out_bn_bias: Optional[Tensor] = None,
                       out_running_mean: Optional[Tensor] = None,
                       out_running_var: Optional[Tensor] = None, *, training: bool = False,
                       momentum: Optional[float] = 0.1, eps: float = 1e-5,
                       num_batches_tracked: Optional[Tensor] = None,
                       out_training: Optional[bool] = None,
                       out_momentum: Optional[float] = 0.1, out_eps: float = 1e-5,
                       out_num_batches_tracked: Optional[Tensor] = None,
                       activation: ActivationLike = "relu",
                       negative_slope: Optional[float] = None,
                       residual: Optional[Tensor] = None, stride=1,
                       padding: Union[int, tuple, str] = 0, dilation=1, groups: int = 1,
                       backend: Optional[str] = None,
                       batch_stats: Optional[Tuple[Tensor, Tensor]] = None,
                       memory: str = "low") -> Tensor:
    """act(bn_out(conv(act(bn(x)), weight, bias)) + residual): a residual block's last conv
    with its BN, the residual add and the activation (the tail of a block's chain, x being
    the previous conv's output z, `batch_stats` its statistics).

    bn (`bn_weight` ... `num_batches_tracked`, `training`, `momentum`, `eps`) is the BN
    applied to x, bn_out (the `out_*` arguments; `out_training` None: as `training`) the one
    after the conv. `memory="low"`: kept for backward are x, both BNs' statistics and what the
    activation's backward reads (a 1-bit mask for relu on the kernel backends), not the conv's
    output, which the backward recomputes from x with the same kernel and the statistics the
    forward used (no running statistic updated twice): `BNActConvBNActFunction`.
    `memory="default"`: `bn_act_conv(..., return_stats=True)` then `bn_act(batch_stats=...)`,
    keeping the conv's output too. Same results and side effects either way.
    """
    check_memory(memory)
    check_input(x)
    _check_weight_type(weight)
    out_training = training if out_training is None else out_training
    cp = conv_params(weight, stride, padding, dilation, groups)
    c_out, oh, ow = check_conv(x, weight, bias, cp)
    out_shape = (x.shape[0], c_out, oh, ow)
    check_bn(x, x.shape[1], bn_weight, bn_bias, running_mean, running_var, num_batches_tracked,
             momentum, eps, training, tuple(x.shape), synced=False)
    try:
        check_bn(x, c_out, out_bn_weight, out_bn_bias, out_running_mean, out_running_var,
                 out_num_batches_tracked, out_momentum, out_eps, out_training, out_shape,
                 synced=False)
    except ResfuseInputError as e:  # the same checks, named as this function's arguments
        raise ResfuseInputError(f"out_{e}") from None
    check_batch_stats(batch_stats, x, x.shape[1], False)
    check_residual(residual, x, out_shape)
    act = as_activation(activation, negative_slope)
    be = dispatch.select_for_call(Case("bn_act_conv", x.device.type, x.dtype,
                                       _channels_last(x), cp.groups, training), backend)
    leaves = (x, bn_weight, bn_bias, weight, bias, out_bn_weight, out_bn_bias, residual)
    if (memory == "default" or not _needs_grad(*leaves) or _autocast_dtype(x) is not None
            or x.shape[0] == 0 or cp.pre_pad != (0, 0)):
        # Nothing to save (or a case the two ops handle): the two ops.
        z = bn_act_conv(x, bn_weight, bn_bias, running_mean, running_var, weight, bias,
                        training=training, momentum=momentum, eps=eps,
                        num_batches_tracked=num_batches_tracked, activation=act,
                        stride=stride, padding=padding, dilation=dilation, groups=groups,
                        backend=backend, batch_stats=batch_stats, return_stats=True,
                        memory=memory)
        z, z_mean, z_var = z
        return bn_act(z, out_bn_weight, out_bn_bias, out_running_mean, out_running_var,
                      training=out_training, momentum=out_momentum, eps=out_eps,
                      num_batches_tracked=out_num_batches_tracked, activation=act,
                      residual=residual, backend=backend,
                      batch_stats=(z_mean, z_var) if x.shape[0] else None, memory=memory)
    c = OpConfig(cp.stride, cp.padding, cp.dilation, cp.groups, bool(training),
                 None if momentum is None else float(momentum), float(eps), act.kind,
                 act.negative_slope, be.name, memory)
    c_out_bn = OpConfig(training=bool(out_training),
                        momentum=None if out_momentum is None else float(out_momentum),
                        eps=float(out_eps), backend=be.name)
    x_mean, x_var = batch_stats if batch_stats is not None else (None, None)
    return BNActConvBNActFunction.apply(
        x, bn_weight, bn_bias, running_mean, running_var, num_batches_tracked, weight, bias,
        out_bn_weight, out_bn_bias, out_running_mean, out_running_var, out_num_batches_tracked,
        residual, c, c_out_bn, x_mean, x_var)


def conv_stats(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, *, stride=1,
               padding: Union[int, tuple, str] = 0, dilation=1, groups: int = 1,
               backend: Optional[str] = None) -> Tuple[Tensor, Tensor, Tensor]:
    """(z, mean, var): z = conv2d(x, weight, bias) and its per-channel batch mean and biased
    variance (fp32; fp64 for fp64 data; not differentiable), from the conv's epilogue where
    the backend can — the head of a block's chain, whose next op (`bn_act_conv` or `bn_act`
    with `batch_stats=(mean, var)`) applies the BN without another pass over z. 1-D (3-D x
    and weight) as `conv_bn_act`."""
    if _is_1d(x):
        x, weight, _, g = one_d.to_2d(x, weight, None, stride, padding, dilation, groups)
        return one_d.to_1d(conv_stats(x, weight, bias, stride=g.stride, padding=g.padding,
                                      dilation=g.dilation, groups=groups, backend=backend))
    check_input(x)
    amp = _autocast_dtype(x)
    if amp is not None:
        x, weight, bias = _amp_cast(x, amp), _amp_cast(weight, amp), _amp_cast(bias, amp)
        with torch.autocast(x.device.type, enabled=False):
            return conv_stats(x, weight, bias, stride=stride, padding=padding,
                              dilation=dilation, groups=groups, backend=backend)
    _check_weight_type(weight)
    cp = conv_params(weight, stride, padding, dilation, groups)
    check_conv(x, weight, bias, cp)
    be = dispatch.select_for_call(Case("conv_bn_act", x.device.type, x.dtype,
                                       _channels_last(x), cp.groups, True), backend)
    x = _pre_pad(x, cp)
    if x.shape[0] == 0 or be.autograd_chain:
        z = F.conv2d(x, weight, bias, cp.stride, cp.padding, cp.dilation, cp.groups)
        return (z, *_batch_stats_of(z))
    c = OpConfig(cp.stride, cp.padding, cp.dilation, cp.groups, backend=be.name)
    if _needs_grad(x, weight, bias):
        return ConvStatsFunction.apply(x, weight, bias, c)
    return tuple(torch.ops.resfuse.conv_stats_fwd(x, weight, bias, list(c.stride),
                                                  list(c.padding), list(c.dilation), c.groups,
                                                  c.backend))


def fuses_block_chain(x: Tensor, backend: Optional[str] = None) -> bool:
    """Whether the backend that runs x's ops applies BN + activation in its convolutions'
    prologue, so that a residual block in training is best run as the fused chain (docs/design.md)
    (`conv_stats`, then `bn_act_conv(batch_stats=..., return_stats=True)` per conv, then
    `bn_act(batch_stats=..., residual=...)`): no normalized activation is ever written."""
    try:
        be = dispatch.select_for_call(Case("bn_act_conv", x.device.type, x.dtype,
                                           x.dim() == 4 and _channels_last(x), 1, True), backend)
    except BackendUnavailable:
        return False  # the ops themselves say why, with the error of a forced backend
    return be.conv_prologue
