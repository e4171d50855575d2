"""Checks of every argument of a fused op, run before anything is computed or written.

An error here leaves running statistics, `num_batches_tracked` and every output untouched, and
names the argument with the shape/dtype/device it expected. Non-contiguous and channels_last
tensors are not errors: every backend handles any strides.
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Tuple

import torch


class ResfuseInputError(ValueError, TypeError):
    """Bad input to a resfuse op. A ValueError *and* a TypeError, so code written for either
    of torch's conventions (shape errors vs dtype errors) catches it."""


def _fail(msg: str):
    raise ResfuseInputError(msg)


def _pair(name: str, v, *, allow_zero: bool) -> Tuple[int, int]:
    if isinstance(v, bool) or not isinstance(v, (int, tuple, list, torch.Size)):
        _fail(f"{name}: expected an int or a pair of ints, got {v!r}")
    t = (v, v) if isinstance(v, int) else tuple(v)
    if len(t) == 1:
        t = (t[0], t[0])
    if len(t) != 2 or not all(isinstance(i, int) and not isinstance(i, bool) for i in t):
        _fail(f"{name}: expected an int or a pair of ints, got {v!r}")
    lo = 0 if allow_zero else 1
    if min(t) < lo:
        _fail(f"{name}: expected values >= {lo}, got {v!r}")
    return t


@dataclasses.dataclass(frozen=True)
class ConvParams:
    """Resolved convolution geometry: explicit symmetric padding; `pre_pad` is the extra
    (right, bottom) zero padding that an asymmetric padding="same" needs, applied to the input
    before the op, as PyTorch's own "same" convolution does."""
    stride: Tuple[int, int] = (1, 1)
    padding: Tuple[int, int] = (0, 0)
    dilation: Tuple[int, int] = (1, 1)
    groups: int = 1
    pre_pad: Tuple[int, int] = (0, 0)

    def out_hw(self, h: int, w: int, kh: int, kw: int) -> Tuple[int, int]:
        h, w = h + self.pre_pad[1], w + self.pre_pad[0]
        oh = (h + 2 * self.padding[0] - self.dilation[0] * (kh - 1) - 1) // self.stride[0] + 1
        ow = (w + 2 * self.padding[1] - self.dilation[1] * (kw - 1) - 1) // self.stride[1] + 1
        return oh, ow


_conv_params_cache: dict = {}


def conv_params(weight: torch.Tensor, stride, padding, dilation, groups) -> ConvParams:
    """Checked and resolved conv geometry (memoised: modules call this with the same
    arguments every step)."""
    try:
        key = (tuple(weight.shape[-2:]), stride, padding, dilation, groups)
        hit = _conv_params_cache.get(key)
    except TypeError:  # unhashable (lists)
        key, hit = None, None
    if hit is not None:
        return hit
    cp = _conv_params(weight, stride, padding, dilation, groups)
    if key is not None and len(_conv_params_cache) < 4096:
        _conv_params_cache[key] = cp
    return cp


