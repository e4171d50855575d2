"""`resfuse.convert(model)`: swap the residual blocks of an existing model for fused ones.

Recognised blocks: torchvision's and timm's `BasicBlock` and `Bottleneck` (by class name and
defining module, then checked attribute by attribute) and resfuse's own plain reference blocks.
A block is swapped only when the fused block computes exactly the same function; otherwise it
is skipped with the reason in the report (squeeze-excitation, anti-aliasing, active drop-path
or drop-block, a norm that is not `nn.BatchNorm2d`, a conv subclass, mixed activations, …).

What convert keeps: the very same `Parameter` and buffer objects (an optimizer built before
still works; state-dict keys are unchanged), every module's train/eval mode, device, dtype and
memory format. It is all-or-nothing: every check runs and every new block is built before the
first one is put in, so an error leaves the model as it was. `revert(model)` puts the original
block objects back (or plain `resfuse.reference` blocks for fused blocks built directly).

Synchronised BN: `convert(model, sync_bn=True[, process_group=pg])` also puts a
`resfuse.SyncBatchNorm` (nn.SyncBatchNorm as resfuse computes it, on any device) in place of
every `nn.BatchNorm1d/2d/3d` of the model, fused blocks and the rest alike, sharing the same
Parameters and buffers, as `nn.SyncBatchNorm.convert_sync_batchnorm` does; a model that already
holds `nn.SyncBatchNorm` layers has them fused (in blocks) and swapped for resfuse's (elsewhere)
with their own process groups, sync_bn or not. `revert` leaves these SyncBatchNorm layers in.
"""
from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional, Tuple

import torch.nn as nn

from . import backend as dispatch, reference
from .activations import as_activation
from .backend.base import BackendUnavailable
from .validation import check_memory
from .modules import (FusedBasicBlock, FusedBottleneck, FusedConvBNAct, FusedResidualBlock,
                      SyncBatchNorm)

_ORIGINAL = "_resfuse_original"  # the replaced block, kept (unregistered) for `revert`


class NotFusable(Exception):
    """A block that cannot be fused exactly; the message is the reason."""


@dataclasses.dataclass
class ConvertReport:
    """What `convert`/`revert` did: `swapped` rows are (name, old class, new class), `skipped`
    rows (name, class, reason); `synced` names the BatchNorm layers made `resfuse.SyncBatchNorm`."""
    swapped: List[Tuple[str, str, str]] = dataclasses.field(default_factory=list)
    skipped: List[Tuple[str, str, str]] = dataclasses.field(default_factory=list)
    synced: List[str] = dataclasses.field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"{len(self.swapped)} block(s) swapped, {len(self.skipped)} skipped"]
        if self.synced:
            lines.append(f"  {len(self.synced)} BatchNorm layer(s) synchronised")
        lines += [f"  swapped {n}: {a} -> {b}" for n, a, b in self.swapped]
        lines += [f"  skipped {n} ({c}): {r}" for n, c, r in self.skipped]
        return "\n".join(lines)


def _qualname(m: nn.Module) -> str:
    t = type(m)
    return f"{t.__module__}.{t.__name__}"


def _origin(m: nn.Module) -> Optional[str]:
    """'torchvision' | 'timm' | 'resfuse' for the blocks we know, else None."""
    t = type(m)
    if t in (reference.ResidualBlock, reference.BasicBlock, reference.Bottleneck):
        return "resfuse"
    if t.__name__ in ("BasicBlock", "Bottleneck"):
        root = t.__module__.split(".")[0]
        if root in ("torchvision", "timm"):
            return root
    return None


def _looks_like_block(m: nn.Module) -> bool:
    name = type(m).__name__
    return ("Block" in name or "Bottleneck" in name) and hasattr(m, "conv1") and hasattr(m, "bn1")


def _is_off(m) -> bool:
    """An optional timm layer that does nothing: None, Identity, or a drop layer with p=0."""
    if m is None or type(m) is nn.Identity:
        return True
    p = getattr(m, "drop_prob", getattr(m, "p", None))
    return type(m).__name__ in ("DropPath", "DropBlock2d", "Dropout") and p == 0


_OPTIONAL_TIMM = {"drop_block": "drop_block (DropBlock)", "aa": "anti-aliasing layer (aa)",
                  "se": "squeeze-excitation / attention (se)",
                  "drop_path": "drop_path (stochastic depth)"}


