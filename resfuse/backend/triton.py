"""The `triton` backend: resfuse's Triton kernels (`resfuse.triton_kernels`, triton_kernels/).

Forward
- convolution: the implicit-GEMM kernel of triton_kernels/conv.py. In training it computes
  BN's batch statistics in its epilogue (`conv_stats`); the pre-activation op applies BN +
  activation in its prologue (`bn_act_conv`), so act(bn(x)) is never written, and in eval mode
  (BN folded) the bias, residual and activation are its epilogue: one kernel per conv.
- BN: batch statistics, and scale-shift + residual + activation writing y and a 1-bit mask for
  relu / leaky_relu / relu6 / hardsigmoid (the pre-activation for silu / gelu / hardswish /
  mish) (triton_kernels/bn_act.py).
A residual block in training runs as the fused chain of docs/design.md (`conv_prologue`, see
`resfuse.modules.FusedResidualBlock`).

Backward
- BN + activation: one pass reads grad_y and the mask for the residual's gradient and BN's two
  per-channel sums; the pre-activation op recomputes u = bn(x) from x (nothing stored).
- conv_bn_act: BN-backward's apply is the data- and weight-gradient kernels' prologue
  (triton_kernels/conv_backward.py): g_z is never written.
- pre-activation op: the weight gradient recomputes act(bn(x)) as it loads x.
- Which convolution backward runs where (`_TRITON_PLAIN_CONV_BACKWARD`): the Triton kernels
  where they fuse a prologue (they save a pass over memory), PyTorch's
  (`aten.convolution_backward`, cuDNN on a GPU) for a plain data or weight gradient, where a
  Triton kernel has nothing to fuse. Not yet measured on a GPU (no GPU was lent while this was
  written): bench/ runs the cases; the choice is to be revisited with its numbers.

Without a GPU the kernels run on CPU tensors under TRITON_INTERPRET=1 (fp32 and fp64): how CI
and users check them. `auto` never picks the interpreter, and does not pick this backend on a
GPU either until it has been measured faster there (bench/).
"""
from __future__ import annotations

import functools
import os
from types import SimpleNamespace
from typing import NamedTuple, Optional

import torch

from ..activations import KINDS, Activation
from ..validation import ConvParams
from .base import Backend, Case, Tensor, bn_scale_shift, memory_format_of

_ACT_CODE = {kind: i for i, kind in enumerate(KINDS)}  # triton_kernels/conv.py ACT_*
# Activations whose gradient is the upstream gradient or a constant multiple of it, chosen by
# a 1-bit test of u: a packed mask is all their backward needs.
_MASKED = ("relu", "leaky_relu", "relu6", "hardsigmoid")
_GPU_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_INTERPRETER_DTYPES = (torch.float32, torch.float64)
# False: a convolution backward with no prologue to fuse runs PyTorch's kernels (see above).
_TRITON_PLAIN_CONV_BACKWARD = False


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.lru_cache(maxsize=None)
def _kernels():
    """(namespace of the kernel modules: conv, bn, bwd), or (None, why they cannot load)."""
    try:
        from ..triton_kernels import bn_act, conv, conv_backward
    except Exception as e:  # noqa: BLE001 - triton missing or broken: say so
        return None, f"{type(e).__name__}: {e}"
    return SimpleNamespace(conv=conv, bn=bn_act, bwd=conv_backward), None


def _k():
    return _kernels()[0]


def _contiguous(t: Tensor) -> Tensor:
    """t contiguous in its own memory format (NCHW or channels_last), as the BN kernels read
    it (any other strides: one copy)."""
    return t.contiguous(memory_format=memory_format_of(t))


def _like_weight(g: Tensor, weight: Tensor) -> Tensor:
    """A weight gradient (accumulation dtype) in the weight's dtype and memory format."""
    return torch.empty_like(weight).copy_(g)


class _RecomputedU(NamedTuple):
    """`saved` of the pre-activation op's backward when its forward wrote nothing: the kernels
    recompute u = x * scale + shift from x ([2, C]: scale; shift)."""
    scale_shift: Tensor


