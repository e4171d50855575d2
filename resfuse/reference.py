"""The eager module chain: the CPU path's definition and the oracle of every test and benchmark.

Everything here is plain PyTorch (`F.conv2d`, `F.batch_norm`, the activation), written to
compute exactly what the chain of modules `nn.Conv2d -> nn.BatchNorm2d -> (+ residual) -> act`
computes, side effects included. Nothing here is fused or fast; it is what "correct" means.

* `conv_bn_act`  : y = act(bn(conv(x)) + residual)        (post-activation; conv optional)
* `bn_act_conv`  : y = conv(act(bn(x))) + residual        (pre-activation, ResNet v2)
* `batch_norm`   : `nn.BatchNorm2d.forward` as a function (momentum=None, num_batches_tracked)
* `ResidualBlock`, `BasicBlock`, `Bottleneck`: plain residual blocks with torchvision's
  attribute names; the fused modules subclass them and replace only `forward`.
"""
from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from .activations import ActivationLike, as_activation

IntPair = Union[int, tuple, list]


def batch_norm(x, running_mean, running_var, weight, bias, *, training: bool,
               momentum: Optional[float] = 0.1, eps: float = 1e-5,
               num_batches_tracked: Optional[torch.Tensor] = None) -> torch.Tensor:
    """`nn.BatchNorm2d.forward`, with the module's state passed in.

    `running_mean`/`running_var` None means track_running_stats=False (batch statistics in
    both modes). In training with running stats, `num_batches_tracked` is incremented and,
    for momentum=None, the cumulative-average factor 1/num_batches_tracked is used.
    """
    factor = 0.0 if momentum is None else momentum
    if training and running_mean is not None and num_batches_tracked is not None:
        num_batches_tracked.add_(1)
        factor = 1.0 / float(num_batches_tracked) if momentum is None else momentum
    use_batch_stats = training or (running_mean is None and running_var is None)
    return F.batch_norm(x, running_mean, running_var, weight, bias, use_batch_stats, factor, eps)


def conv_bn_act(x, weight, bias, bn_weight, bn_bias, running_mean, running_var, *,
                training: bool, momentum: Optional[float] = 0.1, eps: float = 1e-5,
                num_batches_tracked=None, activation: ActivationLike = "relu",
                residual=None, stride: IntPair = 1, padding: Union[IntPair, str] = 0,
                dilation: IntPair = 1, groups: int = 1) -> torch.Tensor:
    """act(bn(conv(x, weight, bias)) + residual); with `weight=None` there is no conv."""
    act = as_activation(activation)
    z = x if weight is None else F.conv2d(x, weight, bias, stride, padding, dilation, groups)
    u = batch_norm(z, running_mean, running_var, bn_weight, bn_bias, training=training,
                   momentum=momentum, eps=eps, num_batches_tracked=num_batches_tracked)
    if residual is not None:
        u = u + residual
    return act.forward(u)


def bn_act_conv(x, bn_weight, bn_bias, running_mean, running_var, weight, bias=None, *,
                training: bool, momentum: Optional[float] = 0.1, eps: float = 1e-5,
                num_batches_tracked=None, activation: ActivationLike = "relu",
                residual=None, stride: IntPair = 1, padding: Union[IntPair, str] = 0,
                dilation: IntPair = 1, groups: int = 1) -> torch.Tensor:
    """conv(act(bn(x)), weight, bias) + residual — the pre-activation form."""
    act = as_activation(activation)
    a = act.forward(batch_norm(x, running_mean, running_var, bn_weight, bn_bias,
                               training=training, momentum=momentum, eps=eps,
                               num_batches_tracked=num_batches_tracked))
    y = F.conv2d(a, weight, bias, stride, padding, dilation, groups)
    return y if residual is None else y + residual


# --------------------------------------------------------------------------- modules

def conv3x3(in_planes, out_planes, stride=1, groups=1, dilation=1, dim: int = 2) -> nn.Conv2d:
    """torchvision's conv3x3 (`dim=1`: its nn.Conv1d counterpart, kernel 3)."""
    conv = nn.Conv1d if dim == 1 else nn.Conv2d
    return conv(in_planes, out_planes, 3, stride, dilation, groups=groups, bias=False,
                dilation=dilation)


