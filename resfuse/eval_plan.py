"""The CPU eval fast path of the modules: one prepared plan per fused conv, per weight version.

A module's fused conv -> BN (running statistics) -> (+ residual) -> act in eval mode on the CPU
is, once BN is folded, one oneDNN call. What costs at batch 1 is not that call but what comes
around it: the argument checks, the backend choice, the fold's cache key and the op dispatch,
tens of microseconds per conv. A plan does all of that once, for one conv module and BN module
with given parameters and buffers, and then answers each call with a few identity and version
comparisons and the oneDNN call itself.

A plan is valid while all of these are what it was made with (else it is made again):
* the identity, `_version` and storage of the conv's weight and bias and the BN's weight,
  bias, running mean and running variance — an optimizer step, `load_state_dict`, an
  in-place edit under `torch.no_grad()`, `module.to(...)` and a new Parameter each change one;
* the activation, whether a residual is given, x's dtype, and the backend the call asks for
  (`backend=`, the `use_backend` scope, RESFUSE_BACKEND), resolved to `eager`;
* the oneDNN switch (`resfuse.backend.eager.set_cpu_fused_conv`).
Per input shape it keeps the output shape (the shape checks ran for it once) and the weight
packed for that shape.

Layout: a plan runs the conv in channels_last, oneDNN's preferred layout, whatever the input's
(an NCHW input is converted once, where a chain of fused convs starts) and hands back a
channels_last tensor, so fused convs pass channels_last to one another; the values are eager's
(see docs/cpu.md). A residual the caller owns (`owns_residual`: a block's projection output,
a FusedStage's intermediate) or one copied into channels_last is summed into in place.

Activation: oneDNN's own relu (clip for relu6) turns NaN into 0, so it runs only where a bound
on the conv's input (and residual) shows that no NaN or Inf can arise (`resfuse.value_bounds`:
bounds measured at a chain's start, then carried from conv to conv); elsewhere torch's
activation runs after oneDNN's conv, as eager's.

Not planned (the ordinary checked path runs, with the same results): training-mode or
untracked BN, gradients needed, torch.compile tracing, autocast, dtypes oneDNN lacks (fp64,
fp16), a non-zero padding mode or an asymmetric "same" padding, modules other than exactly
nn.Conv2d (or the converter's chain slot) and a BatchNorm2d kind, an empty batch, a residual whose shape, dtype or device is
not the output's (the checked path raises the error), and any case oneDNN refuses (remembered
per shape).

Edits that bypass version counters (`param.data.copy_(...)`, writes through `.numpy()`) are not
seen by any cache of folded weights: call `clear_plans()` (and `resfuse.folding.clear_cache()`)
after them.
"""
from __future__ import annotations

import math
import os
import threading
import weakref
from typing import Dict, Optional

import torch
import torch.nn as nn

from . import backend as dispatch
from .activations import Activation, as_activation
from .backend import eager
from .backend.base import Case
from . import folding, value_bounds
from .validation import ResfuseInputError, check_bn, check_conv, check_input, conv_params

Tensor = torch.Tensor
_CL = torch.channels_last
_MAX_SHAPES = 16  # input shapes remembered per plan (then started over)

# id(conv module) -> _ConvPlan; the entry goes with the module (weakref.finalize).
_plans: Dict[int, "_ConvPlan"] = {}
_BN_TYPES: tuple = (nn.BatchNorm2d, nn.SyncBatchNorm)  # + resfuse's SyncBatchNorm (register_bn_type)
# Exactly nn.Conv2d: a subclass may change its forward (timm's StdConv2d standardises its
# weight), so only classes known to run nn.Conv2d's conv are added (`register_conv_type`).
_CONV_TYPES: tuple = (nn.Conv2d,)
_REFUSED = object()  # a shape oneDNN refused


def register_bn_type(cls) -> None:
    """Let plans read BatchNorm modules of `cls` (same parameters and buffers as nn.BatchNorm2d)."""
    global _BN_TYPES
    if cls not in _BN_TYPES:
        _BN_TYPES = _BN_TYPES + (cls,)


def register_conv_type(cls) -> None:
    """Let plans run convs of `cls`, a subclass of nn.Conv2d whose conv is nn.Conv2d's (the
    converter's chain slots: without this their eval calls would take the checked path)."""
    global _CONV_TYPES
    if cls not in _CONV_TYPES:
        _CONV_TYPES = _CONV_TYPES + (cls,)


def clear_plans() -> None:
    """Forget every plan (and so every packed weight they hold), every stage program
    (`resfuse.stage_program`) and every recorded bound on activations
    (`resfuse.value_bounds`)."""
    _plans.clear()
    value_bounds.clear()
    for forget_programs in _on_clear:
        forget_programs()


