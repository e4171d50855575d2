"""The slot modules `convert` puts in place of a conv -> BatchNorm (-> activation) chain.

A chain found inside a module (see `graph_finder`) is fused *in place*, slot by slot, so that the
model's structure, its `state_dict` keys and its Parameter objects stay what they were:

* the conv's slot gets a `ChainConv` (an `nn.Conv2d` holding the conv's own `weight`/`bias`
  under the same names) whose forward is the whole fused op: `act(bn(conv(x)))` for a
  post-activation chain, `conv(act(bn(x)))` for a pre-activation one (DenseNet, ResNet v2);
* the BatchNorm's slot gets a `ChainBatchNorm` (a BatchNorm holding the very same Parameters and
  buffers under the same names) whose forward passes its input through: the fused op already
  applied it. The conv slot reads that module's tensors and `.training` on every call, so
  `load_state_dict`, `.train()`/`.eval()`, `.to()` and frozen BN keep working;
* the activation's slot gets `nn.Identity` (timm's `BatchNormAct2d` holds its activation
  inside: its slot keeps `drop`/`act` and skips the activation when it was fused).

The finder swaps a chain only where the module's dataflow proves it exact: the conv's output
feeds only the BN, the BN's only the activation (or, pre-activation, only the conv), each called
once. 1-D chains (Conv1d -> BatchNorm1d) run as 2-D ones of height 1.

`unswap(slot)` gives the original modules back (with the slot's current tensors and mode).
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import eval_plan, functional as RF
from .activations import Activation
from .modules import (SyncBatchNorm, _bn_args, bn_act_conv_modules,
                      conv_bn_act_modules)

Tensor = torch.Tensor

_ORIGINAL = "_resfuse_original"  # the module a slot replaced, kept unregistered for `revert`


def _with_original(slot: nn.Module, original: nn.Module) -> nn.Module:
    object.__setattr__(slot, _ORIGINAL, original)  # unregistered: no state-dict keys
    slot.training = original.training
    return slot


def _share_state(new: nn.Module, old: nn.Module) -> None:
    """Make `new` hold `old`'s very Parameters and buffers (None included) under their names."""
    for k, v in old._parameters.items():
        new._parameters[k] = v
    for k, v in old._buffers.items():
        new._buffers[k] = v
    new._non_persistent_buffers_set = set(old._non_persistent_buffers_set)


# ------------------------------------------------------------------------------ BatchNorm slots
class _PassThroughNorm:
    """Mixin: forward passes the input through (the conv slot applied this BN), then runs the
    `tail` modules kept from a timm BatchNormAct2d (its drop and, when not fused, its act)."""

    def _init_tail(self, tail: List[Tuple[str, nn.Module]]):
        self._tail_names = [n for n, _ in tail]
        for n, m in tail:
            self.add_module(n, m)

    def forward(self, x: Tensor) -> Tensor:
        for n in self._tail_names:
            x = self._modules[n](x)
        return x


class ChainBatchNorm(_PassThroughNorm, nn.BatchNorm2d):
    """The BatchNorm2d slot of a fused chain: its tensors and mode, no computation."""


class ChainBatchNorm1d(_PassThroughNorm, nn.BatchNorm1d):
    """The BatchNorm1d slot of a fused 1-D chain."""


class ChainSyncBatchNorm(_PassThroughNorm, SyncBatchNorm):
    """The slot of a synchronised BatchNorm (the conv slot's fused op synchronises)."""


def norm_slot(bn: nn.Module, tail: List[Tuple[str, nn.Module]] = ()) -> nn.Module:
    """The pass-through slot for `bn` (nn.BatchNorm1d/2d, nn.SyncBatchNorm, resfuse's
    SyncBatchNorm or a timm BatchNormAct2d), sharing its tensors."""
    if isinstance(bn, (nn.SyncBatchNorm, SyncBatchNorm)):
        cls, extra = ChainSyncBatchNorm, dict(process_group=bn.process_group)
    elif isinstance(bn, nn.BatchNorm1d):
        cls, extra = ChainBatchNorm1d, {}
    else:
        cls, extra = ChainBatchNorm, {}
    slot = cls(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats,
               device="meta", **extra)
    _share_state(slot, bn)
    slot._init_tail(list(tail))
    return _with_original(slot, bn)


# ----------------------------------------------------------------------------------- conv slots
class _ChainHead:
    """Mixin of the conv slots: the chain's BN slot and activation, and the plain fallback."""
    preact: bool = False

    def _init_chain(self, bn_slot: nn.Module, activation: Activation, backend: Optional[str],
                    members: list, memory: str = "default"):
        # Unregistered: the BN slot is registered where it sits; a second registration here
        # would add state-dict keys.
        object.__setattr__(self, "bn_slot", bn_slot)
        self.activation = activation
        self.backend = backend
        self.memory = memory  # what training keeps for backward (docs/memory.md)
        object.__setattr__(self, "_chain_members", members)  # [(parent, name, slot, original)]

    def extra_repr(self) -> str:
        kind = "bn_act_conv" if self.preact else "conv_bn_act"
        return f"{super().extra_repr()}, fused {kind}({self.activation}), backend={self.backend or 'auto'}"


