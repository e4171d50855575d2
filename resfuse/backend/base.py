"""The pieces every fused op is made of, written out in eager PyTorch ops.

`resfuse/ops.py` composes a backend's steps into the forward and backward of each op; a kernel
backend subclasses `Backend` and replaces the pieces it has kernels for (typically fusing two
neighbours into one pass), keeping the rest. The pieces, in the order a training step runs them:

forward   conv                       z = conv(x, w, b)
          bn_stats                   per-channel mean and biased variance of z (fp32/fp64)
          bn_finalize                inverse std; running-stat update as nn.BatchNorm2d, on device
          scale_shift_add_act        y = act(z * scale + shift + residual), and what backward needs
          conv_eval_folded           eval: BN folded into the conv, residual and act in its epilogue
backward  act_backward_reduce        g_u = act'(u) * g_y, and BN-backward's two per-channel sums
          bn_backward_apply          g_z from g_u and the two sums
          conv_backward              g_x, g_w, g_b

Two composite steps group the BN + activation pieces, so a backend can replace a group at once:
`bn_act_forward` (stats, finalize, scale-shift-add-act) and `bn_act_backward` (activation
backward, the two sums, the apply). This class, registered as the `pieces` backend (tests
only; `auto` never picks it), runs every piece as written here; that is the reference backward
the tests gradcheck. Statistics are accumulated in fp32 (fp64 for fp64 inputs) by torch's
deterministic reductions, so two runs on the same input give the same bits.
"""
from __future__ import annotations

from typing import List, NamedTuple, Optional, Tuple

import torch

from ..activations import Activation
from ..validation import ConvParams

Tensor = torch.Tensor
_aten = torch.ops.aten


class BackendUnavailable(RuntimeError):
    """A forced backend cannot run the call (not built, unsupported dtype/layout/device, …)."""


class Case(NamedTuple):
    """What a backend needs to know to accept or refuse a call."""
    op: str  # "conv_bn_act" | "bn_act_conv"
    device_type: str
    dtype: torch.dtype
    channels_last: bool
    groups: int = 1
    training: bool = True

    def __str__(self):
        layout = "channels_last" if self.channels_last else "NCHW"
        return f"{self.op} on {self.device_type}, {self.dtype}, {layout}, groups={self.groups}"