_on_clear: list = []  # what else holds plans (`resfuse.stage_program`'s programs)


# Stands for an absent tensor (a conv without bias, BN without affine) in a plan's key: its
# version and storage never change.
_ABSENT = torch.empty(0)


def _tensors(conv_p: dict, bn_p: dict, bn_b: dict) -> tuple:
    """The six tensors a plan folds: conv weight and bias, BN weight, bias and running stats."""
    return (conv_p["weight"], conv_p["bias"], bn_p["weight"], bn_p["bias"],
            bn_b["running_mean"], bn_b["running_var"])


def _versions(w, cb, bw, bb, rm, rv) -> tuple:
    """Version counter and storage of each tensor (`_ABSENT` for None): an in-place change
    bumps the first, `module.to(...)` (which swaps `param.data`, keeping the Parameter and its
    version) changes the second. Written out: this runs on every call."""
    return (w._version, cb._version, bw._version, bb._version, rm._version, rv._version,
            w.data_ptr(), cb.data_ptr(), bw.data_ptr(), bb.data_ptr(), rm.data_ptr(),
            rv.data_ptr())


def _present(t):
    return _ABSENT if t is None else t


class _ConvPlan:
    __slots__ = ("conv_ref", "w", "cb", "bw", "bb", "rm", "rv", "versions", "act_arg",
                 "act", "residual", "dtype", "requested", "runner", "shapes", "cp", "weight",
                 "summed", "gain", "offset", "act_scale")

    def __init__(self, conv, tensors, act_arg, act, residual, dtype, requested, runner, cp,
                 weight):
        self.conv_ref = weakref.ref(conv)
        # (the tensors themselves are kept: they pin the identities compared per call)
        self.w, self.cb, self.bw, self.bb, self.rm, self.rv = tensors
        self.versions = _versions(*map(_present, tensors))
        self.act_arg, self.act = act_arg, act
        self.residual, self.dtype, self.requested = residual, dtype, requested
        self.runner, self.cp, self.weight = runner, cp, weight
        self.shapes: dict = {}  # x.shape -> (output shape, packed weight) or _REFUSED
        self.summed: set = set()  # x shapes whose in-place residual sum oneDNN has run
        # |conv(x) + b| <= gain * max|x| + offset (`value_bounds`), of the folded weights
        self.gain, self.offset = value_bounds.conv_gain(runner.folded.weight, runner.folded.bias)
        self.act_scale = value_bounds.act_scale(act)  # |act(z)| <= act_scale * max(|z|, 1)

    def entry(self, x: Tensor):
        """(output shape, packed weight) for x's shape, checked and packed on first sight;
        None where the checked path must run instead."""
        if len(self.shapes) >= _MAX_SHAPES:
            self.shapes.clear()
            self.summed.clear()
        shape = x.shape
        if x.dim() != 4 or shape[0] == 0:
            return None
        try:
            c_out, oh, ow = check_conv(x, self.weight, None, self.cp)
        except ResfuseInputError:
            return None  # the checked path raises it
        try:
            packed = self.runner.packed(x)
        except RuntimeError:
            self.shapes[shape] = _REFUSED
            return None
        hit = (torch.Size((shape[0], c_out, oh, ow)), packed)
        self.shapes[shape] = hit
        return hit


# os.environ's own dict (encoded keys): `key in os.environ` costs an exception per miss.
_ENV = getattr(os.environ, "_data", None)
_ENV_KEY = (os.environ.encodekey("RESFUSE_BACKEND") if _ENV is not None
            and hasattr(os.environ, "encodekey") else None)


