"""`resfuse.activations`: names and modules accepted, and each kind's forward / backward
against torch.nn.functional and autograd (the oracle of every backend's kernels)."""
import pytest
import torch
import torch.nn as nn

from resfuse.activations import KINDS, Activation, as_activation

NEW_KINDS = ("relu6", "hardswish", "hardsigmoid", "mish")


def test_kernel_numbering_is_append_only():
    # The kernels number the kinds in this order (triton_kernels/conv.py, csrc/resfuse_kernels.h).
    assert KINDS == ("identity", "relu", "leaky_relu", "silu", "gelu", "gelu_tanh",
                     "relu6", "hardswish", "hardsigmoid", "mish")


@pytest.mark.parametrize("module, kind", [
    (nn.ReLU6(), "relu6"), (nn.ReLU6(inplace=True), "relu6"), (nn.Hardtanh(0.0, 6.0), "relu6"),
    (nn.Hardswish(), "hardswish"), (nn.Hardsigmoid(), "hardsigmoid"), (nn.Mish(), "mish"),
    (nn.ReLU(), "relu"), (nn.GELU(approximate="tanh"), "gelu_tanh"),
], ids=lambda v: v if isinstance(v, str) else type(v).__name__)
def test_modules_map_to_their_kind(module, kind):
    act = as_activation(module)
    assert act.kind == kind
    back = act.module()  # what `revert` puts back computes the same function
    u = torch.randn(50, dtype=torch.float64) * 5
    assert torch.equal(back(u.clone()), module(u.clone()))


@pytest.mark.parametrize("name, kind", [("relu6", "relu6"), ("hardswish", "hardswish"),
                                        ("hard_swish", "hardswish"), ("Hard-Sigmoid", "hardsigmoid"),
                                        ("hardsigmoid", "hardsigmoid"), ("mish", "mish")])
def test_names(name, kind):
    assert as_activation(name).kind == kind


def test_unknown_modules_are_refused():
    with pytest.raises(TypeError, match=r"Hardtanh\(-1.0, 1.0\)"):
        as_activation(nn.Hardtanh())

    class MyReLU6(nn.ReLU6):  # a subclass may override forward: not fused
        pass
    with pytest.raises(TypeError, match="MyReLU6"):
        as_activation(MyReLU6())
    with pytest.raises(ValueError, match="activation"):
        as_activation("hardtanh")


def _probe(dtype):
    """Random values over the interesting range plus the ties and specials."""
    u = torch.randn(300, dtype=dtype, generator=torch.Generator().manual_seed(0)) * 5
    ties = [-3.0, 3.0, 0.0, -0.0, 6.0, -6.0, 20.0, -20.0, 1e-30, float("inf"), -float("inf")]
    return torch.cat([u, torch.tensor(ties, dtype=dtype)])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("kind", NEW_KINDS)
def test_forward_and_backward_are_torchs(kind, dtype):
    act = Activation(kind)
    u = _probe(dtype).requires_grad_()
    y = act.forward(u)
    g = torch.randn_like(y)
    (expected,) = torch.autograd.grad(y, u, g)
    saved = y.detach() if act.saves == "output" else u.detach()
    assert act.saves == ("output" if kind == "relu6" else "input")
    _same(act.backward(g, saved), expected)
    _same(act.forward_(u.detach().clone()), y.detach())


def _same(a, b):
    """Bit-equal, NaN where NaN (hardswish(-inf) and mish(-inf) are NaN, as in torch)."""
    assert torch.equal(torch.isnan(a), torch.isnan(b))
    assert torch.equal(a.nan_to_num(0.0), b.nan_to_num(0.0))