def memory_format_of(t: Tensor) -> torch.memory_format:
    """t's memory format: channels_last when t is channels_last (and not also contiguous, as
    tensors with unit spatial or channel sizes are), else NCHW (contiguous_format)."""
    return (torch.channels_last if t.is_contiguous(memory_format=torch.channels_last)
            and not t.is_contiguous() else torch.contiguous_format)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype of statistics: fp64 for fp64 data, fp32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def bn_scale_shift(mean: Tensor, invstd: Tensor, bn_weight: Optional[Tensor],
                   bn_bias: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
    """Per-channel (scale, shift) with bn(z) = z * scale + shift, in the statistics' dtype."""
    scale = invstd if bn_weight is None else bn_weight.to(invstd.dtype) * invstd
    shift = -mean * scale
    if bn_bias is not None:
        shift = shift + bn_bias.to(shift.dtype)
    return scale, shift


class InputPrologue(NamedTuple):
    """A conv whose input is act(x * scale + shift) per channel (the pre-activation op's
    BN + activation): a backend applies it as it loads x, or writes it first."""
    scale: Tensor
    shift: Tensor
    act: Activation


def per_channel(v: Tensor) -> Tensor:
    """(C,) -> (1, C, 1, 1) for broadcasting over NCHW in any memory format."""
    return v.view(1, -1, 1, 1)


_DIMS = (0, 2, 3)


def finalize_stats(mean: Tensor, var: Tensor, count, eps: float, running_mean: Optional[Tensor],
                   running_var: Optional[Tensor], num_batches_tracked: Optional[Tensor],
                   momentum: Optional[float]) -> Tensor:
    """`Backend.bn_finalize` as a function. `count` (values per channel) may be an int or, for
    statistics synchronised across processes, a 0-d tensor on the device (never read back)."""
    invstd = torch.rsqrt(var + eps)
    if running_mean is not None:
        if num_batches_tracked is not None:
            num_batches_tracked.add_(1)
        if momentum is None:
            # 1/num_batches_tracked read on the device; the module's .item() would sync.
            factor = (num_batches_tracked.to(torch.float64).reciprocal().to(mean.dtype)
                      if num_batches_tracked is not None else torch.zeros((), dtype=mean.dtype,
                                                                            device=mean.device))
        else:
            factor = momentum
        unbiased = var * (count / (count - 1))
        running_mean.copy_(mean * factor + running_mean.to(mean.dtype) * (1 - factor))
        running_var.copy_(unbiased * factor + running_var.to(var.dtype) * (1 - factor))
    return invstd


class Backend:
    name = "pieces"
    # True for a backend whose conv applies BN + activation to its input as it loads it
    # (`bn_act_conv` never writes act(bn(x))): a residual block in training then runs as the
    # chain of docs/design.md (`resfuse.functional.fuses_block_chain`).
    conv_prologue = False
    # True for a backend whose training forward is a chain of differentiable torch ops
    # (`conv_bn_act_chain` / `bn_act_conv_chain`) rather than the custom autograd Function.
    autograd_chain = False

    # ------------------------------------------------------------------ availability
    def unavailable_reason(self) -> Optional[str]:
        """None when the backend can run at all in this process, else why not."""
        return None

    def unsupported_reason(self, case: Case) -> Optional[str]:
        """None when the backend runs `case`, else why not (a forced backend raises with it)."""
        return None

    def auto_eligible(self, case: Case) -> bool:
        """Whether `auto` may pick this backend for `case` (e.g. never the Triton interpreter)."""
        return True

    # ------------------------------------------------------------------ forward pieces
    def forward_saves(self, act: Activation) -> str:
        """What `bn_act_forward(save_input=True)` keeps for the activation's backward:
        "nothing", "output" (y itself, kept by the op's caller), "input" (the pre-activation u,
        returned) or "mask" (a packed 1-bit mask, returned; kernel backends)."""
        return act.saves

    def conv(self, x: Tensor, weight: Tensor, bias: Optional[Tensor], p: ConvParams) -> Tensor:
        return _aten.convolution(x, weight, bias, list(p.stride), list(p.padding),
                                 list(p.dilation), False, [0, 0], p.groups)

    def conv_stats(self, x: Tensor, weight: Tensor, bias: Optional[Tensor], p: ConvParams
                   ) -> Tuple[Tensor, Optional[Tuple[Tensor, Tensor]]]:
        """(z, batch statistics of z or None): a backend whose conv can compute BN's
        statistics in its epilogue returns them (mean, biased variance, as `bn_stats`), and
        `bn_act_forward(batch_stats=...)` then skips its own pass over z."""
        return self.conv(x, weight, bias, p), None

    def bn_stats(self, z: Tensor) -> Tuple[Tensor, Tensor]:
        """Per-channel mean and biased variance, in the accumulation dtype."""
        acc = acc_dtype(z.dtype)
        var, mean = torch.var_mean(z.to(acc), dim=_DIMS, correction=0)
        return mean, var

    def bn_finalize(self, mean: Tensor, var: Tensor, count: int, eps: float,
                    running_mean: Optional[Tensor], running_var: Optional[Tensor],
                    num_batches_tracked: Optional[Tensor], momentum: Optional[float]) -> Tensor:
        """Inverse std of the batch; updates the running statistics in place exactly as
        `nn.BatchNorm2d` in training does (unbiased variance, momentum=None as cumulative
        average over `num_batches_tracked`), with no host synchronisation."""
        return finalize_stats(mean, var, count, eps, running_mean, running_var,
                              num_batches_tracked, momentum)

    def scale_shift_add_act(self, z: Tensor, scale: Tensor, shift: Tensor,
                            residual: Optional[Tensor], act: Activation, save_input: bool = True
                            ) -> Tuple[Tensor, Optional[Tensor]]:
        """y = act(z * scale + shift + residual) in z's dtype (math in the wider of z's and
        the statistics' dtype). Returns (y, u) where u, the pre-activation, is kept only when
        `save_input` and the activation's backward reads its input."""
        u = torch.addcmul(per_channel(shift), z, per_channel(scale))
        if residual is not None:
            u.add_(residual)
        if save_input and act.saves == "input":
            saved = u.to(z.dtype)
            y = act.forward(u)  # not in place: `saved` may be `u` itself
        else:
            saved = None
            y = act.forward_(u)
        return y.to(z.dtype), saved

    def bn_act_forward(self, z: Tensor, bn_weight: Optional[Tensor], bn_bias: Optional[Tensor],
                       running_mean: Optional[Tensor], running_var: Optional[Tensor],
                       num_batches_tracked: Optional[Tensor], training: bool,
                       momentum: Optional[float], eps: float, residual: Optional[Tensor],
                       act: Activation, save_input: bool,
                       batch_stats: Optional[Tuple[Tensor, Tensor]] = None):
        """y = act(bn(z) + residual) with nn.BatchNorm2d's semantics and side effects.
        Returns (y, mean, invstd, u): the statistics BN used (batch or running) and the
        pre-activation u when `save_input` and the activation's backward reads it.
        `batch_stats`: z's (mean, biased variance) already computed (`conv_stats`)."""
        mean, invstd, scale, shift = self.bn_prepare(z, bn_weight, bn_bias, running_mean,
                                                     running_var, num_batches_tracked, training,
                                                     momentum, eps, batch_stats)
        y, u = self.scale_shift_add_act(z, scale, shift, residual, act, save_input)
        return y, mean, invstd, u

    def bn_prepare(self, z: Tensor, bn_weight: Optional[Tensor], bn_bias: Optional[Tensor],
                   running_mean: Optional[Tensor], running_var: Optional[Tensor],
                   num_batches_tracked: Optional[Tensor], training: bool,
                   momentum: Optional[float], eps: float,
                   batch_stats: Optional[Tuple[Tensor, Tensor]] = None):
        """BN's statistics and affine, before it is applied: (mean, invstd, scale, shift),
        batch statistics (updating the running ones) in training or without running ones,
        else the running ones."""
        acc = acc_dtype(z.dtype)
        if training or running_mean is None:
            mean, var = batch_stats if batch_stats is not None else self.bn_stats(z)
            update = training and running_mean is not None
            invstd = self.bn_finalize(mean, var, z.numel() // z.shape[1], eps,
                                      running_mean if update else None,
                                      running_var if update else None,
                                      num_batches_tracked if update else None, momentum)
        else:
            mean = running_mean.to(acc, copy=True)
            invstd = torch.rsqrt(running_var.to(acc) + eps)
        scale, shift = bn_scale_shift(mean, invstd, bn_weight, bn_bias)
        return mean, invstd, scale, shift

    def bn_act_conv(self, x: Tensor, bn_weight: Optional[Tensor], bn_bias: Optional[Tensor],
                    running_mean: Optional[Tensor], running_var: Optional[Tensor],
                    num_batches_tracked: Optional[Tensor], training: bool,
                    momentum: Optional[float], eps: float,
                    batch_stats: Optional[Tuple[Tensor, Tensor]], act: Activation,
                    weight: Tensor, bias: Optional[Tensor], residual: Optional[Tensor],
                    p: ConvParams, out_stats: bool = False):
        """y = conv(act(bn(x))) + residual with nn.BatchNorm2d's semantics and side effects
        (`batch_stats`: x's batch statistics already computed, as in `bn_act_forward`).
        Returns (y, a, mean, invstd, y_stats): a = act(bn(x)) when this backend wrote it
        (kept for the weight gradient; None from a backend whose conv applies BN + activation
        as it loads x, its prologue, and never writes a), the statistics BN used, and y's batch
        (mean, biased variance) when `out_stats` (from the conv's epilogue where it can)."""
        kw = {} if batch_stats is None else {"batch_stats": batch_stats}
        a, mean, invstd, _ = self.bn_act_forward(x, bn_weight, bn_bias, running_mean,
                                                 running_var, num_batches_tracked, training,
                                                 momentum, eps, None, act, False, **kw)
        if out_stats and residual is None:
            y, stats = self.conv_stats(a, weight, bias, p)
        else:
            y, stats = self.conv(a, weight, bias, p), None
        if residual is not None:
            y = y.add_(residual)
        if out_stats and stats is None:
            stats = self.bn_stats(y)
        return y, a, mean, invstd, stats

    def bn_act_backward(self, grad_y: Tensor, saved: Optional[Tensor], z: Tensor, mean: Tensor,
                        invstd: Tensor, bn_weight: Optional[Tensor], use_batch_stats: bool,
                        act: Activation, need_gz: bool, need_bn_grads: bool, need_gu: bool = True):
        """Backward of `bn_act_forward`: (g_u, g_z, g_bn_weight, g_bn_bias), with g_u the
        gradient of the pre-activation (= the residual's gradient); None where not needed
        (a backend may skip writing g_u when `need_gu` is False). BN parameter gradients come
        in the statistics' dtype."""
        g_u, sum_g, sum_gz = self.act_backward_reduce(
            grad_y, saved, z, mean, act, need_sums=(use_batch_stats and need_gz) or need_bn_grads)
        g_z = None
        if need_gz:
            if use_batch_stats:
                g_z = self.bn_backward_apply(g_u, z, mean, invstd, bn_weight, sum_g, sum_gz,
                                             z.numel() // z.shape[1])
            else:
                scale = invstd if bn_weight is None else bn_weight.to(invstd.dtype) * invstd
                g_z = (g_u * per_channel(scale)).to(z.dtype)
        if not need_bn_grads:
            return g_u, g_z, None, None
        return g_u, g_z, sum_gz * invstd, sum_g

    def conv_eval_folded(self, x: Tensor, residual: Optional[Tensor], act: Activation,
                         p: ConvParams, folded) -> Tensor:
        """Eval-mode forward with BN folded into the conv (`folding.FoldedConv`)."""
        y = self.conv(x, folded.weight, folded.bias, p)
        if residual is not None:
            y = y.add_(residual)
        return act.forward_(y)

    # ------------------------------------------------------------------ backward pieces
    def act_backward_reduce(self, grad_y: Tensor, saved: Optional[Tensor], z: Tensor,
                            mean: Tensor, act: Activation, need_sums: bool
                            ) -> Tuple[Tensor, Optional[Tensor], Optional[Tensor]]:
        """g_u = act'(u) * grad_y (also the residual's gradient), and BN-backward's two
        per-channel sums  sum(g_u)  and  sum(g_u * (z - mean))  in the accumulation dtype."""
        g_u = act.backward(grad_y, saved)
        if not need_sums:
            return g_u, None, None
        acc = mean.dtype
        g = g_u.to(acc)
        sum_g = g.sum(_DIMS)
        sum_gz = (g * (z.to(acc) - per_channel(mean))).sum(_DIMS)
        return g_u, sum_g, sum_gz

    def bn_backward_apply(self, g_u: Tensor, z: Tensor, mean: Tensor, invstd: Tensor,
                          bn_weight: Optional[Tensor], sum_g: Tensor, sum_gz: Tensor,
                          count: int) -> Tensor:
        """Training-mode BN backward:
        g_z = w * invstd * (g_u - sum_g / M - (z - mean) * invstd^2 * sum_gz / M)."""
        acc = mean.dtype
        a = invstd if bn_weight is None else bn_weight.to(acc) * invstd
        k = a * invstd * invstd * sum_gz / count
        g = (g_u.to(acc) - per_channel(sum_g / count)).mul_(per_channel(a))
        g.addcmul_(z.to(acc) - per_channel(mean), per_channel(k), value=-1)
        return g.to(z.dtype)

    def conv_backward(self, grad: Tensor, x: Tensor, weight: Tensor, has_bias: bool,
                      p: ConvParams, mask: List[bool],
                      prologue: Optional[InputPrologue] = None):
        """(g_x, g_w, g_b) by PyTorch's convolution backward; None where not asked. With
        `prologue` the conv's input was act(x * scale + shift) (never stored): recomputed
        here for the weight gradient."""
        if prologue is not None and mask[1]:
            x, _ = self.scale_shift_add_act(x, prologue.scale, prologue.shift, None,
                                            prologue.act, False)
        return _aten.convolution_backward(
            grad, x, weight, [weight.shape[0]] if has_bias else None, list(p.stride),
            list(p.padding), list(p.dilation), False, [0, 0], p.groups, mask)

    def preact_saved(self, act: Activation, x: Tensor, a: Optional[Tensor], mean: Tensor,
                     invstd: Tensor, bn_weight: Optional[Tensor], bn_bias: Optional[Tensor]):
        """What the activation's backward reads in the pre-activation form (the `saved` of
        `bn_act_backward`): a = act(bn(x)) itself (recomputed when None: the forward did not
        write it), or the pre-activation bn(x), recomputed rather than stored."""
        if act.saves == "nothing":
            return None
        scale, shift = bn_scale_shift(mean, invstd, bn_weight, bn_bias)
        if act.saves == "output":
            if a is None:
                a, _ = self.scale_shift_add_act(x, scale, shift, None, act, False)
            return a
        return torch.addcmul(per_channel(shift), x, per_channel(scale)).to(x.dtype)

    def conv_bn_act_backward(self, grad_y: Tensor, saved: Optional[Tensor], x: Tensor,
                             weight: Optional[Tensor], z: Tensor, mean: Tensor, invstd: Tensor,
                             bn_weight: Optional[Tensor], use_batch_stats: bool,
                             act: Activation, p: ConvParams, has_bias: bool,
                             output_mask: List[bool]):
        """Backward of act(bn(conv(x)) + residual) (no conv when `weight` is None):
        (g_x, g_w, g_b, g_bn_weight, g_bn_bias, g_residual), None where `output_mask` (same
        order) does not ask. BN's backward (`bn_act_backward`), then the conv's."""
        m_x, m_w, m_b, m_bnw, m_bnb, m_res = output_mask
        need_gz = m_x or m_w or m_b
        g_u, g_z, g_bnw, g_bnb = self.bn_act_backward(grad_y, saved, z, mean, invstd, bn_weight,
                                                      use_batch_stats, act, need_gz,
                                                      m_bnw or m_bnb, need_gu=m_res)
        g_x = g_w = g_b = None
        if need_gz:
            if weight is None:
                g_x = g_z
            else:
                g_x, g_w, g_b = self.conv_backward(g_z, x, weight, has_bias, p,
                                                   [m_x, m_w, m_b and has_bias])
        return g_x, g_w, g_b, g_bnw, g_bnb, g_u if m_res else None
