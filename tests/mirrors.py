"""Plain-PyTorch mirrors of torchvision's and timm's ResNet blocks, for testing the converter on
machines where neither library imports (torch only; nothing here imports resfuse).

They reproduce what `resfuse.convert` looks at: class names (`BasicBlock`, `Bottleneck`,
`ResNet`), defining module (`__module__` set to the library's), constructor signatures
(positional order and defaults), attribute names, registration order and submodule types,
what is `nn.Identity()` and what is `None` when a feature is off, the weight init, and the
forward computation op for op. State-dict keys match the real models'.

Mirrored upstream versions:
- torchvision `torchvision/models/resnet.py`, weights-API era (0.13 and later; the block and
  ResNet classes have not changed since). Builders drop the `weights`/`progress` arguments:
  mirrors never download anything.
- timm `timm/models/resnet.py` at huggingface/pytorch-image-models aa4b5850 (1.0.29.dev0),
  with the `timm.layers` helpers it uses reduced to plain torch: get_padding, make_divisible,
  DropPath, DropBlock2d, SEModule (+ create_attn), BlurPool2d (+ create_aa), AvgPool2dSame,
  Sigmoid, SelectAdaptivePool2d (+ create_classifier), get_act_layer / get_norm_layer.
- Beyond ResNet (for the chain finder): torchvision `ops/misc.py` ConvNormActivation /
  Conv2dNormActivation / SqueezeExcitation, `ops/stochastic_depth.py`, `models/vgg.py`
  (make_layers, VGG), `models/densenet.py` (_DenseLayer with its memory-efficient checkpoint
  path, _DenseBlock as a ModuleDict, _Transition, DenseNet), `models/mobilenetv2.py`,
  `models/efficientnet.py` (MBConv, its config reduced to arguments), `models/regnet.py`
  (BottleneckTransform, ResBottleneckBlock); timm `layers/norm_act.py` BatchNormAct2d (its
  forward verbatim), `layers/conv_bn_act.py` ConvNormAct, `create_conv2d` for static padding
  only, `models/regnet.py` Bottleneck (conv1..3 are ConvNormAct, no bn1), `models/resnetv2.py`
  PreActBottleneck + DownsampleConv, `models/_efficientnet_blocks.py` SqueezeExcite,
  DepthwiseSeparableConv, InvertedResidual (without s2d, aa and CondConv). DenseNet, MobileNetV2,
  BatchNormAct2d, ConvNormAct and timm's regnet were read from the upstream sources; the others
  follow upstream's structure from the same era, not line by line.
"""
from __future__ import annotations

import collections.abc
import math
from functools import partial
from itertools import repeat
from typing import Any, Callable, Dict, List, Optional, Tuple, Type, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    # torchvision
    "conv3x3", "conv1x1", "TvBasicBlock", "TvBottleneck", "TvResNet",
    "tv_resnet18", "tv_resnet50", "tv_resnext50_32x4d", "tv_wide_resnet50_2",
    # timm helpers
    "get_padding", "make_divisible", "DropPath", "DropBlock2d", "SEModule", "Sigmoid",
    "BlurPool2d", "AvgPool2dSame", "SelectAdaptivePool2d", "create_attn", "create_aa",
    "create_classifier", "get_act_layer", "get_norm_layer",
    # timm
    "TimmBasicBlock", "TimmBottleneck", "TimmResNet", "downsample_conv", "downsample_avg",
    "drop_blocks", "make_blocks",
    "timm_resnet18", "timm_resnet50", "timm_resnet50d", "timm_seresnet50", "timm_resnext50_32x4d",
    # beyond ResNet
    "ConvNormActivation", "Conv2dNormActivation", "SqueezeExcitation", "StochasticDepth",
    "vgg_make_layers", "TvVGG", "TvDenseLayer", "TvDenseBlock", "TvTransition", "TvDenseNet",
    "TvInvertedResidual", "TvMobileNetV2", "TvMBConv", "TvBottleneckTransform",
    "TvResBottleneckBlock", "create_conv2d", "BatchNormAct2d", "ConvNormAct",
    "TimmRegNetBottleneck", "TimmDownsampleConv", "TimmPreActBottleneck", "TimmSqueezeExcite",
    "TimmDepthwiseSeparableConv", "TimmInvertedResidual", "TvInvertedResidualV3",
    "TimmCspBottleneckBlock", "TimmCrossStage",
]


def _as(module_name: str, name: str):
    """Give a class the name and module of the library class it mirrors."""
    def deco(cls):
        cls.__name__ = cls.__qualname__ = name
        cls.__module__ = module_name
        return cls
    return deco


# ==================================================================================== torchvision
# torchvision/models/resnet.py (0.13+). `_log_api_usage_once` is left out.

def conv3x3(in_planes: int, out_planes: int, stride: int = 1, groups: int = 1,
            dilation: int = 1) -> nn.Conv2d:
    """3x3 convolution with padding"""
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=dilation,
                     groups=groups, bias=False, dilation=dilation)


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    """1x1 convolution"""
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


tv_conv3x3, tv_conv1x1 = conv3x3, conv1x1  # older names of this file


@_as("torchvision.models.resnet", "BasicBlock")
class TvBasicBlock(nn.Module):
    expansion: int = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1,
                 downsample: Optional[nn.Module] = None, groups: int = 1, base_width: int = 64,
                 dilation: int = 1, norm_layer: Optional[Callable[..., nn.Module]] = None) -> None:
        super().__init__()
        if norm_layer is None:
            norm_layer = nn.BatchNorm2d
        if groups != 1 or base_width != 64:
            raise ValueError("BasicBlock only supports groups=1 and base_width=64")
        if dilation > 1:
            raise NotImplementedError("Dilation > 1 not supported in BasicBlock")
        # conv1 and downsample both carry the stride
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = norm_layer(planes)
        self.relu = nn.ReLU(inplace=True)  # one module, applied twice
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = norm_layer(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x

        out = self.conv1(x)
        out = self.bn1(out)
        out = self.relu(out)

        out = self.conv2(out)
        out = self.bn2(out)

        if self.downsample is not None:
            identity = self.downsample(x)

        out += identity
        out = self.relu(out)
        return out


@_as("torchvision.models.resnet", "Bottleneck")
class TvBottleneck(nn.Module):
    # ResNet V1.5: the stride sits on conv2 (3x3), not conv1.
    expansion: int = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1,
                 downsample: Optional[nn.Module] = None, groups: int = 1, base_width: int = 64,
                 dilation: int = 1, norm_layer: Optional[Callable[..., nn.Module]] = None) -> None:
        super().__init__()
        if norm_layer is None:
            norm_layer = nn.BatchNorm2d
        width = int(planes * (base_width / 64.0)) * groups
        # conv2 and downsample both carry the stride
        self.conv1 = conv1x1(inplanes, width)
        self.bn1 = norm_layer(width)
        self.conv2 = conv3x3(width, width, stride, groups, dilation)
        self.bn2 = norm_layer(width)
        self.conv3 = conv1x1(width, planes * self.expansion)
        self.bn3 = norm_layer(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)  # registered after bn3; applied three times
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x

        out = self.conv1(x)
        out = self.bn1(out)
        out = self.relu(out)

        out = self.conv2(out)
        out = self.bn2(out)
        out = self.relu(out)

        out = self.conv3(out)
        out = self.bn3(out)

        if self.downsample is not None:
            identity = self.downsample(x)

        out += identity
        out = self.relu(out)
        return out