def _build(x: Tensor, conv, bn, activation, residual, requested: str,
           backend: Optional[str]) -> Optional[_ConvPlan]:
    """A plan for this call, or None where it is not for the fast path."""
    if conv.padding_mode != "zeros" or bn.running_mean is None or bn.running_var is None:
        return None
    if not eager.onednn_eval_available(x.dtype):
        return None
    try:
        act = as_activation(activation)
        check_input(x)
        cp = conv_params(conv.weight, conv.stride, conv.padding, conv.dilation, conv.groups)
        if cp.pre_pad != (0, 0):
            return None
        c_out, _, _ = check_conv(x, conv.weight, conv.bias, cp)
        check_bn(x, c_out, bn.weight, bn.bias, bn.running_mean, bn.running_var, None,
                 bn.momentum, bn.eps, False, (2, c_out, 1, 1))
        be = dispatch.select(Case("conv_bn_act", "cpu", x.dtype, True, cp.groups, False), backend)
    except (ResfuseInputError, ValueError, TypeError, dispatch.BackendUnavailable):
        return None  # the checked path gives the error
    if be.name != "eager":
        return None
    tensors = _tensors(conv._parameters, bn._parameters, bn._buffers)
    try:
        _versions(*map(_present, tensors))
    except RuntimeError:  # inference tensors have no version counter: no plan
        return None
    with torch.no_grad():
        folded = folding.FoldedConv(*folding.fold(*tensors, bn.eps))
    runner = eager.OneDNNEvalConv(folded, cp, act, residual is not None)
    plan = _ConvPlan(conv, tensors, activation, act, residual is not None, x.dtype,
                     requested, runner, cp, conv.weight)
    key = id(conv)
    old = _plans.get(key)
    if old is None or old.conv_ref() is not conv:
        weakref.finalize(conv, _plans.pop, key, None)
    _plans[key] = plan
    return plan


_LIMIT = value_bounds.LIMIT
# A carried bound above this is measured afresh where `_bound` may measure: each ResNet block
# multiplies a carried bound by its convs' gains (about 2**11 in a ResNet-50), far more than
# the values grow, and a fresh measure at a block's first conv leaves room for several more.
_LOOSE = 2.0 ** 80
_known, _record = value_bounds.known, value_bounds.record


def _bound(plan: _ConvPlan, x: Tensor, residual: Optional[Tensor], out_numel: int,
           private_x: bool, private_residual: bool):
    """A bound on |bn(conv(x)) + residual| (`resfuse.value_bounds`), at most `LIMIT`, or
    None where none is known. Bounds of x and the residual are looked up (a fused conv's
    output carries one); x is measured (one read) only where the carried bound is missing
    or too loose, the activation has a fused form the bound unlocks, and x is at most four
    times the output's size: a block's first conv, whose measured input then bounds the
    block and the blocks after it (a read of x costs about one and a half activation passes
    over x's size; the bound saves a pass at every conv it reaches)."""
    br = 0.0
    if residual is not None:
        br = _known(residual, private_residual)
        if br is None:
            return None  # (measuring a residual costs more than the pass it would save)
    return bound_from(plan, _known(x, private_x), br, x, out_numel)[0]


def bound_from(plan: _ConvPlan, bx: Optional[float], br: float, x: Tensor, out_numel: int):
    """`_bound` from x's bound `bx` (None: unknown) and the residual's `br` (0: none):
    (the bound or None, x's bound after the call: measured here or `bx`). A measured x's
    bound is recorded."""
    carried = math.inf if bx is None else bx * plan.gain + plan.offset + br
    if carried <= _LOOSE:
        return carried, bx
    if plan.runner.bounded_unary is None or x.numel() > 4 * out_numel or br > _LIMIT / 2:
        return (carried if carried <= _LIMIT else None), bx
    measured = value_bounds.measure(x)
    if measured <= _LIMIT:
        value_bounds.record(x, measured)
        bx = measured
    b = min(measured * plan.gain + plan.offset + br, carried)
    return (b if b <= _LIMIT else None), bx


# Looked up once: the per-call path below is what a batch-1 forward pays per conv.
_is_compiling = torch.compiler.is_compiling
_grad_enabled = torch.is_grad_enabled
_autocast_enabled = torch.is_autocast_enabled
_scope_get = dispatch._scope.get


def requested_backend(backend: Optional[str]) -> str:
    """`dispatch.requested(backend)`, answered without it in the common case (no backend
    asked for anywhere: "auto")."""
    if backend is None and _scope_get() is None and _ENV_KEY is not None and _ENV_KEY not in _ENV:
        return "auto"
    return dispatch.requested(backend)


def stale(plan: _ConvPlan, w, cb, bw, bb, rm, rv) -> bool:
    """Whether the six tensors a plan folded (as the modules hold them now) are no longer the
    ones it was made with, or have changed since (`_versions`, written out: this runs per
    conv per call)."""
    if (w is not plan.w or cb is not plan.cb or bw is not plan.bw or bb is not plan.bb
            or rm is not plan.rm or rv is not plan.rv):
        return True
    cb_, bw_, bb_ = (_ABSENT if cb is None else cb, _ABSENT if bw is None else bw,
                     _ABSENT if bb is None else bb)
    return plan.versions != (w._version, cb_._version, bw_._version, bb_._version, rm._version,
                             rv._version, w.data_ptr(), cb_.data_ptr(), bw_.data_ptr(),
                             bb_.data_ptr(), rm.data_ptr(), rv.data_ptr())


