"""Bounds on the magnitude of CPU eval activations: where oneDNN's fused ReLU gives eager's values.

oneDNN's relu and clip post-ops compute max(z, 0) in a way that turns NaN into 0, where
torch's relu keeps NaN (and the contract is eager's NaN and Inf). A conv's pre-activation z
can only be NaN or Inf if a non-finite value comes in (input, weight, bias, residual) or its
sums overflow. Both are ruled out by a bound: if |x| <= B everywhere, the folded conv has
gain g = max over output channels of sum(|w|) and offset o = max |b|, and the residual is
bounded by R, then every product, partial sum and result of the conv is at most B*g + o + R
in magnitude (up to rounding). Where that is below `LIMIT`, far below the largest finite
float32 or bfloat16 value, z is finite, and oneDNN's fused ReLU is exactly torch's.

A bound comes from one of two places:
* measured: one min/max pass over a tensor (`measure`); NaN or Inf anywhere gives `inf`;
* carried: a fused conv's output is bounded by B*g + o + R (then through the activation).
Bounds are kept in a small table keyed by the tensor object and its version counter, so an
in-place change to a tensor (which bumps its version, views included) drops its bound. An
inference tensor has no version counter: its bound is used only inside a fused block or
stage, on the intermediates no one else sees (so under `torch.inference_mode` each stage
measures its input afresh).
Writes that bypass the version counter are not seen: `t.data.copy_(...)`, writes through
`.numpy()`, `torch.from_dlpack(t)` or `t.untyped_storage()`, or through another tensor made
to share t's storage with `set_`; call `clear()` after them (as
`resfuse.eval_plan.clear_plans()` for weights). resfuse's own in-place residual sum (oneDNN's,
which bumps no version either) records the new bound or drops the old one itself. The table
holds weak references: `torch.utils.swap_tensors` refuses a tensor that has one (a fused
conv's output, a measured input) until `clear()`.
"""
from __future__ import annotations

import math
import weakref
from typing import Dict, Optional

import torch

Tensor = torch.Tensor

# 256 times below float32's and bfloat16's largest finite value (2**128, about 3.4e38):
# rounding in the sums (a factor under 1.001 for the largest ResNet conv) cannot take a value
# this size to Inf, whatever order oneDNN's kernels sum in.
LIMIT = 2.0 ** 120
_MAX_ENTRIES = 512  # then the entries of tensors gone are dropped (`_prune`)

# id(tensor) -> (weakref to it, its _version when recorded, bound)
_table: Dict[int, tuple] = {}


def clear() -> None:
    """Forget every recorded bound."""
    _table.clear()


def known(t: Tensor, private: bool = False) -> Optional[float]:
    """The recorded bound of `t`, or None where none is (or `t` changed in place since).
    An inference tensor (`torch.inference_mode`) has no version counter: its bound is only
    given where the caller vouches that no one else has seen `t` (`private`: a fused
    block's or stage's own intermediate)."""
    entry = _table.get(id(t))
    if entry is None:
        return None
    ref, version, bound = entry
    if ref() is not t:
        return None
    if version is None:
        return bound if private else None
    return bound if version == t._version else None


def record(t: Tensor, bound: float) -> None:
    """Record that |t| <= bound everywhere (`bound` finite and at most `LIMIT`)."""
    if len(_table) >= _MAX_ENTRIES:
        _prune()
    try:
        version = t._version
    except RuntimeError:  # an inference tensor: no version counter
        version = None
    _table[id(t)] = (weakref.ref(t), version, bound)


def _prune() -> None:
    """Make room: drop the entries of tensors gone (nearly all of them, a forward later), and
    start over only if the live ones alone fill the table. (Clearing outright would drop the
    bounds a forward in progress is carrying, and cost it measures.)"""
    for key in [k for k, entry in _table.items() if entry[0]() is None]:
        del _table[key]
    if len(_table) >= _MAX_ENTRIES // 2:
        _table.clear()


def forget(t: Tensor) -> None:
    """Drop any bound recorded for `t`: its values were changed by a write its version counter
    does not see (oneDNN's in-place sum does not bump it)."""
    _table.pop(id(t), None)


def measure(t: Tensor) -> float:
    """max |t| as a Python float, `inf` where t holds NaN or Inf. A dense tensor (contiguous
    or channels_last) is read once as a flat view: the min/max of a channels_last tensor
    reduced as 4-D reads many times slower on this torch."""
    if t.numel() == 0:
        return 0.0
    if t.is_contiguous():
        flat = t.view(-1)
    elif t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last):
        flat = t.permute(0, 2, 3, 1).reshape(-1)  # a view: NHWC order is the memory order
    else:
        flat = t
    lo, hi = torch.aminmax(flat)
    b = max(-float(lo), float(hi))
    return b if math.isfinite(b) else math.inf  # (NaN compares false: max() may keep it)


def conv_gain(weight: Tensor, bias: Optional[Tensor]) -> tuple:
    """(g, o) of a conv (its folded weight and bias): |conv(x) + b| <= g * max|x| + o. In
    float64; `inf` where a weight or bias is not finite (NaN included)."""
    w = weight.detach().to(torch.float64)
    g = float(w.abs().flatten(1).sum(1).max()) if w.numel() else 0.0
    o = float(bias.detach().to(torch.float64).abs().max()) if bias is not None and bias.numel() else 0.0
    if not (math.isfinite(g) and math.isfinite(o)):
        return math.inf, math.inf
    return g, o


def act_scale(act) -> float:
    """s with |act(z)| <= s * max(|z|, 1), for every activation resfuse knows: each is at
    most |z| in magnitude (relu, relu6, silu, gelu, hardswish, mish, identity) or at most 1
    (hardsigmoid), or a leaky slope times |z|."""
    return max(abs(act.negative_slope), 1.0)
