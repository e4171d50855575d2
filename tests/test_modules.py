"""Drop-in modules: parity with the plain module chain, state dicts both ways, torchvision's
signatures, per-BN modes."""
import copy

import pytest
import torch
import torch.nn as nn

import resfuse
from resfuse import models, reference
from conftest import assert_exactish, randomize_bn

D = torch.float64


def _train_step_parity(plain: nn.Module, fused: nn.Module, x: torch.Tensor, tol=1e-10, steps=2):
    """Outputs, input and parameter gradients, and buffers agree over a few steps."""
    for _ in range(steps):
        xp, xf = x.clone().requires_grad_(), x.clone().requires_grad_()
        yp, yf = plain(xp), fused(xf)
        assert_exactish(yf, yp, tol, "output")
        g = torch.randn_like(yp)
        yp.backward(g)
        yf.backward(g)
        assert_exactish(xf.grad, xp.grad, tol, "grad x")
        for (n, p), q in zip(plain.named_parameters(), fused.parameters()):
            assert_exactish(q.grad, p.grad, tol, f"grad {n}")
        for (n, a), b in zip(plain.named_buffers(), fused.buffers()):
            assert_exactish(b, a, tol, n)
        plain.zero_grad()
        fused.zero_grad()


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("act", ["relu", "silu", "identity", "leaky_relu"])
def test_fused_conv_bn_act(act, mode):
    m = resfuse.FusedConvBNAct(4, 6, 3, stride=2, padding=1, bias=True, activation=act).double()
    randomize_bn(m)
    plain = reference.ConvBNAct(copy.deepcopy(m.conv), copy.deepcopy(m.bn), act)
    getattr(m, mode)()
    getattr(plain, mode)()
    _train_step_parity(plain, m, torch.randn(3, 4, 9, 9, dtype=D))
    r = torch.randn(3, 6, 5, 5, dtype=D)
    assert_exactish(m(torch.ones(3, 4, 9, 9, dtype=D), r), plain(torch.ones(3, 4, 9, 9, dtype=D), r),
                    1e-10, "with residual")


def test_fused_conv_bn_act_from_modules_shares_parameters():
    conv, bn = nn.Conv2d(3, 5, 3, padding=1), nn.BatchNorm2d(5)
    m = resfuse.FusedConvBNAct.from_modules(conv, bn, nn.ReLU())
    assert m.conv is conv and m.bn is bn and m.conv.weight is conv.weight
    assert set(m.state_dict()) == {"conv." + k for k in conv.state_dict()} | {"bn." + k for k in bn.state_dict()}


@pytest.mark.parametrize("padding_mode", ["reflect", "circular"])
def test_padding_modes(padding_mode):
    m = resfuse.FusedConvBNAct(3, 4, 3, padding=1, padding_mode=padding_mode).double()
    plain = reference.ConvBNAct(copy.deepcopy(m.conv), copy.deepcopy(m.bn), "relu")
    _train_step_parity(plain, m, torch.randn(2, 3, 6, 6, dtype=D), steps=1)


BLOCKS = {
    "basic": dict(in_channels=8, channels=8),
    "basic-s2-proj": dict(in_channels=8, channels=16, stride=2),
    "bottleneck": dict(in_channels=32, channels=8, bottleneck=True),
    "bottleneck-s2-proj": dict(in_channels=16, channels=8, stride=2, bottleneck=True),
    "resnext": dict(in_channels=64, channels=16, bottleneck=True, groups=2, base_width=16),
    "wide": dict(in_channels=32, channels=8, bottleneck=True, base_width=128),
    "dilated": dict(in_channels=32, channels=8, bottleneck=True, dilation=2),
    "avg-down": dict(in_channels=16, channels=8, stride=2, bottleneck=True, avg_down=True),
    "silu": dict(in_channels=8, channels=8, activation="silu"),
    "preact-basic": dict(in_channels=8, channels=8, preact=True),
    "preact-bottleneck-s2": dict(in_channels=16, channels=8, stride=2, bottleneck=True, preact=True),
    "preact-gelu-proj": dict(in_channels=8, channels=16, preact=True, activation="gelu"),
}


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("block", BLOCKS)
def test_residual_block_parity(block, mode):
    plain = reference.ResidualBlock(**BLOCKS[block]).double()
    randomize_bn(plain)
    fused = resfuse.FusedResidualBlock(**BLOCKS[block]).double()
    fused.load_state_dict(plain.state_dict())
    getattr(plain, mode)()
    getattr(fused, mode)()
    c = BLOCKS[block]["in_channels"]
    _train_step_parity(plain, fused, torch.randn(2, c, 8, 8, dtype=D))