# Exact types: a subclass may change what forward computes.
_FUSABLE_NORMS = (nn.BatchNorm2d, nn.SyncBatchNorm, SyncBatchNorm)
_PLAIN_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def _sync_plan(model: nn.Module, sync_bn: bool, process_group, report: "ConvertReport"):
    """[(parent, name, new SyncBatchNorm)] for every BatchNorm to swap (nothing changed yet)."""
    plan, made = [], {}
    for parent, name, qual, child in _walk(model):
        t = type(child)
        if t is nn.SyncBatchNorm or (sync_bn and t in _PLAIN_NORMS):
            if id(child) not in made:  # a shared layer stays shared
                made[id(child)] = SyncBatchNorm.from_bn(child, process_group)
            plan.append((parent, name, made[id(child)]))
            report.synced.append(qual)
        elif sync_bn and isinstance(child, nn.modules.batchnorm._BatchNorm) and t is not SyncBatchNorm:
            report.skipped.append((qual, _qualname(child), "a BatchNorm subclass: left as it is, "
                                   "not synchronised"))
    return plan


def _block_parts(m: nn.Module, origin: str):
    bottleneck = hasattr(m, "conv3")
    n = 3 if bottleneck else 2
    convs = [getattr(m, f"conv{i}") for i in range(1, n + 1)]
    bns = [getattr(m, f"bn{i}") for i in range(1, n + 1)]
    for i, c in enumerate(convs, 1):
        if type(c) is not nn.Conv2d:
            raise NotFusable(f"conv{i} is a {type(c).__name__}, not an nn.Conv2d")
    for i, b in enumerate(bns, 1):
        if type(b) not in _FUSABLE_NORMS:
            raise NotFusable(f"bn{i} is a {type(b).__name__}, not an nn.BatchNorm2d or "
                             "nn.SyncBatchNorm")
    known = {f"conv{i}" for i in range(1, n + 1)} | {f"bn{i}" for i in range(1, n + 1)}
    known |= {"downsample"}
    if origin == "timm":
        acts = [getattr(m, f"act{i}") for i in range(1, n + 1)]
        known |= {f"act{i}" for i in range(1, n + 1)} | set(_OPTIONAL_TIMM)
        for attr, what in _OPTIONAL_TIMM.items():
            layer = getattr(m, attr, None)
            if not _is_off(layer):
                raise NotFusable(f"{what} is present ({type(layer).__name__}) and is not fused")
    else:
        acts = [m.relu]
        known |= {"relu"}
    try:
        kinds = {as_activation(a) for a in acts}
    except TypeError as e:
        raise NotFusable(str(e)) from None
    if len(kinds) != 1:
        raise NotFusable(f"the block mixes activations ({', '.join(map(str, kinds))})")
    extra = sorted(set(m._modules) - known - {k for k, v in m._modules.items() if v is None})
    if extra:
        raise NotFusable(f"unexpected submodule(s) {extra}: the block's forward may differ")
    return convs, bns, m.downsample, kinds.pop()


def fuse_block(block: nn.Module, backend: Optional[str] = None,
               memory: str = "default") -> FusedResidualBlock:
    """The fused equivalent of one block, sharing its modules; raises `NotFusable`.
    `memory`: the fused block's memory mode (`FusedResidualBlock`)."""
    check_memory(memory)
    origin = _origin(block)
    if origin is None:
        raise NotFusable(f"unrecognised block class {_qualname(block)} (resfuse converts "
                         "torchvision's and timm's BasicBlock and Bottleneck)")
    convs, bns, downsample, act = _block_parts(block, origin)
    if type(block) is reference.ResidualBlock:  # resfuse's own generic block (maybe pre-act)
        cls = FusedResidualBlock
    else:
        cls = FusedBottleneck if len(convs) == 3 else FusedBasicBlock
    pairs = [x for pair in zip(convs, bns) for x in pair]
    fused = cls.from_modules(*pairs, downsample=downsample, activation=act, backend=backend,
                             preact=getattr(block, "preact", False),
                             expansion=getattr(block, "expansion", None), memory=memory)
    fused.training = block.training  # not .train(): children keep their own modes
    object.__setattr__(fused, _ORIGINAL, block)
    return fused