class ChainConv(_ChainHead, nn.Conv2d):
    """The conv slot of a post-activation chain: y = act(bn(conv(x)))."""

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4:  # unbatched input: the plain modules' answer (BatchNorm2d refuses it)
            y = nn.Conv2d.forward(self, x)
            return self.activation.forward(nn.BatchNorm2d.forward(self.bn_slot, y))
        return conv_bn_act_modules(x, self, self.bn_slot, self.activation, None, self.backend,
                                   self.memory)


class PreActChainConv(_ChainHead, nn.Conv2d):
    """The conv slot of a pre-activation chain: y = conv(act(bn(x)))."""
    preact = True

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4:
            a = self.activation.forward(nn.BatchNorm2d.forward(self.bn_slot, x))
            return nn.Conv2d.forward(self, a)
        return bn_act_conv_modules(x, self.bn_slot, self, self.activation, None, self.backend,
                                   self.memory)


def _conv1d_as_2d(conv: nn.Conv1d, x: Tensor):
    """(x as (N, C, 1, L), kwargs of the 2-D op) for a Conv1d: a 1-D conv is a 2-D conv of
    height 1 (weight (O, I/g, 1, K))."""
    padding = conv.padding
    if conv.padding_mode != "zeros":
        x = F.pad(x, conv._reversed_padding_repeated_twice, mode=conv.padding_mode)
        padding = (0,)
    pad = padding if isinstance(padding, str) else (0, padding[0])
    return x.unsqueeze(2), dict(weight=conv.weight.unsqueeze(2), bias=conv.bias,
                                stride=(1, conv.stride[0]), padding=pad,
                                dilation=(1, conv.dilation[0]), groups=conv.groups)


class ChainConv1d(_ChainHead, nn.Conv1d):
    """The conv slot of a 1-D post-activation chain (Conv1d -> BatchNorm1d -> act)."""

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 3:
            y = nn.Conv1d.forward(self, x)
            return self.activation.forward(nn.BatchNorm1d.forward(self.bn_slot, y))
        x2, kw = _conv1d_as_2d(self, x)
        y = RF.conv_bn_act(x2, **kw, **_bn_args(self.bn_slot), activation=self.activation,
                           backend=self.backend, memory=self.memory)
        return y.squeeze(2)


class PreActChainConv1d(_ChainHead, nn.Conv1d):
    """The conv slot of a 1-D pre-activation chain (BatchNorm1d -> act -> Conv1d)."""
    preact = True

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 3 or self.padding_mode != "zeros":  # padding belongs after the act
            a = self.activation.forward(nn.BatchNorm1d.forward(self.bn_slot, x))
            return nn.Conv1d.forward(self, a)
        x2, kw = _conv1d_as_2d(self, x)
        y = RF.bn_act_conv(x2, **_bn_args(self.bn_slot), **kw, activation=self.activation,
                           backend=self.backend, memory=self.memory)
        return y.squeeze(2)


# The 2-D slots' eval calls take the modules' CPU eval plan (checks once per weight version,
# oneDNN in channels_last), as the fused blocks' do: they are nn.Conv2d / BatchNorm2d in all
# but forward, and the plan reads only their tensors.
eval_plan.register_conv_type(ChainConv)
eval_plan.register_pre_act_conv_type(PreActChainConv)
eval_plan.register_bn_type(ChainBatchNorm)
eval_plan.register_bn_type(ChainSyncBatchNorm)

_CONV_SLOTS = {(nn.Conv2d, False): ChainConv, (nn.Conv2d, True): PreActChainConv,
               (nn.Conv1d, False): ChainConv1d, (nn.Conv1d, True): PreActChainConv1d}
CONV_SLOT_TYPES = tuple(_CONV_SLOTS.values())
NORM_SLOT_TYPES = (ChainBatchNorm, ChainBatchNorm1d, ChainSyncBatchNorm)


def conv_slot(conv: nn.Module, bn_slot: nn.Module, activation: Activation, preact: bool,
              backend: Optional[str], members: list, memory: str = "default") -> nn.Module:
    """The fused slot for `conv` (exactly nn.Conv2d or nn.Conv1d), sharing its Parameters."""
    cls = _CONV_SLOTS[(type(conv), preact)]
    slot = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
               conv.dilation, conv.groups, conv.bias is not None, conv.padding_mode,
               device="meta")
    _share_state(slot, conv)
    slot._init_chain(bn_slot, activation, backend, members, memory)
    return _with_original(slot, conv)


def original_of(slot: nn.Module) -> nn.Module:
    """The module a slot replaced, given back the slot's current tensors and mode."""
    original = slot.__dict__[_ORIGINAL]
    for k, v in slot._parameters.items():
        original._parameters[k] = v
    for k, v in slot._buffers.items():
        original._buffers[k] = v
    original.training = slot.training
    return original


def unswap(slot: nn.Module) -> List[str]:
    """Put back every original module of the chain headed by conv slot `slot` (where its slot
    still sits); returns the slot names restored."""
    restored = []
    for parent, name, member, original in slot._chain_members:
        if parent._modules.get(name) is not member:
            continue  # replaced by the user since: left alone
        parent._modules[name] = original_of(member) if _ORIGINAL in member.__dict__ else original
        if _ORIGINAL not in member.__dict__:
            original.training = member.training
        restored.append(name)
    return restored
