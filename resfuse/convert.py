"""`resfuse.convert(model)`: fuse an existing model's residual blocks and conv-BN chains.

Two levels, tried in this order, walking the model in its own order:

1. Whole residual blocks: torchvision's and timm's ResNet `BasicBlock` and `Bottleneck` (by
   class name and defining module, then checked attribute by attribute) and resfuse's own plain
   reference blocks become one fused block, the residual add and last activation included. A
   block is swapped only when the fused block computes exactly the same function; otherwise it
   is skipped with the reason (squeeze-excitation, anti-aliasing, active drop-path or
   drop-block, a norm that is not `nn.BatchNorm2d`, a conv subclass, mixed activations, ...).
2. Chains, everywhere else (inside skipped blocks too, and in models without any block:
   VGG-BN, DenseNet, MobileNet, EfficientNet, RegNet, ResNet v2, CSPNet): every
   conv -> BatchNorm (-> activation) and BatchNorm -> activation -> conv chain that the module's
   dataflow proves exact (`graph_finder`: torch.fx per module, known forwards as the fallback)
   is swapped slot by slot for the fused op (`chains`). Depthwise and grouped convs, Conv1d ->
   BatchNorm1d and timm's ConvNormAct / BatchNormAct2d included. A residual add written in a
   forward stays as it is: only whole known blocks fuse it.

It never raises on a model it does not know: what it cannot fuse is left as it is, with the
reason in the report.

What convert keeps: the very same `Parameter` and buffer objects (an optimizer built before
still works; state-dict keys are unchanged, both ways), every module's train/eval mode, device,
dtype and memory format. It is all-or-nothing: every check runs and every new module is built
before the first one is put in, so an error leaves the model as it was. `revert(model)` puts
the original modules back (or plain `resfuse.reference` blocks for fused blocks built
directly).

Synchronised BN: `convert(model, sync_bn=True[, process_group=pg])` also puts a
`resfuse.SyncBatchNorm` (nn.SyncBatchNorm as resfuse computes it, on any device) in place of
every `nn.BatchNorm1d/2d/3d` of the model, fused blocks and the rest alike, sharing the same
Parameters and buffers, as `nn.SyncBatchNorm.convert_sync_batchnorm` does; a model that already
holds `nn.SyncBatchNorm` layers has them fused (in blocks) and swapped for resfuse's (elsewhere)
with their own process groups, sync_bn or not. `revert` leaves these SyncBatchNorm layers in.
"""
from __future__ import annotations

import dataclasses
from collections import Counter
from typing import Dict, List, NamedTuple, Optional, Tuple

import torch.nn as nn

from . import backend as dispatch, chains as slots, graph_finder, reference
from .activations import as_activation
from .backend.base import BackendUnavailable
from .validation import check_memory
from .modules import (FusedBasicBlock, FusedBottleneck, FusedConvBNAct, FusedResidualBlock,
                      FusedStage, SyncBatchNorm, _has_hooks)

_ORIGINAL = "_resfuse_original"  # the replaced block, kept (unregistered) for `revert`


class NotFusable(Exception):
    """A block that cannot be fused exactly; the message is the reason."""


class ChainRow(NamedTuple):
    """One fused chain: `name` is its conv's qualified name, `members` every slot swapped (in
    dataflow order), `kind` "conv_bn_act" or "bn_act_conv", `note` what stayed out of it."""
    name: str
    members: Tuple[str, ...]
    kind: str
    activation: str
    note: str = ""


