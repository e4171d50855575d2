"""resfuse.convert / revert: parity (outputs and every gradient, train and eval), what is kept
(Parameter objects, buffers, modes, dtype, memory format), all-or-nothing, the report.

Runs on resfuse's own torchvision-compatible ResNets and on block classes in tests/mirrors.py
that mirror torchvision's and timm's structure and attribute names; on the real torchvision and
timm models when they import (the GPU machine)."""
import copy

import pytest
import torch
import torch.nn as nn

import resfuse
from resfuse import models, reference
from conftest import randomize_bn

D = torch.float64


def _named(m):
    return dict(m.named_parameters()), dict(m.named_buffers())


def assert_same_training(plain: nn.Module, fused: nn.Module, x: torch.Tensor, tol: float = 1e-9,
                         steps: int = 2):
    """Same outputs, input gradient, parameter gradients and buffers over `steps` SGD steps."""
    opt_p = torch.optim.SGD(plain.parameters(), lr=0.1, momentum=0.9)
    opt_f = torch.optim.SGD(fused.parameters(), lr=0.1, momentum=0.9)
    for _ in range(steps):
        xp, xf = x.clone().requires_grad_(), x.clone().requires_grad_()
        yp, yf = plain(xp), fused(xf)
        assert (yp - yf).abs().max().item() <= tol * max(1.0, yp.abs().max().item())
        g = torch.randn_like(yp)
        yp.backward(g)
        yf.backward(g)
        assert (xp.grad - xf.grad).abs().max().item() <= tol * max(1.0, xp.grad.abs().max().item())
        fp, fb = _named(fused)
        for n, p in plain.named_parameters():
            assert (p.grad - fp[n].grad).abs().max().item() <= tol * max(1.0, p.grad.abs().max().item()), n
        for n, b in plain.named_buffers():
            assert torch.allclose(b.double(), fb[n].double(), atol=tol), n
        opt_p.step(), opt_f.step()
        opt_p.zero_grad(), opt_f.zero_grad()


BUILDERS = {
    "resnet18": models.resnet18,
    "resnet50": models.resnet50,
    "resnext50_32x4d": models.resnext50_32x4d,
}


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("name", BUILDERS)
def test_convert_resfuse_models(name, mode):
    plain = BUILDERS[name](num_classes=10).double()
    randomize_bn(plain)
    getattr(plain, mode)()
    fused = copy.deepcopy(plain)
    report = resfuse.convert(fused)
    n_blocks = sum(isinstance(m, reference.ResidualBlock) for m in plain.modules())
    assert len(report.swapped) == n_blocks and not report.skipped
    assert all(isinstance(m, resfuse.FusedResidualBlock) for n, m in fused.named_modules()
               if n.count(".") == 1 and n.startswith("layer"))
    assert list(fused.state_dict()) == list(plain.state_dict())
    assert_same_training(plain, fused, torch.randn(2, 3, 48, 48, dtype=D), steps=2 if mode == "train" else 1)


def test_convert_keeps_parameter_objects_buffers_and_optimizer():
    model = models.resnet18(num_classes=10)
    params = {n: p for n, p in model.named_parameters()}
    buffers = {n: b for n, b in model.named_buffers()}
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    resfuse.convert(model)
    for n, p in model.named_parameters():
        assert p is params[n], n
    for n, b in model.named_buffers():
        assert b is buffers[n], n
    before = model.layer1[0].conv1.weight.detach().clone()
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    opt.step()  # the optimizer built before convert updates the fused model
    assert not torch.equal(before, model.layer1[0].conv1.weight)


def test_convert_keeps_modes_dtype_and_memory_format():
    model = models.resnet18(num_classes=10).to(torch.float64).to(memory_format=torch.channels_last)
    model.train()
    model.layer2[0].bn1.eval()  # a frozen BN stays frozen
    model.layer3.eval()
    resfuse.convert(model)
    assert model.training and not model.layer2[0].bn1.training
    assert model.layer2[0].training and model.layer2[0].bn2.training
    assert not model.layer3.training and not model.layer3[0].training
    assert all(p.dtype == torch.float64 for p in model.parameters())
    assert model.layer1[0].conv1.weight.is_contiguous(memory_format=torch.channels_last)
    y = model(torch.randn(2, 3, 32, 32, dtype=torch.float64).contiguous(memory_format=torch.channels_last))
    assert y.dtype == torch.float64


def test_convert_is_all_or_nothing():
    model = models.resnet18(num_classes=10)
    before = [type(m) for m in model.modules()]
    with pytest.raises(resfuse.BackendUnavailable):
        resfuse.convert(model, backend="triton" if resfuse.backends()["triton"] != "ok" else "cuda")
    with pytest.raises(ValueError, match="process_group"):
        resfuse.convert(model, process_group=object())
    with pytest.raises(ValueError, match="backend"):
        resfuse.convert(model, backend="nonsense")
    assert [type(m) for m in model.modules()] == before


def test_convert_on_a_block_itself_says_what_to_do():
    with pytest.raises(ValueError, match="fuse_block"):
        resfuse.convert(reference.Bottleneck(64, 16))
    fused = resfuse.fuse_block(reference.Bottleneck(64, 16))
    assert isinstance(fused, resfuse.FusedBottleneck)


