"""Drop-in modules. Each keeps the plain module's submodules and attribute names (so state
dicts load both ways, keys unchanged) and has a `forward` that calls `resfuse.functional`.

* `FusedConvBNAct`     conv -> bn -> (+ residual) -> act        submodules `conv`, `bn`
* `FusedResidualBlock` basic / bottleneck, post- or pre-activation (see reference.ResidualBlock)
* `FusedBasicBlock`, `FusedBottleneck`: torchvision's signatures, so that
  `torchvision.models.resnet.ResNet(FusedBottleneck, [3, 4, 6, 3])` builds a fused ResNet-50.
* `SyncBatchNorm`: `nn.SyncBatchNorm` computed by resfuse (on any device: torch's refuses CPU
  tensors), what `convert(model, sync_bn=True)` puts in place of every BatchNorm.

A BatchNorm that is a SyncBatchNorm (torch's or resfuse's) synchronises its statistics
over its `process_group` (None: the whole world) in training, as nn.SyncBatchNorm does, inside
the fused ops.

Every BatchNorm keeps its own mode and options: a block's `bn2.eval()` (frozen BN) is honoured,
as are `momentum=None`, `affine=False` and `track_running_stats=False`.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import eval_plan, stage_program, train_plan
from . import functional as RF
from . import reference
from .activations import ActivationLike, as_activation
from .validation import ResfuseInputError, check_memory

Tensor = torch.Tensor


def _conv_args(conv: nn.Conv2d, x: Tensor):
    """(x, kwargs) for functional ops from an nn.Conv2d; non-zero padding modes pad x first,
    exactly as nn.Conv2d does."""
    if not isinstance(conv, (nn.Conv2d, nn.Conv1d)):
        raise ResfuseInputError(f"expected an nn.Conv2d or nn.Conv1d, got {type(conv).__name__}")
    padding = conv.padding
    if conv.padding_mode != "zeros":
        x = F.pad(x, conv._reversed_padding_repeated_twice, mode=conv.padding_mode)
        padding = 0
    return x, dict(weight=conv.weight, bias=conv.bias, stride=conv.stride, padding=padding,
                   dilation=conv.dilation, groups=conv.groups)


def is_batch_norm_2d(m) -> bool:
    """A BatchNorm the fused ops can stand in for: nn.BatchNorm2d, nn.SyncBatchNorm or
    resfuse's SyncBatchNorm."""
    return isinstance(m, (nn.BatchNorm2d,) + _SYNC_NORMS)


def is_batch_norm_1d(m) -> bool:
    """A BatchNorm the 1-D fused ops can stand in for (on (N, C, L) input): nn.BatchNorm1d,
    nn.SyncBatchNorm or resfuse's SyncBatchNorm."""
    return isinstance(m, (nn.BatchNorm1d,) + _SYNC_NORMS)


def _sync_group(bn) -> Optional[object]:
    """The process group an nn.SyncBatchNorm synchronises over in this call, else None
    (nn.SyncBatchNorm's rule: in training, with torch.distributed initialised; the functional
    op drops a group of one process)."""
    if not (isinstance(bn, _SYNC_NORMS) and bn.training):
        return None
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()):
        return None
    return bn.process_group if bn.process_group else dist.group.WORLD


def _bn_args(bn: nn.BatchNorm2d) -> dict:
    """The state `nn.BatchNorm2d.forward` passes to F.batch_norm, plus its bookkeeping."""
    if not (is_batch_norm_2d(bn) or is_batch_norm_1d(bn)):
        raise ResfuseInputError(f"expected an nn.BatchNorm2d or nn.BatchNorm1d, got {type(bn).__name__}")
    tracking = not bn.training or bn.track_running_stats
    counting = bn.training and bn.track_running_stats
    return dict(bn_weight=bn.weight, bn_bias=bn.bias,
                running_mean=bn.running_mean if tracking else None,
                running_var=bn.running_var if tracking else None,
                num_batches_tracked=bn.num_batches_tracked if counting else None,
                training=bn.training, momentum=bn.momentum, eps=bn.eps,
                process_group=_sync_group(bn))


class SyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """`nn.SyncBatchNorm` computed by resfuse's ops: the same constructor, attributes
    (`process_group`: None means the whole world), state dict and results, but it runs on any
    device, the CPU with gloo included, with one all-reduce per forward and one per backward.
    Inputs of any rank >= 2 are normalized as (N, C, L, 1). Not a subclass of nn.SyncBatchNorm:
    DistributedDataParallel refuses those in a CPU model."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1,
                 affine: bool = True, track_running_stats: bool = True, process_group=None,
                 device=None, dtype=None, *, backend: Optional[str] = None):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
        self.process_group = process_group
        self.backend = backend

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    @classmethod
    def from_bn(cls, bn: nn.Module, process_group=None,
                backend: Optional[str] = None) -> "SyncBatchNorm":
        """A SyncBatchNorm sharing `bn`'s Parameters and buffers (the same objects) and mode;
        `process_group` None keeps an nn.SyncBatchNorm's own (None: the world)."""
        if not isinstance(bn, nn.modules.batchnorm._BatchNorm):
            raise ResfuseInputError(f"bn: expected a BatchNorm module, got {type(bn).__name__}")
        if process_group is None and isinstance(bn, _SYNC_NORMS):
            process_group = bn.process_group
        new = cls(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats,
                  process_group, device="meta", backend=backend)
        for name in ("weight", "bias"):
            setattr(new, name, getattr(bn, name))
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            setattr(new, name, getattr(bn, name))
        new.training = bn.training
        return new

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        x = input if input.dim() == 4 else input.reshape(input.shape[0], input.shape[1], -1, 1)
        y = RF.bn_act(x, **_bn_args(self), activation="identity", backend=self.backend)
        return y if input.dim() == 4 else y.reshape(input.shape)


# The SyncBatchNorm classes: torch's and resfuse's.
_SYNC_NORMS = (nn.SyncBatchNorm, SyncBatchNorm)
eval_plan.register_bn_type(SyncBatchNorm)


def _norm_layer(norm_layer, sync_bn: bool, process_group):
    if not sync_bn:
        if process_group is not None:
            raise ResfuseInputError("process_group: given without sync_bn=True")
        return norm_layer
    if norm_layer is not None:
        raise ResfuseInputError("sync_bn=True builds its own norm layers; pass norm_layer or "
                                "sync_bn, not both")
    return functools.partial(SyncBatchNorm, process_group=process_group)


def conv_bn_act_modules(x: Tensor, conv: nn.Conv2d, bn: nn.BatchNorm2d, activation,
                        residual: Optional[Tensor] = None, backend: Optional[str] = None,
                        memory: str = "default", owns_residual: bool = False,
                        private_input: bool = False) -> Tensor:
    """act(bn(conv(x)) + residual) with the state of two existing modules. In eval mode on
    the CPU, the module pair's eval plan (`resfuse.eval_plan`) answers where it can: checks
    and backend choice made once per weight version, the result in channels_last; in
    training, its training plan (`resfuse.train_plan`): checks and backend choice made once
    per kind of call, then eager's differentiable ops.
    `owns_residual`: the caller's residual is dead after this call, so the plan may sum into
    it in place and return it (elsewhere it is left as it is). `private_input`: no one but
    the caller has seen x (its own intermediate; see `eval_plan.conv_bn_act`)."""
    planned = None
    if not bn.training:
        y = eval_plan.conv_bn_act(x, conv, bn, activation, residual, backend, owns_residual,
                                  private_input)
        if y is not None:
            return y
    elif memory == "default":
        planned = train_plan.run(x, conv, bn, activation, residual, backend)
        if planned is not None and planned is not train_plan.MISS:
            return planned
    given_x = x
    x, conv_kw = _conv_args(conv, x)
    y = RF.conv_bn_act(x, **conv_kw, **_bn_args(bn), activation=activation,
                       residual=residual, backend=backend, memory=memory)
    if planned is train_plan.MISS:  # (checked without error: the next such call is planned)
        train_plan.make(given_x, conv, bn, activation, residual, backend)
    return y


