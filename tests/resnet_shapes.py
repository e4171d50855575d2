"""Every distinct convolution of ResNet-18/50/101 and ResNeXt-50 (32x4d) at 224x224, read off
the models themselves (resfuse.models, torchvision's structure) by a forward pass on the meta
device: no weights, no compute."""
from __future__ import annotations

import functools
from typing import Dict, NamedTuple, Tuple

import torch
import torch.nn as nn

from resfuse import models

ARCHS = {"resnet18": models.resnet18, "resnet50": models.resnet50,
         "resnet101": models.resnet101, "resnext50": models.resnext50_32x4d}


class ConvShape(NamedTuple):
    c_in: int
    c_out: int
    hw: Tuple[int, int]       # input height, width at 224x224
    kernel: int
    stride: int
    padding: int
    groups: int

    @property
    def name(self) -> str:
        g = f"-g{self.groups}" if self.groups > 1 else ""
        return (f"{self.c_in}to{self.c_out}-{self.kernel}x{self.kernel}-s{self.stride}{g}"
                f"-{self.hw[0]}px")


@functools.lru_cache(maxsize=None)
def layer_shapes() -> Dict[str, ConvShape]:
    """{name: shape} of the distinct convolutions of the four models (name order)."""
    found = {}
    for build in ARCHS.values():
        model = build().to("meta")
        hooks = []
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                def hook(mod, args, out):
                    s = ConvShape(mod.in_channels, mod.out_channels, tuple(args[0].shape[2:]),
                                  mod.kernel_size[0], mod.stride[0], mod.padding[0], mod.groups)
                    found[s.name] = s
                hooks.append(m.register_forward_hook(hook))
        with torch.no_grad():
            model(torch.empty(1, 3, 224, 224, device="meta"))
        for h in hooks:
            h.remove()
    return dict(sorted(found.items()))
