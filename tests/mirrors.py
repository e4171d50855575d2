"""Plain-PyTorch mirrors of torchvision's and timm's ResNet blocks, for testing the converter on
machines where neither library imports.

They reproduce what `resfuse.convert` looks at: class names (`BasicBlock`, `Bottleneck`),
defining module (`__module__` set to the library's), constructor signatures, attribute names
and types, what is `nn.Identity()` and what is `None` when a feature is off, and the forward
computation op for op. Mirrored from torchvision 0.2x `torchvision/models/resnet.py` and
timm 1.0 `timm/models/resnet.py` (helpers reduced to what the blocks use).
"""
from __future__ import annotations

import math
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F


def _as(module_name: str, name: str):
    """Give a class the name and module of the library class it mirrors."""
    def deco(cls):
        cls.__name__ = cls.__qualname__ = name
        cls.__module__ = module_name
        return cls
    return deco


# ============================================================== torchvision

def tv_conv3x3(in_planes, out_planes, stride=1, groups=1, dilation=1):
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=dilation,
                     groups=groups, bias=False, dilation=dilation)


def tv_conv1x1(in_planes, out_planes, stride=1):
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


@_as("torchvision.models.resnet", "BasicBlock")
class TvBasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes, planes, stride=1, downsample=None, groups=1, base_width=64,
                 dilation=1, norm_layer=None):
        super().__init__()
        norm_layer = norm_layer or nn.BatchNorm2d
        if groups != 1 or base_width != 64:
            raise ValueError("BasicBlock only supports groups=1 and base_width=64")
        if dilation > 1:
            raise NotImplementedError("Dilation > 1 not supported in BasicBlock")
        self.conv1 = tv_conv3x3(inplanes, planes, stride)
        self.bn1 = norm_layer(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = tv_conv3x3(planes, planes)
        self.bn2 = norm_layer(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


@_as("torchvision.models.resnet", "Bottleneck")
class TvBottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes, planes, stride=1, downsample=None, groups=1, base_width=64,
                 dilation=1, norm_layer=None):
        super().__init__()
        norm_layer = norm_layer or nn.BatchNorm2d
        width = int(planes * (base_width / 64.0)) * groups
        self.conv1 = tv_conv1x1(inplanes, width)
        self.bn1 = norm_layer(width)
        self.conv2 = tv_conv3x3(width, width, stride, groups, dilation)
        self.bn2 = norm_layer(width)
        self.conv3 = tv_conv1x1(width, planes * self.expansion)
        self.bn3 = norm_layer(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


@_as("torchvision.models.resnet", "ResNet")
class TvResNet(nn.Module):
    def __init__(self, block, layers, num_classes=1000, zero_init_residual=False, groups=1,
                 width_per_group=64, replace_stride_with_dilation=None, norm_layer=None):
        super().__init__()
        self._norm_layer = norm_layer or nn.BatchNorm2d
        self.inplanes, self.dilation = 64, 1
        replace_stride_with_dilation = replace_stride_with_dilation or [False, False, False]
        self.groups, self.base_width = groups, width_per_group
        self.conv1 = nn.Conv2d(3, self.inplanes, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = self._norm_layer(self.inplanes)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, 64, layers[0])
        self.layer2 = self._make_layer(block, 128, layers[1], 2, replace_stride_with_dilation[0])
        self.layer3 = self._make_layer(block, 256, layers[2], 2, replace_stride_with_dilation[1])
        self.layer4 = self._make_layer(block, 512, layers[3], 2, replace_stride_with_dilation[2])
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512 * block.expansion, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, TvBottleneck) and m.bn3.weight is not None:
                    nn.init.constant_(m.bn3.weight, 0)
                elif isinstance(m, TvBasicBlock) and m.bn2.weight is not None:
                    nn.init.constant_(m.bn2.weight, 0)

    def _make_layer(self, block, planes, blocks, stride=1, dilate=False):
        norm_layer, downsample, previous_dilation = self._norm_layer, None, self.dilation
        if dilate:
            self.dilation *= stride
            stride = 1
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(tv_conv1x1(self.inplanes, planes * block.expansion, stride),
                                       norm_layer(planes * block.expansion))
        layers = [block(self.inplanes, planes, stride, downsample, self.groups, self.base_width,
                        previous_dilation, norm_layer)]
        self.inplanes = planes * block.expansion
        for _ in range(1, blocks):
            layers.append(block(self.inplanes, planes, groups=self.groups,
                                base_width=self.base_width, dilation=self.dilation,
                                norm_layer=norm_layer))
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def tv_resnet18(**kw):
    return TvResNet(TvBasicBlock, [2, 2, 2, 2], **kw)


def tv_resnet50(**kw):
    return TvResNet(TvBottleneck, [3, 4, 6, 3], **kw)


def tv_resnext50_32x4d(**kw):
    return TvResNet(TvBottleneck, [3, 4, 6, 3], groups=32, width_per_group=4, **kw)


def tv_wide_resnet50_2(**kw):
    return TvResNet(TvBottleneck, [3, 4, 6, 3], width_per_group=128, **kw)


# ============================================================== timm

def get_padding(kernel_size, stride=1, dilation=1):
    return ((stride - 1) + dilation * (kernel_size - 1)) // 2


@_as("timm.layers.drop", "DropPath")
class DropPath(nn.Module):
    def __init__(self, drop_prob=0.0, scale_by_keep=True):
        super().__init__()
        self.drop_prob, self.scale_by_keep = drop_prob, scale_by_keep

    def forward(self, x):
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep if self.scale_by_keep else x * mask


@_as("timm.layers.drop", "DropBlock2d")
class DropBlock2d(nn.Module):
    def __init__(self, drop_prob=0.1, block_size=7):
        super().__init__()
        self.drop_prob, self.block_size = drop_prob, block_size

    def forward(self, x):
        if not self.training or not self.drop_prob:
            return x
        gamma = self.drop_prob / self.block_size ** 2
        mask = (torch.rand_like(x[:, :1]) < gamma).float()
        mask = 1 - F.max_pool2d(mask, self.block_size, 1, self.block_size // 2)
        return x * mask * mask.numel() / mask.sum().clamp_min(1)


@_as("timm.layers.squeeze_excite", "SEModule")
class SEModule(nn.Module):
    def __init__(self, channels, rd_ratio=1 / 16):
        super().__init__()
        rd = max(8, int(channels * rd_ratio))
        self.fc1 = nn.Conv2d(channels, rd, 1, bias=True)
        self.bn = nn.Identity()
        self.act = nn.ReLU(inplace=True)
        self.fc2 = nn.Conv2d(rd, channels, 1, bias=True)
        self.gate = nn.Sigmoid()

    def forward(self, x):
        s = self.fc2(self.act(self.bn(self.fc1(x.mean((2, 3), keepdim=True)))))
        return x * self.gate(s)


@_as("timm.layers.blur_pool", "BlurPool2d")
class BlurPool2d(nn.Module):
    def __init__(self, channels, filt_size=3, stride=2):
        super().__init__()
        self.channels, self.stride = channels, stride
        k = torch.tensor([1.0, 2.0, 1.0])
        k = (k[:, None] * k[None, :]) / 16
        self.register_buffer("filt", k[None, None].repeat(channels, 1, 1, 1), persistent=False)

    def forward(self, x):
        return F.conv2d(F.pad(x, (1, 1, 1, 1), mode="reflect"), self.filt, stride=self.stride,
                        groups=self.channels)


def create_aa(aa_layer, channels, stride=2, enable=True):
    if not aa_layer or not enable:
        return nn.Identity()
    if issubclass(aa_layer, nn.AvgPool2d):
        return aa_layer(stride)
    return aa_layer(channels=channels, stride=stride)


def create_attn(attn_layer, channels):
    return None if attn_layer is None else attn_layer(channels)


@_as("timm.models.resnet", "BasicBlock")
class TimmBasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes, planes, stride=1, downsample=None, cardinality=1, base_width=64,
                 reduce_first=1, dilation=1, first_dilation=None, act_layer=nn.ReLU,
                 norm_layer=nn.BatchNorm2d, attn_layer=None, aa_layer=None, drop_block=None,
                 drop_path=None):
        super().__init__()
        assert cardinality == 1 and base_width == 64
        first_planes = planes // reduce_first
        outplanes = planes * self.expansion
        first_dilation = first_dilation or dilation
        use_aa = aa_layer is not None and (stride == 2 or first_dilation != dilation)
        self.conv1 = nn.Conv2d(inplanes, first_planes, 3, stride=1 if use_aa else stride,
                               padding=first_dilation, dilation=first_dilation, bias=False)
        self.bn1 = norm_layer(first_planes)
        self.drop_block = drop_block() if drop_block is not None else nn.Identity()
        self.act1 = act_layer(inplace=True)
        self.aa = create_aa(aa_layer, channels=first_planes, stride=stride, enable=use_aa)
        self.conv2 = nn.Conv2d(first_planes, outplanes, 3, padding=dilation, dilation=dilation,
                               bias=False)
        self.bn2 = norm_layer(outplanes)
        self.se = create_attn(attn_layer, outplanes)
        self.act2 = act_layer(inplace=True)
        self.downsample = downsample
        self.stride, self.dilation = stride, dilation
        self.drop_path = drop_path

    def zero_init_last(self):
        if getattr(self.bn2, "weight", None) is not None:
            nn.init.zeros_(self.bn2.weight)

    def forward(self, x):
        shortcut = x
        x = self.aa(self.act1(self.drop_block(self.bn1(self.conv1(x)))))
        x = self.bn2(self.conv2(x))
        if self.se is not None:
            x = self.se(x)
        if self.drop_path is not None:
            x = self.drop_path(x)
        if self.downsample is not None:
            shortcut = self.downsample(shortcut)
        x += shortcut
        return self.act2(x)


@_as("timm.models.resnet", "Bottleneck")
class TimmBottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes, planes, stride=1, downsample=None, cardinality=1, base_width=64,
                 reduce_first=1, dilation=1, first_dilation=None, act_layer=nn.ReLU,
                 norm_layer=nn.BatchNorm2d, attn_layer=None, aa_layer=None, drop_block=None,
                 drop_path=None):
        super().__init__()
        width = int(math.floor(planes * (base_width / 64)) * cardinality)
        first_planes = width // reduce_first
        outplanes = planes * self.expansion
        first_dilation = first_dilation or dilation
        use_aa = aa_layer is not None and (stride == 2 or first_dilation != dilation)
        self.conv1 = nn.Conv2d(inplanes, first_planes, 1, bias=False)
        self.bn1 = norm_layer(first_planes)
        self.act1 = act_layer(inplace=True)
        self.conv2 = nn.Conv2d(first_planes, width, 3, stride=1 if use_aa else stride,
                               padding=first_dilation, dilation=first_dilation,
                               groups=cardinality, bias=False)
        self.bn2 = norm_layer(width)
        self.drop_block = drop_block() if drop_block is not None else nn.Identity()
        self.act2 = act_layer(inplace=True)
        self.aa = create_aa(aa_layer, channels=width, stride=stride, enable=use_aa)
        self.conv3 = nn.Conv2d(width, outplanes, 1, bias=False)
        self.bn3 = norm_layer(outplanes)
        self.se = create_attn(attn_layer, outplanes)
        self.act3 = act_layer(inplace=True)
        self.downsample = downsample
        self.stride, self.dilation = stride, dilation
        self.drop_path = drop_path

    def zero_init_last(self):
        if getattr(self.bn3, "weight", None) is not None:
            nn.init.zeros_(self.bn3.weight)

    def forward(self, x):
        shortcut = x
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.aa(self.act2(self.drop_block(self.bn2(self.conv2(x)))))
        x = self.bn3(self.conv3(x))
        if self.se is not None:
            x = self.se(x)
        if self.drop_path is not None:
            x = self.drop_path(x)
        if self.downsample is not None:
            shortcut = self.downsample(shortcut)
        x += shortcut
        return self.act3(x)