def conv1x1(in_planes, out_planes, stride=1, dim: int = 2) -> nn.Conv2d:
    conv = nn.Conv1d if dim == 1 else nn.Conv2d
    return conv(in_planes, out_planes, 1, stride, bias=False)


class ConvBNAct(nn.Module):
    """conv -> bn -> (+ residual) -> act as three plain modules."""

    def __init__(self, conv: nn.Conv2d, bn: nn.BatchNorm2d, act: ActivationLike = "relu"):
        super().__init__()
        self.conv, self.bn = conv, bn
        self.activation = as_activation(act)
        self.act = self.activation.module()

    def forward(self, x, residual=None):
        u = self.bn(self.conv(x))
        if residual is not None:
            u = u + residual
        return self.activation.forward(u)


class ResidualBlock(nn.Module):
    """A ResNet block as plain modules, with torchvision's attribute names.

    Post-activation (ResNet v1.5, stride on conv2):
        basic:      relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))
        bottleneck: relu(bn3(conv3(relu(bn2(conv2(relu(bn1(conv1(x)))))))) + shortcut(x))
    Pre-activation (ResNet v2): each conv reads act(bn(.)) of its input, there is no final
    activation, and a projection shortcut reads act(bn1(x)).

    `downsample`: "auto" builds `Sequential(conv1x1, BatchNorm2d)` (preact: `Sequential(conv1x1)`)
    when the shape changes, or `Sequential(AvgPool2d, conv1x1, BatchNorm2d)` with
    `avg_down=True` (timm's "-d" variants); None means identity; a module is used as given.

    `dim=1`: the same block for 1-D data (N, C, L): nn.Conv1d (kernels 3 and 1), nn.BatchNorm1d
    and nn.AvgPool1d in place of their 2-D counterparts (the ResNet-1D of time series and audio).
    """

    def __init__(self, in_channels: int, channels: int, stride: int = 1, *,
                 bottleneck: bool = False, downsample: Union[str, nn.Module, None] = "auto",
                 groups: int = 1, base_width: int = 64, dilation: int = 1,
                 activation: ActivationLike = "relu", preact: bool = False,
                 avg_down: bool = False, norm_layer=None, expansion: Optional[int] = None,
                 dim: int = 2):
        super().__init__()
        if dim not in (1, 2):
            raise ValueError(f"dim: expected 1 (Conv1d) or 2 (Conv2d), got {dim!r}")
        if norm_layer is None:
            norm_layer = nn.BatchNorm1d if dim == 1 else nn.BatchNorm2d
        self.bottleneck, self.preact = bool(bottleneck), bool(preact)
        self.expansion = (4 if bottleneck else 1) if expansion is None else int(expansion)
        self.stride = stride
        self.activation = as_activation(activation)
        out_channels = channels * self.expansion
        # Registered in torchvision's order (conv1, bn1, conv2, bn2, ...): parameters() and
        # state_dict() list them in the same order as torchvision's blocks do.
        if bottleneck:
            width = int(channels * (base_width / 64.0)) * groups
            convs = (conv1x1(in_channels, width, dim=dim),
                     conv3x3(width, width, stride, groups, dilation, dim=dim),
                     conv1x1(width, out_channels, dim=dim))
            bn_sizes = (in_channels, width, width) if preact else (width, width, out_channels)
        else:
            if groups != 1 or base_width != 64:
                raise ValueError("BasicBlock only supports groups=1 and base_width=64")
            convs = (conv3x3(in_channels, channels, stride, 1, dilation, dim=dim),
                     conv3x3(channels, channels, 1, 1, dilation, dim=dim))
            bn_sizes = (in_channels, channels) if preact else (channels, channels)
        for i, (conv, c) in enumerate(zip(convs, bn_sizes), 1):
            setattr(self, f"conv{i}", conv)
            setattr(self, f"bn{i}", norm_layer(c))
        self.relu = self.activation.module()  # torchvision's name for the block's activation
        if isinstance(downsample, str):
            if downsample != "auto":
                raise ValueError(f"downsample: expected 'auto', None or a module, got {downsample!r}")
            downsample = None
            if stride != 1 or in_channels != out_channels:
                layers = []
                if avg_down:
                    pool = nn.AvgPool1d if dim == 1 else nn.AvgPool2d
                    layers.append(pool(stride, stride, ceil_mode=True, count_include_pad=False)
                                  if stride != 1 else nn.Identity())
                layers.append(conv1x1(in_channels, out_channels, 1 if avg_down else stride,
                                      dim=dim))
                if not preact:
                    layers.append(norm_layer(out_channels))
                downsample = nn.Sequential(*layers)
        self.downsample = downsample

    @classmethod
    def from_modules(cls, conv1: nn.Conv2d, bn1: nn.Module, conv2: nn.Conv2d, bn2: nn.Module,
                     conv3: Optional[nn.Conv2d] = None, bn3: Optional[nn.Module] = None, *,
                     downsample: Optional[nn.Module] = None, activation: ActivationLike = "relu",
                     preact: bool = False, expansion: Optional[int] = None):
        """A block around existing modules (shared, not copied: same Parameter objects)."""
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self.bottleneck, self.preact = conv3 is not None, bool(preact)
        self.expansion = (4 if self.bottleneck else 1) if expansion is None else int(expansion)
        self.stride = max(conv2.stride[0] if self.bottleneck else conv1.stride[0],
                          _downsample_stride(downsample))
        self.activation = as_activation(activation)
        self.conv1, self.bn1 = conv1, bn1
        self.conv2, self.bn2 = conv2, bn2
        if self.bottleneck:
            self.conv3, self.bn3 = conv3, bn3
        self.relu = self.activation.module()
        self.downsample = downsample
        return self

    def _pairs(self):
        # (read from _modules: nn.Module.__getattr__ costs more than the rest of a fused
        # block's per-call Python at batch 1)
        m = self._modules
        pairs = [(m["conv1"], m["bn1"]), (m["conv2"], m["bn2"])]
        if self.bottleneck:
            pairs.append((m["conv3"], m["bn3"]))
        return pairs

    def forward(self, x):
        act = self.activation.forward
        pairs = self._pairs()
        if self.preact:
            a = act(self.bn1(x))
            shortcut = x if self.downsample is None else self.downsample(a)
            out = pairs[0][0](a)
            for conv, bn in pairs[1:]:
                out = conv(act(bn(out)))
            return out + shortcut
        shortcut = x if self.downsample is None else self.downsample(x)
        out = x
        for conv, bn in pairs[:-1]:
            out = act(bn(conv(out)))
        conv, bn = pairs[-1]
        return act(bn(conv(out)) + shortcut)


