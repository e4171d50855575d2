"""resfuse.convert beyond whole ResNet blocks: conv -> BN (-> act) and BN -> act -> conv chains
fused slot by slot in any model, on mirrors of torchvision's and timm's non-ResNet structures
(tests/mirrors.py), 1-D chains, and the converter's promises: the same Parameter objects,
state_dict keys and round trips both ways, modes, revert, never raising on an unknown model, a
reason for everything left, model order in the report."""
import copy
import sys

import pytest
import torch
import torch.nn as nn

import mirrors as M
import resfuse
from resfuse import chains as slots, graph_finder
from conftest import randomize_bn
from test_convert import assert_same_training

D = torch.float64


def _tiny_seresnet():
    return M.TimmResNet(M.TimmBottleneck, (1, 1, 1, 1), channels=(4, 4, 8, 8), num_classes=4,
                        block_args=dict(attn_layer="se"))


# name -> (builder, input channels, {chain kind: count}) — the counts are what the real
# structure holds: every conv of these models sits in a chain.
CASES = {
    "tv_vgg_bn": (lambda: M.TvVGG(M.vgg_make_layers([8, "M", 16, 16, "M"], batch_norm=True),
                                  4, hidden=8, dropout=0.0), 3, {"conv_bn_act": 3}),
    "tv_densenet": (lambda: M.TvDenseNet(8, (2, 2), 8, bn_size=2, num_classes=4), 3,
                    {"conv_bn_act": 1, "bn_act_conv": 9}),
    "tv_densenet_memory_efficient": (
        lambda: M.TvDenseNet(8, (2, 1), 8, bn_size=2, num_classes=4, memory_efficient=True), 3,
        {"conv_bn_act": 1, "bn_act_conv": 7}),
    "tv_mobilenet_v2": (lambda: M.TvMobileNetV2(4, 0.25, [[1, 16, 1, 1], [6, 24, 2, 2]],
                                                dropout=0.0), 3, {"conv_bn_act": 10}),
    "tv_efficientnet_mbconv": (lambda: nn.Sequential(M.TvMBConv(8, 8, 3, 1, 4, 0.0),
                                                     M.TvMBConv(8, 16, 5, 2, 6, 0.0)), 8,
                               {"conv_bn_act": 6}),
    "tv_regnet_y": (lambda: nn.Sequential(
        M.TvResBottleneckBlock(8, 16, 2, group_width=4, se_ratio=0.25),
        M.TvResBottleneckBlock(16, 16, 1, group_width=4)), 8, {"conv_bn_act": 7}),
    "timm_regnet": (lambda: nn.Sequential(M.TimmRegNetBottleneck(8, 16, 2, group_size=4),
                                          M.TimmRegNetBottleneck(16, 16, 1, group_size=4,
                                                                 se_ratio=0)), 8,
                    {"conv_bn_act": 7}),
    "timm_resnetv2_preact": (lambda: nn.Sequential(
        M.TimmPreActBottleneck(16, 32, stride=2, proj_layer=M.TimmDownsampleConv),
        M.TimmPreActBottleneck(32, 32)), 16, {"conv_bn_act": 2, "bn_act_conv": 3}),
    "timm_efficientnet_blocks": (lambda: nn.Sequential(
        M.TimmDepthwiseSeparableConv(8, 8, se_layer=M.TimmSqueezeExcite, act_layer=nn.SiLU),
        M.TimmInvertedResidual(8, 16, stride=2, exp_ratio=4, act_layer=nn.SiLU,
                               se_layer=M.TimmSqueezeExcite)), 8, {"conv_bn_act": 5}),
    "timm_seresnet": (_tiny_seresnet, 3, {"conv_bn_act": 17}),
    # expand, depthwise and projection chains of each block; Hardswish and ReLU; SE with
    # Hardsigmoid (left as it is); the second block adds its residual in place
    "tv_mobilenet_v3": (lambda: nn.Sequential(
        M.TvInvertedResidualV3(4, 3, 8, 8, True, True, 2),
        M.TvInvertedResidualV3(8, 5, 16, 8, True, False, 1),
        M.TvInvertedResidualV3(8, 3, 8, 8, False, True, 1)), 4, {"conv_bn_act": 8}),
    # conv_down, conv_exp (linear), three per bottleneck block, the two transitions
    "timm_cspnet_cross_stage": (lambda: M.TimmCrossStage(
        8, 16, stride=2, dilation=1, depth=2, expand_ratio=2.0, bottle_ratio=0.5,
        cross_linear=True, act_layer=nn.LeakyReLU), 8, {"conv_bn_act": 10}),
}


