"""The `eager` backend: the pieces of `base.Backend` as they are, on any device, plus one
CPU fast path.

In eval mode on the CPU, the BN-folded convolution goes through oneDNN's fused convolution with
post-ops (`torch.ops.mkldnn._convolution_pointwise`: conv + bias + residual add + activation in
one call), the way `torch.compile`'s CPU freezing passes do. That internal op is not a public
API: where it is missing, or refuses a case (dtype, activation, shapes), the plain
conv -> add -> act pieces run instead, and the refusal is remembered so it costs one try.
oneDNN's relu post-op turns NaN into 0 (torch's relu keeps NaN), and after the residual add
oneDNN fuses no activation but relu: in those cases the activation runs as torch's own, in
place, after oneDNN's conv (+ bias + add), so NaN and Inf propagate as in eager; the eval
plans run oneDNN's relu (and clip, for relu6) only where a bound on the values shows the
pre-activation finite, where it is exactly torch's (`resfuse.value_bounds`).
`set_cpu_fused_conv(False)` turns the fast path off (tests check both paths).

`OneDNNEvalConv` is the same call prepared once for a fold (post-op attributes resolved,
weights packed into oneDNN's blocked layout per input shape) for the modules' per-module eval
plans (`resfuse.eval_plan`): it always answers in channels_last, oneDNN's preferred layout.
"""
from __future__ import annotations

import functools
from typing import Optional, Set

import torch

from ..activations import Activation
from ..validation import ConvParams
from .base import Backend, Tensor, acc_dtype, memory_format_of


def _acc(z: Tensor) -> torch.dtype:
    return acc_dtype(z.dtype)

# activation kind -> (oneDNN unary attr, scalars, algorithm). Not listed: no oneDNN post-op
# (mish: this torch's op answers "Fusion behavior undefined"), the plain pieces run. With a
# residual, oneDNN's binary-add post-op takes only relu after it on this torch (the others
# are refused once and remembered, see `_refused`).
_ONEDNN_UNARY = {
    "identity": ("none", [], None),
    "relu": ("relu", [], None),
    "silu": ("swish", [], None),
    "gelu": ("gelu", [], "none"),
    "gelu_tanh": ("gelu", [], "tanh"),
    "relu6": ("hardtanh", [0.0, 6.0], None),
    "hardswish": ("hardswish", [], None),
    "hardsigmoid": ("hardsigmoid", [], None),
}

_cpu_fused_conv = True
_refused: Set[tuple] = set()


def set_cpu_fused_conv(enabled: bool) -> bool:
    """Enable/disable the oneDNN fused eval convolution on the CPU; returns the old value."""
    global _cpu_fused_conv
    old, _cpu_fused_conv = _cpu_fused_conv, bool(enabled)
    return old


@functools.lru_cache(maxsize=None)
def _onednn_op():
    """oneDNN's fused conv op, or None where this torch has none (looked up once)."""
    try:
        return (torch.ops.mkldnn._convolution_pointwise
                if torch.backends.mkldnn.is_available() else None)
    except (AttributeError, RuntimeError):
        return None


def _onednn_sum_op():
    """The in-place variant of oneDNN's fused conv with a residual: its sum post-op adds the
    conv into its first argument. None where this torch has none."""
    try:
        return torch.ops.mkldnn._convolution_pointwise_.binary
    except (AttributeError, RuntimeError):
        return None


@torch.no_grad()
def _cumulative_update(running_mean, running_var, batch_mean, batch_var, num_batches_tracked):
    """momentum=None: running = running + (batch - running) / num_batches_tracked, after
    counting this batch, with the factor computed on the device."""
    num_batches_tracked.add_(1)
    factor = num_batches_tracked.to(torch.float64).reciprocal().to(running_mean.dtype)
    running_mean.copy_(batch_mean * factor + running_mean * (1 - factor))
    running_var.copy_(batch_var * factor + running_var * (1 - factor))


def _is_channels_last(t: Tensor) -> bool:
    return memory_format_of(t) == torch.channels_last


# Packed weights kept per fold: one per input shape seen, up to this many (then started over).
_MAX_PACKED = 16


def _packed_weight(folded, x: Tensor, args) -> Tensor:
    """The folded weight in oneDNN's blocked layout for this input shape, made once per fold
    (it is what torch.compile's CPU freezing does; up to 2x faster on large 3x3 convs)."""
    key = ("onednn", tuple(x.shape), x.dtype)
    w = folded.packed.get(key)
    if w is None:
        if len(folded.packed) >= _MAX_PACKED:
            folded.packed.clear()
        w = torch._C._nn.mkldnn_reorder_conv2d_weight(folded.weight.to_mkldnn(), *args, list(x.shape))
        folded.packed[key] = w
    return w