def _downsample_stride(downsample) -> int:
    if downsample is None:
        return 1
    for m in downsample.modules():
        if isinstance(m, nn.Conv2d) and m.stride[0] > 1:
            return m.stride[0]
        if isinstance(m, (nn.AvgPool2d, nn.MaxPool2d)):
            k = m.stride if m.stride is not None else m.kernel_size
            return k if isinstance(k, int) else k[0]
    return 1


class BasicBlock(ResidualBlock):
    """torchvision's `BasicBlock` signature and behaviour."""
    expansion = 1

    def __init__(self, inplanes, planes, stride=1, downsample=None, groups=1, base_width=64,
                 dilation=1, norm_layer=None):
        super().__init__(inplanes, planes, stride, bottleneck=False, downsample=downsample,
                         groups=groups, base_width=base_width, dilation=dilation,
                         norm_layer=norm_layer)


class Bottleneck(ResidualBlock):
    """torchvision's `Bottleneck` signature and behaviour (stride on conv2, v1.5)."""
    expansion = 4

    def __init__(self, inplanes, planes, stride=1, downsample=None, groups=1, base_width=64,
                 dilation=1, norm_layer=None):
        super().__init__(inplanes, planes, stride, bottleneck=True, downsample=downsample,
                         groups=groups, base_width=base_width, dilation=dilation,
                         norm_layer=norm_layer)