def _conv_params(weight: torch.Tensor, stride, padding, dilation, groups) -> ConvParams:
    stride = _pair("stride", stride, allow_zero=False)
    dilation = _pair("dilation", dilation, allow_zero=False)
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
        _fail(f"groups: expected a positive int, got {groups!r}")
    kh, kw = weight.shape[-2:]
    pre_pad = (0, 0)
    if isinstance(padding, str):
        if padding == "valid":
            padding = (0, 0)
        elif padding == "same":
            if stride != (1, 1):
                _fail(f"padding='same' is not supported for strided convolutions (stride={stride})")
            total = (dilation[0] * (kh - 1), dilation[1] * (kw - 1))
            padding = (total[0] // 2, total[1] // 2)
            pre_pad = (total[1] - 2 * padding[1], total[0] - 2 * padding[0])  # (right, bottom)
        else:
            _fail(f"padding: expected an int, a pair, 'same' or 'valid', got {padding!r}")
    else:
        padding = _pair("padding", padding, allow_zero=True)
    return ConvParams(stride, padding, dilation, groups, pre_pad)


def _check_tensor(name: str, t, ref: torch.Tensor, shape: Optional[Tuple[int, ...]] = None,
                  *, same_dtype: bool = True):
    # `shape` is a tuple: torch.Size compares equal to tuples only.
    if not isinstance(t, torch.Tensor):
        _fail(f"{name}: expected a Tensor, got {type(t).__name__}")
    if t.device != ref.device:
        _fail(f"{name}: expected a tensor on {ref.device} (the device of x), got {t.device}")
    if t.dtype != ref.dtype:  # x is floating point, so a tensor of its dtype needs no more checks
        if same_dtype:
            _fail(f"{name}: expected dtype {ref.dtype} (the dtype of x), got {t.dtype}")
        if not t.dtype.is_floating_point:
            _fail(f"{name}: expected a floating-point tensor, got {t.dtype}")
    if shape is not None and t.shape != shape:
        _fail(f"{name}: expected shape {tuple(shape)}, got {tuple(t.shape)}")


def check_input(x):
    if not isinstance(x, torch.Tensor):
        _fail(f"x: expected a Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        _fail("x: expected a 4-D (N, C, H, W) tensor (or a 3-D (N, C, L) one for a 1-D "
              f"convolution), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        _fail(f"x: expected a floating-point tensor, got {x.dtype}")


def check_conv(x, weight, bias, cp: ConvParams) -> Tuple[int, int, int]:
    """Returns (C_out, H_out, W_out)."""
    _check_tensor("weight", weight, x)
    if weight.dim() != 4:
        _fail(f"weight: expected a 4-D (C_out, C_in/groups, kH, kW) tensor, got shape {tuple(weight.shape)}")
    c_out, c_in_g, kh, kw = weight.shape
    c_in = x.shape[1]
    if c_in % cp.groups or c_out % cp.groups:
        _fail(f"groups: {cp.groups} must divide both the input channels ({c_in}) and the "
              f"output channels ({c_out})")
    if c_in_g * cp.groups != c_in:
        _fail(f"weight: expected shape ({c_out}, {c_in // cp.groups}, {kh}, {kw}) for x with {c_in} "
              f"channels and groups={cp.groups}, got {tuple(weight.shape)}")
    if bias is not None:
        _check_tensor("bias", bias, x, (c_out,))
    oh, ow = cp.out_hw(x.shape[2], x.shape[3], kh, kw)
    if oh < 1 or ow < 1:
        _fail(f"x: spatial size {tuple(x.shape[2:])} is too small for a {kh}x{kw} kernel with "
              f"padding={cp.padding}, dilation={cp.dilation}, stride={cp.stride} "
              f"(output would be {oh}x{ow})")
    return c_out, oh, ow


def check_bn(x, channels: int, bn_weight, bn_bias, running_mean, running_var,
             num_batches_tracked, momentum, eps, training: bool, normalized_shape, *,
             synced: bool = False):
    """`normalized_shape` is the shape of the tensor that BN normalizes; `synced`: the
    statistics are combined across processes, so one value per channel here is allowed (as
    in nn.SyncBatchNorm)."""
    for name, t in (("bn_weight", bn_weight), ("bn_bias", bn_bias),
                    ("running_mean", running_mean), ("running_var", running_var)):
        if t is not None:
            # BN parameters may be kept in fp32 beside low-precision activations (apex O2 style).
            _check_tensor(name, t, x, (channels,), same_dtype=False)
    if (running_mean is None) != (running_var is None):
        _fail("running_mean and running_var: pass both (track_running_stats=True) or neither")
    if num_batches_tracked is not None:
        if not isinstance(num_batches_tracked, torch.Tensor) or num_batches_tracked.numel() != 1:
            _fail("num_batches_tracked: expected a one-element tensor or None")
        if num_batches_tracked.device != x.device:
            _fail(f"num_batches_tracked: expected a tensor on {x.device}, got {num_batches_tracked.device}")
    if momentum is not None and (isinstance(momentum, bool) or not isinstance(momentum, (int, float))):
        _fail(f"momentum: expected a float or None, got {momentum!r}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps >= 0:
        _fail(f"eps: expected a non-negative float, got {eps!r}")
    if not isinstance(training, bool):
        _fail(f"training: expected a bool, got {training!r}")
    use_batch_stats = training or running_mean is None
    count = normalized_shape[0] * normalized_shape[2] * normalized_shape[3]
    if use_batch_stats and count == 1 and not synced:
        # Same error (type and text) as nn.BatchNorm2d.
        raise ValueError("Expected more than 1 value per channel when training, got input size "
                         f"{torch.Size(normalized_shape)}")


def check_residual(residual, x, out_shape):
    if residual is not None:
        _check_tensor("residual", residual, x, out_shape)



def check_batch_stats(batch_stats, x, channels: int, synced: bool):
    """`batch_stats`: None, or (mean, biased variance) of the BN input per channel, in the
    statistics' dtype (float64 for float64 data, else float32), as `conv_stats` returns them."""
    if batch_stats is None:
        return
    if synced:
        _fail("batch_stats: not with a synchronised BN (process_group): the statistics are "
              "combined across processes inside the op")
    if not isinstance(batch_stats, (tuple, list)) or len(batch_stats) != 2:
        _fail("batch_stats: expected a pair (mean, var) of tensors, got "
              f"{type(batch_stats).__name__}")
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    for name, t in zip(("batch_stats[0] (mean)", "batch_stats[1] (var)"), batch_stats):
        if not isinstance(t, torch.Tensor):
            _fail(f"{name}: expected a Tensor, got {type(t).__name__}")
        if t.device != x.device:
            _fail(f"{name}: expected a tensor on {x.device} (the device of x), got {t.device}")
        if t.dtype != acc:
            _fail(f"{name}: expected dtype {acc} (the statistics' dtype for {x.dtype} data), "
                  f"got {t.dtype}")
        if tuple(t.shape) != (channels,):
            _fail(f"{name}: expected shape ({channels},), got {tuple(t.shape)}")


MEMORY_MODES = ("default", "low")


def check_memory(memory) -> str:
    """`memory=`: "default" (keep each conv's output z, never a normalized activation) or
    "low" (also drop the last conv's output of a block, recomputed in backward)."""
    if not isinstance(memory, str) or memory not in MEMORY_MODES:
        _fail(f"memory: expected one of {MEMORY_MODES}, got {memory!r}")
    return memory
