"""The CPU training path of the modules: argument checks and backend choice made once per
module pair and kind of call.

In training a fused conv -> BN (batch statistics) -> (+ residual) -> act runs as differentiable
torch ops, the eager backend's chain (aten's convolution, batch_norm, add_, relu_), so that
the backward is eager's own; so does a pre-activation BN -> act -> conv (+ residual).
Before those ops, `resfuse.functional.conv_bn_act` (`bn_act_conv`) checks every argument and
chooses the backend: tens of microseconds of Python per conv, which at batch 1 was all of
resfuse's gap to eager in a training step. A training plan keeps what those checks
found for one module pair and one kind of call, and while calls stay of that kind runs the
chain directly, with the module's current tensors and settings.

A plan answers a call only where all of these are as when it was made (else the checked path
runs, raises its error where there is one, and the plan is made again):
* x's shape, strides and dtype (on the CPU), and the residual's shape and dtype (or none);
* the identity of the conv's weight and bias and the BN's weight, bias, running statistics
  and batch counter, and the storage of each (`module.to(...)` and `.data = ...` keep the
  object and swap its storage; an optimizer step writes into it in place);
* the conv's stride, padding, dilation, groups and padding mode (equal values); the BN's
  momentum, eps and `track_running_stats`, the BN module itself and the activation
  (identity: an attribute set anew, even to an equal value, remakes the plan); the backend
  the call asks for (`backend=`, the `use_backend` scope, RESFUSE_BACKEND);
* gradients needed (grad mode on, and the weight, x or another tensor requiring grad), no
  autocast, no torch.compile tracing.
Nothing of the tensors' values is kept: an optimizer step needs no new plan.

Not planned: a BN in eval (the eval plan's case, `resfuse.eval_plan`), a synchronised BN,
`memory="low"`, a non-zero padding mode or an asymmetric "same" padding, a backend that does
not run the chain (a kernel backend's autograd Function), an empty batch, and modules other
than those the eval plans run (exactly nn.Conv2d or the converter's slots, a BatchNorm2d kind).
Nor are modules whose weight is computed from other tensors (pruning, parametrizations, weight
norm: their attribute is not the parameter dict's tensor), and activations given as modules
(whose settings may change; names and `Activation`s cannot). A conv keeps one plan: a conv
called alternately with and without a residual, or at two input shapes, is checked at each
change. `set_enabled(False)` turns plans off (process-wide); `eval_plan.clear_plans()` drops
them.
"""
from __future__ import annotations

import contextlib
import copy
import weakref
from typing import Dict, Optional

import torch

from . import backend as dispatch
from . import eval_plan
from .activations import Activation, as_activation
from .backend.base import Case, memory_format_of
from .validation import conv_params

Tensor = torch.Tensor
_CL = torch.channels_last

# id(conv module) -> _TrainPlan; the entry goes with the module (weakref.finalize).
_plans: Dict[int, "_TrainPlan"] = {}

MISS = object()  # `run`: the call may be planned, but no plan answers it (see `make`)
_enabled = True

_grad_enabled = torch.is_grad_enabled
_autocast_enabled = torch.is_autocast_enabled
_is_compiling = torch.compiler.is_compiling
_requested = eval_plan.requested_backend


def clear() -> None:
    """Forget every training plan (each is made again on its module pair's next call)."""
    _plans.clear()


eval_plan._on_clear.append(clear)


def set_enabled(enabled: bool) -> bool:
    """Turn training plans on or off (off: every training call takes the checked path, as
    the benchmarks' A/B compares); returns the old value."""
    global _enabled
    old, _enabled = _enabled, bool(enabled)
    return old


@contextlib.contextmanager
def disabled():
    """A scope in which training plans are off (the old setting restored after)."""
    old = set_enabled(False)
    try:
        yield
    finally:
        set_enabled(old)


class _TrainPlan:
    """What the checked path found for one module pair and one kind of call."""
    __slots__ = ("conv_first", "conv_ref", "bn_ref", "shape", "stride", "dtype", "residual", "w",
                 "cb", "bw", "bb", "rm", "rv", "nbt", "present", "ptrs", "geometry", "momentum",
                 "eps", "tracking", "momentum_arg", "eps_arg", "act_arg", "requested", "chain",
                 "cp", "act")

    def __init__(self, conv_first, x, conv, bn, activation, residual, requested, chain, cp, act,
                 tensors):
        self.conv_first = conv_first  # conv -> BN -> act, or BN -> act -> conv
        self.conv_ref, self.bn_ref = weakref.ref(conv), weakref.ref(bn)
        self.shape, self.stride, self.dtype = x.shape, x.stride(), x.dtype
        self.residual = None if residual is None else (residual.shape, residual.dtype)
        self.w, self.cb, self.bw, self.bb, self.rm, self.rv, self.nbt = tensors
        # The storage of each tensor present: a `.data` assignment or `module.to(...)` keeps
        # the object and swaps its storage (an optimizer step writes into it in place).
        self.present = tuple(t for t in tensors if t is not None)
        self.ptrs = tuple(map(_data_ptr, self.present))
        # Copies: a list-valued padding edited in place must not edit the plan's too.
        self.geometry = tuple(map(copy.copy, _geometry(conv)))
        self.momentum, self.eps, self.tracking = bn.momentum, bn.eps, bn.track_running_stats
        # (as the checked path passes them on)
        self.momentum_arg = None if bn.momentum is None else float(bn.momentum)
        self.eps_arg = float(bn.eps)
        self.act_arg, self.act = activation, act
        self.requested, self.chain, self.cp = requested, chain, cp


_data_ptr = Tensor.data_ptr


def _geometry(conv) -> tuple:
    return (conv.stride, conv.padding, conv.dilation, conv.groups, conv.padding_mode)