def test_frozen_bn_inside_a_training_block():
    """A BN put in eval mode on its own (frozen BN fine-tuning) is honoured."""
    plain = reference.ResidualBlock(16, 8, bottleneck=True).double()
    randomize_bn(plain)
    fused = resfuse.FusedResidualBlock(16, 8, bottleneck=True).double()
    fused.load_state_dict(plain.state_dict())
    for m in (plain, fused):
        m.train()
        m.bn2.eval()
        m.bn1.momentum = None
    _train_step_parity(plain, fused, torch.randn(2, 16, 6, 6, dtype=D))


@pytest.mark.parametrize("block", ["basic", "bottleneck-s2-proj", "preact-basic", "avg-down"])
def test_state_dict_round_trip(block):
    plain = reference.ResidualBlock(**BLOCKS[block])
    randomize_bn(plain)
    fused = resfuse.FusedResidualBlock(**BLOCKS[block])
    assert list(fused.state_dict()) == list(plain.state_dict())
    fused.load_state_dict(plain.state_dict())
    back = reference.ResidualBlock(**BLOCKS[block])
    back.load_state_dict(fused.state_dict())
    for (k, a), b in zip(plain.state_dict().items(), back.state_dict().values()):
        assert torch.equal(a, b), k


def test_torchvision_signature_builds_a_resnet50():
    """ResNet(FusedBottleneck, [3, 4, 6, 3]) builds, loads a plain ResNet-50's state dict with
    the same keys, and computes the same function (the stem and head stay plain)."""
    plain = models.resnet50(num_classes=10).double()
    randomize_bn(plain)
    fused = models.resnet50(block=resfuse.FusedBottleneck, num_classes=10).double()
    assert list(fused.state_dict()) == list(plain.state_dict())
    fused.load_state_dict(plain.state_dict())
    x = torch.randn(2, 3, 64, 64, dtype=D)
    _train_step_parity(plain, fused, x, tol=1e-9, steps=1)
    plain.eval()
    fused.eval()
    with torch.no_grad():
        assert_exactish(fused(x), plain(x), 1e-9, "eval output")


def test_fused_basic_block_resnet18():
    plain = models.resnet18(num_classes=5).double()
    fused = models.resnet18(block=resfuse.FusedBasicBlock, num_classes=5).double()
    fused.load_state_dict(plain.state_dict())
    _train_step_parity(plain, fused, torch.randn(2, 3, 32, 32, dtype=D), tol=1e-9, steps=1)
    assert resfuse.FusedBasicBlock.expansion == 1 and resfuse.FusedBottleneck.expansion == 4


def test_real_torchvision_resnet_with_fused_blocks():
    tv = pytest.importorskip("torchvision")
    plain = tv.models.resnet50(num_classes=10).double()
    randomize_bn(plain)
    fused = tv.models.resnet.ResNet(resfuse.FusedBottleneck, [3, 4, 6, 3], num_classes=10).double()
    fused.load_state_dict(plain.state_dict())
    _train_step_parity(plain, fused, torch.randn(2, 3, 64, 64, dtype=D), tol=1e-9, steps=1)


def test_block_backend_attribute_is_used():
    fused = resfuse.FusedResidualBlock(8, 8, backend="triton")
    if resfuse.backends()["triton"] != "ok":
        with pytest.raises(resfuse.BackendUnavailable):
            fused(torch.randn(2, 8, 4, 4))
    elif not torch.cuda.is_available():  # the interpreter: float32 and float64 only
        with pytest.raises(resfuse.BackendUnavailable, match="float32 and float64"):
            fused.bfloat16()(torch.randn(2, 8, 4, 4, dtype=torch.bfloat16))
