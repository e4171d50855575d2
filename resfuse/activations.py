"""The activations a fused op can end with, and what each needs for its backward.

One small immutable `Activation` describes the activation of every op (kind + leaky slope +
gelu approximation). It knows three things the backends need:

* `forward(u)`: the eager function, exactly as `torch.nn.functional` computes it;
* `saves`: what backward needs from forward — nothing (identity), the *output* (relu and
  relu6: the gradient is a mask that the output gives exactly — relu6's y = clamp(u, 0, 6)
  is 0 or 6 exactly where u <= 0 or u >= 6, NaN where u is NaN — and the output is alive
  anyway as the next layer's input), or the *pre-activation* (leaky_relu, silu, gelu,
  hardswish, hardsigmoid, mish);
* `backward(grad, saved)`: the gradient, by the same aten backward kernels autograd uses for
  the eager chain, so NaN/Inf and ties at 0 behave exactly as in eager.
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

# The order is the kernels' activation numbering (triton_kernels/conv.py ACT_*, csrc's Act):
# new kinds are appended, never inserted.
KINDS = ("identity", "relu", "leaky_relu", "silu", "gelu", "gelu_tanh",
         "relu6", "hardswish", "hardsigmoid", "mish")

# Other spellings accepted by `as_activation` (timm's names among them).
_ALIASES = {"none": "identity", "swish": "silu", "gelu_erf": "gelu", "leakyrelu": "leaky_relu",
            "hard_swish": "hardswish", "hswish": "hardswish", "hard_sigmoid": "hardsigmoid",
            "hsigmoid": "hardsigmoid"}

# What backward reads, per kind.
SAVES_NOTHING, SAVES_OUTPUT, SAVES_INPUT = "nothing", "output", "input"


@dataclasses.dataclass(frozen=True)
class Activation:
    kind: str = "identity"
    negative_slope: float = 0.01  # leaky_relu only

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"activation: expected one of {KINDS}, got {self.kind!r}")

    @property
    def saves(self) -> str:
        if self.kind == "identity":
            return SAVES_NOTHING
        if self.kind in ("relu", "relu6"):
            return SAVES_OUTPUT
        return SAVES_INPUT

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        k = self.kind
        if k == "identity":
            return u
        if k == "relu":
            return torch.relu(u)
        if k == "leaky_relu":
            return F.leaky_relu(u, self.negative_slope)
        if k == "silu":
            return F.silu(u)
        if k == "gelu":
            return F.gelu(u)
        if k == "gelu_tanh":
            return F.gelu(u, approximate="tanh")
        if k == "relu6":
            return F.relu6(u)
        if k == "hardswish":
            return F.hardswish(u)
        if k == "hardsigmoid":
            return F.hardsigmoid(u)
        return F.mish(u)

    def forward_(self, u: torch.Tensor) -> torch.Tensor:
        """In place where the activation allows it (u is a temporary nobody else holds)."""
        k = self.kind
        if k == "identity":
            return u
        if k == "relu":
            return u.relu_()
        if k == "leaky_relu":
            return F.leaky_relu_(u, self.negative_slope)
        if k == "relu6":
            return F.relu6(u, inplace=True)
        if k == "hardswish":
            return F.hardswish(u, inplace=True)
        if k == "hardsigmoid":
            return F.hardsigmoid(u, inplace=True)
        if k == "mish":
            return F.mish(u, inplace=True)
        return self.forward(u)

    def backward(self, grad: torch.Tensor, saved: Optional[torch.Tensor]) -> torch.Tensor:
        """d act / d u applied to `grad`; `saved` is what `saves` says forward kept."""
        k = self.kind
        aten = torch.ops.aten
        if k == "identity":
            return grad
        if k == "relu":  # mask from the output, as autograd's relu backward does
            return aten.threshold_backward(grad, saved, 0)
        if k == "leaky_relu":
            return aten.leaky_relu_backward(grad, saved, self.negative_slope, False)
        if k == "silu":
            return aten.silu_backward(grad, saved)
        if k == "gelu":
            return aten.gelu_backward(grad, saved, approximate="none")
        if k == "gelu_tanh":
            return aten.gelu_backward(grad, saved, approximate="tanh")
        if k == "relu6":  # from the output: 0 where y <= 0 or y >= 6, as from u (see `saves`)
            return aten.hardtanh_backward(grad, saved, 0.0, 6.0)
        if k == "hardswish":
            return aten.hardswish_backward(grad, saved)
        if k == "hardsigmoid":
            return aten.hardsigmoid_backward(grad, saved)
        return aten.mish_backward(grad, saved)

    def module(self) -> nn.Module:
        """The nn.Module with the same function (what `revert` puts back)."""
        k = self.kind
        if k == "identity":
            return nn.Identity()
        if k == "relu":
            return nn.ReLU(inplace=True)
        if k == "leaky_relu":
            return nn.LeakyReLU(self.negative_slope, inplace=True)
        if k == "silu":
            return nn.SiLU(inplace=True)
        if k == "gelu":
            return nn.GELU()
        if k == "gelu_tanh":
            return nn.GELU(approximate="tanh")
        if k == "relu6":
            return nn.ReLU6(inplace=True)
        if k == "hardswish":
            return nn.Hardswish(inplace=True)
        if k == "hardsigmoid":
            return nn.Hardsigmoid(inplace=True)
        return nn.Mish(inplace=True)

    def __str__(self) -> str:
        if self.kind == "leaky_relu":
            return f"leaky_relu({self.negative_slope:g})"
        return self.kind


_MODULE_KINDS = {nn.Hardswish: "hardswish", nn.Hardsigmoid: "hardsigmoid", nn.Mish: "mish"}

ActivationLike = Union[None, str, Activation, nn.Module]


def as_activation(act: ActivationLike, negative_slope: Optional[float] = None) -> Activation:
    """Normalise `None`, a name, an `Activation` or an nn.Module instance to an `Activation`.

    Names: "identity"/"none", "relu", "leaky_relu", "silu"/"swish", "gelu" (erf),
    "gelu_tanh", "relu6", "hardswish"/"hard_swish", "hardsigmoid"/"hard_sigmoid", "mish".
    A module's type must be exactly one of nn.Identity, nn.ReLU, nn.LeakyReLU, nn.SiLU,
    nn.GELU, nn.ReLU6, nn.Hardtanh(0, 6) (relu6), nn.Hardswish, nn.Hardsigmoid, nn.Mish
    (a subclass is not accepted: it may override forward); anything else is refused with
    `TypeError`, because fusing an activation we do not know would change the function.
    """
    if isinstance(act, Activation):
        return act
    if act is None:
        return Activation("identity")
    if isinstance(act, str):
        name = act.lower().replace("-", "_")
        name = _ALIASES.get(name, name)
        if name not in KINDS:
            raise ValueError(f"activation: expected one of {KINDS} (or None), got {act!r}")
        if name == "leaky_relu":
            return Activation(name, 0.01 if negative_slope is None else float(negative_slope))
        return Activation(name)
    if isinstance(act, nn.Module):
        t = type(act)
        if t is nn.Identity:
            return Activation("identity")
        if t is nn.ReLU:
            return Activation("relu")
        if t is nn.LeakyReLU:
            return Activation("leaky_relu", float(act.negative_slope))
        if t is nn.SiLU:
            return Activation("silu")
        if t is nn.GELU:
            return Activation("gelu_tanh" if act.approximate == "tanh" else "gelu")
        if t is nn.ReLU6:
            return Activation("relu6")
        if t is nn.Hardtanh:
            if float(act.min_val) == 0.0 and float(act.max_val) == 6.0:
                return Activation("relu6")
            raise TypeError(f"activation: cannot fuse nn.Hardtanh({act.min_val}, {act.max_val}); "
                            "only nn.Hardtanh(0, 6) (relu6) is supported")
        if t in _MODULE_KINDS:
            return Activation(_MODULE_KINDS[t])
        raise TypeError(f"activation: cannot fuse a {t.__name__}; supported modules are "
                        "nn.Identity, nn.ReLU, nn.LeakyReLU, nn.SiLU, nn.GELU, nn.ReLU6, "
                        "nn.Hardtanh(0, 6), nn.Hardswish, nn.Hardsigmoid and nn.Mish")
    raise TypeError(f"activation: expected None, a name, an Activation or an nn.Module, got {type(act).__name__}")