class TritonBackend(Backend):
    name = "triton"
    conv_prologue = True
    conv_backward_prologue = True

    def unavailable_reason(self) -> Optional[str]:
        mods, why = _kernels()
        if mods is None:
            return f"not available: the Triton kernels do not load ({why})"
        if not torch.cuda.is_available() and not interpreting():
            return ("not available: no CUDA device (set TRITON_INTERPRET=1 to run the kernels "
                    "on CPU tensors in Triton's interpreter)")
        return None

    def unsupported_reason(self, case: Case) -> Optional[str]:
        if case.device_type == "cpu":
            if not interpreting():
                return "CPU tensors run only in Triton's interpreter (TRITON_INTERPRET=1)"
            if case.dtype not in _INTERPRETER_DTYPES:
                return f"the interpreter runs float32 and float64 only, got {case.dtype}"
            return None
        if case.device_type != "cuda":
            return f"it runs on CUDA tensors (or CPU tensors in the interpreter), got {case.device_type}"
        if case.dtype not in _GPU_DTYPES:
            return f"dtype {case.dtype} is not one of float32, float64, float16, bfloat16"
        return None

    def auto_eligible(self, case: Case) -> bool:
        # Never the interpreter; on a GPU not before bench/ has measured it faster.
        return False

    # ------------------------------------------------------------------ forward
    def forward_saves(self, act: Activation) -> str:
        return "mask" if act.kind in _MASKED else act.saves

    def conv(self, x: Tensor, weight: Tensor, bias: Optional[Tensor], p: ConvParams) -> Tensor:
        y, _ = _k().conv.conv2d(x, weight, bias, p.stride, p.padding, p.dilation, p.groups)
        return y

    def conv_stats(self, x: Tensor, weight: Tensor, bias: Optional[Tensor], p: ConvParams):
        """The conv with BN's batch statistics computed in its epilogue (per output tile,
        merged in a fixed order): no separate pass over z."""
        conv = _k().conv
        z, parts = conv.conv2d(x, weight, bias, p.stride, p.padding, p.dilation, p.groups,
                               stats=True)
        return z, conv.merge_stats(parts)

    def bn_act_conv(self, x, bn_weight, bn_bias, running_mean, running_var,
                    num_batches_tracked, training, momentum, eps, batch_stats, act, weight, bias,
                    residual, p, out_stats=False):
        """conv(act(bn(x))) + residual with BN + activation applied as the conv loads x (its
        prologue): act(bn(x)) is never written (a = None; the backward recomputes it), and
        with `out_stats` y's batch statistics come from the conv's epilogue."""
        conv = _k().conv
        mean, invstd, scale, shift = self.bn_prepare(x, bn_weight, bn_bias, running_mean,
                                                     running_var, num_batches_tracked, training,
                                                     momentum, eps, batch_stats)
        pro = conv.Prologue(scale, shift, _ACT_CODE[act.kind], act.negative_slope)
        epilogue_stats = out_stats and residual is None
        y, parts = conv.conv2d(x, weight, bias, p.stride, p.padding, p.dilation, p.groups,
                               prologue=pro, stats=epilogue_stats,
                               residual=None if residual is None else residual.to(x.dtype))
        stats = None
        if epilogue_stats:
            stats = conv.merge_stats(parts)
        elif out_stats:  # y includes the residual: one pass over it
            stats = self.bn_stats(y)
        return y, None, mean, invstd, stats

    def bn_stats(self, z: Tensor):
        return _k().bn.batch_stats(_contiguous(z))

    def scale_shift_add_act(self, z, scale, shift, residual, act, save_input=True):
        bn = _k().bn
        saves = self.forward_saves(act) if save_input else "nothing"
        code = {"mask": bn.SAVE_MASK, "input": bn.SAVE_INPUT}.get(saves, bn.SAVE_NONE)
        z = _contiguous(z)
        y, saved = bn.apply(z, scale, shift, None if residual is None else residual.to(z.dtype),
                            _ACT_CODE[act.kind], act.negative_slope, code)
        return y, saved

    def conv_eval_folded(self, x: Tensor, residual: Optional[Tensor], act: Activation,
                         p: ConvParams, folded) -> Tensor:
        """One kernel: the folded conv, + bias, + residual, activation (its epilogue)."""
        y, _ = _k().conv.conv2d(x, folded.weight, folded.bias, p.stride, p.padding, p.dilation,
                                p.groups,
                                residual=None if residual is None else residual.to(x.dtype),
                                act=_ACT_CODE[act.kind], slope=act.negative_slope)
        return y

    # ------------------------------------------------------------------ backward
    def _saved(self, saved, act: Activation):
        """(saved tensor or None, its bn_act SAVE_* code) for the kernels."""
        bn = _k().bn
        if isinstance(saved, _RecomputedU):
            return saved.scale_shift, bn.SAVE_RECOMPUTE
        if saved is None or act.kind == "identity":
            return None, bn.SAVE_NONE
        if saved.dtype == torch.int32:
            return saved, bn.SAVE_MASK
        return saved, (bn.SAVE_OUTPUT if act.saves == "output" else bn.SAVE_INPUT)

    def preact_saved(self, act, x, a, mean, invstd, bn_weight, bn_bias):
        """Where the forward wrote nothing, u = bn(x) is recomputed inside the backward's
        kernels from x (no tensor written)."""
        if a is not None or act.saves == "nothing":
            return super().preact_saved(act, x, a, mean, invstd, bn_weight, bn_bias)
        return _RecomputedU(torch.stack(bn_scale_shift(mean, invstd, bn_weight, bn_bias)))

    def _bn_backward(self, grad_y, saved, z, mean, invstd, bn_weight, use_batch_stats, act,
                     need_gz, need_bn_grads, need_gu):
        """BN + activation backward up to the apply: (g_u or None, the apply's coefficients
        (None when g_z is not needed), sum_g, sum_gz, the GradPrologue-style arguments)."""
        bn = _k().bn
        saved_t, save = self._saved(saved, act)
        code, slope = _ACT_CODE[act.kind], act.negative_slope
        count = z.numel() // z.shape[1]
        a = invstd if bn_weight is None else bn_weight.to(invstd.dtype) * invstd
        need_sums = (use_batch_stats and need_gz) or need_bn_grads
        g_u = sum_g = sum_gz = coef = None
        if need_sums:
            g_u, sum_g, sum_gz = bn.backward_reduce(grad_y, saved_t, save, z, mean, code, slope,
                                                    need_gu)
        elif need_gu:  # g_u alone: the apply pass with the coefficient 1
            g_u = bn.backward_apply(grad_y, saved_t, save, z, mean, torch.ones_like(a)[None],
                                    code, slope)
        if need_gz:
            if use_batch_stats:
                coef = torch.stack([a, -a * sum_g / count, -a * invstd * invstd * sum_gz / count])
            else:
                coef = a[None]  # eval: g_z = a * g_u
        return g_u, coef, sum_g, sum_gz, (saved_t, save, code, slope)

    def bn_act_backward(self, grad_y, saved, z, mean, invstd, bn_weight, use_batch_stats, act,
                        need_gz, need_bn_grads, need_gu=True):
        z = _contiguous(z)
        g_u, coef, sum_g, sum_gz, (saved_t, save, code, slope) = self._bn_backward(
            grad_y, saved, z, mean, invstd, bn_weight, use_batch_stats, act, need_gz,
            need_bn_grads, need_gu)
        g_z = None
        if need_gz:
            g_z = _k().bn.backward_apply(grad_y, saved_t, save, z, mean, coef, code, slope)
        if not need_bn_grads:
            return g_u, g_z, None, None
        return g_u, g_z, sum_gz * invstd, sum_g

    def conv_bn_act_backward(self, grad_y, saved, x, weight, z, mean, invstd, bn_weight,
                             use_batch_stats, act, p, has_bias, output_mask):
        """BN-backward's apply as the prologue of the data- and weight-gradient kernels: one
        reduction pass over grad_y (and the mask), then the two convolutions; g_z is never
        written. (A conv bias's gradient, which would read g_z, takes the unfused path.)"""
        m_x, m_w, m_b, m_bnw, m_bnb, m_res = output_mask
        if weight is None or not (m_x or m_w) or (m_b and has_bias):
            return super().conv_bn_act_backward(grad_y, saved, x, weight, z, mean, invstd,
                                                bn_weight, use_batch_stats, act, p, has_bias,
                                                output_mask)
        k = _k()
        z = _contiguous(z)
        g_u, coef, sum_g, sum_gz, (saved_t, save, code, slope) = self._bn_backward(
            grad_y, saved, z, mean, invstd, bn_weight, use_batch_stats, act, True,
            m_bnw or m_bnb, m_res)
        gp = k.bwd.GradPrologue(saved_t, save, z, mean, coef, code, slope)
        g_x = g_w = None
        if m_x:
            g_x = k.bwd.conv2d_input_grad(grad_y, weight, x.shape, p.stride, p.padding,
                                          p.dilation, p.groups, grad_prologue=gp,
                                          channels_last=memory_format_of(x) == torch.channels_last)
        if m_w:
            g_w = _like_weight(k.bwd.conv2d_weight_grad(grad_y, x, weight.shape, p.stride,
                                                        p.padding, p.dilation, p.groups,
                                                        grad_prologue=gp), weight)
        g_bnw, g_bnb = (sum_gz * invstd, sum_g) if (m_bnw or m_bnb) else (None, None)
        return g_x, g_w, None, g_bnw, g_bnb, g_u

    def conv_backward(self, grad, x, weight, has_bias, p, mask, prologue=None):
        """With an input prologue the weight gradient is the Triton kernel recomputing
        act(bn(x)) as it loads x; the data gradient (nothing to fuse) is PyTorch's, as is a
        backward without a prologue (`_TRITON_PLAIN_CONV_BACKWARD`)."""
        if prologue is None and not _TRITON_PLAIN_CONV_BACKWARD:
            return super().conv_backward(grad, x, weight, has_bias, p, mask)
        k = _k()
        m_x, m_w, m_b = mask
        g_x = g_w = g_b = None
        if m_x:
            if _TRITON_PLAIN_CONV_BACKWARD:
                g_x = k.bwd.conv2d_input_grad(grad, weight, x.shape, p.stride, p.padding,
                                              p.dilation, p.groups,
                                              channels_last=memory_format_of(x) == torch.channels_last)
            else:
                g_x, _, _ = super().conv_backward(grad, x, weight, False, p, [True, False, False])
        if m_w:
            pro = None
            if prologue is not None:
                pro = k.conv.Prologue(prologue.scale, prologue.shift,
                                      _ACT_CODE[prologue.act.kind], prologue.act.negative_slope)
            g_w = _like_weight(k.bwd.conv2d_weight_grad(grad, x, weight.shape, p.stride,
                                                        p.padding, p.dilation, p.groups,
                                                        prologue=pro), weight)
        if m_b and has_bias:
            g_b = grad.sum((0, 2, 3), dtype=torch.float64 if grad.dtype == torch.float64
                           else torch.float32).to(weight.dtype)
        return g_x, g_w, g_b


__all__ = ["TritonBackend", "interpreting"]