@dataclasses.dataclass
class ConvertReport:
    """What `convert`/`revert` did, in model order: `swapped` rows are whole blocks (name, old
    class, new class); `chains` the fused chains (`ChainRow`); `skipped` rows (name, class,
    reason) what was left as it is; `synced` the BatchNorm layers made `resfuse.SyncBatchNorm`."""
    swapped: List[Tuple[str, str, str]] = dataclasses.field(default_factory=list)
    skipped: List[Tuple[str, str, str]] = dataclasses.field(default_factory=list)
    synced: List[str] = dataclasses.field(default_factory=list)
    chains: List[ChainRow] = dataclasses.field(default_factory=list)
    device: Optional[str] = None  # the model's device type when converted ("cpu", "cuda")

    def summary(self) -> List[str]:
        """One line per kind: blocks, each chain kind, skips, synchronised norms."""
        lines = [f"{len(self.swapped)} block(s) swapped, {len(self.chains)} chain(s) fused, "
                 f"{len(self.skipped)} skipped"]
        if self.swapped:
            lines.append("  blocks: " + _tally(new for _, _, new in self.swapped))
        for kind in (graph_finder.POST, graph_finder.PRE):
            rows = [r for r in self.chains if r.kind == kind]
            if rows:
                lines.append(f"  {kind} chains: {len(rows)} ({_tally(r.activation for r in rows)})")
        lone = sum(r.kind == graph_finder.POST and r.activation == "identity" for r in self.chains)
        if lone:
            lines.append(f"  of which conv+BN without activation: {lone} (in eval the BN folds into "
                         "the conv; in training on the CPU they run the very torch ops of the "
                         "unfused pair, so expect no gain there)")
        if self.chains and self.device == "cpu":
            lines += _CPU_CHAIN_NOTE
        noted = sum(bool(r.note) for r in self.chains)
        if noted:
            lines.append(f"  chains with a part left out: {noted} (see their notes)")
        if self.synced:
            lines.append(f"  {len(self.synced)} BatchNorm layer(s) synchronised")
        return lines

    def __str__(self) -> str:
        lines = self.summary()
        lines += [f"  swapped {n}: {a} -> {b}" for n, a, b in self.swapped]
        lines += [f"  fused {r.name}: {r.kind}({r.activation}) over {' -> '.join(r.members)}"
                  + (f"; {r.note}" if r.note else "") for r in self.chains]
        lines += [f"  skipped {n or '(model)'} ({c}): {r}" for n, c, r in self.skipped]
        return "\n".join(lines)


# What a fused chain gains on the CPU, measured one chain at a time (bench: the blocks suite's
# lone chains; docs/convert.md has the figures): said in the report, not hidden by the swap.
# The slots stay, as the model may move to a GPU, where the kernels fuse them.
_CPU_CHAIN_NOTE = [
    "  on the CPU: in training every chain runs torch's own ops (no gain; a little Python per "
    "chain);",
    "    in eval conv -> BN (-> act) chains run oneDNN with the BN folded (gains in channels_last "
    "and in whole models; a lone chain in NCHW pays a layout copy), BN -> act -> conv chains run "
    "eager's own ops (no gain); see docs/convert.md",
]


def _tally(items) -> str:
    return ", ".join(f"{k} {v}" for k, v in Counter(items).most_common())


def _qualname(m: nn.Module) -> str:
    t = type(m)
    return f"{t.__module__}.{t.__name__}"


# The files whose BasicBlock/Bottleneck fuse whole. Other libraries' classes of the same name
# (timm's regnet, cspnet, ... Bottleneck) have other parts and forwards: chains only.
_BLOCK_FILES = {"torchvision.models.resnet": "torchvision", "timm.models.resnet": "timm"}


def _origin(m: nn.Module) -> Optional[str]:
    """'torchvision' | 'timm' | 'resfuse' for the blocks we know, else None."""
    t = type(m)
    if t in (reference.ResidualBlock, reference.BasicBlock, reference.Bottleneck):
        return "resfuse"
    if t.__name__ in ("BasicBlock", "Bottleneck"):
        return _BLOCK_FILES.get(t.__module__)
    return None


def _looks_like_block(m: nn.Module) -> bool:
    """A residual-block-like module we do not fuse whole (reported, then fused chain by chain)."""
    name = type(m).__name__
    if isinstance(m, (nn.Sequential, nn.ModuleList, nn.ModuleDict)):
        return False  # containers of blocks or layers (a DenseNet block, a RegNet transform)
    # (Not DenseNet's layers: no residual add, both chains fuse, nothing to report.)
    if not any(k in name for k in ("Block", "Bottleneck", "Residual", "MBConv",
                                   "DepthwiseSeparable")):
        return False
    return hasattr(m, "conv1") or any(graph_finder.is_conv(c) for c in m.modules())


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
_FUSABLE_NORMS_1D = graph_finder._NORMS_1D  # (nn.BatchNorm1d and both sync BNs)
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
    # A 1-D block (resfuse.reference.ResidualBlock(dim=1): Conv1d / BatchNorm1d throughout)
    # fuses whole as the 2-D one does, its ops running as 2-D ones of height 1.
    one_d = type(convs[0]) is nn.Conv1d
    conv_t, norms = (nn.Conv1d, _FUSABLE_NORMS_1D) if one_d else (nn.Conv2d, _FUSABLE_NORMS)
    for i, c in enumerate(convs, 1):
        if type(c) is not conv_t:
            raise NotFusable(f"conv{i} is a {type(c).__name__}, not an nn.{conv_t.__name__}"
                             + (" (conv1 is an nn.Conv1d)" if one_d else ""))
    for i, b in enumerate(bns, 1):
        if type(b) not in norms:
            raise NotFusable(f"bn{i} is a {type(b).__name__}, not an "
                             f"nn.BatchNorm{'1' if one_d else '2'}d or nn.SyncBatchNorm")
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
    """(parent, child name, qualified name, child) for every module below `model`, in model
    order (depth first, children in registration order)."""
    def below(prefix, parent):
        for name, child in list(parent._modules.items()):
            if child is None:
                continue
            qual = f"{prefix}.{name}" if prefix else name
            yield parent, name, qual, child
            yield from below(qual, child)
    yield from below("", model)