def _walk(model: nn.Module):
    """(parent, child name, qualified name, child) for every module below `model`."""
    stack = [("", model)]
    while stack:
        prefix, parent = stack.pop()
        for name, child in list(parent._modules.items()):
            if child is None:
                continue
            qual = f"{prefix}.{name}" if prefix else name
            yield parent, name, qual, child
            stack.append((qual, child))


def convert(model: nn.Module, backend: Optional[str] = None, sync_bn: bool = False,
            process_group=None, memory: str = "default") -> ConvertReport:
    """Swap, in place, every block of `model` that resfuse can fuse exactly; returns a report.

    `backend` forces the fused blocks' backend (default: chosen per call, see
    `resfuse.use_backend`). `sync_bn=True` synchronises every BatchNorm's statistics over
    `process_group` (None: the whole world) in training, as nn.SyncBatchNorm. `memory`
    ("default" or "low") is the fused blocks' memory mode (see `FusedResidualBlock`).
    """
    check_memory(memory)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    if process_group is not None and not sync_bn:
        raise ValueError("convert: process_group is given but sync_bn is False")
    if backend is not None:
        name = dispatch.requested(backend)
        if name != "auto" and dispatch.backends()[name] != "ok":
            raise BackendUnavailable(f"convert(backend={name!r}): {dispatch.backends()[name]}")
    if _origin(model) is not None:
        raise ValueError("convert: the model is itself a block and cannot be replaced in "
                         "place; use resfuse.convert.fuse_block(block)")
    report = ConvertReport()
    norms = _sync_plan(model, sync_bn, process_group, report)
    previous = [(parent, name, parent._modules[name]) for parent, name, _ in norms]
    for parent, name, new in norms:  # first, so that the fused blocks hold the new layers
        parent._modules[name] = new
    try:
        plan = _block_plan(model, backend, report, memory)
    except BaseException:
        for parent, name, old in previous:  # all-or-nothing
            parent._modules[name] = old
        raise
    for parent, name, fused in plan:  # nothing below can fail
        parent._modules[name] = fused
    return report


def _block_plan(model: nn.Module, backend: Optional[str], report: ConvertReport,
                memory: str = "default"):
    """[(parent, name, fused block)] for every block to swap (nothing changed yet)."""
    plan: List[Tuple[nn.Module, str, nn.Module]] = []
    done: Dict[int, nn.Module] = {}
    skip_below = set()
    for parent, name, qual, child in _walk(model):
        if id(parent) in skip_below:
            skip_below.add(id(child))
            continue
        if isinstance(child, (FusedResidualBlock, FusedConvBNAct)):
            skip_below.add(id(child))
            continue
        if _origin(child) is None and not _looks_like_block(child):
            continue
        skip_below.add(id(child))  # never fuse inside a block
        if id(child) not in done:  # a block shared by two parents is fused once
            try:
                done[id(child)] = fuse_block(child, backend, memory)
            except NotFusable as e:
                report.skipped.append((qual, _qualname(child), str(e)))
                continue
        fused = done[id(child)]
        plan.append((parent, name, fused))
        report.swapped.append((qual, _qualname(child), type(fused).__name__))
    return plan


def _unfused(m: nn.Module) -> nn.Module:
    original = m.__dict__.get(_ORIGINAL)
    if isinstance(m, FusedConvBNAct):
        plain = reference.ConvBNAct(m.conv, m.bn, m.activation)
        plain.training = m.training
        return plain
    names = ["conv1", "bn1", "conv2", "bn2"] + (["conv3", "bn3"] if m.bottleneck else [])
    if original is None:
        plain = m._reference_class.from_modules(
            *(getattr(m, k) for k in names), downsample=m.downsample, activation=m.activation,
            preact=m.preact, expansion=m.expansion)
    else:
        plain = original
        for k in names + ["downsample"]:
            setattr(plain, k, getattr(m, k))  # the modules in use now (same objects unless replaced)
    plain.training = m.training
    return plain


def revert(model: nn.Module) -> ConvertReport:
    """Replace, in place, every fused module of `model` by plain PyTorch modules."""
    report = ConvertReport()
    for parent, name, qual, child in list(_walk(model)):
        if isinstance(child, (FusedResidualBlock, FusedConvBNAct)):
            plain = _unfused(child)
            parent._modules[name] = plain
            report.swapped.append((qual, type(child).__name__, _qualname(plain)))
    return report
