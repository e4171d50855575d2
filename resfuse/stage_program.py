"""A FusedStage's CPU eval forward captured once and replayed: its oneDNN calls, nothing else.

In eval on the CPU, a converted ResNet stage is a fixed sequence of oneDNN convolutions (BN
folded, ReLU and residual add as post-ops), each answered by its module's eval plan
(`resfuse.eval_plan`). Between two of them, the modules' Python (block and stage logic, the
plan's lookups and checks, the bound table) costs tens of microseconds at batch 1, and more
in a real forward than in a loop: each convolution has just pushed the interpreter's data
out of the caches. torch.compile's freezing runs the same convolutions from generated code
with nothing between them. A stage program does the same from Python:

* **capture**: the stage runs as it always does, and every call its plans answer is
  recorded (`eval_plan.set_recorder`): which plan, which earlier output (or the stage's input)
  goes in as x and as the residual, whether the conv was summed into the residual in place,
  which copies into channels_last were made. A capture that saw anything else (a conv the
  checked path ran) is dropped; a stage with a BN in training or a downsample of another
  form than a fused projection is not captured at all.
* **replay**: the same oneDNN calls on the same packed weights, each output handed to the
  step that reads it, with the bound arithmetic of `resfuse.value_bounds` (measures included,
  where the modules would measure) deciding per call whether oneDNN's own ReLU runs. The
  values are the modules' (the same calls in the same order), so eager's. A bound measured
  on the stage's input serves the whole replay, also where that input is the first block's
  shortcut: under `torch.inference_mode`, where the modules cannot trust it there (an
  inference tensor has no version counter), a replay still runs that ReLU as oneDNN's.

A program is replayed only while everything it was captured from is as it was, checked per
call: the stage's children and each block's submodules (identity), each block's activation,
backend and hooks, no `forward` of an instance's own, every BN in eval, and every plan's
six tensors (identity, version counter and storage, as the plan itself checks). It also
needs the conditions of the plans (no gradients: `torch.no_grad()` or
`torch.inference_mode()`, no autocast, oneDNN's fused conv on) and an input of the captured
shape, strides and dtype. Otherwise the stage runs through its modules (and is captured
again). `set_enabled(False)` turns programs off; `eval_plan.clear_plans()` drops them.
"""
from __future__ import annotations

import contextlib
import math
import operator
import threading
import weakref
from typing import Dict, Optional

import torch

from . import eval_plan, value_bounds
from .backend import eager

Tensor = torch.Tensor
_CL = torch.channels_last
_MAX_KEYS = 8  # input kinds (shape, strides, dtype) kept per stage (then started over)
_MAX_FAILED = 2  # failed captures per input kind before the stage stops trying it

_enabled = True
# id(stage) -> {input key: _Program, or the number of failed captures}
_programs: Dict[int, dict] = {}


def clear() -> None:
    """Forget every stage's programs (each is captured again on its next call)."""
    _programs.clear()


eval_plan._on_clear.append(clear)


def set_enabled(enabled: bool) -> bool:
    """Turn stage programs on or off (off: every stage runs through its modules, as the
    benchmarks' A/B and the tests compare); returns the old value."""
    global _enabled
    old, _enabled = _enabled, bool(enabled)
    return old


@contextlib.contextmanager
def disabled():
    """A scope in which stage programs are off (the old setting restored after): the stages
    run through their modules, as the benchmarks' A/B and the tests compare."""
    old = set_enabled(False)
    try:
        yield
    finally:
        set_enabled(old)


def has_hooks(m) -> bool:
    """Whether module `m` has forward or backward hooks of its own (a fused op, or a program,
    would not call them)."""
    return bool(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks
                or getattr(m, "_backward_pre_hooks", None))


_grad_enabled = torch.is_grad_enabled
_autocast_enabled = torch.is_autocast_enabled


def applies() -> bool:
    """Whether a stage program may run or be captured for this call (the conditions of the
    eval plans, checked once for the stage)."""
    return (_enabled and not _grad_enabled() and eager._cpu_fused_conv
            and not _autocast_enabled("cpu"))


_is = operator.is_
_get_training = operator.attrgetter("training")
_get_activation = operator.attrgetter("activation")
_get_backend = operator.attrgetter("backend")
_get_version = operator.attrgetter("_version")
_data_ptr = Tensor.data_ptr
_get_dict = operator.attrgetter("__dict__")