def convert(model: nn.Module, backend: Optional[str] = None, sync_bn: bool = False,
            process_group=None, *, chains: bool = True,
            memory: str = "default") -> ConvertReport:
    """Fuse, in place, every block and chain of `model` that resfuse can fuse exactly; returns
    a report of what was fused and of what was left, with why.

    `backend` forces the fused modules' backend (default: chosen per call, see
    `resfuse.use_backend`). `sync_bn=True` synchronises every BatchNorm's statistics over
    `process_group` (None: the whole world) in training, as nn.SyncBatchNorm. `chains=False`
    swaps whole blocks only (as resfuse did before chains). `memory` ("default" or "low") is
    the fused blocks' memory mode (see `FusedResidualBlock`).
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
    first = next(iter(model.parameters()), None)
    report.device = None if first is None else first.device.type
    norms = _sync_plan(model, sync_bn, process_group, report)
    previous = [(parent, name, parent._modules[name]) for parent, name, _ in norms]
    for parent, name, new in norms:  # first, so that the fused modules hold the new layers
        parent._modules[name] = new
    try:
        plan = _block_plan(model, backend, report, chains, memory)
    except BaseException:
        for parent, name, old in previous:  # all-or-nothing
            parent._modules[name] = old
        raise
    for parent, name, new in plan:  # nothing below can fail
        parent._modules[name] = new
        if type(parent) is nn.Sequential and isinstance(new, FusedResidualBlock):
            parent.__class__ = FusedStage  # the same object: hands its blocks' outputs on
    return report


def _block_plan(model: nn.Module, backend: Optional[str], report: ConvertReport,
                chains: bool = True, memory: str = "default"):
    """[(parent, name, new module)] for every block and chain slot to swap (nothing changed)."""
    return _Planner(model, backend, report, chains, memory).run()


_FUSED = (FusedResidualBlock, FusedConvBNAct) + slots.CONV_SLOT_TYPES + slots.NORM_SLOT_TYPES


class _Planner:
    """Walks the model once, in its order, and plans every swap (nothing changes here)."""

    def __init__(self, model: nn.Module, backend: Optional[str], report: ConvertReport,
                 chains: bool, memory: str = "default"):
        self.model, self.backend, self.report, self.chains = model, backend, report, chains
        self.memory = memory
        self.plan: List[Tuple[nn.Module, str, nn.Module]] = []
        self.fused_blocks: Dict[int, nn.Module] = {}
        # A module registered in two places cannot have its slot swapped in one of them only.
        self.uses = Counter(id(m) for _, m in model.named_modules(remove_duplicate=False))
        self.found_any = False

    def run(self):
        self._visit(self.model, "")
        r = self.report
        if not (r.swapped or r.chains or r.skipped) and not self.found_any:
            r.skipped.append(("", _qualname(self.model), "nothing to fuse: no known residual "
                              "block and no conv -> BatchNorm or BatchNorm -> activation -> "
                              "conv chain (resfuse fuses nn.Conv1d/2d with nn.BatchNorm1d/2d)"))
        return self.plan

    def _visit(self, module: nn.Module, qual: str, trusted: bool = True):
        """Plan `module`'s children (chains among them first), then go below each."""
        claimed, untrusted = set(), set()
        if self.chains and trusted:
            claimed, untrusted = self._chains_in(module, qual)
        elif self.chains and any(graph_finder.is_conv(m) for m in module._modules.values()):
            self.report.skipped.append((qual, _qualname(module), "its parent's forward calls "
                                        "its submodules directly (bypassing its forward): its "
                                        "layers are left as they are"))
        for name, child in list(module._modules.items()):
            if child is None or name in claimed:
                continue
            cq = f"{qual}.{name}" if qual else name
            if isinstance(child, _FUSED):
                self.found_any = True
                continue
            if _origin(child) is not None:
                if self._block(module, name, cq, child) or not self.chains:
                    continue  # fused whole (or blocks only): nothing to do below
            elif _looks_like_block(child) and self.chains:
                self.report.skipped.append((cq, _qualname(child), _UNKNOWN_BLOCK))
            self._visit(child, cq, trusted=name not in untrusted)

    def _block(self, parent, name, qual, child) -> bool:
        if id(child) not in self.fused_blocks:  # a block shared by two parents is fused once
            try:
                self.fused_blocks[id(child)] = fuse_block(child, self.backend, self.memory)
            except NotFusable as e:
                self.report.skipped.append((qual, _qualname(child), str(e)
                                            + ("; its chains are fused one by one" if self.chains else "")))
                return False
            except Exception as e:  # noqa: BLE001 - a block we misjudged: never the user's crash
                self.report.skipped.append((qual, _qualname(child), f"could not be analysed as "
                                            f"a block ({type(e).__name__}: {e})"))
                return False
        fused = self.fused_blocks[id(child)]
        self.plan.append((parent, name, fused))
        self.report.swapped.append((qual, _qualname(child), type(fused).__name__))
        return True

    def _chains_in(self, module: nn.Module, qual: str):
        """Plan the chains among `module`'s children; (claimed child names, children whose own
        children the forward calls directly)."""
        try:
            found = graph_finder.find(module)
        except Exception as e:  # noqa: BLE001 - the finder's own failure costs this module only
            found = graph_finder.Found([], [("", f"could not be analysed ({type(e).__name__}: "
                                                 f"{e})")], set(), "error")
        where = lambda n: f"{qual}.{n}" if qual and n else (n or qual)  # noqa: E731
        for n, reason in found.skipped:
            self.report.skipped.append((where(n), _qualname(module._modules[n]) if n else
                                        _qualname(module), reason))
        claimed = set()
        for chain in found.chains:
            mods = [module._modules[n] for n in chain.names]
            why = self._why_not(mods, chain)
            if why:
                self.report.skipped.append((where(chain.conv), _qualname(mods[0] if chain.kind == graph_finder.POST else mods[-1]), why))
                continue
            self._swap_chain(module, chain, where)
            claimed.update(chain.names)
        return claimed, found.direct_calls

    def _why_not(self, mods, chain) -> str:
        for m in mods:
            if self.uses[id(m)] > 1:
                return f"{chain.kind} chain not fused: a {type(m).__name__} of it is shared with another part of the model"
            if _has_hooks(m):
                return f"{chain.kind} chain not fused: a {type(m).__name__} of it has hooks, which a fused op would not call"
        return ""

    def _swap_chain(self, parent: nn.Module, chain, where):
        self.found_any = True
        conv, bn = parent._modules[chain.conv], parent._modules[chain.bn]
        tail = []
        if graph_finder.is_batchnorm_act(bn):  # keep its drop and act where they are
            tail = [("drop", bn.drop), ("act", nn.Identity() if chain.act_inside else bn.act)]
        bn_slot = slots.norm_slot(bn, tail)
        members = [(parent, chain.bn, bn_slot, bn)]
        if chain.act_name:
            act = parent._modules[chain.act_name]
            ident = nn.Identity()
            ident.training = act.training
            members.append((parent, chain.act_name, ident, act))
        conv_slot = slots.conv_slot(conv, bn_slot, chain.activation,
                                    chain.kind == graph_finder.PRE, self.backend, members,
                                    self.memory)
        members.insert(0, (parent, chain.conv, conv_slot, conv))
        for p, n, new, _ in members:
            self.plan.append((p, n, new))
        self.report.chains.append(ChainRow(where(chain.conv), tuple(where(n) for n in chain.names),
                                           chain.kind, str(chain.activation), chain.note))


_UNKNOWN_BLOCK = ("unrecognised block class: not fused whole (only torchvision's and timm's "
                  "ResNet blocks are); its chains are fused one by one, any residual add in its "
                  "forward runs as it is")


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
    """Replace, in place, every fused module of `model` by plain PyTorch modules: fused chains
    by their original modules, fused blocks by the original blocks."""
    report = ConvertReport()
    if type(model) is FusedStage:
        model.__class__ = nn.Sequential
    for parent, name, qual, child in list(_walk(model)):
        if type(child) is FusedStage:
            child.__class__ = nn.Sequential
        if parent._modules.get(name) is not child:
            continue  # already put back with its chain
        if isinstance(child, (FusedResidualBlock, FusedConvBNAct)):
            plain = _unfused(child)
            parent._modules[name] = plain
            report.swapped.append((qual, type(child).__name__, _qualname(plain)))
        elif isinstance(child, slots.CONV_SLOT_TYPES):
            prefix = qual[: -len(name)]
            restored = slots.unswap(child)
            kind = graph_finder.PRE if child.preact else graph_finder.POST
            report.chains.append(ChainRow(qual, tuple(prefix + n for n in restored), kind,
                                          str(child.activation), "reverted"))
    return report