def bn_act_conv_modules(x: Tensor, bn: nn.BatchNorm2d, conv: nn.Conv2d, activation,
                        residual: Optional[Tensor] = None, backend: Optional[str] = None,
                        memory: str = "default") -> Tensor:
    """conv(act(bn(x))) + residual with the state of two existing modules. In eval mode on
    the CPU, eager's own ops answer where they can (`resfuse.eval_plan.bn_act_conv`); in
    training, the pair's training plan (`resfuse.train_plan`)."""
    planned = None
    if not bn.training:
        y = eval_plan.bn_act_conv(x, bn, conv, activation, residual, backend)
        if y is not None:
            return y
    elif memory == "default":
        planned = train_plan.run(x, conv, bn, activation, residual, backend, conv_first=False)
        if planned is not None and planned is not train_plan.MISS:
            return planned
    if conv.padding_mode != "zeros":  # the padding belongs after the activation
        a = RF.bn_act(x, **_bn_args(bn), activation=activation, backend=backend)
        y = conv(a)
        return y if residual is None else y + residual
    _, conv_kw = _conv_args(conv, x)
    y = RF.bn_act_conv(x, **_bn_args(bn), **conv_kw, activation=activation,
                       residual=residual, backend=backend, memory=memory)
    if planned is train_plan.MISS:  # (checked without error: the next such call is planned)
        train_plan.make(x, conv, bn, activation, residual, backend, conv_first=False)
    return y


def _tail_bn_args(bn: nn.BatchNorm2d, prefix: str = "") -> dict:
    """`_bn_args` as `resfuse.functional.bn_act_conv_bn_act` takes its BNs (names prefixed
    "out_" for the second; never synchronised: the block chain runs without)."""
    kw = _bn_args(bn)
    del kw["process_group"]
    return {prefix + k: v for k, v in kw.items()}


class FusedConvBNAct(nn.Module):
    """y = act(bn(conv(x)) + residual) in one fused op; `conv` and `bn` are plain modules."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0,
                 dilation=1, groups: int = 1, bias: bool = False,
                 activation: ActivationLike = "relu", eps: float = 1e-5,
                 momentum: Optional[float] = 0.1, affine: bool = True,
                 track_running_stats: bool = True, padding_mode: str = "zeros",
                 backend: Optional[str] = None, device=None, dtype=None, *,
                 sync_bn: bool = False, process_group=None, memory: str = "default"):
        self_memory = check_memory(memory)
        super().__init__()
        self.memory = self_memory
        kw = dict(device=device, dtype=dtype)
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, dilation,
                              groups, bias, padding_mode, **kw)
        norm = _norm_layer(None, sync_bn, process_group) or nn.BatchNorm2d
        self.bn = norm(out_channels, eps, momentum, affine, track_running_stats, **kw)
        self.activation = as_activation(activation)
        self.act = self.activation.module()
        self.backend = backend

    @classmethod
    def from_modules(cls, conv: nn.Conv2d, bn: nn.BatchNorm2d, act: ActivationLike = None,
                     backend: Optional[str] = None, memory: str = "default") -> "FusedConvBNAct":
        """Wrap existing modules (shared, not copied). `act` None means identity."""
        check_memory(memory)
        if type(conv) is not nn.Conv2d:
            raise ResfuseInputError(f"conv: expected an nn.Conv2d, got {type(conv).__name__}")
        if not is_batch_norm_2d(bn):
            raise ResfuseInputError(f"bn: expected an nn.BatchNorm2d, got {type(bn).__name__}")
        if bn.num_features != conv.out_channels:
            raise ResfuseInputError(f"bn: expected num_features={conv.out_channels} "
                                    f"(conv.out_channels), got {bn.num_features}")
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self.conv, self.bn = conv, bn
        self.activation = as_activation(act)
        self.act = self.activation.module()
        self.backend = backend
        self.memory = memory
        return self

    def forward(self, x: Tensor, residual: Optional[Tensor] = None) -> Tensor:
        mods = self._modules  # (not nn.Module.__getattr__'s lookup: this runs per call)
        return conv_bn_act_modules(x, mods["conv"], mods["bn"], self.activation, residual,
                                   self.backend, getattr(self, "memory", "default"))

    def extra_repr(self) -> str:
        return (f"activation={self.activation}, backend={self.backend or 'auto'}, "
                f"memory={getattr(self, 'memory', 'default')}")


class FusedConvBNAct1d(FusedConvBNAct):
    """`FusedConvBNAct` for 1-D data (time series, audio): y = act(bn(conv(x)) + residual)
    on (N, C, L) input, `conv` an nn.Conv1d and `bn` an nn.BatchNorm1d (the same attribute
    names and state dict as the plain chain); run as the 2-D op with H = 1."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0,
                 dilation=1, groups: int = 1, bias: bool = False,
                 activation: ActivationLike = "relu", eps: float = 1e-5,
                 momentum: Optional[float] = 0.1, affine: bool = True,
                 track_running_stats: bool = True, padding_mode: str = "zeros",
                 backend: Optional[str] = None, device=None, dtype=None, *,
                 sync_bn: bool = False, process_group=None):
        nn.Module.__init__(self)
        kw = dict(device=device, dtype=dtype)
        self.conv = nn.Conv1d(in_channels, out_channels, kernel_size, stride, padding, dilation,
                              groups, bias, padding_mode, **kw)
        norm = _norm_layer(None, sync_bn, process_group) or nn.BatchNorm1d
        self.bn = norm(out_channels, eps, momentum, affine, track_running_stats, **kw)
        self.activation = as_activation(activation)
        self.act = self.activation.module()
        self.backend = backend

    @classmethod
    def from_modules(cls, conv: nn.Conv1d, bn: nn.BatchNorm1d, act: ActivationLike = None,
                     backend: Optional[str] = None) -> "FusedConvBNAct1d":
        """Wrap existing modules (shared, not copied). `act` None means identity."""
        if type(conv) is not nn.Conv1d:
            raise ResfuseInputError(f"conv: expected an nn.Conv1d, got {type(conv).__name__}")
        if not is_batch_norm_1d(bn):
            raise ResfuseInputError(f"bn: expected an nn.BatchNorm1d, got {type(bn).__name__}")
        if bn.num_features != conv.out_channels:
            raise ResfuseInputError(f"bn: expected num_features={conv.out_channels} "
                                    f"(conv.out_channels), got {bn.num_features}")
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self.conv, self.bn = conv, bn
        self.activation = as_activation(act)
        self.act = self.activation.module()
        self.backend = backend
        return self

    def forward(self, x: Tensor, residual: Optional[Tensor] = None) -> Tensor:
        if x.dim() != 3:
            raise ResfuseInputError(f"x: expected a 3-D (N, C, L) tensor for a Conv1d, got "
                                    f"shape {tuple(x.shape)}")
        return super().forward(x, residual)