def _kinds(report):
    out = {}
    for r in report.chains:
        out[r.kind] = out.get(r.kind, 0) + 1
    return out


def _build(name):
    torch.manual_seed(0)
    build, cin, kinds = CASES[name]
    plain = build().double()
    randomize_bn(plain)
    return plain, cin, kinds


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("name", CASES)
def test_chains_parity_on_mirrors(name, mode):
    plain, cin, kinds = _build(name)
    getattr(plain, mode)()
    fused = copy.deepcopy(plain)
    keys = list(fused.state_dict())
    report = resfuse.convert(fused)
    assert _kinds(report) == kinds, str(report)
    assert list(fused.state_dict()) == keys
    assert_same_training(plain, fused, torch.randn(2, cin, 8, 8, dtype=D),
                         steps=2 if mode == "train" else 1)


KERNEL_BACKENDS = ["pieces"] + (["triton"] if resfuse.backends()["triton"] == "ok" else [])


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("name", ["tv_mobilenet_v3", "timm_cspnet_cross_stage", "tv_densenet"])
def test_chains_on_the_kernel_backends(name, backend):
    """The chains' autograd Functions (what a GPU runs; `triton` in the interpreter here) on
    what stresses them: a residual added in place to a chain's output (MobileNetV3),
    channel-sliced views as a chain's input (CSPNet), concatenations into pre-activation
    chains (DenseNet): float64 SGD steps as eager takes them (one in the interpreter)."""
    plain, cin, kinds = _build(name)
    fused = copy.deepcopy(plain)
    report = resfuse.convert(fused, backend=backend)
    assert _kinds(report) == kinds, str(report)
    assert_same_training(plain, fused, torch.randn(2, cin, 8, 8, dtype=D),
                         steps=1 if backend == "triton" else 2)


@pytest.mark.parametrize("name", ["tv_densenet", "timm_resnetv2_preact", "timm_regnet",
                                  "tv_mobilenet_v2", "tv_mobilenet_v3", "timm_cspnet_cross_stage"])
def test_chains_keep_parameters_state_dict_both_ways_and_revert(name):
    model, cin, _ = _build(name)
    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    modules = dict(model.named_modules())
    other, _, _ = _build(name)
    randomize_bn(other)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.25)
    resfuse.convert(model)
    assert all(p is params[n] for n, p in model.named_parameters())
    assert all(b is buffers[n] for n, b in model.named_buffers())
    # plain -> converted, then converted -> plain, strict: the keys are the original ones
    model.load_state_dict(other.state_dict(), strict=True)
    back, _, _ = _build(name)
    back.load_state_dict(model.state_dict(), strict=True)
    for (k, a), b in zip(other.state_dict().items(), back.state_dict().values()):
        assert torch.equal(a, b), k
    x = torch.randn(2, cin, 16, 16, dtype=D)
    model.eval(), back.eval()
    with torch.no_grad():
        y = model(x)
        assert torch.allclose(y, back(x), atol=1e-10, rtol=1e-9)
    report = resfuse.revert(model)
    assert report.chains
    for n, m in model.named_modules():
        assert m is modules[n], n
    assert not any(isinstance(m, slots.CONV_SLOT_TYPES + slots.NORM_SLOT_TYPES)
                   for m in model.modules())
    with torch.no_grad():
        assert torch.allclose(model(x), y, atol=1e-10, rtol=1e-9)


