"""The `triton` backend: resfuse's Triton kernels (`resfuse.triton_kernels`, triton_kernels/).

This version (work in progress toward DESIGN.md section 1's fused design):
- convolution: the implicit-GEMM kernel of triton_kernels/conv.py, forward, in eval mode with
  the folded BN's bias, the residual and the activation in its epilogue (one kernel per conv);
- BN: batch statistics, scale-shift + residual + activation writing y and a 1-bit mask (relu,
  leaky_relu; the pre-activation for the others), BN-backward's reduction and apply
  (triton_kernels/bn_act.py);
- convolution backward: PyTorch's (`aten.convolution_backward`): the Triton data- and
  weight-gradient kernels are not written yet.
In training the conv computes BN's batch statistics in its epilogue (`conv_stats`): a
conv_bn_act forward is the conv, then one scale-shift-add-activation pass. The pre-activation
op (conv(act(bn(x)))) applies BN + activation in the conv's prologue where nothing is kept for
backward (inference); with gradients it still writes act(bn(x)) (the backward reads it), and a
block does not yet hand its next conv the previous BN (next step).

Without a GPU the kernels run on CPU tensors under TRITON_INTERPRET=1 (fp32 and fp64): how CI
and users check them. `auto` never picks the interpreter, and does not pick this backend on a
GPU either until it has been measured faster there (bench/).
"""
from __future__ import annotations

import functools
import os
from typing import Optional

import torch

from ..activations import KINDS, Activation
from ..validation import ConvParams
from .base import Backend, Case, Tensor

_ACT_CODE = {kind: i for i, kind in enumerate(KINDS)}  # triton_kernels/conv.py ACT_*
_MASKED = ("relu", "leaky_relu")
_GPU_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_INTERPRETER_DTYPES = (torch.float32, torch.float64)


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.lru_cache(maxsize=None)
def _kernels():
    """(conv, bn_act) kernel modules, or the reason they cannot load."""
    try:
        from ..triton_kernels import bn_act, conv
    except Exception as e:  # noqa: BLE001 - triton missing or broken: say so
        return None, f"{type(e).__name__}: {e}"
    return (conv, bn_act), None


def _contiguous(t: Tensor) -> Tensor:
    """t contiguous in its own memory format (NCHW or channels_last), as the BN kernels read
    it (any other strides: one copy)."""
    fmt = (torch.channels_last if t.is_contiguous(memory_format=torch.channels_last)
           and not t.is_contiguous() else torch.contiguous_format)
    return t.contiguous(memory_format=fmt)


class TritonBackend(Backend):
    name = "triton"

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
        (conv, _), _ = _kernels()
        y, _ = conv.conv2d(x, weight, bias, p.stride, p.padding, p.dilation, p.groups)
        return y

    def conv_stats(self, x: Tensor, weight: Tensor, bias: Optional[Tensor], p: ConvParams):
        """The conv with BN's batch statistics computed in its epilogue (per output tile,
        merged in a fixed order): no separate pass over z."""
        (conv, _), _ = _kernels()
        z, parts = conv.conv2d(x, weight, bias, p.stride, p.padding, p.dilation, p.groups,
                               stats=True)
        return z, conv.merge_stats(parts)

    def bn_act_conv_unsaved(self, x, bn_weight, bn_bias, running_mean, running_var,
                            num_batches_tracked, training, momentum, eps, weight, bias, residual,
                            act, p):
        """conv(act(bn(x))) + residual with BN + activation applied as the conv loads x (its
        prologue): act(bn(x)) is never written."""
        (conv, _), _ = _kernels()
        _, _, scale, shift = self.bn_prepare(x, bn_weight, bn_bias, running_mean, running_var,
                                             num_batches_tracked, training, momentum, eps)
        y, _ = conv.conv2d(x, weight, bias, p.stride, p.padding, p.dilation, p.groups,
                           prologue=conv.Prologue(scale, shift, _ACT_CODE[act.kind],
                                                  act.negative_slope),
                           residual=None if residual is None else residual.to(x.dtype))
        return y

    def bn_stats(self, z: Tensor):
        (_, bn), _ = _kernels()
        return bn.batch_stats(_contiguous(z))

    def scale_shift_add_act(self, z, scale, shift, residual, act, save_input=True):
        (_, bn), _ = _kernels()
        saves = self.forward_saves(act) if save_input else "nothing"
        code = {"mask": bn.SAVE_MASK, "input": bn.SAVE_INPUT}.get(saves, bn.SAVE_NONE)
        z = _contiguous(z)
        y, saved = bn.apply(z, scale, shift, None if residual is None else residual.to(z.dtype),
                            _ACT_CODE[act.kind], act.negative_slope, code)
        return y, saved

    def conv_eval_folded(self, x: Tensor, residual: Optional[Tensor], act: Activation,
                         p: ConvParams, folded) -> Tensor:
        """One kernel: the folded conv, + bias, + residual, activation (its epilogue)."""
        (conv, _), _ = _kernels()
        y, _ = conv.conv2d(x, folded.weight, folded.bias, p.stride, p.padding, p.dilation,
                           p.groups, residual=None if residual is None else residual.to(x.dtype),
                           act=_ACT_CODE[act.kind], slope=act.negative_slope)
        return y

    # ------------------------------------------------------------------ backward
    def _saved_code(self, saved: Optional[Tensor], act: Activation) -> int:
        (_, bn), _ = _kernels()
        if saved is None or act.kind == "identity":
            return bn.SAVE_NONE
        if saved.dtype == torch.int32:
            return bn.SAVE_MASK
        return bn.SAVE_OUTPUT if act.saves == "output" else bn.SAVE_INPUT

    def bn_act_backward(self, grad_y, saved, z, mean, invstd, bn_weight, use_batch_stats, act,
                        need_gz, need_bn_grads, need_gu=True):
        (_, bn), _ = _kernels()
        z = _contiguous(z)
        save = self._saved_code(saved, act)
        code, slope = _ACT_CODE[act.kind], act.negative_slope
        count = z.numel() // z.shape[1]
        a = invstd if bn_weight is None else bn_weight.to(invstd.dtype) * invstd
        need_sums = (use_batch_stats and need_gz) or need_bn_grads
        g_u = g_z = sum_g = sum_gz = None
        if need_sums:
            g_u, sum_g, sum_gz = bn.backward_reduce(grad_y, saved, save, z, mean, code, slope,
                                                    need_gu)
        elif need_gu:  # g_u alone: the apply pass with the coefficient 1
            g_u = bn.backward_apply(grad_y, saved, save, z, mean, torch.ones_like(a)[None],
                                    code, slope)
        if need_gz:
            if use_batch_stats:
                coef = torch.stack([a, -a * sum_g / count, -a * invstd * invstd * sum_gz / count])
            else:
                coef = a[None]  # eval: g_z = a * g_u
            g_z = bn.backward_apply(grad_y, saved, save, z, mean, coef, code, slope)
        if not need_bn_grads:
            return g_u, g_z, None, None
        return g_u, g_z, sum_gz * invstd, sum_g