class FusedResidualBlock(reference.ResidualBlock):
    """A ResNet block whose every conv -> bn -> act (and the residual add) is one fused op.

    Same constructor, attributes and state dict as `resfuse.reference.ResidualBlock`:
    `FusedResidualBlock(256, 64, stride=1, bottleneck=True)`; `backend=` forces a backend;
    `sync_bn=True` (with `process_group=`, None: the world) makes every BN a `SyncBatchNorm`.
    A `downsample` of the form `Sequential([pool,] Conv2d, BatchNorm2d)` is fused too; any
    other downsample module runs as it is.

    `memory` (attribute and keyword): what training keeps for backward. "default": the block's
    input, each conv's output z (pre-BN) and the last activation's 1-bit mask on the kernel
    backends, never a normalized activation (the eager backend: torch's own per-layer chain).
    "low": also not the last conv's output (nor the projection's), recomputed in backward by
    the same kernel from that conv's input, on every backend: a bottleneck keeps x, z1, z2
    and the mask. Same results and gradients in both modes (see docs/memory.md).
    """
    _reference_class = reference.ResidualBlock

    def __init__(self, *args, backend: Optional[str] = None, sync_bn: bool = False,
                 process_group=None, memory: str = "default", **kwargs):
        check_memory(memory)
        if sync_bn or process_group is not None:
            kwargs["norm_layer"] = _norm_layer(kwargs.get("norm_layer"), sync_bn, process_group)
        super().__init__(*args, **kwargs)
        self.backend = backend
        self.memory = memory
        self._check_fusable()

    @classmethod
    def from_modules(cls, *args, backend: Optional[str] = None, memory: str = "default",
                     **kwargs):
        check_memory(memory)
        self = super().from_modules(*args, **kwargs)
        self.backend = backend
        self.memory = memory
        self._check_fusable()
        return self

    def _conv_type(self):
        """nn.Conv1d for a 1-D block (`dim=1`, or built around Conv1d modules), else nn.Conv2d."""
        return nn.Conv1d if type(self.conv1) is nn.Conv1d else nn.Conv2d

    def _is_block_bn(self, bn) -> bool:
        return is_batch_norm_1d(bn) if self._conv_type() is nn.Conv1d else is_batch_norm_2d(bn)

    @property
    def _low(self) -> bool:
        return getattr(self, "memory", "default") == "low"

    def _check_fusable(self):
        conv_t = self._conv_type()
        bn_name = "nn.BatchNorm1d" if conv_t is nn.Conv1d else "nn.BatchNorm2d"
        for i, (conv, bn) in enumerate(self._pairs(), 1):
            if type(conv) is not conv_t:
                raise ResfuseInputError(f"conv{i}: expected an nn.{conv_t.__name__}, got "
                                        f"{type(conv).__name__}")
            if not self._is_block_bn(bn):
                raise ResfuseInputError(f"bn{i}: expected an {bn_name} (norm_layer), got "
                                        f"{type(bn).__name__}")

    def _shortcut(self, x: Tensor, a: Optional[Tensor] = None) -> Tensor:
        return self._shortcut_owned(x, a)[0]

    def _fused_projection(self):
        """(pool or None, conv, bn) of a `downsample` of the form `Sequential([pool,] conv,
        bn)`, which runs as one fused op; None for any other downsample (or none)."""
        ds = self.downsample
        layers = list(ds) if isinstance(ds, nn.Sequential) else []
        if (len(layers) in (2, 3) and type(layers[-2]) is self._conv_type()
                and self._is_block_bn(layers[-1])):
            return (layers[0] if len(layers) == 3 else None), layers[-2], layers[-1]
        return None

    def _shortcut_owned(self, x: Tensor, a: Optional[Tensor] = None):
        """(the shortcut, whether it is a fresh tensor of this block's own: the fused
        projection's output, which nothing else can see)."""
        ds = self.downsample
        if ds is None:
            return x, False
        if self.preact:
            return ds(a), False
        proj = self._fused_projection()
        if proj is None:
            return ds(x), False
        pool, conv, bn = proj
        if pool is not None:
            x = pool(x)
        return conv_bn_act_modules(x, conv, bn, None, backend=self.backend,
                                   memory="low" if self._low else "default"), True

    def _runs_chain(self, x: Tensor) -> bool:
        """Whether this call runs as the fused chain (docs/design.md) (`_chain_forward`): every BN uses batch
        statistics without synchronisation, every conv pads with zeros, the batch is not
        empty, and the backend runs blocks as the chain (`memory="low"`: on every backend)."""
        for conv, bn in self._pairs():
            if conv.padding_mode != "zeros" or _sync_group(bn) is not None:
                return False
            if not (bn.training or bn.running_mean is None):
                return False  # running statistics: the folded or plain per-layer ops
        return x.shape[0] > 0 and (self._low or RF.fuses_block_chain(x, self.backend))

    def _chain_forward(self, x: Tensor) -> Tensor:
        """The block as one chain (docs/design.md): each conv computes its output's batch
        statistics in its epilogue, and the next conv applies that BN + activation as it
        loads its input (prologue), so no normalized activation is written; the last BN,
        the residual add and the activation are one pass. Same results and side effects as
        the per-layer ops."""
        act, be = self.activation, self.backend
        mem = "low" if self._low else "default"
        pairs = self._pairs()
        (conv1, bn1), rest = pairs[0], pairs[1:]
        if self.preact:  # (the last conv's output is the block's: nothing more to drop)
            if self.downsample is None:
                shortcut = x
                z, m, v = RF.bn_act_conv(x, **_bn_args(bn1), **_conv_args(conv1, x)[1],
                                         activation=act, backend=be, return_stats=True,
                                         memory=mem)
            else:  # the projection reads act(bn1(x)) too: normalize once, convolve twice
                a = RF.bn_act(x, **_bn_args(bn1), activation=act, backend=be, memory=mem)
                shortcut = self._shortcut(x, a)
                z, m, v = RF.conv_stats(a, **_conv_args(conv1, a)[1], backend=be)
            for i, (conv, bn) in enumerate(rest):
                last = i == len(rest) - 1
                out = RF.bn_act_conv(z, **_bn_args(bn), **_conv_args(conv, z)[1],
                                     activation=act, backend=be, batch_stats=(m, v),
                                     residual=shortcut if last else None, return_stats=not last,
                                     memory=mem)
                if last:
                    return out
                z, m, v = out
        shortcut = self._shortcut(x)
        z, m, v = RF.conv_stats(x, **_conv_args(conv1, x)[1], backend=be)
        prev_bn = bn1
        for i, (conv, bn) in enumerate(rest):
            if self._low and i == len(rest) - 1:
                # The tail: the last conv's output is recomputed in backward, not kept.
                return RF.bn_act_conv_bn_act(z, **_tail_bn_args(prev_bn),
                                             **_conv_args(conv, z)[1],
                                             **_tail_bn_args(bn, "out_"), activation=act,
                                             residual=shortcut, backend=be, batch_stats=(m, v),
                                             memory="low")
            z, m, v = RF.bn_act_conv(z, **_bn_args(prev_bn), **_conv_args(conv, z)[1],
                                     activation=act, backend=be, batch_stats=(m, v),
                                     return_stats=True, memory=mem)
            prev_bn = bn
        return RF.bn_act(z, **_bn_args(prev_bn), activation=act, residual=shortcut, backend=be,
                         batch_stats=(m, v))

    def forward(self, x: Tensor) -> Tensor:
        return self._forward(x, False)

    def _forward(self, x: Tensor, owns_input: bool) -> Tensor:
        """`owns_input`: x is dead after this block (`FusedStage` hands on its blocks'
        outputs so): the identity shortcut may then be summed into in place."""
        pairs = self._pairs()
        bn1 = pairs[0][1]
        # (a BN in eval with running statistics rules the chain out: `_runs_chain` not needed)
        if (bn1.training or bn1.running_mean is None) and self._runs_chain(x):
            return self._chain_forward(x)
        act, be = self.activation, self.backend
        mem = "low" if self._low else "default"  # (ignored by synchronised BN)
        if self.preact:
            conv1, bn1 = pairs[0]
            if self.downsample is None:
                shortcut = x
                out = bn_act_conv_modules(x, bn1, conv1, act, backend=be, memory=mem)
            else:  # the projection reads act(bn1(x)) too: normalize once, convolve twice
                a = RF.bn_act(x, **_bn_args(bn1), activation=act, backend=be, memory=mem)
                shortcut = self._shortcut(x, a)
                out = conv1(a)
            for conv, bn in pairs[1:-1]:
                out = bn_act_conv_modules(out, bn, conv, act, backend=be, memory=mem)
            conv, bn = pairs[-1]
            return bn_act_conv_modules(out, bn, conv, act, residual=shortcut, backend=be,
                                       memory=mem)
        proj = self._fused_projection() if x.is_cpu and self.downsample is not None else None
        if proj is not None and not any(bn.training for _, bn in pairs) and not proj[2].training:
            return self._eval_projection_last(x, proj, pairs, owns_input)
        shortcut, owned = self._shortcut_owned(x)
        owned = owned or (owns_input and self.downsample is None)  # the shortcut is x
        out = self._main_path(x, pairs, owns_input, mem)
        conv, bn = pairs[-1]
        return conv_bn_act_modules(out, conv, bn, act, residual=shortcut, backend=be,
                                   memory=mem, owns_residual=owned, private_input=True)

    def _main_path(self, x: Tensor, pairs, owns_input: bool, mem: str) -> Tensor:
        """The post-activation main path up to the last conv's input: each conv -> BN -> act
        fused. Only x may have been seen by anyone else (`owns_input`: not even x)."""
        out, private = x, owns_input
        for conv, bn in pairs[:-1]:
            out = conv_bn_act_modules(out, conv, bn, self.activation, backend=self.backend,
                                      memory=mem, private_input=private)
            private = True
        return out

    def _eval_projection_last(self, x: Tensor, proj, pairs, owns_input: bool) -> Tensor:
        """A projection block in eval on the CPU, in the order torch.compile's frozen graphs
        run it: the main path first, its last conv without activation (a fresh tensor of
        our own), then the projection conv summed into that in place, with the activation:
        act(bn(conv(x')) + main) is act(main + shortcut), the same sum. The projection's
        output then never waits in memory while the main path runs (ResNet-50's first
        stage-2 block: measured faster, see docs/cpu.md)."""
        act, be = self.activation, self.backend
        mem = "low" if self._low else "default"  # (where the checked path runs: gradients)
        out = self._main_path(x, pairs, owns_input, mem)
        conv, bn = pairs[-1]
        main = conv_bn_act_modules(out, conv, bn, None, backend=be, memory=mem,
                                   private_input=True)
        pool, conv, bn = proj
        if pool is not None:
            x = eval_plan.call_module(pool, x)  # (recorded where a stage is captured)
        return conv_bn_act_modules(x, conv, bn, act, residual=main, backend=be, memory=mem,
                                   owns_residual=True, private_input=owns_input)

    def extra_repr(self) -> str:
        kind = "bottleneck" if self.bottleneck else "basic"
        return (f"{kind}, {'pre' if self.preact else 'post'}-activation, "
                f"activation={self.activation}, backend={self.backend or 'auto'}, "
                f"memory={getattr(self, 'memory', 'default')}")


