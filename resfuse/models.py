"""torchvision-compatible ResNets in plain PyTorch, for machines where torchvision does not
import (its binaries must match the installed torch). Same structure, attribute names,
state-dict keys and initialisation as `torchvision.models.resnet`, so torchvision checkpoints
load unchanged; `block=` takes any block class with torchvision's signature, e.g.
`resnet50(block=resfuse.FusedBottleneck)`.
"""
from __future__ import annotations

from typing import List, Optional, Type

import torch
import torch.nn as nn

from .reference import BasicBlock, Bottleneck, ResidualBlock, conv1x1


class ResNet(nn.Module):
    def __init__(self, block: Type[nn.Module], layers: List[int], num_classes: int = 1000,
                 zero_init_residual: bool = False, groups: int = 1, width_per_group: int = 64,
                 replace_stride_with_dilation: Optional[List[bool]] = None, norm_layer=None):
        super().__init__()
        self._norm_layer = nn.BatchNorm2d if norm_layer is None else norm_layer
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
        if zero_init_residual:  # each residual branch starts as zero, as torchvision does
            for m in self.modules():
                if isinstance(m, ResidualBlock):
                    last_bn = m.bn3 if m.bottleneck else m.bn2
                    if last_bn.weight is not None:
                        nn.init.constant_(last_bn.weight, 0)

    def _make_layer(self, block, planes: int, blocks: int, stride: int = 1,
                    dilate: bool = False) -> nn.Sequential:
        norm_layer, downsample, previous_dilation = self._norm_layer, None, self.dilation
        if dilate:
            self.dilation *= stride
            stride = 1
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(conv1x1(self.inplanes, planes * block.expansion, stride),
                                       norm_layer(planes * block.expansion))
        layers = [block(self.inplanes, planes, stride, downsample, self.groups, self.base_width,
                        previous_dilation, norm_layer)]
        self.inplanes = planes * block.expansion
        for _ in range(1, blocks):
            layers.append(block(self.inplanes, planes, groups=self.groups,
                                base_width=self.base_width, dilation=self.dilation,
                                norm_layer=norm_layer))
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet18(block=BasicBlock, **kw) -> ResNet:
    return ResNet(block, [2, 2, 2, 2], **kw)


def resnet34(block=BasicBlock, **kw) -> ResNet:
    return ResNet(block, [3, 4, 6, 3], **kw)


def resnet50(block=Bottleneck, **kw) -> ResNet:
    return ResNet(block, [3, 4, 6, 3], **kw)


def resnet101(block=Bottleneck, **kw) -> ResNet:
    return ResNet(block, [3, 4, 23, 3], **kw)


def resnext50_32x4d(block=Bottleneck, **kw) -> ResNet:
    return ResNet(block, [3, 4, 6, 3], groups=32, width_per_group=4, **kw)


def wide_resnet50_2(block=Bottleneck, **kw) -> ResNet:
    return ResNet(block, [3, 4, 6, 3], width_per_group=128, **kw)