def _children(m) -> tuple:
    return tuple(m._modules.values())


class _Program:
    """The steps of one capture and what each call checks before replaying them."""
    __slots__ = ("owners", "children", "blocks", "activations", "backends", "requested",
                 "bns", "dicts", "names", "tensors", "present", "versions", "steps", "slots")

    def __init__(self, stage, blocks, convs, steps, slots):
        # The stage's children, then those of its blocks and their fused downsamples. (Not the
        # stage itself: its programs go with it, `capture`'s weakref.finalize, so nothing
        # here may keep it alive; its children do not refer to it.)
        self.owners = tuple(blocks) + tuple(b.downsample for b in blocks
                                            if b.downsample is not None)
        self.children = (_children(stage),) + tuple(map(_children, self.owners))
        self.blocks = tuple(blocks)
        self.activations = tuple(map(_get_activation, blocks))
        self.backends = tuple(map(_get_backend, blocks))
        # each backend asked for, and what it resolved to (a plan's `requested`)
        self.requested = tuple((be, eval_plan.requested_backend(be))
                               for be in dict.fromkeys(self.backends))
        self.bns = tuple(bn for _, bn, _ in convs)
        # every tensor a plan folded: where the modules hold it (dict, name) and the object
        # the plan folded (None: absent), then its version counter and storage at the fold
        # Versions and storages of the tensors present (an absent one's identity check
        # suffices): those each plan folded, so the program is as current as its plans.
        self.dicts, self.names, self.tensors, present, versions, ptrs = [], [], [], [], [], []
        for conv, bn, plan in convs:
            self.dicts += [conv._parameters] * 2 + [bn._parameters] * 2 + [bn._buffers] * 2
            self.names += ["weight", "bias", "weight", "bias", "running_mean", "running_var"]
            folded = (plan.w, plan.cb, plan.bw, plan.bb, plan.rm, plan.rv)
            self.tensors += folded
            for t, version, ptr in zip(folded, plan.versions[:6], plan.versions[6:]):
                if t is not None:
                    present.append(t)
                    versions.append(version)
                    ptrs.append(ptr)
        self.present, self.versions = tuple(present), tuple(versions + ptrs)
        self.dicts, self.names = tuple(self.dicts), tuple(self.names)
        self.tensors = tuple(self.tensors)
        self.steps = steps
        self.slots = slots  # how many tensors a replay hands on (the input is slot 0)

    def current(self, stage) -> bool:
        """Whether the stage and its modules are still what this program was captured from:
        the checks of every plan and block, each run over all of them at once."""
        requested = eval_plan.requested_backend
        return ((_children(stage),) + tuple(map(_children, self.owners)) == self.children
                and all(map(_is, map(_get_activation, self.blocks), self.activations))
                and all(map(_is, map(_get_backend, self.blocks), self.backends))
                and all(requested(be) == req for be, req in self.requested)
                and not any(map(has_hooks, self.blocks))
                and not any("forward" in d for d in map(_get_dict, self.blocks))
                and not any(map(_get_training, self.bns))
                and all(map(_is, map(dict.get, self.dicts, self.names), self.tensors))
                and tuple(map(_get_version, self.present))
                + tuple(map(_data_ptr, self.present)) == self.versions)


def _key(x: Tensor) -> tuple:
    return (x.shape, x.stride(), x.dtype)


_STRIDED = torch.strided


_LIMIT, _LOOSE = value_bounds.LIMIT, eval_plan._LOOSE
_record = value_bounds.record
_NO_RESIDUAL, _SUM_INTO, _BINARY = 0, 1, 2  # a conv step's call (OneDNNEvalConv.__call__'s three)


