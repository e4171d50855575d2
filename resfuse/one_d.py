"""1-D convolutions (Conv1d / BatchNorm1d chains) as the 2-D ops with H = 1.

The functional ops take a 3-D x (N, C, L) with a 3-D weight (C_out, C_in/groups, K) and
1-element stride / padding / dilation (an int or a 1-tuple; padding "same" / "valid" too):
`to_2d` checks them, naming the argument, and views everything as 4-D (x (N, C, 1, L), weight
(C_out, C_in/groups, 1, K), stride (1, s), ...); `to_1d` views the 4-D result back. Views only,
so gradients flow back to the 3-D tensors; x is read in place when it is contiguous, else
copied once: the output is a contiguous (N, C_out, L_out), as `F.conv1d`'s is.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Tuple, Union

import torch

from .validation import ResfuseInputError, conv_params

Tensor = torch.Tensor


class Geometry2d(NamedTuple):
    """The 2-D conv arguments of a 1-D call."""
    stride: Union[int, Tuple[int, int]]
    padding: Union[str, Tuple[int, int]]
    dilation: Union[int, Tuple[int, int]]


def _single(name: str, v, pad_to: int, *, allow_zero: bool, allow_str: bool = False):
    """(pad_to, v) from an int or a 1-tuple (a string passes through for padding)."""
    if allow_str and isinstance(v, str):
        return v
    if isinstance(v, (tuple, list, torch.Size)) and len(v) == 1:
        v = v[0]
    if isinstance(v, bool) or not isinstance(v, int):
        what = "an int, a 1-tuple, 'same' or 'valid'" if allow_str else "an int or a 1-tuple"
        raise ResfuseInputError(f"{name}: expected {what} for a 1-D convolution (3-D x), "
                                f"got {v!r}")
    if v < (0 if allow_zero else 1):
        raise ResfuseInputError(f"{name}: expected values >= {0 if allow_zero else 1}, got {v!r}")
    return (pad_to, v)


def to_2d(x: Tensor, weight: Optional[Tensor], residual: Optional[Tensor], stride, padding,
          dilation, groups) -> Tuple[Tensor, Optional[Tensor], Optional[Tensor], Geometry2d]:
    """(x, weight, residual, geometry) of a 1-D call (3-D x) as the 2-D op's arguments."""
    if weight is not None:
        if not isinstance(weight, Tensor):
            raise ResfuseInputError(f"weight: expected a Tensor, got {type(weight).__name__}")
        if weight.dim() != 3:
            raise ResfuseInputError(
                "weight: expected a 3-D (C_out, C_in/groups, K) tensor for a 3-D (N, C, L) x, "
                f"got shape {tuple(weight.shape)}")
        geom = Geometry2d(_single("stride", stride, 1, allow_zero=False),
                          _single("padding", padding, 0, allow_zero=True, allow_str=True),
                          _single("dilation", dilation, 1, allow_zero=False))
        weight = weight.unsqueeze(2)
    else:
        geom = Geometry2d(stride, padding, dilation)  # unused without a conv
    if residual is not None and isinstance(residual, Tensor):
        expected = _out_shape(x, weight, geom, groups)
        if residual.dim() != 3 or (expected is not None and tuple(residual.shape) != expected):
            want = f"shape {expected}" if expected is not None else "a 3-D (N, C_out, L_out) tensor"
            raise ResfuseInputError(f"residual: expected {want} for a 3-D x, got shape "
                                    f"{tuple(residual.shape)}")
        residual = residual.unsqueeze(2)
    return x.contiguous().unsqueeze(2), weight, residual, geom


def _out_shape(x: Tensor, weight4: Optional[Tensor], geom: Geometry2d, groups
               ) -> Optional[Tuple[int, int, int]]:
    """The 1-D output's shape, or None where the geometry is bad (the 2-D checks say why)."""
    if weight4 is None:
        return tuple(x.shape)
    try:
        cp = conv_params(weight4, geom.stride, geom.padding, geom.dilation, groups)
    except ResfuseInputError:
        return None
    _, length = cp.out_hw(1, x.shape[2], 1, weight4.shape[3])
    return (x.shape[0], weight4.shape[0], length)


def to_1d(out):
    """The 4-D (N, C, 1, L) result (or the (y, mean, var) triple) as 3-D."""
    if isinstance(out, tuple):
        return (out[0].squeeze(2), *out[1:])
    return out.squeeze(2)