def _onednn_attrs(act: Activation, residual: bool):
    """(unary, scalars, algorithm, after) of oneDNN's post-ops for an activation: `after` is
    the activation torch applies (in place) after oneDNN's call, where oneDNN cannot give
    eager's result: its relu (and leaky_relu with slope 0, and clip: relu6) turns NaN into 0, where
    torch's keeps NaN; and after the residual add it fuses no activation but relu ("Unary
    Fusion behavior undefined")."""
    if act.kind in ("relu", "relu6") or (act.kind == "leaky_relu" and act.negative_slope == 0):
        return "none", [], None, act
    if residual and act.kind != "identity":
        return "none", [], None, act
    if act.kind not in _ONEDNN_UNARY and act.kind != "leaky_relu":
        return "none", [], None, act  # no oneDNN post-op for it (mish)
    if act.kind == "leaky_relu":
        return "leaky_relu", [act.negative_slope], None, None
    return _ONEDNN_UNARY[act.kind] + (None,)


def _bounded_attrs(act: Activation, residual: bool):
    """(unary, scalars) of oneDNN's own post-op for an activation `_onednn_attrs` leaves to
    torch because oneDNN turns NaN into 0 (relu, relu6, leaky_relu with slope 0): where the
    caller has shown the pre-activation finite (`resfuse.value_bounds`), it gives torch's
    values exactly. None where oneDNN has no such post-op (after a residual add: relu only)."""
    relu = act.kind == "relu" or (act.kind == "leaky_relu" and act.negative_slope == 0)
    if relu:
        return "relu", []
    if act.kind == "relu6" and not residual:
        return "hardtanh", [0.0, 6.0]
    return None


def activate_(act: Activation, y: Tensor) -> Tensor:
    """act(y) in place (relu through its own method: the cheapest call)."""
    return y.relu_() if act.kind == "relu" else act.forward_(y)


def _raw(overload):
    """The C++ callable behind an op overload (its `_op`), where this torch has one: the
    overload's own `__call__` is one more Python frame per conv. None stays None."""
    return getattr(overload, "_op", overload)


def onednn_eval_available(dtype: torch.dtype) -> bool:
    """Whether oneDNN's fused eval convolution may run on CPU tensors of `dtype` now (the
    switch is on, this torch has the op, oneDNN takes the dtype)."""
    return _cpu_fused_conv and dtype in (torch.float32, torch.bfloat16) and _onednn_op() is not None


class OneDNNEvalConv:
    """One folded eval conv prepared for oneDNN: y = act(conv(x, w', b') + residual), always
    in channels_last. `packed(x)` gives the packed weight for x's shape (made once per shape
    and fold); `__call__` takes x and the residual already in channels_last. A call oneDNN
    refuses raises RuntimeError (the caller falls back to the plain pieces).

    `bounded` (relu-like activations only, `bounded_unary` set): the caller has shown that
    the pre-activation is finite, so oneDNN's own post-op runs in place of torch's pass."""
    __slots__ = ("folded", "args", "unary", "scalars", "algo", "op", "binary", "sum_into",
                 "residual", "after", "bias", "padding", "stride", "dilation", "groups",
                 "bounded_unary")

    def __init__(self, folded, p: ConvParams, act: Activation, residual: bool):
        self.folded = folded
        self.args = (list(p.padding), list(p.stride), list(p.dilation), p.groups)
        self.unary, self.scalars, self.algo, self.after = _onednn_attrs(act, residual)
        self.bias = folded.bias
        self.padding, self.stride, self.dilation, self.groups = self.args
        op = _onednn_op()
        self.op, self.binary = _raw(getattr(op, "default", op)), _raw(op.binary)
        # oneDNN's in-place sum post-op (`_onednn_sum_op()`): the conv is added into the
        # residual's own memory, which the caller must own (`into=True`); None where this
        # torch lacks it (the binary add then writes a fresh output).
        self.sum_into = _raw(_onednn_sum_op()) if residual else None
        self.residual = residual
        self.bounded_unary = _bounded_attrs(act, residual) if self.after is not None else None

    def packed(self, x: Tensor) -> Tensor:
        return _packed_weight(self.folded, x, self.args)

    def own_activation(self, bounded: bool) -> bool:
        """Whether a call with this `bounded` runs oneDNN's post-op in place of torch's pass
        (`after`) for an activation oneDNN cannot always give."""
        return bounded and self.bounded_unary is not None

    def post_ops(self, residual: bool, bounded: bool) -> tuple:
        """(unary, scalars, after) of a call: oneDNN's post-op and the activation torch then
        applies in place (None: oneDNN's gives it)."""
        if self.own_activation(bounded):
            return self.bounded_unary + (None,)
        if residual:
            return None, [], self.after
        return self.unary, self.scalars, self.after

    def __call__(self, x: Tensor, w: Tensor, residual: Optional[Tensor],
                 into: bool = False, bounded: bool = False) -> Tensor:
        """`into`: sum into `residual` in place and return it (the caller owns it and has
        checked `sum_into`); else the result is a fresh tensor and `residual` is kept.
        `bounded`: the pre-activation is known finite (see the class)."""
        unary, scalars, after = self.post_ops(residual is not None, bounded)
        if residual is None:
            y = self.op(x, w, self.bias, self.padding, self.stride, self.dilation, self.groups,
                        unary, scalars, self.algo)
        elif into:
            y = self.sum_into(residual, x, w, self.bias, self.padding, self.stride,
                              self.dilation, self.groups, "add", None, unary, scalars, None)
        else:
            y = self.binary(x, residual, w, self.bias, self.padding, self.stride, self.dilation,
                            self.groups, "add", None, unary, scalars, None)
        return y if after is None else activate_(after, y)