def _tensors(conv, bn) -> tuple:
    """(weight, bias, BN weight, BN bias, running mean, running var, batch counter) as the
    modules' parameter and buffer dicts hold them (None: absent), those the checked path
    reads in training (`modules._bn_args`)."""
    cps, bnp, bnb = conv._parameters, bn._parameters, bn._buffers
    tracking = bn.track_running_stats
    return (cps.get("weight"), cps.get("bias"), bnp.get("weight"), bnp.get("bias"),
            bnb.get("running_mean") if tracking else None,
            bnb.get("running_var") if tracking else None,
            bnb.get("num_batches_tracked") if tracking else None)


def run(x, conv, bn, activation, residual: Optional[Tensor], backend: Optional[str],
        conv_first: bool = True):
    """act(bn(conv(x)) + residual) (`conv_first=False`: conv(act(bn(x))) + residual) for a
    BN in training, by the pair's plan; `MISS` where the call may be planned but no plan
    answers it (the caller runs the checked path, then `make`); None where it is not a case
    for plans at all."""
    if (not _enabled or type(x) is not Tensor or not x.is_cpu or not _grad_enabled()
            or _is_compiling() or _autocast_enabled("cpu")):
        return None
    plan = _plans.get(id(conv))
    if (plan is None or plan.conv_ref() is not conv or plan.conv_first is not conv_first
            or bn is not plan.bn_ref()):
        return MISS
    w, cb, bw, bb, rm, rv, nbt = _tensors(conv, bn)
    if (w is not plan.w or cb is not plan.cb or bw is not plan.bw or bb is not plan.bb
            or rm is not plan.rm or rv is not plan.rv or nbt is not plan.nbt
            or (residual is None) is not (plan.residual is None)):
        return MISS
    if residual is not None and (type(residual) is not Tensor or not residual.is_cpu
                                 or (residual.shape, residual.dtype) != plan.residual):
        return MISS
    if not (w.requires_grad or x.requires_grad
            or (residual is not None and residual.requires_grad)
            or (cb is not None and cb.requires_grad) or (bw is not None and bw.requires_grad)
            or (bb is not None and bb.requires_grad)):
        return None  # (no gradients needed: the checked path runs the op alone)
    if (x.shape != plan.shape or x.dtype is not plan.dtype
            or tuple(map(_data_ptr, plan.present)) != plan.ptrs
            or activation is not plan.act_arg or bn.momentum is not plan.momentum
            or bn.eps is not plan.eps or bn.track_running_stats is not plan.tracking
            or _geometry(conv) != plan.geometry or x.stride() != plan.stride
            or _requested(backend) != plan.requested):
        return MISS
    if conv_first:
        return plan.chain(x, w, cb, bw, bb, rm, rv, nbt, residual, plan.cp, True,
                          plan.momentum_arg, plan.eps_arg, plan.act)
    return plan.chain(x, bw, bb, rm, rv, nbt, w, cb, residual, plan.cp, True,
                      plan.momentum_arg, plan.eps_arg, plan.act)


def _held_by_the_modules(conv, bn, tensors) -> bool:
    """Whether the modules' attributes are the tensors of their parameter and buffer dicts
    (not so where pruning, a parametrization or weight norm computes a weight from others)."""
    w, cb, bw, bb, rm, rv, _ = tensors
    return (isinstance(w, Tensor) and conv.weight is w and conv.bias is cb
            and bn.weight is bw and bn.bias is bb
            and (not bn.track_running_stats
                 or (bn.running_mean is rm and bn.running_var is rv)))


def make(x, conv, bn, activation, residual: Optional[Tensor], backend: Optional[str],
         conv_first: bool = True) -> None:
    """Plan the call the checked path has just run without error (`run` said `MISS`), where
    it is a case for plans. The backend is chosen as the checked path chose it."""
    convs = eval_plan._CONV_TYPES if conv_first else eval_plan._PRE_CONV_TYPES
    if (type(conv) not in convs or type(bn) not in eval_plan._BN_TYPES
            or hasattr(bn, "process_group")  # (nn.SyncBatchNorm, resfuse's: synchronised)
            or conv.padding_mode != "zeros"
            or not bn.training or x.dim() != 4 or x.shape[0] == 0
            # (an activation module's settings may change: only names and Activations,
            # which are immutable)
            or not (activation is None or isinstance(activation, (str, Activation)))
            or (residual is not None and (type(residual) is not Tensor or not residual.is_cpu))):
        return
    tensors = _tensors(conv, bn)
    if not _held_by_the_modules(conv, bn, tensors):
        return
    w = tensors[0]
    if not w.is_cpu or w.dtype is not x.dtype:
        return
    cp = conv_params(w, conv.stride, conv.padding, conv.dilation, conv.groups)
    if cp.pre_pad != (0, 0):
        return
    try:
        be = dispatch.select(Case("conv_bn_act" if conv_first else "bn_act_conv", "cpu", x.dtype,
                                  memory_format_of(x) == _CL, cp.groups, True), backend)
    except dispatch.BackendUnavailable:
        return
    if not be.autograd_chain:
        return
    chain = be.conv_bn_act_chain if conv_first else be.bn_act_conv_chain
    plan = _TrainPlan(conv_first, x, conv, bn, activation, residual, _requested(backend), chain,
                      cp, as_activation(activation), tensors)
    key = id(conv)
    if key not in _finalized:  # (once per live conv: `clear()` keeps this)
        _finalized.add(key)
        weakref.finalize(conv, _forget, key)
    _plans[key] = plan


_finalized: set = set()  # ids of the live convs whose death drops their plan


def _forget(key: int) -> None:
    _plans.pop(key, None)
    _finalized.discard(key)