def test_convert_twice_and_backend_attribute():
    model = models.resnet18(num_classes=10)
    assert len(resfuse.convert(model, backend="eager").swapped) == 8
    assert all(m.backend == "eager" for m in model.modules() if isinstance(m, resfuse.FusedResidualBlock))
    assert len(resfuse.convert(model).swapped) == 0  # already fused


def test_revert_gives_back_the_original_blocks():
    model = models.resnet50(num_classes=10).double()
    randomize_bn(model)
    originals = {n: m for n, m in model.named_modules() if isinstance(m, reference.Bottleneck)}
    x = torch.randn(2, 3, 32, 32, dtype=D)
    model.eval()
    with torch.no_grad():
        y0 = model(x)
    resfuse.convert(model)
    report = resfuse.revert(model)
    assert len(report.swapped) == len(originals)
    for n, m in model.named_modules():
        if n in originals:
            assert m is originals[n]
    assert not any(isinstance(m, resfuse.FusedResidualBlock) for m in model.modules())
    with torch.no_grad():
        assert torch.equal(model(x), y0)


def test_revert_of_directly_built_fused_modules():
    seq = nn.Sequential(resfuse.FusedResidualBlock(8, 8, preact=True),
                        resfuse.FusedConvBNAct(8, 8, 3, padding=1)).double()
    randomize_bn(seq)
    x = torch.randn(2, 8, 6, 6, dtype=D)
    seq.eval()
    with torch.no_grad():
        y = seq(x)
    resfuse.revert(seq)
    assert type(seq[0]) is reference.ResidualBlock and type(seq[1]) is reference.ConvBNAct
    with torch.no_grad():
        assert torch.allclose(seq(x), y, atol=1e-10)


def test_unrecognised_blocks_are_reported_not_touched():
    class MyBlock(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1, self.bn1 = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)

        def forward(self, x):
            return torch.tanh(self.bn1(self.conv1(x)))
    model = nn.Sequential(MyBlock(), reference.BasicBlock(4, 4))
    report = resfuse.convert(model)
    assert type(model[0]) is MyBlock and isinstance(model[1], resfuse.FusedBasicBlock)
    assert report.skipped[0][0] == "0" and "unrecognised block class" in report.skipped[0][2]
    assert "1 block(s) swapped, 1 chain(s) fused, 1 skipped" in str(report)
    assert report.chains[0].members == ("0.conv1", "0.bn1")  # tanh is a function call: not fused


def test_blocks_with_unfusable_parts_are_skipped_with_a_reason():
    blocks = nn.Sequential(reference.BasicBlock(8, 8), reference.BasicBlock(8, 8),
                           reference.BasicBlock(8, 8), reference.BasicBlock(8, 8))
    blocks[0].bn1 = nn.GroupNorm(2, 8)
    blocks[1].conv2 = type("Conv2dSame", (nn.Conv2d,), {})(8, 8, 3, padding=1, bias=False)
    blocks[2].relu = nn.Tanh()
    blocks[3].extra = nn.Dropout()
    report = resfuse.convert(blocks)
    reasons = {n: r for n, _, r in report.skipped}
    assert "not an nn.BatchNorm2d" in reasons["0"]
    assert "Conv2dSame, not an nn.Conv2d" in reasons["1"]
    assert "cannot fuse a Tanh" in reasons["2"]
    assert "unexpected submodule" in reasons["3"]
    assert not report.swapped


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_convert_plain_preact_and_silu_blocks(mode):
    plain = nn.Sequential(reference.ResidualBlock(8, 8, preact=True),
                          reference.ResidualBlock(8, 16, stride=2, bottleneck=True, preact=True,
                                                  activation="silu"),
                          reference.ResidualBlock(64, 8, bottleneck=True, activation="gelu_tanh")
                          ).double()
    randomize_bn(plain)
    getattr(plain, mode)()
    fused = copy.deepcopy(plain)
    assert len(resfuse.convert(fused).swapped) == 3
    assert all(type(m) is resfuse.FusedResidualBlock for m in fused)
    assert fused[0].preact and fused[1].activation.kind == "silu"
    assert_same_training(plain, fused, torch.randn(2, 8, 8, 8, dtype=D))


def test_shared_block_is_fused_once():
    block = reference.BasicBlock(4, 4)
    model = nn.Sequential(block, block)
    resfuse.convert(model)
    assert model[0] is model[1] and isinstance(model[0], resfuse.FusedBasicBlock)


def test_converted_model_state_dict_loads_into_plain_and_back():
    plain = models.resnet50(num_classes=10)
    randomize_bn(plain)
    fused = models.resnet50(num_classes=10)
    resfuse.convert(fused)
    fused.load_state_dict(plain.state_dict())
    again = models.resnet50(num_classes=10)
    again.load_state_dict(fused.state_dict())
    for (k, a), b in zip(plain.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), k


# ---------------------------------------------------------------- torchvision and timm mirrors

import mirrors  # noqa: E402