class EagerBackend(Backend):
    """The module chain's own kernels, three ways:

    * with gradients: the chain itself as differentiable torch ops (`conv_bn_act_chain`,
      `bn_act_conv_chain`), so autograd runs aten's backward kernels with no Python in
      between: on the CPU there is no fused kernel to win, and per-layer Python in a custom
      Function cost more than the pieces saved (a ResNet-50 training step measured several
      percent slower than eager in development; through the chain it is level);
    * the pieces of `Backend` (used when `ConvBNActFunction` is applied with this backend),
      BN + activation on aten's batch-norm kernels (`_native_batch_norm_legit`,
      `native_batch_norm_backward`), bit for bit the chain's results;
    * inference: BN folded, oneDNN's fused conv with post-ops on the CPU.
    `momentum=None` is handled on the device in every path (the module's .item() would sync).
    """
    name = "eager"
    autograd_chain = True
    # Default mode: per-layer autograd chains (aten's kernels, CPU speed), not the block chain.
    # `memory="low"` runs the block chain through the autograd Functions on this backend too.
    conv_prologue = False

    def _bn_chain(self, z, bn_weight, bn_bias, running_mean, running_var, num_batches_tracked,
                  training, momentum, eps):
        cudnn = torch.backends.cudnn.enabled
        if not (training and running_mean is not None):
            use_batch = training or running_mean is None
            return torch.batch_norm(z, bn_weight, bn_bias, None if use_batch else running_mean,
                                    None if use_batch else running_var, use_batch, 0.0, eps, cudnn)
        if momentum is not None:
            if num_batches_tracked is not None:
                num_batches_tracked.add_(1)
            return torch.batch_norm(z, bn_weight, bn_bias, running_mean, running_var, True,
                                    momentum, eps, cudnn)
        # momentum=None: momentum=1 into scratch buffers gives the batch mean and unbiased
        # variance; the cumulative average is then taken with 1/num_batches_tracked on device.
        batch_mean, batch_var = torch.zeros_like(running_mean), torch.zeros_like(running_var)
        out = torch.batch_norm(z, bn_weight, bn_bias, batch_mean, batch_var, True, 1.0, eps, cudnn)
        if num_batches_tracked is not None:
            _cumulative_update(running_mean, running_var, batch_mean, batch_var, num_batches_tracked)
        return out

    def conv_bn_act_chain(self, x, weight, bias, bn_weight, bn_bias, running_mean, running_var,
                          num_batches_tracked, residual, p: ConvParams, training, momentum, eps,
                          act: Activation):
        """act(bn(conv(x)) + residual) as differentiable torch ops (what the modules run)."""
        z = x if weight is None else self.conv(x, weight, bias, p)
        u = self._bn_chain(z, bn_weight, bn_bias, running_mean, running_var,
                           num_batches_tracked, training, momentum, eps)
        if residual is not None:
            u = u.add_(residual)  # u is BN's fresh output: in place, as torchvision's `out += identity`
        return u.relu_() if act.kind == "relu" else act.forward(u)

    def bn_act_conv_chain(self, x, bn_weight, bn_bias, running_mean, running_var,
                          num_batches_tracked, weight, bias, residual, p: ConvParams, training,
                          momentum, eps, act: Activation):
        """conv(act(bn(x))) + residual as differentiable torch ops."""
        u = self._bn_chain(x, bn_weight, bn_bias, running_mean, running_var,
                           num_batches_tracked, training, momentum, eps)
        a = u.relu_() if act.kind == "relu" else act.forward(u)
        y = self.conv(a, weight, bias, p)
        return y if residual is None else y.add_(residual)

    def bn_act_forward(self, z, bn_weight, bn_bias, running_mean, running_var,
                       num_batches_tracked, training, momentum, eps, residual, act, save_input,
                       batch_stats=None):
        # `batch_stats` is not needed: aten's batch-norm kernel computes them in its pass.
        aten = torch.ops.aten
        if training or running_mean is None:
            update = training and running_mean is not None
            if update and momentum is not None:
                u, mean, invstd = aten._native_batch_norm_legit(
                    z, bn_weight, bn_bias, running_mean, running_var, True, momentum, eps)
                if num_batches_tracked is not None:
                    num_batches_tracked.add_(1)
            elif update:
                # momentum=None: the cumulative average needs 1/num_batches_tracked, which the
                # module reads with .item(); here it stays on the device. momentum=1 into
                # scratch buffers yields the batch mean and unbiased variance.
                batch_mean, batch_var = torch.zeros_like(running_mean), torch.zeros_like(running_var)
                u, mean, invstd = aten._native_batch_norm_legit(
                    z, bn_weight, bn_bias, batch_mean, batch_var, True, 1.0, eps)
                if num_batches_tracked is not None:
                    _cumulative_update(running_mean, running_var, batch_mean, batch_var,
                                       num_batches_tracked)
            else:
                u, mean, invstd = aten._native_batch_norm_legit.no_stats(
                    z, bn_weight, bn_bias, True, 0.0, eps)
        else:
            u = aten._native_batch_norm_legit_no_training(
                z, bn_weight, bn_bias, running_mean, running_var, 0.0, eps)[0]
            mean = running_mean.to(_acc(z), copy=True)
            invstd = torch.rsqrt(running_var.to(_acc(z)) + eps)
        if residual is not None:
            u.add_(residual)  # u is this op's own temporary
        if save_input and act.saves == "input":
            return act.forward(u), mean, invstd, u
        return act.forward_(u), mean, invstd, None

    def bn_act_backward(self, grad_y, saved, z, mean, invstd, bn_weight, use_batch_stats, act,
                        need_gz, need_bn_grads, need_gu=True):
        if not use_batch_stats or (need_bn_grads and bn_weight is None):
            return super().bn_act_backward(grad_y, saved, z, mean, invstd, bn_weight,
                                           use_batch_stats, act, need_gz, need_bn_grads)
        g_u = act.backward(grad_y, saved)
        # eps is unused in training mode (save_invstd is given).
        g_z, g_w, g_b = torch.ops.aten.native_batch_norm_backward(
            g_u, z, bn_weight, None, None, mean, invstd, True, 0.0,
            [need_gz, need_bn_grads, need_bn_grads])
        if not need_bn_grads:
            return g_u, g_z, None, None
        return g_u, g_z, g_w.to(mean.dtype), g_b.to(mean.dtype)

    def conv_eval_folded(self, x: Tensor, residual: Optional[Tensor], act: Activation,
                         p: ConvParams, folded) -> Tensor:
        y = self._onednn_fused(x, residual, act, p, folded)
        if y is not None:
            return y
        return super().conv_eval_folded(x, residual, act, p, folded)

    def _onednn_fused(self, x, residual, act, p, folded) -> Optional[Tensor]:
        if not (_cpu_fused_conv and x.device.type == "cpu"
                and x.dtype in (torch.float32, torch.bfloat16)):
            return None
        op = _onednn_op()
        if op is None:
            return None
        unary, scalars, algo, after = _onednn_attrs(act, residual is not None)
        # The output layout must be eager's: channels_last iff the input or the weight is.
        channels_last = _is_channels_last(x) or _is_channels_last(folded.weight)
        key = (x.dtype, act.kind, residual is not None, channels_last, p.groups)
        if key in _refused:
            return None
        args = (list(p.padding), list(p.stride), list(p.dilation), p.groups)
        try:
            # A pre-packed weight makes oneDNN answer in channels_last whatever the input's
            # layout, so it is used only where that is the layout eager would give.
            w = _packed_weight(folded, x, args) if channels_last else folded.weight
            b = folded.bias
            if residual is None:
                y = op(x, w, b, *args, unary, scalars, algo)
            else:
                # oneDNN's binary post-op wants the residual in the output's layout.
                fmt = torch.channels_last if channels_last else torch.contiguous_format
                other = residual.contiguous(memory_format=fmt)
                y = op.binary(x, other, w, b, *args, "add", None, None, [], None)
            return y if after is None else after.forward_(y)
        except RuntimeError:
            _refused.add(key)
            return None