# Recorders of the plan calls made (`resfuse.stage_program` captures a stage so): one per
# thread at most (`threading.local`: captures in two threads at once record each its own
# calls), and how many are set in all, so that a call with none set pays one comparison.
_recording = threading.local()
_recorders = 0
_recorders_lock = threading.Lock()


def set_recorder(recorder: Optional[list]) -> Optional[list]:
    """Append a `PlanCall` (or `ModuleCall`) to `recorder` for every call a plan answers in
    this thread (None: stop); returns this thread's recorder before, to be set back."""
    global _recorders
    old = getattr(_recording, "events", None)
    with _recorders_lock:
        _recorders += (recorder is not None) - (old is not None)
    _recording.events = recorder
    return old


def _recorder() -> Optional[list]:
    return getattr(_recording, "events", None) if _recorders else None


class ModuleCall:
    """A module called between plan calls (a ResNet-D projection's average pool), as
    `resfuse.stage_program` replays it."""
    __slots__ = ("module", "x", "y")

    def __init__(self, module, x, y):
        self.module, self.x, self.y = module, x, y


def call_module(module, x: Tensor) -> Tensor:
    """module(x), recorded where a recorder is set (`set_recorder`)."""
    y = module(x)
    events = _recorder()
    if events is not None:
        events.append(ModuleCall(module, x, y))
    return y


class PlanCall:
    """One call a plan answered, as `resfuse.stage_program` replays it: the tensors as given
    (`x`, `residual`) and returned (`y`), and what the call did with them."""
    __slots__ = ("plan", "packed", "x", "residual", "y", "into", "copy_x", "copy_residual",
                 "out_numel")

    def __init__(self, plan, packed, x, residual, y, into, copy_x, copy_residual, out_numel):
        self.plan, self.packed, self.x, self.residual, self.y = plan, packed, x, residual, y
        self.into, self.copy_x, self.copy_residual = into, copy_x, copy_residual
        self.out_numel = out_numel


def conv_bn_act(x: Tensor, conv, bn, activation, residual: Optional[Tensor],
                backend: Optional[str], owns_residual: bool = False,
                private_input: bool = False) -> Optional[Tensor]:
    """act(bn(conv(x)) + residual) by the module's plan, in channels_last; None where the
    checked path must run instead (see the module's docstring).

    `owns_residual`: no one but the caller holds `residual` and it is dead after this call
    (a block's own projection output, or a stage's intermediate: `FusedStage`). The conv is
    then summed into it in place and it is returned, so no fresh output is written (what
    torch.compile's freezing does in a traced graph). A residual that has to be made
    channels_last is a copy of our own and is summed into in the same way.
    `private_input`: no one but the caller has seen x (a fused block's or stage's own
    intermediate), so a bound recorded for it holds even without a version counter
    (inference tensors). Where a bound on x (and the residual) shows the pre-activation
    finite, oneDNN's own ReLU runs (`resfuse.value_bounds`); the output's bound is recorded.
    """
    if (bn.training or type(conv) not in _CONV_TYPES or type(bn) not in _BN_TYPES
            or type(x) is not Tensor or not x.is_cpu or _is_compiling()):
        return None
    cps, bnp, bnb = conv._parameters, bn._parameters, bn._buffers
    try:
        w, cb, bw, bb = cps["weight"], cps["bias"], bnp["weight"], bnp["bias"]
        rm, rv = bnb["running_mean"], bnb["running_var"]
    except KeyError:  # (a tensor computed from others: pruning, a parametrization)
        return None
    if _grad_enabled() and (
            x.requires_grad or (residual is not None and residual.requires_grad)
            or any(t is not None and t.requires_grad for t in (w, cb, bw, bb))):
        return None
    if _autocast_enabled("cpu") or not eager._cpu_fused_conv:
        return None
    requested = requested_backend(backend)
    plan = _plans.get(id(conv))
    if (plan is None or stale(plan, w, cb, bw, bb, rm, rv) or plan.dtype is not x.dtype
            or plan.requested != requested or plan.residual is (residual is None)
            or (plan.act_arg is not activation and plan.act != as_activation(activation))):
        plan = _build(x, conv, bn, activation, residual, requested, backend)
        if plan is None:
            return None
    shape = x.shape
    hit = plan.shapes.get(shape)
    if hit is None:
        hit = plan.entry(x)
        if hit is None:
            return None
    if hit is _REFUSED:
        return None
    out_shape, packed = hit
    if residual is not None:
        if (residual.shape != out_shape or residual.dtype is not x.dtype or not residual.is_cpu
                or type(residual) is not Tensor):
            return None  # the checked path converts or refuses it
    bound = _bound(plan, x, residual, out_shape.numel(), private_input, owns_residual)
    given_x, given_residual, copy_residual = x, residual, False
    if residual is not None:
        into = plan.runner.sum_into is not None
        if not residual.is_contiguous(memory_format=_CL):
            residual = residual.contiguous(memory_format=_CL)  # a copy: ours to sum into
            copy_residual = True
        elif into and not owns_residual:
            into = False
        elif into and shape not in plan.summed:
            # The first in-place sum for a shape goes into a copy: were oneDNN to refuse it
            # part way, the caller's tensor would be left half-written.
            residual = residual.clone(memory_format=_CL)
    else:
        into = False
    copy_x = not x.is_contiguous(memory_format=_CL)
    if copy_x:
        x = x.contiguous(memory_format=_CL)  # once, where a chain of fused convs starts
    try:
        y = plan.runner(x, packed, residual, into, bound is not None)
    except RuntimeError:
        plan.shapes[shape] = _REFUSED
        return None
    if into:
        plan.summed.add(shape)
    if _recorders:
        events = _recorder()
        if events is not None:
            events.append(PlanCall(plan, packed, given_x, given_residual, y, into, copy_x,
                                   copy_residual, out_shape.numel()))
    if bound is not None:
        _record(y, plan.act_scale * (bound if bound > 1.0 else 1.0))
    elif into:
        # y is the residual, written by oneDNN's sum without a version bump: a bound it
        # carried from before must not outlive this call
        value_bounds.forget(y)
    return y