def test_chain_modes_frozen_bn_dtype_memory_format():
    seq = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8),
                        nn.ReLU(), nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8), nn.SiLU())
    seq = seq.double().to(memory_format=torch.channels_last)
    randomize_bn(seq)
    seq[4].eval()  # a frozen BN stays frozen inside its chain
    plain = copy.deepcopy(seq)
    resfuse.convert(seq)
    assert isinstance(seq[0], slots.ChainConv) and type(seq[2]) is nn.Identity
    assert seq.training and not seq[4].training and seq[1].training
    assert seq[0].weight.is_contiguous(memory_format=torch.channels_last)
    x = torch.randn(2, 4, 6, 6, dtype=D).contiguous(memory_format=torch.channels_last)
    assert_same_training(plain, seq, x)
    seq.eval(), plain.eval()  # .eval() reaches the BN slots
    assert not seq[1].training
    assert_same_training(plain, seq, x, steps=1)
    seq.float()  # .to() replaces buffers: the chain reads them from its slots, revert gives them back
    resfuse.revert(seq)
    assert type(seq[1]) is nn.BatchNorm2d and seq[1].running_mean.dtype == torch.float32
    assert not seq[1].training


def test_conv1d_chains():
    seq = nn.Sequential(nn.Conv1d(4, 8, 3, padding=1, bias=False), nn.BatchNorm1d(8), nn.ReLU(),
                        nn.Conv1d(8, 8, 5, stride=2, padding=2, groups=2), nn.BatchNorm1d(8),
                        nn.BatchNorm1d(8), nn.SiLU(), nn.Conv1d(8, 4, 1, padding_mode="zeros"),
                        nn.Conv1d(4, 4, 3, padding=1, padding_mode="reflect"), nn.BatchNorm1d(4))
    seq = seq.double()
    randomize_bn(seq)
    plain = copy.deepcopy(seq)
    report = resfuse.convert(seq)
    assert _kinds(report) == {"conv_bn_act": 3, "bn_act_conv": 1}, str(report)
    assert isinstance(seq[0], slots.ChainConv1d) and isinstance(seq[7], slots.PreActChainConv1d)
    assert list(seq.state_dict()) == list(plain.state_dict())
    x = torch.randn(2, 4, 11, dtype=D)
    assert_same_training(plain, seq, x)
    seq.eval(), plain.eval()
    assert_same_training(plain, seq, x, steps=1)


def test_batchnorm_act_with_active_drop_and_unknown_act():
    a = M.ConvNormAct(4, 8, 3, drop_layer=lambda: M.DropBlock2d(0.2, 3))
    b = M.ConvNormAct(8, 8, 1, act_layer=nn.ELU)  # an activation resfuse does not fuse
    model = nn.Sequential(a, b).double()
    randomize_bn(model)
    plain = copy.deepcopy(model)
    report = resfuse.convert(model)
    rows = {r.name: r for r in report.chains}
    assert rows["0.conv"].activation == "identity" and "drop" in rows["0.conv"].note
    assert rows["1.conv"].activation == "identity" and "ELU" in rows["1.conv"].note
    assert type(model[0].bn.act) is nn.ReLU and type(model[1].bn.act) is nn.ELU  # kept, run
    model.eval(), plain.eval()  # DropBlock is random in training
    assert_same_training(plain, model, torch.randn(2, 4, 8, 8, dtype=D), steps=1)


@M._as("mylib.blocks", "TwiceReluBlock")
class _TwiceRelu(M.TvBasicBlock):
    """torchvision's BasicBlock under another name: its one relu runs twice, so it is no chain
    member, and the residual add stays."""


def test_activation_applied_twice_is_not_absorbed():
    model = nn.Sequential(_TwiceRelu(8, 8)).double()
    randomize_bn(model)
    plain = copy.deepcopy(model)
    report = resfuse.convert(model)
    assert [r.activation for r in report.chains] == ["identity", "identity"]
    assert "more than once" in report.chains[0].note
    assert type(model[0].relu) is nn.ReLU
    assert "unrecognised block class" in report.skipped[0][2]
    assert_same_training(plain, model, torch.randn(2, 8, 6, 6, dtype=D))


