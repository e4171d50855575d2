"""The `cuda` backend: resfuse's hand-written CUDA kernels (`resfuse._C`, csrc/) for the BN,
residual and activation parts of the fused ops; the convolutions go through PyTorch's (cuDNN).

A training forward of `conv_bn_act` is then three passes over the conv output instead of
eager's six or more: cuDNN's convolution, one read for the batch statistics (the finalize and
running-stat update run on the device after it), and one pass that writes
y = act(bn(z) + residual) and a 1-bit mask (relu, leaky_relu, relu6, hardsigmoid; the
pre-activation for the others). Backward is two passes: one reads the upstream gradient, the
mask and z and produces the residual's gradient and BN-backward's two per-channel sums; the other produces the conv output's gradient, recomputing act'(u) from the
mask rather than reading a stored g_u. Eval mode with BN folded and ReLU uses cuDNN's fused
conv + bias (+ add) + ReLU where `set_cudnn_fused_eval` allows it (fp16/bf16), else the folded
conv followed by one add + activation pass.

A residual block in training runs as the block chain (`conv_prologue`, inherited): each conv's
output z is kept, act(bn(z)) is a temporary of the forward (written by the apply kernel,
convolved by cuDNN, freed) and is recomputed once in backward for the weight gradient — the
same Python path as the `pieces` backend's, which the CPU tests run.

The ops the extension registers (`torch.ops.resfuse.cuda_*`) get fake implementations here, so
they trace under `torch.compile` on their own too.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch

from ..activations import KINDS, Activation
from ..validation import ConvParams
from .base import Backend, Case, Tensor, acc_dtype, bn_scale_shift

_ACT_CODE = {kind: i for i, kind in enumerate(KINDS)}  # csrc/resfuse_kernels.h Act
# csrc/resfuse_kernels.h Saved
SAVED_NONE, SAVED_MASK, SAVED_OUTPUT, SAVED_INPUT = 0, 1, 2, 3
_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_MASKED = ("relu", "leaky_relu", "relu6", "hardsigmoid")  # gradient chosen by a 1-bit test of u

_cudnn_fused_eval = True


def set_cudnn_fused_eval(enabled: bool) -> bool:
    """Use cuDNN's fused conv + bias + add + ReLU in eval (fp16/bf16); returns the old value."""
    global _cudnn_fused_eval
    old, _cudnn_fused_eval = _cudnn_fused_eval, bool(enabled)
    return old


@functools.lru_cache(maxsize=None)
def _ops_ready() -> Optional[str]:
    """None when resfuse._C is loaded with its ops (and fakes registered), else why not."""
    from .._extension import load_extension
    ext, why = load_extension()
    if ext is None:
        return f"resfuse._C {why}"
    if not hasattr(torch.ops.resfuse, "cuda_bn_stats"):
        return "resfuse._C loads but registers no cuda_* ops (an older build: rebuild it)"
    _register_fakes()
    return None