def replay(stage, x: Tensor) -> Optional[Tensor]:
    """The stage's output by its program for x's kind, or None where there is none or it is
    out of date (the caller runs the modules: `capture`).

    The loop is `OneDNNEvalConv.__call__` and `eval_plan.bound_from` written out, on what
    `_conv_step` prepared: at batch 1 each line of Python here costs about what a line of
    the modules does, so there are as few as can be."""
    progs = _programs.get(id(stage))
    if progs is None or type(x) is not Tensor or x.layout is not _STRIDED:
        return None
    key = (x.shape, x.stride(), x.dtype)
    prog = progs.get(key)
    if type(prog) is not _Program:
        return None
    if not prog.current(stage):
        # What changed (weights, most often) has outdated the programs of other input kinds
        # too: all go, and with them what they hold (plans, packed weights, modules).
        progs.clear()
        return None
    buf = [None] * prog.slots
    bounds = [None] * prog.slots
    buf[0], bounds[0] = x, value_bounds.known(x)
    y = b = None
    try:
        for step in prog.steps:
            (kind, op, xs, rs, out, dead, copy_x, copy_r, packed, static, free, bounded,
             gain, offset, scale, may_measure) = step
            xt = buf[xs]
            if kind is None:  # a module (an average pool): its output's bound is not known
                y, b = op(xt), None
                if y.shape != packed:  # (its shape as captured: the next conv's packing)
                    return None  # the modules run from x: nothing of the caller's written
            else:
                if rs is None:
                    r, br = None, 0.0
                else:
                    r, br = buf[rs], bounds[rs]
                b = None
                if br is not None:
                    bx = bounds[xs]
                    b = bx * gain + offset + br if bx is not None else math.inf
                    # (written `not b <= ...`: a NaN bound, 0 * inf of a zero input and a
                    # non-finite weight's gain, must count as no bound)
                    if not b <= _LOOSE:
                        if may_measure and br <= _LIMIT / 2:
                            m = value_bounds.measure(xt)
                            if m <= _LIMIT:
                                _record(xt, m)
                                bounds[xs] = m
                            b = min(m * gain + offset + br, b)
                        if not b <= _LIMIT:
                            b = None
                unary, scalars, after = free if b is None else bounded
                if copy_r:
                    r = r.contiguous(memory_format=_CL)
                if copy_x:
                    xt = xt.contiguous(memory_format=_CL)
                bias, padding, stride, dilation, groups, algo = static
                if kind == _NO_RESIDUAL:
                    y = op(xt, packed, bias, padding, stride, dilation, groups, unary, scalars,
                           algo)
                elif kind == _SUM_INTO:
                    y = op(r, xt, packed, bias, padding, stride, dilation, groups, "add", None,
                           unary, scalars, None)
                else:
                    y = op(xt, r, packed, bias, padding, stride, dilation, groups, "add", None,
                           unary, scalars, None)
                if after is not None:
                    y = y.relu_() if after.kind == "relu" else after.forward_(y)
                if b is not None:
                    b = scale * (b if b > 1.0 else 1.0)
            buf[out] = y
            bounds[out] = b
            for d in dead:
                buf[d] = None
    except RuntimeError:
        # oneDNN refused a call it took at capture: only the program's own intermediates
        # have been written (the input never is), so the modules can run from x. Counted
        # as a failed capture: were the refusal to stay, the next capture sees it too.
        progs[key] = 1
        return None
    if b is not None:
        _record(y, b)
    else:
        value_bounds.forget(y)
    return y


def _conv_step(ev, xs: int, rs: Optional[int], out: int) -> tuple:
    """A replay step for one recorded plan call (see `replay`)."""
    plan = ev.plan
    runner = plan.runner
    residual = ev.residual is not None
    if not residual:
        kind, op = _NO_RESIDUAL, runner.op
    elif ev.into:
        kind, op = _SUM_INTO, runner.sum_into
    else:
        kind, op = _BINARY, runner.binary
    static = (runner.bias, runner.padding, runner.stride, runner.dilation, runner.groups,
              runner.algo if not residual else None)
    may_measure = runner.bounded_unary is not None and ev.x.numel() <= 4 * ev.out_numel
    return [kind, op, xs, rs, out, (), ev.copy_x, ev.copy_residual, ev.packed, static,
            runner.post_ops(residual, False), runner.post_ops(residual, True), plan.gain,
            plan.offset, plan.act_scale, may_measure]