def downsample_conv(in_channels, out_channels, kernel_size, stride=1, dilation=1,
                    first_dilation=None, norm_layer=None):
    norm_layer = norm_layer or nn.BatchNorm2d
    kernel_size = 1 if stride == 1 and dilation == 1 else kernel_size
    first_dilation = (first_dilation or dilation) if kernel_size > 1 else 1
    p = get_padding(kernel_size, stride, first_dilation)
    return nn.Sequential(*[nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride,
                                     padding=p, dilation=first_dilation, bias=False),
                           norm_layer(out_channels)])


def downsample_avg(in_channels, out_channels, kernel_size, stride=1, dilation=1,
                   first_dilation=None, norm_layer=None):
    norm_layer = norm_layer or nn.BatchNorm2d
    avg_stride = stride if dilation == 1 else 1
    if stride == 1 and dilation == 1:
        pool = nn.Identity()
    else:
        pool = nn.AvgPool2d(2, avg_stride, ceil_mode=True, count_include_pad=False)
    return nn.Sequential(*[pool, nn.Conv2d(in_channels, out_channels, 1, stride=1, padding=0,
                                           bias=False), norm_layer(out_channels)])


@_as("timm.models.resnet", "ResNet")
class TimmResNet(nn.Module):
    def __init__(self, block, layers, num_classes=1000, in_chans=3, cardinality=1, base_width=64,
                 stem_width=64, stem_type="", avg_down=False, down_kernel_size=1,
                 act_layer=nn.ReLU, norm_layer=nn.BatchNorm2d, aa_layer=None, drop_path_rate=0.0,
                 drop_block_rate=0.0, zero_init_last=True, block_args=None):
        super().__init__()
        block_args = block_args or {}
        deep_stem = "deep" in stem_type
        inplanes = stem_width * 2 if deep_stem else 64
        if deep_stem:
            stem_chs = (stem_width, stem_width)
            self.conv1 = nn.Sequential(*[
                nn.Conv2d(in_chans, stem_chs[0], 3, stride=2, padding=1, bias=False),
                norm_layer(stem_chs[0]), act_layer(inplace=True),
                nn.Conv2d(stem_chs[0], stem_chs[1], 3, stride=1, padding=1, bias=False),
                norm_layer(stem_chs[1]), act_layer(inplace=True),
                nn.Conv2d(stem_chs[1], inplanes, 3, stride=1, padding=1, bias=False)])
        else:
            self.conv1 = nn.Conv2d(in_chans, inplanes, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = norm_layer(inplanes)
        self.act1 = act_layer(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        net_num_blocks, net_block_idx = sum(layers), 0
        channels = [64, 128, 256, 512]
        prev_dilation = 1
        for stage_idx, (planes, num_blocks) in enumerate(zip(channels, layers)):
            stride = 1 if stage_idx == 0 else 2
            downsample = None
            if stride != 1 or inplanes != planes * block.expansion:
                kw = dict(in_channels=inplanes, out_channels=planes * block.expansion,
                          kernel_size=down_kernel_size, stride=stride, dilation=1,
                          first_dilation=prev_dilation, norm_layer=norm_layer)
                downsample = downsample_avg(**kw) if avg_down else downsample_conv(**kw)
            blocks = []
            for block_idx in range(num_blocks):
                dpr = drop_path_rate * net_block_idx / (net_num_blocks - 1)
                db = partial(DropBlock2d, drop_prob=drop_block_rate) if (drop_block_rate and stage_idx >= 2) else None
                blocks.append(block(inplanes, planes, stride if block_idx == 0 else 1,
                                    downsample if block_idx == 0 else None,
                                    cardinality=cardinality, base_width=base_width,
                                    act_layer=act_layer, norm_layer=norm_layer, aa_layer=aa_layer,
                                    drop_block=db, drop_path=DropPath(dpr) if dpr > 0.0 else None,
                                    **block_args))
                inplanes = planes * block.expansion
                net_block_idx += 1
            self.add_module(f"layer{stage_idx + 1}", nn.Sequential(*blocks))
        self.num_features = 512 * block.expansion
        self.global_pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(self.num_features, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        if zero_init_last:
            for m in self.modules():
                if hasattr(m, "zero_init_last"):
                    m.zero_init_last()

    def forward(self, x):
        x = self.maxpool(self.act1(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.global_pool(x), 1))


def timm_resnet18(**kw):
    return TimmResNet(TimmBasicBlock, [2, 2, 2, 2], **kw)


def timm_resnet50(**kw):
    return TimmResNet(TimmBottleneck, [3, 4, 6, 3], **kw)


def timm_resnet50d(**kw):
    return TimmResNet(TimmBottleneck, [3, 4, 6, 3], stem_width=32, stem_type="deep",
                      avg_down=True, **kw)


def timm_seresnet50(**kw):
    return TimmResNet(TimmBottleneck, [3, 4, 6, 3], block_args=dict(attn_layer=SEModule), **kw)


def timm_resnext50_32x4d(**kw):
    return TimmResNet(TimmBottleneck, [3, 4, 6, 3], cardinality=32, base_width=4, **kw)