def bn_act_conv(x: Tensor, bn, conv, activation, residual: Optional[Tensor],
                backend: Optional[str]) -> Optional[Tensor]:
    """conv(act(bn(x))) + residual in eval on the CPU as eager's own three ops (BN with its
    running statistics, the activation, the conv), or None where the checked path must run.

    Nothing folds here: the activation stands between the BN and the conv. What this saves
    is the checked path's per-call cost (argument checks, backend choice, dtype copies of the
    statistics), which on DenseNet-121 made the converted model slower than the one it
    replaced. The values are eager's, bit for bit; the layout is x's (a channels_last input,
    as the plans hand on, stays channels_last)."""
    if (bn.training or type(conv) not in _PRE_CONV_TYPES or type(bn) not in _BN_TYPES
            or type(x) is not Tensor or not x.is_cpu or _is_compiling() or x.dim() != 4
            or conv.padding_mode != "zeros"):
        return None
    try:
        rm, rv = bn._buffers["running_mean"], bn._buffers["running_var"]
        w, cb = conv._parameters["weight"], conv._parameters["bias"]
        bw, bb = bn._parameters["weight"], bn._parameters["bias"]
    except KeyError:  # (a tensor computed from others: pruning, a parametrization)
        return None
    if rm is None or rv is None:
        return None
    if _grad_enabled() and (
            x.requires_grad or (residual is not None and residual.requires_grad)
            or any(t is not None and t.requires_grad for t in (w, cb, bw, bb))):
        return None
    if _autocast_enabled("cpu"):
        return None
    try:
        be = dispatch.select(Case("bn_act_conv", "cpu", x.dtype,
                                  x.is_contiguous(memory_format=_CL), conv.groups, False),
                             backend)
    except (ValueError, TypeError, dispatch.BackendUnavailable):
        return None  # the checked path gives the error
    if be.name != "eager":
        return None
    if (x.dtype is not w.dtype or x.shape[1] != rm.shape[0]
            or (residual is not None and (type(residual) is not Tensor or not residual.is_cpu))):
        return None  # the checked path converts or refuses it
    try:
        act = as_activation(activation)
        a = act.forward(torch.batch_norm(x, bw, bb, rm, rv, False, 0.0, bn.eps, False))
        y = torch.conv2d(a, w, cb, conv.stride, conv.padding, conv.dilation, conv.groups)
    except RuntimeError:
        return None  # the checked path says what is wrong
    if residual is not None:
        if residual.shape != y.shape or residual.dtype is not y.dtype:
            return None
        y = y + residual
    return y


# The pre-activation slot (registered by `resfuse.chains`) besides nn.Conv2d.
_PRE_CONV_TYPES: tuple = (nn.Conv2d,)


def register_pre_act_conv_type(cls) -> None:
    """Let `bn_act_conv` run convs of `cls` (a subclass of nn.Conv2d whose conv is nn.Conv2d's)."""
    global _PRE_CONV_TYPES
    if cls not in _PRE_CONV_TYPES:
        _PRE_CONV_TYPES = _PRE_CONV_TYPES + (cls,)