def test_preact_bn_feeding_the_shortcut_too_is_not_a_preact_chain():
    block = M.TimmPreActBottleneck(16, 32, stride=2, proj_layer=M.TimmDownsampleConv)
    model = nn.Sequential(block)
    resfuse.convert(model)
    assert type(block.norm1) is M.BatchNormAct2d  # feeds conv1 and the downsample


def test_untraceable_forward_shared_modules_and_hooks_are_reported():
    class DataDependent(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)

        def forward(self, x):
            if x.sum() > 0:  # control flow on data: torch.fx cannot trace it
                return self.bn(self.conv(x))
            return self.conv(x)

    shared = nn.Conv2d(4, 4, 1)
    hooked = nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4))
    hooked[1].register_forward_hook(lambda m, i, o: None)
    model = nn.Sequential(DataDependent(), nn.Sequential(shared, nn.BatchNorm2d(4)), shared,
                          hooked)
    before = [type(m) for m in model.modules()]
    report = resfuse.convert(model)
    reasons = {n: r for n, _, r in report.skipped}
    assert "does not trace" in reasons["0"]
    assert "calls its submodules directly" in reasons["1"]  # fx names `shared` 1.0 in "2"
    assert "hooks" in reasons["3.0"]
    assert [type(m) for m in model.modules()] == before and not report.chains


def test_nothing_to_fuse_says_why():
    report = resfuse.convert(nn.Sequential(nn.Linear(4, 4), nn.ReLU()))
    assert not report.chains and not report.swapped
    assert "nothing to fuse" in report.skipped[0][2]
    report = resfuse.convert(nn.Sequential(nn.Conv2d(3, 4, 3), nn.GroupNorm(2, 4)))
    assert "nothing to fuse" in report.skipped[0][2]


def test_the_timm_regnet_crash_case_converts():
    """timm's regnet Bottleneck has conv1 as a ConvNormAct and no bn1: convert used to raise
    AttributeError on it."""
    model = nn.Sequential(M.TimmRegNetBottleneck(8, 16, 2, group_size=4))
    report = resfuse.convert(model)
    assert len(report.chains) == 4 and not report.swapped
    assert report.skipped[0][0] == "0" and "unrecognised block class" in report.skipped[0][2]


def test_a_block_that_breaks_the_checks_is_skipped_not_raised(monkeypatch):
    def broken(block, backend=None):
        raise AttributeError("'Bottleneck' object has no attribute 'bn1'")
    monkeypatch.setattr(sys.modules["resfuse.convert"], "fuse_block", broken)
    model = M.tv_resnet18(num_classes=4)
    report = resfuse.convert(model)
    assert not report.swapped and len(report.skipped) == 8
    assert all("could not be analysed" in r for _, _, r in report.skipped)
    assert report.chains  # the chains inside are fused all the same