@_as("torchvision.models.resnet", "ResNet")
class TvResNet(nn.Module):
    def __init__(self, block: Type[Union[TvBasicBlock, TvBottleneck]], layers: List[int],
                 num_classes: int = 1000, zero_init_residual: bool = False, groups: int = 1,
                 width_per_group: int = 64,
                 replace_stride_with_dilation: Optional[List[bool]] = None,
                 norm_layer: Optional[Callable[..., nn.Module]] = None) -> None:
        super().__init__()
        if norm_layer is None:
            norm_layer = nn.BatchNorm2d
        self._norm_layer = norm_layer

        self.inplanes = 64
        self.dilation = 1
        if replace_stride_with_dilation is None:
            # one flag per stage 2-4: replace its stride 2 with a dilated convolution
            replace_stride_with_dilation = [False, False, False]
        if len(replace_stride_with_dilation) != 3:
            raise ValueError("replace_stride_with_dilation should be None or a 3-element tuple, "
                             f"got {replace_stride_with_dilation}")
        self.groups = groups
        self.base_width = width_per_group
        self.conv1 = nn.Conv2d(3, self.inplanes, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = norm_layer(self.inplanes)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, 64, layers[0])
        self.layer2 = self._make_layer(block, 128, layers[1], stride=2,
                                       dilate=replace_stride_with_dilation[0])
        self.layer3 = self._make_layer(block, 256, layers[2], stride=2,
                                       dilate=replace_stride_with_dilation[1])
        self.layer4 = self._make_layer(block, 512, layers[3], stride=2,
                                       dilate=replace_stride_with_dilation[2])
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512 * block.expansion, num_classes)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

        # Zero-init the last BN of each residual branch (arXiv:1706.02677).
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, TvBottleneck) and m.bn3.weight is not None:
                    nn.init.constant_(m.bn3.weight, 0)
                elif isinstance(m, TvBasicBlock) and m.bn2.weight is not None:
                    nn.init.constant_(m.bn2.weight, 0)

    def _make_layer(self, block, planes: int, blocks: int, stride: int = 1,
                    dilate: bool = False) -> nn.Sequential:
        norm_layer = self._norm_layer
        downsample = None
        previous_dilation = self.dilation
        if dilate:
            self.dilation *= stride
            stride = 1
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                conv1x1(self.inplanes, planes * block.expansion, stride),  # downsample.0
                norm_layer(planes * block.expansion),                      # downsample.1
            )

        layers = [block(self.inplanes, planes, stride, downsample, self.groups, self.base_width,
                        previous_dilation, norm_layer)]
        self.inplanes = planes * block.expansion
        for _ in range(1, blocks):
            layers.append(block(self.inplanes, planes, groups=self.groups,
                                base_width=self.base_width, dilation=self.dilation,
                                norm_layer=norm_layer))
        return nn.Sequential(*layers)

    def _forward_impl(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        x = self.bn1(x)
        x = self.relu(x)
        x = self.maxpool(x)

        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        x = self.layer4(x)

        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        x = self.fc(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._forward_impl(x)


def _ovewrite_named_param(kwargs: Dict[str, Any], param: str, new_value: Any) -> None:
    # torchvision.models._utils: a builder's fixed argument may be repeated but not changed
    if param in kwargs:
        if kwargs[param] != new_value:
            raise ValueError(f"The parameter '{param}' expected value {new_value} "
                             f"but got {kwargs[param]} instead.")
    else:
        kwargs[param] = new_value


def tv_resnet18(num_classes: int = 1000, **kwargs: Any) -> TvResNet:
    return TvResNet(TvBasicBlock, [2, 2, 2, 2], num_classes=num_classes, **kwargs)


def tv_resnet50(num_classes: int = 1000, **kwargs: Any) -> TvResNet:
    return TvResNet(TvBottleneck, [3, 4, 6, 3], num_classes=num_classes, **kwargs)


def tv_resnext50_32x4d(num_classes: int = 1000, **kwargs: Any) -> TvResNet:
    _ovewrite_named_param(kwargs, "groups", 32)
    _ovewrite_named_param(kwargs, "width_per_group", 4)
    return TvResNet(TvBottleneck, [3, 4, 6, 3], num_classes=num_classes, **kwargs)


def tv_wide_resnet50_2(num_classes: int = 1000, **kwargs: Any) -> TvResNet:
    _ovewrite_named_param(kwargs, "width_per_group", 64 * 2)
    return TvResNet(TvBottleneck, [3, 4, 6, 3], num_classes=num_classes, **kwargs)


# ========================================================================= timm.layers helpers

def _ntuple(n):
    def parse(x):
        if isinstance(x, collections.abc.Iterable) and not isinstance(x, str):
            return tuple(x)
        return tuple(repeat(x, n))
    return parse


to_2tuple = _ntuple(2)
to_ntuple = _ntuple


def get_padding(kernel_size: int, stride: int = 1, dilation: int = 1, **_) -> int:
    """Symmetric padding (timm.layers.padding; resnet.py keeps its own identical copy)."""
    return ((stride - 1) + dilation * (kernel_size - 1)) // 2


def get_same_padding(x: int, kernel_size: int, stride: int, dilation: int) -> int:
    return max((math.ceil(x / stride) - 1) * stride + (kernel_size - 1) * dilation + 1 - x, 0)


def pad_same(x, kernel_size, stride, dilation=(1, 1), value: float = 0):
    ih, iw = x.size()[-2:]
    pad_h = get_same_padding(ih, kernel_size[0], stride[0], dilation[0])
    pad_w = get_same_padding(iw, kernel_size[1], stride[1], dilation[1])
    return F.pad(x, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2), value=value)


def make_divisible(v, divisor=8, min_value=None, round_limit=0.9):
    min_value = min_value or divisor
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    if new_v < round_limit * v:  # don't round down by more than (1 - round_limit)
        new_v += divisor
    return new_v


@_as("timm.layers.activations", "Sigmoid")
class Sigmoid(nn.Module):
    """timm's Sigmoid (has an `inplace` flag); what SEModule's gate 'sigmoid' resolves to."""
    def __init__(self, inplace: bool = False):
        super().__init__()
        self.inplace = inplace

    def forward(self, x):
        return x.sigmoid_() if self.inplace else x.sigmoid()


# timm.layers.create_act: name -> layer class (only the ones that take `inplace`, as the blocks
# call act_layer(inplace=True)). Upstream has more (gelu, tanh, prelu, ... with timm wrappers).
_ACT_LAYERS = dict(
    relu=nn.ReLU, relu6=nn.ReLU6, leaky_relu=nn.LeakyReLU, elu=nn.ELU, celu=nn.CELU,
    selu=nn.SELU, silu=nn.SiLU, swish=nn.SiLU, mish=nn.Mish, hard_swish=nn.Hardswish,
    hardswish=nn.Hardswish, hard_sigmoid=nn.Hardsigmoid, hardsigmoid=nn.Hardsigmoid,
    sigmoid=Sigmoid, identity=nn.Identity,
)


def get_act_layer(name="relu"):
    if name is None:
        return None
    if not isinstance(name, str):
        return name  # a class, partial or callable
    if not name:
        return None
    name = name.lower()
    if name not in _ACT_LAYERS:
        raise NotImplementedError(f"mirrors: activation '{name}' is not mirrored")
    return _ACT_LAYERS[name]


def create_act_layer(name, inplace: Optional[bool] = None, **kwargs):
    act_layer = get_act_layer(name)
    if act_layer is None:
        return None
    if inplace is None:
        return act_layer(**kwargs)
    try:
        return act_layer(inplace=inplace, **kwargs)
    except TypeError:
        return act_layer(**kwargs)


_NORM_LAYERS = dict(batchnorm=nn.BatchNorm2d, batchnorm2d=nn.BatchNorm2d)


def get_norm_layer(norm_layer):
    """timm.layers.create_norm, reduced: classes/partials pass through, 'batchnorm' maps."""
    if norm_layer is None or not isinstance(norm_layer, str):
        return norm_layer
    key = norm_layer.lower().replace("_", "")
    if key not in _NORM_LAYERS:
        raise NotImplementedError(f"mirrors: norm layer '{norm_layer}' is not mirrored")
    return _NORM_LAYERS[key]


@_as("timm.layers.drop", "DropPath")
class DropPath(nn.Module):
    """Stochastic depth per sample; identity in eval or when drop_prob == 0."""
    def __init__(self, drop_prob: float = 0.0, scale_by_keep: bool = True):
        super().__init__()
        self.drop_prob = drop_prob
        self.scale_by_keep = scale_by_keep

    def forward(self, x):
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep_prob = 1 - self.drop_prob
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        random_tensor = x.new_empty(shape).bernoulli_(keep_prob)
        if keep_prob > 0.0 and self.scale_by_keep:
            random_tensor.div_(keep_prob)
        return x * random_tensor

    def extra_repr(self):
        return f"drop_prob={round(self.drop_prob, 3):0.3f}"


def drop_block_2d(x, drop_prob: float = 0.1, block_size: int = 7, gamma_scale: float = 1.0,
                  with_noise: bool = False, inplace: bool = False, couple_channels: bool = True,
                  scale_by_keep: bool = True):
    """DropBlock (arXiv:1810.12890), as timm.layers.drop.drop_block_2d."""
    B, C, H, W = x.shape
    kh, kw = min(block_size, H), min(block_size, W)
    gamma = (float(gamma_scale * drop_prob * H * W) / float(kh * kw)
             / float((H - kh + 1) * (W - kw + 1)))
    noise_shape = (B, 1 if couple_channels else C, H, W)
    with torch.no_grad():
        block_mask = torch.empty(noise_shape, dtype=x.dtype, device=x.device).bernoulli_(gamma)
        block_mask = F.max_pool2d(block_mask, kernel_size=(kh, kw), stride=1,
                                  padding=(kh // 2, kw // 2))
        if kh % 2 == 0 or kw % 2 == 0:  # even kernels give one extra row/column
            block_mask = block_mask[..., (kh + 1) % 2:, (kw + 1) % 2:]
        keep_mask = 1.0 - block_mask
    if with_noise:
        with torch.no_grad():
            noise = torch.empty_like(keep_mask).normal_()
            noise.mul_(block_mask)
        return x.mul_(keep_mask).add_(noise) if inplace else x * keep_mask + noise
    if scale_by_keep:
        with torch.no_grad():
            scale = keep_mask.numel() / keep_mask.to(dtype=torch.float32).sum().add(1e-7)
            keep_mask.mul_(scale.to(x.dtype))
    return x.mul_(keep_mask) if inplace else x * keep_mask


@_as("timm.layers.drop", "DropBlock2d")
class DropBlock2d(nn.Module):
    """Identity in eval or when drop_prob == 0."""
    def __init__(self, drop_prob: float = 0.1, block_size: int = 7, gamma_scale: float = 1.0,
                 with_noise: bool = False, inplace: bool = False, couple_channels: bool = True,
                 scale_by_keep: bool = True, **kwargs):
        super().__init__()
        self.drop_prob = drop_prob
        self.gamma_scale = gamma_scale
        self.block_size = block_size
        self.with_noise = with_noise
        self.inplace = inplace
        self.couple_channels = couple_channels
        self.scale_by_keep = scale_by_keep

    def forward(self, x):
        if not self.training or not self.drop_prob:
            return x
        return drop_block_2d(x, self.drop_prob, self.block_size, self.gamma_scale,
                             self.with_noise, self.inplace, self.couple_channels,
                             self.scale_by_keep)


@_as("timm.layers.squeeze_excite", "SEModule")
class SEModule(nn.Module):
    """Squeeze-excitation: x * gate(fc2(act(bn(fc1(mean_hw(x))))))."""
    def __init__(self, channels: int, rd_ratio: float = 1.0 / 16, rd_channels: Optional[int] = None,
                 rd_divisor: int = 8, add_maxpool: bool = False, bias: bool = True,
                 act_layer=nn.ReLU, norm_layer=None, gate_layer="sigmoid",
                 device=None, dtype=None):
        dd = {"device": device, "dtype": dtype}
        super().__init__()
        self.add_maxpool = add_maxpool
        if not rd_channels:
            rd_channels = make_divisible(channels * rd_ratio, rd_divisor, round_limit=0.0)
        self.fc1 = nn.Conv2d(channels, rd_channels, kernel_size=1, bias=bias, **dd)
        self.bn = norm_layer(rd_channels, **dd) if norm_layer else nn.Identity()
        self.act = create_act_layer(act_layer, inplace=True)
        self.fc2 = nn.Conv2d(rd_channels, channels, kernel_size=1, bias=bias, **dd)
        self.gate = create_act_layer(gate_layer)

    def forward(self, x):
        x_se = x.mean((2, 3), keepdim=True)
        if self.add_maxpool:
            x_se = 0.5 * x_se + 0.5 * x.amax((2, 3), keepdim=True)
        x_se = self.fc1(x_se)
        x_se = self.act(self.bn(x_se))
        x_se = self.fc2(x_se)
        return x * self.gate(x_se)


def get_attn(attn_type):
    """timm.layers.create_attn.get_attn, reduced to 'se' / True / a class or partial."""
    if isinstance(attn_type, nn.Module):
        return attn_type
    module_cls = None
    if attn_type:
        if isinstance(attn_type, str):
            if attn_type.lower() != "se":
                raise NotImplementedError(f"mirrors: attention '{attn_type}' is not mirrored")
            module_cls = SEModule
        elif isinstance(attn_type, bool):
            module_cls = SEModule
        else:
            module_cls = attn_type
    return module_cls


def create_attn(attn_type, channels, **kwargs):
    """An attention module, or None (not Identity) when attn_type is falsy."""
    module_cls = get_attn(attn_type)
    if module_cls is not None:
        return module_cls(channels, **kwargs)
    return None


@_as("timm.layers.blur_pool", "BlurPool2d")
class BlurPool2d(nn.Module):
    """Anti-aliased downsampling: reflect-pad, then a fixed binomial depthwise conv at `stride`."""
    def __init__(self, channels: Optional[int] = None, filt_size: int = 3, stride: int = 2,
                 pad_mode: str = "reflect", device=None, dtype=None) -> None:
        super().__init__()
        assert filt_size > 1
        self.channels = channels
        self.filt_size = filt_size
        self.stride = stride
        self.pad_mode = pad_mode
        self.padding = [get_padding(filt_size, stride, dilation=1)] * 4
        coeffs = torch.tensor([math.comb(filt_size - 1, k) for k in range(filt_size)],
                              dtype=torch.float32) / (2 ** (filt_size - 1))
        blur = (coeffs[:, None] * coeffs[None, :])[None, None, :, :]
        if channels is not None:
            blur = blur.repeat(channels, 1, 1, 1)
        # non-persistent: no state-dict key, as upstream
        self.register_buffer("filt", blur.to(device=device, dtype=dtype), persistent=False)

    def forward(self, x):
        x = F.pad(x, self.padding, mode=self.pad_mode)
        if self.channels is None:
            channels = x.shape[1]
            weight = self.filt.expand(channels, 1, self.filt_size, self.filt_size)
        else:
            channels, weight = self.channels, self.filt
        return F.conv2d(x, weight, stride=self.stride, groups=channels)


def create_aa(aa_layer, channels: Optional[int] = None, stride: int = 2, enable: bool = True,
              noop=nn.Identity, device=None, dtype=None):
    """An anti-aliasing layer, or nn.Identity() (noop) when aa_layer is falsy or not enabled."""
    if not aa_layer or not enable:
        return noop() if noop is not None else None
    if isinstance(aa_layer, str):
        key = aa_layer.lower().replace("_", "").replace("-", "")
        aa_layer = {"avg": nn.AvgPool2d, "avgpool": nn.AvgPool2d, "blur": BlurPool2d,
                    "blurpool": BlurPool2d, "blurpc": partial(BlurPool2d, pad_mode="constant")}[key]
    try:
        return aa_layer(channels=channels, stride=stride)
    except TypeError:
        return aa_layer(stride)  # e.g. nn.AvgPool2d(stride): kernel = stride = 2


@_as("timm.layers.pool2d_same", "AvgPool2dSame")
class AvgPool2dSame(nn.AvgPool2d):
    """TF-'SAME' average pooling (used by downsample_avg when a stage is dilated)."""
    def __init__(self, kernel_size, stride=None, padding=0, ceil_mode=False,
                 count_include_pad=True):
        super().__init__(to_2tuple(kernel_size), to_2tuple(stride), (0, 0), ceil_mode,
                         count_include_pad)

    def forward(self, x):
        x = pad_same(x, self.kernel_size, self.stride)
        return F.avg_pool2d(x, self.kernel_size, self.stride, self.padding, self.ceil_mode,
                            self.count_include_pad)


@_as("timm.layers.adaptive_avgmax_pool", "SelectAdaptivePool2d")
class SelectAdaptivePool2d(nn.Module):
    """Global pooling ('avg', 'max' or '' = pass-through) + optional flatten; no parameters."""
    def __init__(self, output_size=1, pool_type: str = "fast", flatten: bool = False,
                 input_fmt: str = "NCHW"):
        super().__init__()
        self.pool_type = pool_type or ""
        pool_type = self.pool_type.lower()
        if not pool_type:
            self.pool = nn.Identity()
        elif pool_type == "avg":
            self.pool = nn.AdaptiveAvgPool2d(output_size)
        elif pool_type == "max":
            self.pool = nn.AdaptiveMaxPool2d(output_size)
        else:
            raise NotImplementedError(f"mirrors: pool type '{pool_type}' is not mirrored")
        self.flatten = nn.Flatten(1) if flatten else nn.Identity()

    def is_identity(self):
        return not self.pool_type

    def forward(self, x):
        return self.flatten(self.pool(x))

    def feat_mult(self):
        return 1


def create_classifier(num_features: int, num_classes: int, pool_type: str = "avg",
                      use_conv: bool = False, device=None, dtype=None):
    """(global_pool, fc); fc is nn.Identity() when num_classes <= 0."""
    flatten_in_pool = not use_conv and bool(pool_type)
    global_pool = SelectAdaptivePool2d(pool_type=pool_type, flatten=flatten_in_pool)
    n = num_features * global_pool.feat_mult()
    if num_classes <= 0:
        fc = nn.Identity()
    elif use_conv:
        fc = nn.Conv2d(n, num_classes, 1, bias=True, device=device, dtype=dtype)
    else:
        fc = nn.Linear(n, num_classes, bias=True, device=device, dtype=dtype)
    return global_pool, fc


# =========================================================================== timm.models.resnet

@_as("timm.models.resnet", "BasicBlock")
class TimmBasicBlock(nn.Module):
    # forward: conv1 bn1 drop_block act1 aa | conv2 bn2 [se] [drop_path] | += shortcut, act2
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1,
                 downsample: Optional[nn.Module] = None, cardinality: int = 1,
                 base_width: int = 64, reduce_first: int = 1, dilation: int = 1,
                 first_dilation: Optional[int] = None, act_layer: Type[nn.Module] = nn.ReLU,
                 norm_layer: Type[nn.Module] = nn.BatchNorm2d,
                 attn_layer: Optional[Type[nn.Module]] = None,
                 aa_layer: Optional[Type[nn.Module]] = None,
                 drop_block: Optional[Type[nn.Module]] = None,
                 drop_path: Optional[nn.Module] = None, device=None, dtype=None) -> None:
        dd = {"device": device, "dtype": dtype}
        super().__init__()
        assert cardinality == 1, "BasicBlock only supports cardinality of 1"
        assert base_width == 64, "BasicBlock does not support changing base width"
        first_planes = planes // reduce_first
        outplanes = planes * self.expansion
        first_dilation = first_dilation or dilation
        use_aa = aa_layer is not None and (stride == 2 or first_dilation != dilation)

        # with aa, conv1 runs at stride 1 and self.aa does the striding after act1
        self.conv1 = nn.Conv2d(inplanes, first_planes, kernel_size=3,
                               stride=1 if use_aa else stride, padding=first_dilation,
                               dilation=first_dilation, bias=False, **dd)
        self.bn1 = norm_layer(first_planes, **dd)
        self.drop_block = drop_block() if drop_block is not None else nn.Identity()
        self.act1 = act_layer(inplace=True)
        self.aa = create_aa(aa_layer, channels=first_planes, stride=stride, enable=use_aa, **dd)

        self.conv2 = nn.Conv2d(first_planes, outplanes, kernel_size=3, padding=dilation,
                               dilation=dilation, bias=False, **dd)
        self.bn2 = norm_layer(outplanes, **dd)

        self.se = create_attn(attn_layer, outplanes, **dd)  # None when off

        self.act2 = act_layer(inplace=True)
        self.downsample = downsample
        self.stride = stride
        self.dilation = dilation
        self.drop_path = drop_path  # None when off (not Identity)

    def zero_init_last(self) -> None:
        if getattr(self.bn2, "weight", None) is not None:
            nn.init.zeros_(self.bn2.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x

        x = self.conv1(x)
        x = self.bn1(x)
        x = self.drop_block(x)
        x = self.act1(x)
        x = self.aa(x)

        x = self.conv2(x)
        x = self.bn2(x)

        if self.se is not None:
            x = self.se(x)

        if self.drop_path is not None:
            x = self.drop_path(x)

        if self.downsample is not None:
            shortcut = self.downsample(shortcut)
        x += shortcut
        x = self.act2(x)
        return x


@_as("timm.models.resnet", "Bottleneck")
class TimmBottleneck(nn.Module):
    # forward: conv1 bn1 act1 | conv2 bn2 drop_block act2 aa | conv3 bn3 [se] [drop_path]
    #          | += shortcut, act3
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1,
                 downsample: Optional[nn.Module] = None, cardinality: int = 1,
                 base_width: int = 64, reduce_first: int = 1, dilation: int = 1,
                 first_dilation: Optional[int] = None, act_layer: Type[nn.Module] = nn.ReLU,
                 norm_layer: Type[nn.Module] = nn.BatchNorm2d,
                 attn_layer: Optional[Type[nn.Module]] = None,
                 aa_layer: Optional[Type[nn.Module]] = None,
                 drop_block: Optional[Type[nn.Module]] = None,
                 drop_path: Optional[nn.Module] = None, device=None, dtype=None) -> None:
        dd = {"device": device, "dtype": dtype}
        super().__init__()
        width = int(math.floor(planes * (base_width / 64)) * cardinality)
        first_planes = width // reduce_first
        outplanes = planes * self.expansion
        first_dilation = first_dilation or dilation
        use_aa = aa_layer is not None and (stride == 2 or first_dilation != dilation)

        self.conv1 = nn.Conv2d(inplanes, first_planes, kernel_size=1, bias=False, **dd)
        self.bn1 = norm_layer(first_planes, **dd)
        self.act1 = act_layer(inplace=True)

        # stride on the 3x3 (V1.5); with aa it moves to self.aa after act2
        self.conv2 = nn.Conv2d(first_planes, width, kernel_size=3, stride=1 if use_aa else stride,
                               padding=first_dilation, dilation=first_dilation,
                               groups=cardinality, bias=False, **dd)
        self.bn2 = norm_layer(width, **dd)
        self.drop_block = drop_block() if drop_block is not None else nn.Identity()
        self.act2 = act_layer(inplace=True)
        self.aa = create_aa(aa_layer, channels=width, stride=stride, enable=use_aa, **dd)

        self.conv3 = nn.Conv2d(width, outplanes, kernel_size=1, bias=False, **dd)
        self.bn3 = norm_layer(outplanes, **dd)

        self.se = create_attn(attn_layer, outplanes, **dd)  # None when off

        self.act3 = act_layer(inplace=True)
        self.downsample = downsample
        self.stride = stride
        self.dilation = dilation
        self.drop_path = drop_path  # None when off (not Identity)

    def zero_init_last(self) -> None:
        if getattr(self.bn3, "weight", None) is not None:
            nn.init.zeros_(self.bn3.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x

        x = self.conv1(x)
        x = self.bn1(x)
        x = self.act1(x)

        x = self.conv2(x)
        x = self.bn2(x)
        x = self.drop_block(x)
        x = self.act2(x)
        x = self.aa(x)

        x = self.conv3(x)
        x = self.bn3(x)

        if self.se is not None:
            x = self.se(x)

        if self.drop_path is not None:
            x = self.drop_path(x)

        if self.downsample is not None:
            shortcut = self.downsample(shortcut)
        x += shortcut
        x = self.act3(x)
        return x


def downsample_conv(in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                    dilation: int = 1, first_dilation: Optional[int] = None,
                    norm_layer: Optional[Type[nn.Module]] = None, device=None,
                    dtype=None) -> nn.Module:
    """Sequential(0: conv (1x1 unless strided/dilated with down_kernel_size > 1), 1: norm)."""
    dd = {"device": device, "dtype": dtype}
    norm_layer = norm_layer or nn.BatchNorm2d
    kernel_size = 1 if stride == 1 and dilation == 1 else kernel_size
    first_dilation = (first_dilation or dilation) if kernel_size > 1 else 1
    p = get_padding(kernel_size, stride, first_dilation)
    return nn.Sequential(*[
        nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=p,
                  dilation=first_dilation, bias=False, **dd),
        norm_layer(out_channels, **dd),
    ])


def downsample_avg(in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                   dilation: int = 1, first_dilation: Optional[int] = None,
                   norm_layer: Optional[Type[nn.Module]] = None, device=None,
                   dtype=None) -> nn.Module:
    """Sequential(0: pool or Identity, 1: 1x1 conv at stride 1, 2: norm); kernel_size unused."""
    dd = {"device": device, "dtype": dtype}
    norm_layer = norm_layer or nn.BatchNorm2d
    avg_stride = stride if dilation == 1 else 1
    if stride == 1 and dilation == 1:
        pool = nn.Identity()
    else:
        avg_pool_fn = AvgPool2dSame if avg_stride == 1 and dilation > 1 else nn.AvgPool2d
        pool = avg_pool_fn(2, avg_stride, ceil_mode=True, count_include_pad=False)
    return nn.Sequential(*[
        pool,
        nn.Conv2d(in_channels, out_channels, 1, stride=1, padding=0, bias=False, **dd),
        norm_layer(out_channels, **dd),
    ])


def drop_blocks(drop_prob: float = 0.0):
    """Per-stage DropBlock factories: none in stages 1-2, then block 5 / gamma 0.25 and 3 / 1.0."""
    return [
        None, None,
        partial(DropBlock2d, drop_prob=drop_prob, block_size=5, gamma_scale=0.25)
        if drop_prob else None,
        partial(DropBlock2d, drop_prob=drop_prob, block_size=3, gamma_scale=1.00)
        if drop_prob else None,
    ]


def make_blocks(block_fns, channels, block_repeats, inplanes: int, reduce_first: int = 1,
                output_stride: int = 32, down_kernel_size: int = 1, avg_down: bool = False,
                drop_block_rate: float = 0.0, drop_path_rate: float = 0.0, device=None,
                dtype=None, **kwargs) -> Tuple[List[Tuple[str, nn.Module]], List[Dict[str, Any]]]:
    dd = {"device": device, "dtype": dtype}
    stages, feature_info = [], []
    net_num_blocks = sum(block_repeats)
    net_block_idx = 0
    net_stride = 4
    dilation = prev_dilation = 1
    for stage_idx, (block_fn, planes, num_blocks, db) in enumerate(
            zip(block_fns, channels, block_repeats, drop_blocks(drop_block_rate))):
        stage_name = f"layer{stage_idx + 1}"
        stride = 1 if stage_idx == 0 else 2
        if net_stride >= output_stride:
            dilation *= stride
            stride = 1
        else:
            net_stride *= stride

        downsample = None
        if stride != 1 or inplanes != planes * block_fn.expansion:
            down_kwargs = dict(in_channels=inplanes, out_channels=planes * block_fn.expansion,
                               kernel_size=down_kernel_size, stride=stride, dilation=dilation,
                               first_dilation=prev_dilation, norm_layer=kwargs.get("norm_layer"),
                               **dd)
            downsample = downsample_avg(**down_kwargs) if avg_down else downsample_conv(**down_kwargs)

        block_kwargs = dict(reduce_first=reduce_first, dilation=dilation, drop_block=db, **kwargs)
        blocks = []
        for block_idx in range(num_blocks):
            downsample = downsample if block_idx == 0 else None
            stride = stride if block_idx == 0 else 1
            # stochastic depth, linear in the network-wide block index (0 for the first block)
            block_dpr = drop_path_rate * net_block_idx / (net_num_blocks - 1)
            blocks.append(block_fn(inplanes, planes, stride, downsample,
                                   first_dilation=prev_dilation,
                                   drop_path=DropPath(block_dpr) if block_dpr > 0.0 else None,
                                   **block_kwargs, **dd))
            prev_dilation = dilation
            inplanes = planes * block_fn.expansion
            net_block_idx += 1

        stages.append((stage_name, nn.Sequential(*blocks)))
        feature_info.append(dict(num_chs=inplanes, reduction=net_stride, module=stage_name))
    return stages, feature_info


@_as("timm.models.resnet", "ResNet")
class TimmResNet(nn.Module):
    """timm ResNet / ResNeXt / SE-ResNet. Stems: '' (7x7 conv), 'deep' (3x 3x3 convs of
    stem_width, stem_width, 2*stem_width), 'deep_tiered'. Layout: conv1, bn1, act1, maxpool,
    layer1..layer4, global_pool, fc."""

    def __init__(self, block, layers: Tuple[int, ...], num_classes: int = 1000, in_chans: int = 3,
                 output_stride: int = 32, global_pool: str = "avg", cardinality: int = 1,
                 base_width: int = 64, stem_width: int = 64, stem_type: str = "",
                 replace_stem_pool: bool = False, block_reduce_first: int = 1,
                 down_kernel_size: int = 1, avg_down: bool = False,
                 channels: Optional[Tuple[int, ...]] = (64, 128, 256, 512),
                 act_layer=nn.ReLU, norm_layer=nn.BatchNorm2d,
                 aa_layer: Optional[Type[nn.Module]] = None, drop_rate: float = 0.0,
                 drop_path_rate: float = 0.0, drop_block_rate: float = 0.0,
                 zero_init_last: bool = True, block_args: Optional[Dict[str, Any]] = None,
                 device=None, dtype=None):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        block_args = block_args or dict()
        assert output_stride in (8, 16, 32)
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.drop_rate = drop_rate
        self.grad_checkpointing = False

        act_layer = get_act_layer(act_layer)
        norm_layer = get_norm_layer(norm_layer)

        # Stem. The deep stem's last conv (conv1.6) is normalised by bn1, outside the Sequential.
        deep_stem = "deep" in stem_type
        inplanes = stem_width * 2 if deep_stem else 64
        if deep_stem:
            stem_chs = (stem_width, stem_width)
            if "tiered" in stem_type:
                stem_chs = (3 * (stem_width // 4), stem_width)
            self.conv1 = nn.Sequential(*[
                nn.Conv2d(in_chans, stem_chs[0], 3, stride=2, padding=1, bias=False, **dd),  # 0
                norm_layer(stem_chs[0], **dd),                                               # 1
                act_layer(inplace=True),                                                     # 2
                nn.Conv2d(stem_chs[0], stem_chs[1], 3, stride=1, padding=1, bias=False, **dd),  # 3
                norm_layer(stem_chs[1], **dd),                                               # 4
                act_layer(inplace=True),                                                     # 5
                nn.Conv2d(stem_chs[1], inplanes, 3, stride=1, padding=1, bias=False, **dd)])  # 6
        else:
            self.conv1 = nn.Conv2d(in_chans, inplanes, kernel_size=7, stride=2, padding=3,
                                   bias=False, **dd)
        self.bn1 = norm_layer(inplanes, **dd)
        self.act1 = act_layer(inplace=True)
        self.feature_info = [dict(num_chs=inplanes, reduction=2, module="act1")]

        # Stem pooling ('maxpool' kept as the name for weight compatibility).
        if replace_stem_pool:
            self.maxpool = nn.Sequential(*filter(None, [
                nn.Conv2d(inplanes, inplanes, 3, stride=1 if aa_layer else 2, padding=1,
                          bias=False, **dd),
                create_aa(aa_layer, channels=inplanes, stride=2, **dd) if aa_layer is not None else None,
                norm_layer(inplanes, **dd),
                act_layer(inplace=True),
            ]))
        else:
            if aa_layer is not None:
                if issubclass(aa_layer, nn.AvgPool2d):
                    self.maxpool = aa_layer(2)
                else:
                    self.maxpool = nn.Sequential(*[
                        nn.MaxPool2d(kernel_size=3, stride=1, padding=1),
                        aa_layer(channels=inplanes, stride=2, **dd)])
            else:
                self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)

        # Stages
        block_fns = to_ntuple(len(channels))(block)
        stage_modules, stage_feature_info = make_blocks(
            block_fns, channels, layers, inplanes, cardinality=cardinality, base_width=base_width,
            output_stride=output_stride, reduce_first=block_reduce_first, avg_down=avg_down,
            down_kernel_size=down_kernel_size, act_layer=act_layer, norm_layer=norm_layer,
            aa_layer=aa_layer, drop_block_rate=drop_block_rate, drop_path_rate=drop_path_rate,
            **block_args, **dd)
        for stage in stage_modules:
            self.add_module(*stage)  # layer1 .. layer4
        self.feature_info.extend(stage_feature_info)

        # Head
        self.num_features = self.head_hidden_size = channels[-1] * block_fns[-1].expansion
        self.global_pool, self.fc = create_classifier(self.num_features, self.num_classes,
                                                      pool_type=global_pool, **dd)

        self.init_weights(zero_init_last=zero_init_last)

    def init_weights(self, zero_init_last: bool = True) -> None:
        # Only convs are re-initialised; BN and fc keep torch's defaults.
        for _, m in self.named_modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        if zero_init_last:
            for m in self.modules():
                if hasattr(m, "zero_init_last"):
                    m.zero_init_last()

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable  # recorded only; the mirror never checkpoints

    def get_classifier(self, name_only: bool = False):
        return "fc" if name_only else self.fc

    def reset_classifier(self, num_classes: int, global_pool: str = "avg") -> None:
        self.num_classes = num_classes
        self.global_pool, self.fc = create_classifier(self.num_features, self.num_classes,
                                                      pool_type=global_pool)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        x = self.bn1(x)
        x = self.act1(x)
        x = self.maxpool(x)

        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        x = self.layer4(x)
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.global_pool(x)
        if self.drop_rate:
            x = F.dropout(x, p=float(self.drop_rate), training=self.training)
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.forward_features(x)
        x = self.forward_head(x)
        return x


# Builders: as timm's registered entrypoints, caller kwargs override the model's defaults.
def _create_timm_resnet(num_classes: int, model_args: Dict[str, Any], **kwargs) -> TimmResNet:
    return TimmResNet(**dict(model_args, num_classes=num_classes, **kwargs))


def timm_resnet18(num_classes: int = 1000, **kwargs: Any) -> TimmResNet:
    return _create_timm_resnet(num_classes, dict(block=TimmBasicBlock, layers=(2, 2, 2, 2)),
                               **kwargs)


def timm_resnet50(num_classes: int = 1000, **kwargs: Any) -> TimmResNet:
    return _create_timm_resnet(num_classes, dict(block=TimmBottleneck, layers=(3, 4, 6, 3)),
                               **kwargs)


def timm_resnet50d(num_classes: int = 1000, **kwargs: Any) -> TimmResNet:
    return _create_timm_resnet(num_classes, dict(block=TimmBottleneck, layers=(3, 4, 6, 3),
                                                 stem_width=32, stem_type="deep", avg_down=True),
                               **kwargs)


def timm_seresnet50(num_classes: int = 1000, **kwargs: Any) -> TimmResNet:
    return _create_timm_resnet(num_classes, dict(block=TimmBottleneck, layers=(3, 4, 6, 3),
                                                 block_args=dict(attn_layer="se")), **kwargs)


def timm_resnext50_32x4d(num_classes: int = 1000, **kwargs: Any) -> TimmResNet:
    return _create_timm_resnet(num_classes, dict(block=TimmBottleneck, layers=(3, 4, 6, 3),
                                                 cardinality=32, base_width=4), **kwargs)


# ===================================================================== torchvision beyond ResNet
# torchvision/ops/misc.py, models/{vgg,densenet,mobilenetv2,efficientnet,regnet}.py (0.13+),
# reduced to the structure and forward the converter sees: class names and modules, attribute
# names, registration order, what is Identity/None, and the forward op for op.

@_as("torchvision.ops.misc", "ConvNormActivation")
class ConvNormActivation(nn.Sequential):
    def __init__(self, in_channels: int, out_channels: int, kernel_size=3, stride=1,
                 padding=None, groups: int = 1, norm_layer=nn.BatchNorm2d,
                 activation_layer=nn.ReLU, dilation=1, inplace: Optional[bool] = True,
                 bias: Optional[bool] = None, conv_layer=nn.Conv2d) -> None:
        if padding is None:
            padding = (kernel_size - 1) // 2 * dilation
        if bias is None:
            bias = norm_layer is None
        layers = [conv_layer(in_channels, out_channels, kernel_size, stride, padding,
                             dilation=dilation, groups=groups, bias=bias)]
        if norm_layer is not None:
            layers.append(norm_layer(out_channels))
        if activation_layer is not None:
            params = {} if inplace is None else {"inplace": inplace}
            layers.append(activation_layer(**params))
        super().__init__(*layers)
        self.out_channels = out_channels


@_as("torchvision.ops.misc", "Conv2dNormActivation")
class Conv2dNormActivation(ConvNormActivation):
    def __init__(self, in_channels, out_channels, kernel_size=3, stride=1, padding=None,
                 groups=1, norm_layer=nn.BatchNorm2d, activation_layer=nn.ReLU, dilation=1,
                 inplace=True, bias=None) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, groups,
                         norm_layer, activation_layer, dilation, inplace, bias, nn.Conv2d)


@_as("torchvision.ops.misc", "SqueezeExcitation")
class SqueezeExcitation(nn.Module):
    def __init__(self, input_channels: int, squeeze_channels: int, activation=nn.ReLU,
                 scale_activation=nn.Sigmoid) -> None:
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(input_channels, squeeze_channels, 1)
        self.fc2 = nn.Conv2d(squeeze_channels, input_channels, 1)
        self.activation = activation()
        self.scale_activation = scale_activation()

    def _scale(self, input):
        scale = self.avgpool(input)
        scale = self.fc1(scale)
        scale = self.activation(scale)
        scale = self.fc2(scale)
        return self.scale_activation(scale)

    def forward(self, input):
        scale = self._scale(input)
        return scale * input


def stochastic_depth(input, p: float, mode: str, training: bool = True):
    if not training or p == 0.0:
        return input
    survival_rate = 1.0 - p
    size = [input.shape[0]] + [1] * (input.ndim - 1) if mode == "row" else [1] * input.ndim
    noise = torch.empty(size, dtype=input.dtype, device=input.device).bernoulli_(survival_rate)
    if survival_rate > 0.0:
        noise.div_(survival_rate)
    return input * noise


@_as("torchvision.ops.stochastic_depth", "StochasticDepth")
class StochasticDepth(nn.Module):
    def __init__(self, p: float, mode: str) -> None:
        super().__init__()
        self.p = p
        self.mode = mode

    def forward(self, input):
        return stochastic_depth(input, self.p, self.mode, self.training)


# -- VGG-BN (torchvision/models/vgg.py): features is a plain Sequential conv, bn, relu, ..., M
def vgg_make_layers(cfg, batch_norm: bool = False) -> nn.Sequential:
    layers: List[nn.Module] = []
    in_channels = 3
    for v in cfg:
        if v == "M":
            layers += [nn.MaxPool2d(kernel_size=2, stride=2)]
        else:
            conv2d = nn.Conv2d(in_channels, v, kernel_size=3, padding=1)  # bias=True, as upstream
            if batch_norm:
                layers += [conv2d, nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
            else:
                layers += [conv2d, nn.ReLU(inplace=True)]
            in_channels = v
    return nn.Sequential(*layers)


@_as("torchvision.models.vgg", "VGG")
class TvVGG(nn.Module):
    def __init__(self, features: nn.Module, num_classes: int = 1000, hidden: int = 4096,
                 dropout: float = 0.5) -> None:
        super().__init__()
        self.features = features
        self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
        c = [m for m in features if isinstance(m, nn.Conv2d)][-1].out_channels
        self.classifier = nn.Sequential(
            nn.Linear(c * 7 * 7, hidden), nn.ReLU(True), nn.Dropout(p=dropout),
            nn.Linear(hidden, hidden), nn.ReLU(True), nn.Dropout(p=dropout),
            nn.Linear(hidden, num_classes))

    def forward(self, x):
        x = self.features(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.classifier(x)


# -- DenseNet (torchvision/models/densenet.py)
@_as("torchvision.models.densenet", "_DenseLayer")
class TvDenseLayer(nn.Module):
    def __init__(self, num_input_features: int, growth_rate: int, bn_size: int,
                 drop_rate: float, memory_efficient: bool = False) -> None:
        super().__init__()
        self.norm1 = nn.BatchNorm2d(num_input_features)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(num_input_features, bn_size * growth_rate, kernel_size=1,
                               stride=1, bias=False)
        self.norm2 = nn.BatchNorm2d(bn_size * growth_rate)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(bn_size * growth_rate, growth_rate, kernel_size=3, stride=1,
                               padding=1, bias=False)
        self.drop_rate = float(drop_rate)
        self.memory_efficient = memory_efficient

    def bn_function(self, inputs: List[torch.Tensor]) -> torch.Tensor:
        concated_features = torch.cat(inputs, 1)
        return self.conv1(self.relu1(self.norm1(concated_features)))

    def any_requires_grad(self, input: List[torch.Tensor]) -> bool:
        for tensor in input:
            if tensor.requires_grad:
                return True
        return False

    def call_checkpoint_bottleneck(self, input: List[torch.Tensor]) -> torch.Tensor:
        import torch.utils.checkpoint as cp

        def closure(*inputs):
            return self.bn_function(inputs)
        return cp.checkpoint(closure, *input, use_reentrant=False)

    def forward(self, input):
        if isinstance(input, torch.Tensor):
            prev_features = [input]
        else:
            prev_features = input
        if self.memory_efficient and self.any_requires_grad(prev_features):
            bottleneck_output = self.call_checkpoint_bottleneck(prev_features)
        else:
            bottleneck_output = self.bn_function(prev_features)
        new_features = self.conv2(self.relu2(self.norm2(bottleneck_output)))
        if self.drop_rate > 0:
            new_features = F.dropout(new_features, p=self.drop_rate, training=self.training)
        return new_features


@_as("torchvision.models.densenet", "_DenseBlock")
class TvDenseBlock(nn.ModuleDict):
    _version = 2

    def __init__(self, num_layers: int, num_input_features: int, bn_size: int,
                 growth_rate: int, drop_rate: float, memory_efficient: bool = False) -> None:
        super().__init__()
        for i in range(num_layers):
            layer = TvDenseLayer(num_input_features + i * growth_rate, growth_rate=growth_rate,
                                 bn_size=bn_size, drop_rate=drop_rate,
                                 memory_efficient=memory_efficient)
            self.add_module("denselayer%d" % (i + 1), layer)

    def forward(self, init_features):
        features = [init_features]
        for name, layer in self.items():
            new_features = layer(features)
            features.append(new_features)
        return torch.cat(features, 1)


@_as("torchvision.models.densenet", "_Transition")
class TvTransition(nn.Sequential):
    def __init__(self, num_input_features: int, num_output_features: int) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(num_input_features)
        self.relu = nn.ReLU(inplace=True)
        self.conv = nn.Conv2d(num_input_features, num_output_features, kernel_size=1, stride=1,
                              bias=False)
        self.pool = nn.AvgPool2d(kernel_size=2, stride=2)


@_as("torchvision.models.densenet", "DenseNet")
class TvDenseNet(nn.Module):
    def __init__(self, growth_rate: int = 32, block_config=(6, 12, 24, 16),
                 num_init_features: int = 64, bn_size: int = 4, drop_rate: float = 0,
                 num_classes: int = 1000, memory_efficient: bool = False) -> None:
        super().__init__()
        from collections import OrderedDict
        self.features = nn.Sequential(OrderedDict([
            ("conv0", nn.Conv2d(3, num_init_features, kernel_size=7, stride=2, padding=3, bias=False)),
            ("norm0", nn.BatchNorm2d(num_init_features)),
            ("relu0", nn.ReLU(inplace=True)),
            ("pool0", nn.MaxPool2d(kernel_size=3, stride=2, padding=1)),
        ]))
        num_features = num_init_features
        for i, num_layers in enumerate(block_config):
            block = TvDenseBlock(num_layers=num_layers, num_input_features=num_features,
                                 bn_size=bn_size, growth_rate=growth_rate, drop_rate=drop_rate,
                                 memory_efficient=memory_efficient)
            self.features.add_module("denseblock%d" % (i + 1), block)
            num_features = num_features + num_layers * growth_rate
            if i != len(block_config) - 1:
                trans = TvTransition(num_features, num_features // 2)
                self.features.add_module("transition%d" % (i + 1), trans)
                num_features = num_features // 2
        self.features.add_module("norm5", nn.BatchNorm2d(num_features))
        self.classifier = nn.Linear(num_features, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
            elif isinstance(m, nn.Linear):
                nn.init.constant_(m.bias, 0)

    def forward(self, x):
        features = self.features(x)
        out = F.relu(features, inplace=True)
        out = F.adaptive_avg_pool2d(out, (1, 1))
        out = torch.flatten(out, 1)
        return self.classifier(out)


# -- MobileNetV2 (torchvision/models/mobilenetv2.py)
def _make_divisible(v: float, divisor: int, min_value: Optional[int] = None) -> int:
    if min_value is None:
        min_value = divisor
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return new_v


@_as("torchvision.models.mobilenetv2", "InvertedResidual")
class TvInvertedResidual(nn.Module):
    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: int, norm_layer=None) -> None:
        super().__init__()
        self.stride = stride
        if norm_layer is None:
            norm_layer = nn.BatchNorm2d
        hidden_dim = int(round(inp * expand_ratio))
        self.use_res_connect = self.stride == 1 and inp == oup
        layers: List[nn.Module] = []
        if expand_ratio != 1:
            layers.append(Conv2dNormActivation(inp, hidden_dim, kernel_size=1,
                                               norm_layer=norm_layer, activation_layer=nn.ReLU6))
        layers.extend([
            Conv2dNormActivation(hidden_dim, hidden_dim, stride=stride, groups=hidden_dim,
                                 norm_layer=norm_layer, activation_layer=nn.ReLU6),
            nn.Conv2d(hidden_dim, oup, 1, 1, 0, bias=False),
            norm_layer(oup),
        ])
        self.conv = nn.Sequential(*layers)
        self.out_channels = oup
        self._is_cn = stride > 1

    def forward(self, x):
        if self.use_res_connect:
            return x + self.conv(x)
        return self.conv(x)


@_as("torchvision.models.mobilenetv2", "MobileNetV2")
class TvMobileNetV2(nn.Module):
    def __init__(self, num_classes: int = 1000, width_mult: float = 1.0,
                 inverted_residual_setting=None, round_nearest: int = 8, block=None,
                 norm_layer=None, dropout: float = 0.2) -> None:
        super().__init__()
        block = block or TvInvertedResidual
        norm_layer = norm_layer or nn.BatchNorm2d
        input_channel, last_channel = 32, 1280
        if inverted_residual_setting is None:
            inverted_residual_setting = [[1, 16, 1, 1], [6, 24, 2, 2], [6, 32, 3, 2],
                                         [6, 64, 4, 2], [6, 96, 3, 1], [6, 160, 3, 2],
                                         [6, 320, 1, 1]]
        input_channel = _make_divisible(input_channel * width_mult, round_nearest)
        self.last_channel = _make_divisible(last_channel * max(1.0, width_mult), round_nearest)
        features: List[nn.Module] = [Conv2dNormActivation(3, input_channel, stride=2,
                                                          norm_layer=norm_layer,
                                                          activation_layer=nn.ReLU6)]
        for t, c, n, s in inverted_residual_setting:
            output_channel = _make_divisible(c * width_mult, round_nearest)
            for i in range(n):
                stride = s if i == 0 else 1
                features.append(block(input_channel, output_channel, stride, expand_ratio=t,
                                      norm_layer=norm_layer))
                input_channel = output_channel
        features.append(Conv2dNormActivation(input_channel, self.last_channel, kernel_size=1,
                                             norm_layer=norm_layer, activation_layer=nn.ReLU6))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(nn.Dropout(p=dropout),
                                        nn.Linear(self.last_channel, num_classes))

    def forward(self, x):
        x = self.features(x)
        x = nn.functional.adaptive_avg_pool2d(x, (1, 1))
        x = torch.flatten(x, 1)
        return self.classifier(x)


# -- EfficientNet's MBConv (torchvision/models/efficientnet.py), config reduced to arguments
@_as("torchvision.models.efficientnet", "MBConv")
class TvMBConv(nn.Module):
    def __init__(self, input_channels: int, out_channels: int, kernel: int, stride: int,
                 expand_ratio: float, stochastic_depth_prob: float, norm_layer=nn.BatchNorm2d,
                 se_layer=SqueezeExcitation) -> None:
        super().__init__()
        self.use_res_connect = stride == 1 and input_channels == out_channels
        layers: List[nn.Module] = []
        activation_layer = nn.SiLU
        expanded_channels = _make_divisible(input_channels * expand_ratio, 8)
        if expanded_channels != input_channels:
            layers.append(Conv2dNormActivation(input_channels, expanded_channels, kernel_size=1,
                                               norm_layer=norm_layer,
                                               activation_layer=activation_layer))
        layers.append(Conv2dNormActivation(expanded_channels, expanded_channels,
                                           kernel_size=kernel, stride=stride,
                                           groups=expanded_channels, norm_layer=norm_layer,
                                           activation_layer=activation_layer))
        squeeze_channels = max(1, input_channels // 4)
        layers.append(se_layer(expanded_channels, squeeze_channels,
                               activation=partial(nn.SiLU, inplace=True)))
        layers.append(Conv2dNormActivation(expanded_channels, out_channels, kernel_size=1,
                                           norm_layer=norm_layer, activation_layer=None))
        self.block = nn.Sequential(*layers)
        self.stochastic_depth = StochasticDepth(stochastic_depth_prob, "row")
        self.out_channels = out_channels

    def forward(self, input):
        result = self.block(input)
        if self.use_res_connect:
            result = self.stochastic_depth(result)
            result += input
        return result


# -- RegNet (torchvision/models/regnet.py)
@_as("torchvision.models.regnet", "BottleneckTransform")
class TvBottleneckTransform(nn.Sequential):
    def __init__(self, width_in, width_out, stride, norm_layer, activation_layer, group_width,
                 bottleneck_multiplier, se_ratio) -> None:
        from collections import OrderedDict
        layers: Dict[str, nn.Module] = OrderedDict()
        w_b = int(round(width_out * bottleneck_multiplier))
        g = w_b // group_width
        layers["a"] = Conv2dNormActivation(width_in, w_b, kernel_size=1, stride=1,
                                           norm_layer=norm_layer, activation_layer=activation_layer)
        layers["b"] = Conv2dNormActivation(w_b, w_b, kernel_size=3, stride=stride, groups=g,
                                           norm_layer=norm_layer, activation_layer=activation_layer)
        if se_ratio:
            width_se_out = int(round(se_ratio * width_in))
            layers["se"] = SqueezeExcitation(input_channels=w_b, squeeze_channels=width_se_out,
                                             activation=activation_layer)
        layers["c"] = Conv2dNormActivation(w_b, width_out, kernel_size=1, stride=1,
                                           norm_layer=norm_layer, activation_layer=None)
        super().__init__(layers)


@_as("torchvision.models.regnet", "ResBottleneckBlock")
class TvResBottleneckBlock(nn.Module):
    def __init__(self, width_in, width_out, stride, norm_layer=nn.BatchNorm2d,
                 activation_layer=nn.ReLU, group_width: int = 1,
                 bottleneck_multiplier: float = 1.0, se_ratio: Optional[float] = None) -> None:
        super().__init__()
        self.proj = None
        if (width_in != width_out) or (stride != 1):
            self.proj = Conv2dNormActivation(width_in, width_out, kernel_size=1, stride=stride,
                                             norm_layer=norm_layer, activation_layer=None)
        self.f = TvBottleneckTransform(width_in, width_out, stride, norm_layer, activation_layer,
                                       group_width, bottleneck_multiplier, se_ratio)
        self.activation = activation_layer(inplace=True)

    def forward(self, x):
        if self.proj is not None:
            x = self.proj(x) + self.f(x)
        else:
            x = x + self.f(x)
        return self.activation(x)


# ============================================================================ timm beyond ResNet
# timm/layers/{create_conv2d,padding,norm_act,conv_bn_act}.py, timm/models/{regnet,resnetv2,
# _efficientnet_blocks}.py (1.0 era), reduced the same way.

def create_conv2d(in_channels, out_channels, kernel_size, **kwargs):
    """timm's create_conv2d for static ('' / symmetric) padding: an exact nn.Conv2d, bias off."""
    depthwise = kwargs.pop("depthwise", False)
    groups = in_channels if depthwise else kwargs.pop("groups", 1)
    padding = kwargs.pop("padding", "")
    kwargs.setdefault("bias", False)
    stride, dilation = kwargs.get("stride", 1), kwargs.get("dilation", 1)
    if padding != "":
        raise NotImplementedError("mirrors: only timm's default static padding is mirrored")
    return nn.Conv2d(in_channels, out_channels, kernel_size,
                     padding=get_padding(kernel_size, stride, dilation), groups=groups, **kwargs)


def _create_act(act_layer, act_kwargs=None, inplace=False, apply_act=True):
    act_layer = get_act_layer(act_layer)
    act_kwargs = act_kwargs or {}
    if act_layer is not None and apply_act:
        if inplace:
            act_kwargs["inplace"] = inplace
        return act_layer(**act_kwargs)
    return nn.Identity()


@_as("timm.layers.norm_act", "BatchNormAct2d")
class BatchNormAct2d(nn.BatchNorm2d):
    """BatchNorm + drop + act, inheriting BatchNorm2d so weights keep the plain BN's keys."""
    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True,
                 track_running_stats=True, apply_act=True, act_layer=nn.ReLU, act_kwargs=None,
                 inplace=True, drop_layer=None, device=None, dtype=None):
        super().__init__(num_features, eps=eps, momentum=momentum, affine=affine,
                         track_running_stats=track_running_stats, device=device, dtype=dtype)
        self.drop = drop_layer() if drop_layer is not None else nn.Identity()
        self.act = _create_act(act_layer, act_kwargs=act_kwargs, inplace=inplace,
                               apply_act=apply_act)

    def forward(self, x):
        assert x.ndim == 4, f"expected 4D input (got {x.ndim}D input)"
        if self.momentum is None:
            exponential_average_factor = 0.0
        else:
            exponential_average_factor = self.momentum
        if self.training and self.track_running_stats:
            if self.num_batches_tracked is not None:
                self.num_batches_tracked.add_(1)
                if self.momentum is None:
                    exponential_average_factor = 1.0 / float(self.num_batches_tracked)
                else:
                    exponential_average_factor = self.momentum
        if self.training:
            bn_training = True
        else:
            bn_training = (self.running_mean is None) and (self.running_var is None)
        x = F.batch_norm(
            x,
            self.running_mean if not self.training or self.track_running_stats else None,
            self.running_var if not self.training or self.track_running_stats else None,
            self.weight, self.bias, bn_training, exponential_average_factor, self.eps)
        x = self.drop(x)
        x = self.act(x)
        return x


def get_norm_act_layer(norm_layer, act_layer=None):
    """timm.layers.create_norm_act, reduced: BatchNorm2d (or 'batchnorm') -> BatchNormAct2d."""
    if norm_layer in (nn.BatchNorm2d, "batchnorm", "batchnorm2d", BatchNormAct2d):
        return partial(BatchNormAct2d, act_layer=act_layer) if act_layer is not None else BatchNormAct2d
    raise NotImplementedError(f"mirrors: norm-act layer {norm_layer} is not mirrored")


@_as("timm.layers.conv_bn_act", "ConvNormAct")
class ConvNormAct(nn.Module):
    def __init__(self, in_channels, out_channels, kernel_size=1, stride=1, padding="",
                 dilation=1, groups=1, bias=False, apply_act=True, norm_layer=nn.BatchNorm2d,
                 act_layer=nn.ReLU, drop_layer=None):
        super().__init__()
        self.conv = create_conv2d(in_channels, out_channels, kernel_size, stride=stride,
                                  padding=padding, dilation=dilation, groups=groups, bias=bias)
        norm_act_layer = get_norm_act_layer(norm_layer, act_layer)
        norm_kwargs = dict(drop_layer=drop_layer) if drop_layer is not None else {}
        self.bn = norm_act_layer(out_channels, apply_act=apply_act, **norm_kwargs)

    @property
    def in_channels(self):
        return self.conv.in_channels

    @property
    def out_channels(self):
        return self.conv.out_channels

    def forward(self, x):
        x = self.conv(x)
        x = self.bn(x)
        return x


# -- timm/models/regnet.py: Bottleneck whose conv1..3 are ConvNormAct (no bn1: the old crash)
def regnet_create_shortcut(downsample_type, in_chs, out_chs, kernel_size, stride,
                           dilation=(1, 1), norm_layer=None):
    if in_chs != out_chs or stride != 1 or dilation[0] != dilation[1]:
        if not downsample_type:
            return None
        return ConvNormAct(in_chs, out_chs, kernel_size, stride=stride, dilation=dilation[0],
                           norm_layer=norm_layer or nn.BatchNorm2d, apply_act=False)
    return nn.Identity()


@_as("timm.models.regnet", "Bottleneck")
class TimmRegNetBottleneck(nn.Module):
    def __init__(self, in_chs, out_chs, stride=1, dilation=(1, 1), bottle_ratio=1, group_size=1,
                 se_ratio=0.25, downsample="conv1x1", linear_out=False, act_layer=nn.ReLU,
                 norm_layer=nn.BatchNorm2d, drop_block=None, drop_path_rate=0.):
        super().__init__()
        act_layer = get_act_layer(act_layer)
        bottleneck_chs = int(round(out_chs * bottle_ratio))
        groups = bottleneck_chs // group_size
        cargs = dict(act_layer=act_layer, norm_layer=norm_layer)
        self.conv1 = ConvNormAct(in_chs, bottleneck_chs, kernel_size=1, **cargs)
        self.conv2 = ConvNormAct(bottleneck_chs, bottleneck_chs, kernel_size=3, stride=stride,
                                 dilation=dilation[0], groups=groups, drop_layer=drop_block,
                                 **cargs)
        if se_ratio:
            se_channels = int(round(in_chs * se_ratio))
            self.se = SEModule(bottleneck_chs, rd_channels=se_channels, act_layer=act_layer)
        else:
            self.se = nn.Identity()
        self.conv3 = ConvNormAct(bottleneck_chs, out_chs, kernel_size=1, apply_act=False, **cargs)
        self.act3 = nn.Identity() if linear_out else act_layer()
        self.downsample = regnet_create_shortcut(downsample, in_chs, out_chs, 1, stride, dilation,
                                                 norm_layer=norm_layer)
        self.drop_path = DropPath(drop_path_rate) if drop_path_rate > 0 else nn.Identity()

    def forward(self, x):
        shortcut = x
        x = self.conv1(x)
        x = self.conv2(x)
        x = self.se(x)
        x = self.conv3(x)
        if self.downsample is not None:
            x = self.drop_path(x) + self.downsample(shortcut)
        x = self.act3(x)
        return x


# -- timm/models/resnetv2.py: pre-activation bottleneck (resnetv2_50: create_conv2d, BatchNormAct2d)
@_as("timm.models.resnetv2", "DownsampleConv")
class TimmDownsampleConv(nn.Module):
    def __init__(self, in_chs, out_chs, stride=1, dilation=1, first_dilation=None, preact=True,
                 conv_layer=None, norm_layer=None):
        super().__init__()
        self.conv = conv_layer(in_chs, out_chs, 1, stride=stride)
        self.norm = nn.Identity() if preact else norm_layer(out_chs, apply_act=False)

    def forward(self, x):
        return self.norm(self.conv(x))


@_as("timm.models.resnetv2", "PreActBottleneck")
class TimmPreActBottleneck(nn.Module):
    def __init__(self, in_chs, out_chs=None, bottle_ratio=0.25, stride=1, dilation=1,
                 first_dilation=None, groups=1, act_layer=None, conv_layer=create_conv2d,
                 norm_layer=BatchNormAct2d, proj_layer=None, drop_path_rate=0.):
        super().__init__()
        first_dilation = first_dilation or dilation
        out_chs = out_chs or in_chs
        mid_chs = make_divisible(out_chs * bottle_ratio)
        if proj_layer is not None:
            self.downsample = proj_layer(in_chs, out_chs, stride=stride, dilation=dilation,
                                         first_dilation=first_dilation, preact=True,
                                         conv_layer=conv_layer, norm_layer=norm_layer)
        else:
            self.downsample = None
        self.norm1 = norm_layer(in_chs)
        self.conv1 = conv_layer(in_chs, mid_chs, 1)
        self.norm2 = norm_layer(mid_chs)
        self.conv2 = conv_layer(mid_chs, mid_chs, 3, stride=stride, dilation=first_dilation,
                                groups=groups)
        self.norm3 = norm_layer(mid_chs)
        self.conv3 = conv_layer(mid_chs, out_chs, 1)
        self.drop_path = DropPath(drop_path_rate) if drop_path_rate > 0 else nn.Identity()

    def forward(self, x):
        x_preact = self.norm1(x)
        shortcut = x
        if self.downsample is not None:
            shortcut = self.downsample(x_preact)
        x = self.conv1(x_preact)
        x = self.conv2(self.norm2(x))
        x = self.conv3(self.norm3(x))
        x = self.drop_path(x)
        return x + shortcut


# -- timm/models/_efficientnet_blocks.py
@_as("timm.models._efficientnet_blocks", "SqueezeExcite")
class TimmSqueezeExcite(nn.Module):
    def __init__(self, in_chs, rd_ratio=0.25, rd_channels=None, act_layer=nn.ReLU,
                 gate_layer=nn.Sigmoid, force_act_layer=None, rd_round_fn=None):
        super().__init__()
        if rd_channels is None:
            rd_round_fn = rd_round_fn or round
            rd_channels = rd_round_fn(in_chs * rd_ratio)
        act_layer = force_act_layer or act_layer
        self.conv_reduce = nn.Conv2d(in_chs, rd_channels, 1, bias=True)
        self.act1 = create_act_layer(act_layer, inplace=True)
        self.conv_expand = nn.Conv2d(rd_channels, in_chs, 1, bias=True)
        self.gate = create_act_layer(gate_layer)

    def forward(self, x):
        x_se = x.mean((2, 3), keepdim=True)
        x_se = self.conv_reduce(x_se)
        x_se = self.act1(x_se)
        x_se = self.conv_expand(x_se)
        return x * self.gate(x_se)


@_as("timm.models._efficientnet_blocks", "DepthwiseSeparableConv")
class TimmDepthwiseSeparableConv(nn.Module):
    def __init__(self, in_chs, out_chs, dw_kernel_size=3, stride=1, dilation=1, group_size=1,
                 noskip=False, pw_kernel_size=1, pw_act=False, act_layer=nn.ReLU,
                 norm_layer=nn.BatchNorm2d, se_layer=None, drop_path_rate=0.):
        super().__init__()
        norm_act_layer = get_norm_act_layer(norm_layer, act_layer)
        self.has_skip = (stride == 1 and in_chs == out_chs) and not noskip
        self.has_pw_act = pw_act
        groups = in_chs if group_size == 1 else in_chs // group_size
        self.conv_dw = create_conv2d(in_chs, in_chs, dw_kernel_size, stride=stride,
                                     dilation=dilation, groups=groups)
        self.bn1 = norm_act_layer(in_chs, inplace=True)
        self.aa = nn.Identity()
        self.se = se_layer(in_chs, act_layer=act_layer) if se_layer else nn.Identity()
        self.conv_pw = create_conv2d(in_chs, out_chs, pw_kernel_size)
        self.bn2 = norm_act_layer(out_chs, inplace=True, apply_act=self.has_pw_act)
        self.drop_path = DropPath(drop_path_rate) if drop_path_rate else nn.Identity()

    def forward(self, x):
        shortcut = x
        x = self.conv_dw(x)
        x = self.bn1(x)
        x = self.aa(x)
        x = self.se(x)
        x = self.conv_pw(x)
        x = self.bn2(x)
        if self.has_skip:
            x = self.drop_path(x) + shortcut
        return x


@_as("timm.models._efficientnet_blocks", "InvertedResidual")
class TimmInvertedResidual(nn.Module):
    def __init__(self, in_chs, out_chs, dw_kernel_size=3, stride=1, dilation=1, group_size=1,
                 noskip=False, exp_ratio=1.0, exp_kernel_size=1, pw_kernel_size=1,
                 act_layer=nn.ReLU, norm_layer=nn.BatchNorm2d, se_layer=None,
                 drop_path_rate=0.):
        super().__init__()
        norm_act_layer = get_norm_act_layer(norm_layer, act_layer)
        self.has_skip = (in_chs == out_chs and stride == 1) and not noskip
        mid_chs = make_divisible(in_chs * exp_ratio)
        groups = mid_chs if group_size == 1 else mid_chs // group_size
        self.conv_pw = create_conv2d(in_chs, mid_chs, exp_kernel_size)
        self.bn1 = norm_act_layer(mid_chs, inplace=True)
        self.conv_dw = create_conv2d(mid_chs, mid_chs, dw_kernel_size, stride=stride,
                                     dilation=dilation, groups=groups)
        self.bn2 = norm_act_layer(mid_chs, inplace=True)
        self.aa = nn.Identity()
        self.se = se_layer(mid_chs, act_layer=act_layer) if se_layer else nn.Identity()
        self.conv_pwl = create_conv2d(mid_chs, out_chs, pw_kernel_size)
        self.bn3 = norm_act_layer(out_chs, apply_act=False)
        self.drop_path = DropPath(drop_path_rate) if drop_path_rate else nn.Identity()

    def forward(self, x):
        shortcut = x
        x = self.conv_pw(x)
        x = self.bn1(x)
        x = self.conv_dw(x)
        x = self.bn2(x)
        x = self.aa(x)
        x = self.se(x)
        x = self.conv_pwl(x)
        x = self.bn3(x)
        if self.has_skip:
            x = self.drop_path(x) + shortcut
        return x


# -- torchvision/models/mobilenetv3.py: InvertedResidual. Hardswish or ReLU, a squeeze-excitation
# gated by Hardsigmoid, and the residual added IN PLACE to the projection's output
# (`result += input`): a fused chain must leave its output free to be written.
@_as("torchvision.models.mobilenetv3", "InvertedResidual")
class TvInvertedResidualV3(nn.Module):
    def __init__(self, input_channels: int, kernel: int, expanded_channels: int,
                 out_channels: int, use_se: bool, use_hs: bool, stride: int, dilation: int = 1,
                 norm_layer=partial(nn.BatchNorm2d, eps=0.001, momentum=0.01)):
        super().__init__()
        self.use_res_connect = stride == 1 and input_channels == out_channels
        layers: List[nn.Module] = []
        activation_layer = nn.Hardswish if use_hs else nn.ReLU
        if expanded_channels != input_channels:
            layers.append(Conv2dNormActivation(input_channels, expanded_channels, kernel_size=1,
                                               norm_layer=norm_layer,
                                               activation_layer=activation_layer))
        stride = 1 if dilation > 1 else stride
        layers.append(Conv2dNormActivation(expanded_channels, expanded_channels,
                                           kernel_size=kernel, stride=stride, dilation=dilation,
                                           groups=expanded_channels, norm_layer=norm_layer,
                                           activation_layer=activation_layer))
        if use_se:
            squeeze_channels = _make_divisible(expanded_channels // 4, 8)
            layers.append(SqueezeExcitation(expanded_channels, squeeze_channels,
                                            scale_activation=nn.Hardsigmoid))
        layers.append(Conv2dNormActivation(expanded_channels, out_channels, kernel_size=1,
                                           norm_layer=norm_layer, activation_layer=None))
        self.block = nn.Sequential(*layers)
        self.out_channels = out_channels
        self._is_cn = stride > 1

    def forward(self, input):
        result = self.block(input)
        if self.use_res_connect:
            result += input
        return result


# -- timm/models/cspnet.py: BottleneckBlock and CrossStage (CSPResNet's stages). ConvNormAct
# layers; conv_exp's output is split along channels, so its halves reach the next chains as
# channel-sliced views; cross_linear leaves conv_exp without its activation.
@_as("timm.models.cspnet", "BottleneckBlock")
class TimmCspBottleneckBlock(nn.Module):
    def __init__(self, in_chs, out_chs, dilation=1, bottle_ratio=0.25, groups=1,
                 act_layer=nn.ReLU, norm_layer=nn.BatchNorm2d, drop_path=0.0):
        super().__init__()
        mid_chs = int(round(out_chs * bottle_ratio))
        ckwargs = dict(act_layer=act_layer, norm_layer=norm_layer)
        self.conv1 = ConvNormAct(in_chs, mid_chs, kernel_size=1, **ckwargs)
        self.conv2 = ConvNormAct(mid_chs, mid_chs, kernel_size=3, dilation=dilation,
                                 groups=groups, **ckwargs)
        self.attn2 = nn.Identity()
        self.conv3 = ConvNormAct(mid_chs, out_chs, kernel_size=1, apply_act=False, **ckwargs)
        self.attn3 = nn.Identity()
        self.drop_path = DropPath(drop_path) if drop_path else nn.Identity()
        self.act3 = create_act_layer(act_layer)

    def forward(self, x):
        shortcut = x
        x = self.conv1(x)
        x = self.conv2(x)
        x = self.attn2(x)
        x = self.conv3(x)
        x = self.attn3(x)
        x = self.drop_path(x) + shortcut
        x = self.act3(x)
        return x


@_as("timm.models.cspnet", "CrossStage")
class TimmCrossStage(nn.Module):
    def __init__(self, in_chs, out_chs, stride, dilation, depth, block_ratio=1.0,
                 bottle_ratio=1.0, expand_ratio=1.0, groups=1, cross_linear=False,
                 act_layer=nn.ReLU, norm_layer=nn.BatchNorm2d):
        super().__init__()
        self.expand_chs = exp_chs = int(round(out_chs * expand_ratio))
        block_out_chs = int(round(out_chs * block_ratio))
        conv_kwargs = dict(act_layer=act_layer, norm_layer=norm_layer)
        if stride != 1:
            self.conv_down = ConvNormAct(in_chs, in_chs, kernel_size=3, stride=stride,
                                         dilation=dilation, groups=groups, **conv_kwargs)
        else:
            self.conv_down = nn.Identity()
        prev_chs = in_chs
        self.conv_exp = ConvNormAct(prev_chs, exp_chs, kernel_size=1, apply_act=not cross_linear,
                                    **conv_kwargs)
        prev_chs = exp_chs // 2
        self.blocks = nn.Sequential()
        for i in range(depth):
            self.blocks.add_module(str(i), TimmCspBottleneckBlock(
                prev_chs, block_out_chs, dilation=dilation, bottle_ratio=bottle_ratio,
                groups=groups, **conv_kwargs))
            prev_chs = block_out_chs
        self.conv_transition_b = ConvNormAct(prev_chs, exp_chs // 2, kernel_size=1, **conv_kwargs)
        self.conv_transition = ConvNormAct(exp_chs, out_chs, kernel_size=1, **conv_kwargs)

    def forward(self, x):
        x = self.conv_down(x)
        x = self.conv_exp(x)
        xs, xb = x.split(self.expand_chs // 2, dim=1)
        xb = self.blocks(xb)
        xb = self.conv_transition_b(xb).contiguous()
        out = self.conv_transition(torch.cat([xs, xb], dim=1))
        return out