class FusedBasicBlock(FusedResidualBlock):
    """torchvision's `BasicBlock(inplanes, planes, stride, downsample, groups, base_width,
    dilation, norm_layer)`, fused."""
    expansion = 1
    _reference_class = reference.BasicBlock

    def __init__(self, inplanes, planes, stride=1, downsample=None, groups=1, base_width=64,
                 dilation=1, norm_layer=None, *, backend: Optional[str] = None,
                 memory: str = "default"):
        super().__init__(inplanes, planes, stride, bottleneck=False, downsample=downsample,
                         groups=groups, base_width=base_width, dilation=dilation,
                         norm_layer=norm_layer, backend=backend, memory=memory)


class FusedBottleneck(FusedResidualBlock):
    """torchvision's `Bottleneck(inplanes, planes, stride, downsample, groups, base_width,
    dilation, norm_layer)` (stride on conv2, v1.5), fused."""
    expansion = 4
    _reference_class = reference.Bottleneck

    def __init__(self, inplanes, planes, stride=1, downsample=None, groups=1, base_width=64,
                 dilation=1, norm_layer=None, *, backend: Optional[str] = None,
                 memory: str = "default"):
        super().__init__(inplanes, planes, stride, bottleneck=True, downsample=downsample,
                         groups=groups, base_width=base_width, dilation=dilation,
                         norm_layer=norm_layer, backend=backend, memory=memory)


