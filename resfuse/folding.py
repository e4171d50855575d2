"""Eval-mode BN folding: conv(x, w, b) followed by BN with running statistics is
conv(x, w * s, (b - running_mean) * s + beta) with s = gamma / sqrt(running_var + eps).

The folded weight is computed once per *version* of its inputs and cached: the key holds each
tensor's identity, storage and `_version` counter, which every in-place change (an optimizer step,
`load_state_dict`, `copy_`) bumps, so a stale fold is never used. The cache holds one entry per
conv weight and drops it when the weight is freed. Folding runs only where no gradient is
needed (eval-mode training through BN uses the unfolded pieces, so gradients reach every
parameter).
"""
from __future__ import annotations

import dataclasses
import weakref
from typing import Dict, Optional, Tuple

import torch

from .backend.base import acc_dtype, bn_scale_shift

Tensor = torch.Tensor
_cache: Dict[int, tuple] = {}


def fold(weight: Tensor, bias: Optional[Tensor], bn_weight, bn_bias, running_mean: Tensor,
         running_var: Tensor, eps: float) -> Tuple[Tensor, Tensor]:
    """(weight', bias') of the folded conv, in the weight's dtype and memory format."""
    acc = acc_dtype(weight.dtype)
    invstd = torch.rsqrt(running_var.to(acc) + eps)
    scale, shift = bn_scale_shift(running_mean.to(acc), invstd, bn_weight, bn_bias)
    w = (weight.to(acc) * scale.view(-1, 1, 1, 1)).to(weight.dtype)
    b = shift if bias is None else shift + bias.to(acc) * scale
    return w, b.to(weight.dtype)


@dataclasses.dataclass
class FoldedConv:
    """A folded conv: `weight`, `bias`, and `packed`, where a backend may keep its own
    prepared forms of this fold (e.g. oneDNN's blocked weight layout per input shape); they
    are dropped with the fold when a parameter changes."""
    weight: Tensor
    bias: Tensor
    packed: dict = dataclasses.field(default_factory=dict)


def _key(tensors, eps) -> Optional[tuple]:
    try:
        # data_ptr catches `param.data = ...` (module.to(), .half()), which keeps the
        # Parameter's identity but not its storage.
        return tuple([None if t is None else (id(t), t._version, t.data_ptr()) for t in tensors]
                     + [eps])
    except RuntimeError:  # inference tensors have no version counter: do not cache
        return None


def folded(weight: Tensor, bias, bn_weight, bn_bias, running_mean, running_var,
           eps: float) -> FoldedConv:
    """`fold(...)`, cached per version of its inputs (not while torch.compile traces)."""
    tensors = (weight, bias, bn_weight, bn_bias, running_mean, running_var)
    key = None if torch.compiler.is_compiling() else _key(tensors, eps)
    if key is None:
        return FoldedConv(*fold(*tensors, eps))
    wid = id(weight)
    hit = _cache.get(wid)
    if hit is not None and hit[0]() is weight and hit[1] == key:
        return hit[2]
    result = FoldedConv(*fold(*tensors, eps))
    if hit is None or hit[0]() is not weight:
        weakref.finalize(weight, _cache.pop, wid, None)
    _cache[wid] = (weakref.ref(weight), key, result)
    return result


def clear_cache() -> None:
    _cache.clear()