def _register_fakes() -> None:
    lib = "resfuse::"

    @torch.library.register_fake(lib + "cuda_bn_stats")
    def _(z, bn_weight, bn_bias, running_mean, running_var, num_batches_tracked, momentum, eps):
        v = z.new_empty(z.shape[1], dtype=acc_dtype(z.dtype))
        return v, torch.empty_like(v), torch.empty_like(v), torch.empty_like(v)

    @torch.library.register_fake(lib + "cuda_bn_apply")
    def _(z, scale, shift, residual, activation, negative_slope, save):
        y = torch.empty_like(z)
        if save == SAVED_MASK:
            return y, z.new_empty((z.numel() + 31) // 32, dtype=torch.int32)
        return y, (torch.empty_like(z) if save == SAVED_INPUT else z.new_empty(0))

    @torch.library.register_fake(lib + "cuda_bn_backward_reduce")
    def _(grad_y, saved, saved_kind, z, mean, invstd, bn_weight, use_batch_stats, activation,
          negative_slope, write_grad_u):
        v = z.new_empty(z.shape[1], dtype=acc_dtype(z.dtype))
        gu = torch.empty_like(z) if write_grad_u else z.new_empty(0)
        return gu, v, torch.empty_like(v), z.new_empty((3, z.shape[1]), dtype=v.dtype)

    @torch.library.register_fake(lib + "cuda_bn_backward_apply")
    def _(grad_y, saved, saved_kind, z, mean, coef, activation, negative_slope):
        return torch.empty_like(z)


def _saved_kind(saved: Optional[Tensor], act: Activation) -> int:
    if saved is None or act.kind == "identity":
        return SAVED_NONE
    if saved.dtype == torch.int32:
        return SAVED_MASK
    return SAVED_OUTPUT if act.saves == "output" else SAVED_INPUT


class CudaBackend(Backend):
    name = "cuda"

    def unavailable_reason(self) -> Optional[str]:
        why = _ops_ready()
        if why is not None:
            return f"not available: {why}"
        if not torch.cuda.is_available():
            return "not available: resfuse._C is built but no CUDA device is visible"
        return None

    def unsupported_reason(self, case: Case) -> Optional[str]:
        if case.device_type != "cuda":
            return f"it runs on CUDA tensors only, got {case.device_type} tensors"
        if case.dtype not in _DTYPES:
            return f"dtype {case.dtype} is not one of float32, float64, float16, bfloat16"
        return None

    # ------------------------------------------------------------------ forward
    def forward_saves(self, act: Activation) -> str:
        return "mask" if act.kind in _MASKED else act.saves

    def bn_act_forward(self, z, bn_weight, bn_bias, running_mean, running_var,
                       num_batches_tracked, training, momentum, eps, residual, act, save_input,
                       batch_stats=None):
        if batch_stats is not None:  # statistics already computed: finalize, then the apply kernel
            return super().bn_act_forward(z, bn_weight, bn_bias, running_mean, running_var,
                                          num_batches_tracked, training, momentum, eps,
                                          residual, act, save_input, batch_stats)
        if training or running_mean is None:
            update = training and running_mean is not None
            mean, invstd, scale, shift = torch.ops.resfuse.cuda_bn_stats(
                z, bn_weight, bn_bias, running_mean if update else None,
                running_var if update else None, num_batches_tracked if update else None,
                momentum, eps)
        else:
            acc = acc_dtype(z.dtype)
            mean = running_mean.to(acc, copy=True)
            invstd = torch.rsqrt(running_var.to(acc) + eps)
            scale, shift = bn_scale_shift(mean, invstd, bn_weight, bn_bias)
        y, saved = self.scale_shift_add_act(z, scale, shift, residual, act, save_input)
        return y, mean, invstd, saved

    def scale_shift_add_act(self, z, scale, shift, residual, act, save_input=True):
        saves = self.forward_saves(act) if save_input else "nothing"
        code = SAVED_MASK if saves == "mask" else (SAVED_INPUT if saves == "input" else SAVED_NONE)
        y, saved = torch.ops.resfuse.cuda_bn_apply(z, scale, shift, residual, _ACT_CODE[act.kind],
                                                   act.negative_slope, code)
        return y, (saved if code != SAVED_NONE else None)

    def conv_eval_folded(self, x: Tensor, residual: Optional[Tensor], act: Activation,
                         p: ConvParams, folded) -> Tensor:
        if (_cudnn_fused_eval and act.kind == "relu" and x.dtype in (torch.float16, torch.bfloat16)
                and folded.bias is not None):
            args = (list(p.stride), list(p.padding), list(p.dilation), p.groups)
            if residual is None:
                return torch.cudnn_convolution_relu(x, folded.weight, folded.bias, *args)
            return torch.cudnn_convolution_add_relu(x, folded.weight, residual.to(x.dtype), 1.0,
                                                    folded.bias, *args)
        z = self.conv(x, folded.weight, folded.bias, p)
        if residual is None and act.kind == "identity":
            return z
        y, _ = torch.ops.resfuse.cuda_bn_apply(z, None, None, residual, _ACT_CODE[act.kind],
                                               act.negative_slope, SAVED_NONE)
        return y

    # ------------------------------------------------------------------ backward
    def bn_act_backward(self, grad_y, saved, z, mean, invstd, bn_weight, use_batch_stats, act,
                        need_gz, need_bn_grads, need_gu=True):
        kind = _saved_kind(saved, act)
        code = _ACT_CODE[act.kind]
        need_sums = (use_batch_stats and need_gz) or need_bn_grads
        g_u = g_z = sum_g = sum_gz = None
        if need_sums:
            g_u, sum_g, sum_gz, coef = torch.ops.resfuse.cuda_bn_backward_reduce(
                grad_y, saved, kind, z, mean, invstd, bn_weight, use_batch_stats, code,
                act.negative_slope, need_gu)
            if not need_gu:
                g_u = None
        else:
            scale = invstd if bn_weight is None else bn_weight.to(invstd.dtype) * invstd
            zeros = torch.zeros_like(scale)
            coef = torch.stack([scale, zeros, zeros])
            if need_gu:  # g_u alone: the apply pass with coefficients (1, 0, 0)
                ones = torch.ones_like(scale)
                g_u = grad_y if kind == SAVED_NONE else torch.ops.resfuse.cuda_bn_backward_apply(
                    grad_y, saved, kind, z, mean, torch.stack([ones, zeros, zeros]), code,
                    act.negative_slope)
        if need_gz:
            g_z = torch.ops.resfuse.cuda_bn_backward_apply(grad_y, saved, kind, z, mean, coef, code,
                                                           act.negative_slope)
        if not need_bn_grads:
            return g_u, g_z, None, None
        return g_u, g_z, sum_gz * invstd, sum_g