def capture(stage, x: Tensor, blocks, run) -> Tensor:
    """`run(x)` (the stage through its modules), recording the plans' calls to make the
    stage's program for x's kind. `blocks`: the stage's fused blocks, all of its children,
    or None where a child is not one a program can stand for (then nothing is recorded)."""
    if blocks is None or type(x) is not Tensor or x.layout is not _STRIDED:
        return run(x)
    progs = _programs.get(id(stage))
    key = _key(x)
    failed = 0 if progs is None else progs.get(key, 0)
    if type(failed) is not int or failed >= _MAX_FAILED or _norms(blocks) is None:
        return run(x)  # (a state that may pass, such as a BN in training, is not counted)
    events: list = []
    old = eval_plan.set_recorder(events)  # (this thread's calls only)
    try:
        y = run(x)
    finally:
        eval_plan.set_recorder(old)
    prog = _build(stage, blocks, x, y, events)
    del events
    if id(stage) not in _programs:
        if id(stage) not in _finalized:  # (once per stage: `clear()` keeps this)
            _finalized.add(id(stage))
            weakref.finalize(stage, _forget_stage, id(stage))
        _programs[id(stage)] = {}
    progs = _programs[id(stage)]
    if len(progs) >= _MAX_KEYS and key not in progs:
        progs.clear()
    progs[key] = prog if prog is not None else failed + 1
    return y


_finalized: set = set()  # ids of the live stages whose death drops their programs


def _forget_stage(stage_id: int) -> None:
    _programs.pop(stage_id, None)
    _finalized.discard(stage_id)


def _norms(blocks) -> Optional[dict]:
    """{id(conv): its BN} over the blocks' fused convs, or None where a block cannot be
    captured now: a BN in training or without running statistics (the plans do not run it),
    or a downsample of another form than a fused projection (it runs as a module)."""
    norms = {}
    for block in blocks:
        proj = block._fused_projection() if block.downsample is not None else None
        if block.downsample is not None and proj is None:
            return None
        for conv, bn in block._pairs() + ([] if proj is None else [proj[1:]]):
            if bn.training or bn.running_mean is None:
                return None
            norms[id(conv)] = bn
    return norms


def _build(stage, blocks, x: Tensor, y: Tensor, events: list) -> Optional[_Program]:
    """The program of one recorded run, or None where the run was not all plan calls and
    recorded modules from x to y."""
    norms = _norms(blocks)
    if norms is None:
        return None
    slots = {id(x): 0}  # id(tensor) -> the slot a replay holds it in
    caller = {0}  # slots holding the caller's tensor (x, or a module's output that is x)
    steps, convs, uses = [], [], []
    count = 1
    for ev in events:
        xs = slots.get(id(ev.x))
        if xs is None:
            return None
        if isinstance(ev, eval_plan.ModuleCall):
            rs = None
            # (the output's shape stands where a conv step has its packed weight: a replay
            # checks it, since the next conv's weight was packed for it)
            step = [None, ev.module, xs, None, count, (), None, None, ev.y.shape] + [None] * 7
            if ev.y is ev.x and xs in caller:  # (an nn.Identity pool: timm's stride-1 ResNet-D)
                caller.add(count)
        else:
            plan = ev.plan
            conv = plan.conv_ref()
            bn = norms.get(id(conv))
            rs = None if ev.residual is None else slots.get(id(ev.residual))
            # (A first in-place sum went into a copy, which `_conv_step` leaves out: were
            # oneDNN to refuse a call, a replay starts the stage over from its input, so its
            # own intermediates need not be kept intact.)
            if (bn is None or (ev.residual is not None and rs is None)
                    or (ev.into and not ev.copy_residual and rs in caller)):
                return None  # (the caller's tensor is never summed into)
            convs.append((conv, bn, plan))
            step = _conv_step(ev, xs, rs, count)
        slots[id(ev.y)] = count  # (an in-place sum's y is its residual: now this slot's)
        count += 1
        uses.append((xs, rs))
        steps.append(step)
    if not steps or slots.get(id(y)) != steps[-1][4] or len(convs) != len(norms):
        return None
    last_use = {}
    for i, (xs, rs) in enumerate(uses):
        last_use[xs] = i
        if rs is not None:
            last_use[rs] = i
    for i, step in enumerate(steps):
        if step[0] == _SUM_INTO and not step[7] and last_use[step[3]] != i:
            return None  # (summed into in place, yet read later: the modules never do this)
        step[5] = tuple(s for s, at in last_use.items() if at == i and s != step[4])
    return _Program(stage, blocks, convs, tuple(tuple(s) for s in steps), count)