def test_finder_errors_are_reported_and_planning_errors_leave_the_model_unchanged(monkeypatch):
    model = M.TvMobileNetV2(4, 0.25, [[1, 16, 1, 1]])
    before = [(n, type(m)) for n, m in model.named_modules()]
    real_find = graph_finder.find

    def flaky(module):
        if type(module).__name__ == "InvertedResidual":
            raise RuntimeError("finder bug")
        return real_find(module)
    monkeypatch.setattr(graph_finder, "find", flaky)
    report = resfuse.convert(copy.deepcopy(model))
    assert any("could not be analysed (RuntimeError: finder bug)" in r for _, _, r in report.skipped)
    monkeypatch.setattr(graph_finder, "find", real_find)

    calls = []

    def failing_slot(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("cannot build")
        return real_slot(*args, **kwargs)
    real_slot = slots.conv_slot
    monkeypatch.setattr(slots, "conv_slot", failing_slot)
    with pytest.raises(RuntimeError, match="cannot build"):
        resfuse.convert(model)
    assert [(n, type(m)) for n, m in model.named_modules()] == before


def test_report_reads_in_model_order_with_a_summary_per_kind():
    model = M.tv_resnet18(num_classes=4)
    report = resfuse.convert(model)
    names = [n for n, _, _ in report.swapped]
    assert names == ["layer1.0", "layer1.1", "layer2.0", "layer2.1", "layer3.0", "layer3.1",
                     "layer4.0", "layer4.1"]
    assert [r.name for r in report.chains] == ["conv1"]  # the stem: conv1 -> bn1 -> relu
    text = str(report)
    assert text.splitlines()[0] == "8 block(s) swapped, 1 chain(s) fused, 0 skipped"
    assert "  blocks: FusedBasicBlock 8" in text
    assert "  conv_bn_act chains: 1 (relu 1)" in text

    model = M.TvDenseNet(8, (2, 2), 8, bn_size=2, num_classes=4)
    report = resfuse.convert(model)
    names = [r.name for r in report.chains]
    order = [n for n, _ in model.named_modules()]
    assert names == sorted(names, key=order.index)
    assert "  bn_act_conv chains: 9 (relu 9)" in str(report)


def test_chains_false_swaps_whole_blocks_only():
    model = M.timm_resnet18(num_classes=4)
    report = resfuse.convert(model, chains=False)
    assert len(report.swapped) == 8 and not report.chains
    assert type(model.conv1) is nn.Conv2d


def test_convert_twice_fuses_nothing_new():
    model = M.TvMobileNetV2(4, 0.25, [[1, 16, 1, 1]])
    first = resfuse.convert(model)
    second = resfuse.convert(model)
    assert first.chains and not second.chains and not second.skipped


def test_compiled_chain_model_matches_eager():
    torch.compiler.reset()
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8),
                          nn.ReLU(), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1)).double()
    randomize_bn(model)
    resfuse.convert(model, backend="eager")
    model.eval()
    x = torch.randn(2, 3, 8, 8, dtype=D)
    with torch.no_grad():
        assert torch.allclose(torch.compile(model, fullgraph=True)(x), model(x), atol=1e-10)


def test_real_torchvision_models():
    tv = pytest.importorskip("torchvision")
    for name in ("vgg11_bn", "densenet121", "mobilenet_v2", "mobilenet_v3_small",
                 "efficientnet_b0", "regnet_y_400mf"):
        plain = getattr(tv.models, name)(num_classes=4).double()
        randomize_bn(plain)
        plain.eval()
        fused = copy.deepcopy(plain)
        report = resfuse.convert(fused)
        assert report.chains, (name, str(report))
        assert list(fused.state_dict()) == list(plain.state_dict())
        assert_same_training(plain, fused, torch.randn(1, 3, 64, 64, dtype=D), steps=1)


@pytest.mark.parametrize("name", ["regnetx_002", "resnetv2_50", "cspresnet50", "efficientnet_b0",
                                  "seresnet50", "mobilenetv3_small_100"])
def test_real_timm_models_chains(name):
    timm = pytest.importorskip("timm")
    plain = timm.create_model(name, num_classes=4).double()
    randomize_bn(plain)
    plain.eval()
    fused = copy.deepcopy(plain)
    report = resfuse.convert(fused)
    assert report.chains, str(report)
    assert list(fused.state_dict()) == list(plain.state_dict())
    assert_same_training(plain, fused, torch.randn(1, 3, 64, 64, dtype=D), steps=1)


def test_report_says_what_chains_gain_on_the_cpu():
    """A CPU model's report says what its chains gain there (training: nothing; eval: the
    folded post-activation chains); a model with no chain or no parameters says nothing."""
    model = nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1))
    report = resfuse.convert(model)
    assert report.device == "cpu"
    text = "\n".join(report.summary())
    assert "on the CPU: in training every chain runs torch's own ops" in text
    assert "BN -> act -> conv chains run eager's own ops" in text
    plain = resfuse.convert(nn.Sequential(nn.Linear(3, 3)))
    assert not any("on the CPU" in line for line in plain.summary())
    empty = resfuse.convert(nn.Sequential(nn.ReLU()))
    assert empty.device is None and not any("on the CPU" in line for line in empty.summary())