MIRRORS = {
    "tv_resnet18": mirrors.tv_resnet18,
    "tv_resnet50": mirrors.tv_resnet50,
    "tv_resnext50_32x4d": mirrors.tv_resnext50_32x4d,
    "timm_resnet18": mirrors.timm_resnet18,
    "timm_resnet50d": mirrors.timm_resnet50d,  # deep stem, avg-pool downsample
    "timm_resnext50_32x4d": mirrors.timm_resnext50_32x4d,
    "timm_resnet50_silu": lambda **kw: mirrors.timm_resnet50(act_layer=nn.SiLU, **kw),
}


def _count_blocks(model):
    return sum(type(m).__name__ in ("BasicBlock", "Bottleneck") for m in model.modules())


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("name", MIRRORS)
def test_convert_mirrors(name, mode):
    torch.manual_seed(0)
    plain = MIRRORS[name](num_classes=10).double()
    randomize_bn(plain)
    getattr(plain, mode)()
    fused = copy.deepcopy(plain)
    report = resfuse.convert(fused)
    assert len(report.swapped) == _count_blocks(plain) and not report.skipped, str(report)
    assert list(fused.state_dict()) == list(plain.state_dict())
    assert_same_training(plain, fused, torch.randn(2, 3, 48, 48, dtype=D), steps=1)


def test_convert_wide_block_mirror():
    block = mirrors.TvBottleneck(64, 16, base_width=128).double()  # Wide-ResNet's width
    randomize_bn(block)
    model = nn.Sequential(block)
    plain = copy.deepcopy(model)
    resfuse.convert(model)
    assert isinstance(model[0], resfuse.FusedBottleneck)
    assert_same_training(plain, model, torch.randn(2, 64, 8, 8, dtype=D))


def test_convert_torchvision_dilated_layers():
    plain = mirrors.TvResNet(mirrors.TvBottleneck, [1, 1, 2, 1], num_classes=4,
                             replace_stride_with_dilation=[False, True, True]).double()
    randomize_bn(plain)
    fused = copy.deepcopy(plain)
    assert len(resfuse.convert(fused).swapped) == 5
    assert_same_training(plain, fused, torch.randn(2, 3, 48, 48, dtype=D), steps=1)


def test_timm_unfusable_blocks_are_skipped_with_reasons():
    se = mirrors.timm_seresnet50(num_classes=4)
    report = resfuse.convert(se)
    assert not report.swapped and len(report.skipped) == 16
    assert all("squeeze-excitation" in r for _, _, r in report.skipped)

    aa = mirrors.timm_resnet18(num_classes=4, aa_layer=mirrors.BlurPool2d)
    report = resfuse.convert(aa)
    skipped = {n: r for n, _, r in report.skipped}
    # the strided first block of stages 2-4 carries the anti-aliasing pool
    assert set(skipped) == {"layer2.0", "layer3.0", "layer4.0"}
    assert all("anti-aliasing" in r for r in skipped.values())
    assert len(report.swapped) == 5

    dp = mirrors.timm_resnet18(num_classes=4, drop_path_rate=0.1)
    report = resfuse.convert(dp)
    assert [n for n, _, _ in report.swapped] == ["layer1.0"]  # the only block with rate 0
    assert all("drop_path" in r for _, _, r in report.skipped)

    db = mirrors.timm_resnet18(num_classes=4, drop_block_rate=0.1)
    report = resfuse.convert(db)
    assert {n for n, _, _ in report.skipped} == {"layer3.0", "layer3.1", "layer4.0", "layer4.1"}


def test_timm_mixed_activations_skipped():
    block = mirrors.TimmBasicBlock(8, 8)
    block.act2 = nn.SiLU()
    report = resfuse.convert(nn.Sequential(block))
    assert "mixes activations" in report.skipped[0][2]


def test_revert_restores_the_mirror_classes():
    model = mirrors.timm_resnet50d(num_classes=4)
    before = {n: m for n, m in model.named_modules()}
    resfuse.convert(model)
    resfuse.revert(model)
    for n, m in model.named_modules():
        assert m is before[n], n


def test_real_torchvision_resnet50():
    tv = pytest.importorskip("torchvision")
    plain = tv.models.resnet50(num_classes=10).double()
    randomize_bn(plain)
    fused = copy.deepcopy(plain)
    assert len(resfuse.convert(fused).swapped) == 16
    assert_same_training(plain, fused, torch.randn(2, 3, 64, 64, dtype=D), steps=1)
    plain.eval(), fused.eval()
    assert_same_training(plain, fused, torch.randn(2, 3, 64, 64, dtype=D), steps=1)


@pytest.mark.parametrize("name", ["resnet18", "resnet50d", "resnext50_32x4d", "seresnet50"])
def test_real_timm_models(name):
    timm = pytest.importorskip("timm")
    plain = timm.create_model(name, num_classes=10).double()
    randomize_bn(plain)
    fused = copy.deepcopy(plain)
    report = resfuse.convert(fused)
    if name == "seresnet50":
        assert not report.swapped and report.skipped
    else:
        assert report.swapped and not report.skipped, str(report)
    assert_same_training(plain, fused, torch.randn(2, 3, 64, 64, dtype=D), steps=1)