_module_hooks = nn.modules.module
# Whether a module has forward or backward hooks of its own (the converter's and FusedStage's
# test: a fused op would not call them).
_has_hooks = stage_program.has_hooks


class FusedStage(nn.Sequential):
    """An nn.Sequential whose fused blocks hand their outputs on as the next block's own.

    The converter gives this class to every plain nn.Sequential holding fused blocks (a
    ResNet's `layer1` .. `layer4`): the same object, children and state dict. In eval on the
    CPU, a block's output is seen by nothing but the next block, which sums its last conv
    into it in place (the residual add without a fresh tensor: one buffer carries a stage's
    residual stream, as in torch.compile's frozen graphs). It does so only where nothing else
    can see that intermediate: the blocks have no hooks, no global module hooks are set, the
    blocks' `forward` is their class's own, and nothing traces or compiles. Otherwise, and
    for the stage's input (the caller's tensor, never written), it runs as nn.Sequential.

    Without gradients (`torch.no_grad()`, `torch.inference_mode()`), a stage of post-activation
    fused blocks is captured once per input shape, strides and dtype and then replayed: its
    oneDNN calls with no module Python between them (`resfuse.stage_program`), the same calls
    and values, while the stage's modules and weights are as they were.
    """

    def forward(self, input: Tensor) -> Tensor:
        if (type(input) is not Tensor or not input.is_cpu or torch.compiler.is_compiling()
                or torch.jit.is_tracing() or _module_hooks._global_forward_hooks
                or _module_hooks._global_forward_pre_hooks
                or _module_hooks._global_backward_hooks
                or getattr(_module_hooks, "_global_backward_pre_hooks", None)):
            return super().forward(input)
        if stage_program.applies():
            y = stage_program.replay(self, input)
            if y is not None:
                return y
            return stage_program.capture(self, input, self._program_blocks(), self._blocks)
        return self._blocks(input)

    def _blocks(self, input: Tensor) -> Tensor:
        """The stage through its modules, each fused block's output handed on as the next
        block's own."""
        owned = False
        for m in self._modules.values():
            if _runs_own(m):
                input, owned = m._forward(input, owned), True
            else:
                input, owned = m(input), False
        return input

    def _program_blocks(self):
        """The children, where all are fused post-activation blocks a program can stand for
        (`resfuse.stage_program`), else None."""
        blocks = list(self._modules.values())
        if blocks and all(_runs_own(m) and not m.preact for m in blocks):
            return blocks
        return None


def _runs_own(m) -> bool:
    """Whether a stage may run `m` as a fused block handing on its output (`_forward`): a
    FusedResidualBlock with no hooks and no `forward` of the instance's own."""
    return (isinstance(m, FusedResidualBlock) and not _has_hooks(m)
            and "forward" not in m.__dict__)
