"""The modules' CPU eval plans (resfuse.eval_plan): fused convs in channels_last whatever the
input's layout, with eager's values; checks and backend choice once per weight version; the
checked path wherever a plan does not apply; every parameter or buffer change seen."""
import copy

import pytest
import torch
import torch.nn as nn

import resfuse
import resfuse.functional as RF
from resfuse import eval_plan, models, reference
from resfuse.backend import eager
from conftest import assert_honest, randomize_bn

CL = torch.channels_last


pytestmark = pytest.mark.usefixtures("fresh_eval_plans")


def _fmt(layout):
    return CL if layout == "channels_last" else torch.contiguous_format


def _plain_and_fused(block):
    plain = randomize_bn(block).eval()
    fused = resfuse.FusedResidualBlock.from_modules(*_block_modules(plain)).eval()
    return plain, fused


def _block_modules(b):
    if b.bottleneck:
        return (b.conv1, b.bn1, b.conv2, b.bn2, b.conv3, b.bn3), dict(downsample=b.downsample)
    return (b.conv1, b.bn1, b.conv2, b.bn2), dict(downsample=b.downsample)


def _fused_block(kind, projection):
    torch.manual_seed(0)
    if kind == "basic":
        plain = reference.BasicBlock(8, 8) if not projection else reference.BasicBlock(
            8, 16, 2, nn.Sequential(reference.conv1x1(8, 16, 2), nn.BatchNorm2d(16)))
    else:
        plain = reference.Bottleneck(16, 4) if not projection else reference.Bottleneck(
            8, 4, 2, nn.Sequential(reference.conv1x1(8, 16, 2), nn.BatchNorm2d(16)))
    randomize_bn(plain).eval()
    holder = nn.Sequential(copy.deepcopy(plain))
    report = resfuse.convert(holder)
    assert report.swapped
    return plain, holder.eval()


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("kind,projection", [("basic", False), ("basic", True),
                                             ("bottleneck", False), ("bottleneck", True)])
def test_block_layout_path_parity(kind, projection, layout, batch):
    plain, fused = _fused_block(kind, projection)
    cin = plain.conv1.in_channels
    x = torch.randn(batch, cin, 9, 9).contiguous(memory_format=_fmt(layout))
    with torch.no_grad():
        out, ref = fused(x), plain(x)
        ref64 = copy.deepcopy(plain).double()(x.double())
    assert_honest(out, ref, ref64, f"{kind} {layout} batch {batch}")
    assert out.is_contiguous(memory_format=CL), out.stride()
    assert len(eval_plan._plans) == (3 if kind == "bottleneck" else 2) + projection


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("act", ["relu", "identity", "silu", "gelu", "leaky_relu"])
def test_conv_bn_act_layout_path_parity(act, layout):
    activation = nn.LeakyReLU(0.2) if act == "leaky_relu" else act
    conv, bn = nn.Conv2d(6, 10, 3, 2, 1, bias=True), randomize_bn(nn.BatchNorm2d(10))
    m = resfuse.FusedConvBNAct.from_modules(conv, bn, activation).eval()
    plain = reference.ConvBNAct(conv, bn, activation).eval()
    for batch in (1, 2):
        x = torch.randn(batch, 6, 11, 11).contiguous(memory_format=_fmt(layout))
        r = torch.randn(batch, 10, 6, 6)  # an NCHW residual: converted, values kept
        with torch.no_grad():
            out, ref = m(x, r), plain(x, r)
            ref64 = copy.deepcopy(plain).double()(x.double(), r.double())
        assert_honest(out, ref, ref64, f"{act} {layout} batch {batch}")
        assert out.is_contiguous(memory_format=CL)


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_converted_resnet_layout_path_parity(name, layout):
    """A whole converted ResNet: logits and a backbone's feature maps (correct tensors, the
    eager values; channels_last where a fused conv made them)."""
    torch.manual_seed(0)
    plain = randomize_bn(getattr(models, name)(num_classes=7)).eval()
    plain.to(memory_format=_fmt(layout))
    fused = copy.deepcopy(plain)
    resfuse.convert(fused)
    plain64 = copy.deepcopy(plain).double()

    def features(m, x):
        x = m.maxpool(m.relu(m.bn1(m.conv1(x))))
        f1 = m.layer1(x)
        f4 = m.layer4(m.layer3(m.layer2(f1)))
        return [f1, f4, m.fc(torch.flatten(m.avgpool(f4), 1))]
    for batch in (1, 2):
        x = torch.randn(batch, 3, 40, 40).contiguous(memory_format=_fmt(layout))
        with torch.no_grad():
            got, want, want64 = features(fused, x), features(plain, x), features(plain64, x.double())
        for what, g, w, w64 in zip(("layer1", "layer4", "logits"), got, want, want64):
            assert_honest(g, w, w64, f"{name} {layout} batch {batch} {what}")
        assert got[0].is_contiguous(memory_format=CL)
        # .contiguous() gives eager's NCHW strides (and values); reshape/flatten work on both
        f = got[1].contiguous()
        assert f.stride() == want[1].contiguous().stride()
        assert torch.equal(f.flatten(1), got[1].flatten(1))
        assert torch.equal(f.reshape(batch, -1), got[1].reshape(batch, -1))


def test_checks_and_backend_choice_run_once_per_shape(monkeypatch):
    """After the first call for a shape, neither the checked functional path nor the shape
    checks nor the backend choice run again."""
    conv, bn = nn.Conv2d(4, 4, 3, padding=1), randomize_bn(nn.BatchNorm2d(4))
    m = resfuse.FusedConvBNAct.from_modules(conv, bn, "relu").eval()
    x = torch.randn(1, 4, 6, 6)
    with torch.no_grad():
        ref = m(x)
    counted = {"check_conv": 0, "select": 0}
    real_check, real_select = eval_plan.check_conv, resfuse.backend.select

    def check_conv(*a, **k):
        counted["check_conv"] += 1
        return real_check(*a, **k)

    def select(*a, **k):
        counted["select"] += 1
        return real_select(*a, **k)

    def refuse(*a, **k):
        raise AssertionError("the checked path ran")
    monkeypatch.setattr(eval_plan, "check_conv", check_conv)
    monkeypatch.setattr(resfuse.backend, "select", select)
    monkeypatch.setattr(RF, "conv_bn_act", refuse)
    with torch.no_grad():
        for _ in range(3):
            assert torch.equal(m(x), ref)
    assert counted == {"check_conv": 0, "select": 0}
    with torch.no_grad():  # a new shape: checked once, then planned
        m(torch.randn(2, 4, 6, 6))
        m(torch.randn(2, 4, 6, 6))
    assert counted["check_conv"] == 1 and counted["select"] == 0


def _module_case():
    conv, bn = nn.Conv2d(4, 6, 3, padding=1), randomize_bn(nn.BatchNorm2d(6))
    return resfuse.FusedConvBNAct.from_modules(conv, bn, "relu").eval()


def _assert_eager_values(m, x, r=None):
    with torch.no_grad():
        out = m(x) if r is None else m(x, r)
        ref = reference.ConvBNAct(m.conv, m.bn, m.activation).eval()(x, r)
    assert out.dtype == ref.dtype
    tol = 1e-12 if x.dtype == torch.float64 else 2e-2 if x.dtype == torch.bfloat16 else 1e-5
    assert (out.double() - ref.double()).abs().max().item() <= tol * max(1, ref.abs().max().item())
    return out


def test_fallback_when_the_fast_path_is_off():
    m, x = _module_case(), torch.randn(2, 4, 5, 5)
    eager.set_cpu_fused_conv(False)
    out = _assert_eager_values(m, x)
    assert out.is_contiguous() and not eval_plan._plans  # eager's layout, no plan
    eager.set_cpu_fused_conv(True)
    assert _assert_eager_values(m, x).is_contiguous(memory_format=CL)
    eager.set_cpu_fused_conv(False)  # switched off again: the plan is not used
    assert _assert_eager_values(m, x).is_contiguous()


def test_fallback_when_onednn_refuses(monkeypatch):
    """oneDNN refusing the call (at packing or at the call): the plain pieces, eager's values
    and layout, and the refusal remembered for that shape."""
    def refusing():
        def op(*a, **k):
            raise RuntimeError("refused")
        op.binary = op
        return op
    monkeypatch.setattr(eager, "_onednn_op", refusing)
    monkeypatch.setattr(eager, "_onednn_sum_op", refusing)
    m, x = _module_case(), torch.randn(2, 4, 5, 5)
    for _ in range(2):
        assert _assert_eager_values(m, x, torch.randn(2, 6, 5, 5)).is_contiguous()
    plan = eval_plan._plans[id(m.conv)]
    assert plan.shapes[x.shape] is eval_plan._REFUSED
    monkeypatch.undo()
    eval_plan.clear_plans()

    def no_pack(*a, **k):
        raise RuntimeError("cannot pack")
    monkeypatch.setattr(torch._C._nn, "mkldnn_reorder_conv2d_weight", no_pack)
    m2 = _module_case()
    _assert_eager_values(m2, x)
    assert eval_plan._plans[id(m2.conv)].shapes[x.shape] is eval_plan._REFUSED


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_dtypes(dtype):
    """fp64: oneDNN has none, the checked path runs (exact); bf16: planned."""
    m = _module_case().to(dtype)
    x = torch.randn(2, 4, 5, 5, dtype=dtype)
    _assert_eager_values(m, x)
    assert bool(eval_plan._plans) == (dtype == torch.bfloat16)


def test_backend_request_is_honoured(monkeypatch):
    """A scope or RESFUSE_BACKEND forcing another backend: the plan is not used; back to
    auto: it is."""
    m, x = _module_case(), torch.randn(2, 4, 5, 5)
    assert _assert_eager_values(m, x).is_contiguous(memory_format=CL)
    calls = []
    pieces = resfuse.backend.get("pieces")
    real = type(pieces).conv_eval_folded
    monkeypatch.setattr(type(pieces), "conv_eval_folded",
                        lambda self, *a: calls.append(1) or real(self, *a))
    with resfuse.use_backend("pieces"):
        assert _assert_eager_values(m, x).is_contiguous()
    assert calls == [1]
    monkeypatch.setenv("RESFUSE_BACKEND", "pieces")
    _assert_eager_values(m, x)
    assert calls == [1, 1]
    monkeypatch.delenv("RESFUSE_BACKEND")
    assert _assert_eager_values(m, x).is_contiguous(memory_format=CL)
    assert calls == [1, 1]


def test_not_planned_with_gradients_or_training():
    m, x = _module_case(), torch.randn(2, 4, 5, 5)
    out = m(x)  # eval with gradients (frozen BN fine-tuning): the autograd path
    assert out.requires_grad and out.is_contiguous() and not eval_plan._plans
    m.train()
    with torch.no_grad():
        m(x)
    assert not eval_plan._plans


def test_bad_residual_still_raises_after_planning():
    m, x = _module_case(), torch.randn(2, 4, 5, 5)
    _assert_eager_values(m, x, torch.randn(2, 6, 5, 5))
    with torch.no_grad(), pytest.raises(resfuse.ResfuseInputError, match="residual"):
        m(x, torch.randn(2, 6, 4, 4))
    with torch.no_grad(), pytest.raises(resfuse.ResfuseInputError, match="x"):
        m(torch.randn(2, 5, 5, 5))


@pytest.mark.parametrize("act", ["relu", "leaky_relu", "silu"])
@pytest.mark.parametrize("residual", [False, True])
def test_nan_propagates(act, residual):
    """As in eager (oneDNN's own relu would turn NaN into 0): through the plan and through
    the checked op (channels_last input, oneDNN's path there too)."""
    conv, bn = nn.Conv2d(4, 6, 3, padding=1), randomize_bn(nn.BatchNorm2d(6))
    activation = nn.LeakyReLU(0.0) if act == "leaky_relu" else act
    m = resfuse.FusedConvBNAct.from_modules(conv, bn, activation).eval()
    x = torch.randn(1, 4, 5, 5).contiguous(memory_format=CL)
    x[0, 1, 2, 2] = float("nan")
    r = torch.randn(1, 6, 5, 5).contiguous(memory_format=CL) if residual else None
    if residual:
        r[0, 2, 0, 0] = float("nan")
    with torch.no_grad():
        ref = reference.ConvBNAct(conv, bn, activation).eval()(x, r)
        for out in (m(x, r), RF.conv_bn_act(x, conv.weight, conv.bias, bn.weight, bn.bias,
                                            bn.running_mean, bn.running_var,
                                            activation=activation, residual=r, padding=1)):
            assert torch.equal(out.isnan(), ref.isnan()) and out.isnan().any()


def _counting_folds(monkeypatch):
    n = []
    real = resfuse.folding.fold
    monkeypatch.setattr(resfuse.folding, "fold", lambda *a: n.append(1) or real(*a))
    return n


def test_cache_invalidated_by_optimizer_step_and_load_state_dict(monkeypatch):
    n = _counting_folds(monkeypatch)
    m, x = _module_case(), torch.randn(2, 4, 5, 5)
    _assert_eager_values(m, x)
    _assert_eager_values(m, x)
    assert len(n) == 1, "folded again for unchanged parameters"
    # a training step: running statistics and, after the optimizer, the parameters change
    opt = torch.optim.SGD(m.parameters(), lr=0.5)
    m.train()
    m(torch.randn(4, 4, 5, 5)).square().sum().backward()
    opt.step()
    m.eval()
    _assert_eager_values(m, x)
    assert len(n) == 2
    opt.zero_grad()
    m.bn.bias.grad = torch.ones(6)  # an optimizer step alone (one parameter)
    opt.step()
    _assert_eager_values(m, x)
    assert len(n) == 3
    sd = {k: v.clone() for k, v in m.state_dict().items()}
    sd["bn.running_var"] *= 3
    m.load_state_dict(sd)
    _assert_eager_values(m, x)
    assert len(n) == 4


@pytest.mark.parametrize("edit", ["conv.weight", "conv.bias", "bn.weight", "bn.bias",
                                  "bn.running_mean", "bn.running_var"])
def test_cache_invalidated_by_in_place_edits(edit):
    m, x = _module_case(), torch.randn(2, 4, 5, 5)
    before = _assert_eager_values(m, x).clone()
    mod, name = edit.split(".")
    with torch.no_grad():
        getattr(getattr(m, mod), name).add_(0.5)
    after = _assert_eager_values(m, x)
    assert not torch.allclose(before, after)


def test_cache_invalidated_by_to_dtype_and_new_parameters():
    m, x = _module_case(), torch.randn(2, 4, 5, 5)
    _assert_eager_values(m, x)
    m.double()  # keeps the Parameters and their versions, swaps their data
    _assert_eager_values(m, x.double())
    m.float()
    with torch.no_grad():
        m.conv.weight.mul_(1.0)  # (same values: only the storage changed above)
    _assert_eager_values(m, x)
    m.bfloat16()
    _assert_eager_values(m, x.bfloat16())
    m.float()
    m.conv.weight = nn.Parameter(torch.randn_like(m.conv.weight))
    m.bn.running_mean = torch.randn(6)
    _assert_eager_values(m, x)


def test_plans_go_with_their_modules():
    import gc
    m, x = _module_case(), torch.randn(1, 4, 5, 5)
    _assert_eager_values(m, x)
    assert len(eval_plan._plans) == 1
    del m
    gc.collect()
    assert not eval_plan._plans


def test_inference_mode_and_deepcopy_after_planning():
    m, x = _module_case(), torch.randn(1, 4, 5, 5)
    with torch.inference_mode():
        y = m(x)
    assert y.is_contiguous(memory_format=CL)
    m2 = copy.deepcopy(m)  # plans are not attributes of the modules: deepcopy is unaffected
    with torch.no_grad():
        m2.conv.weight.mul_(2)
    _assert_eager_values(m2, x)
    _assert_eager_values(m, x)


def test_compile_of_a_converted_nchw_model_after_eager_eval():
    """torch.compile traces the checked op path (the plan stands aside while tracing), in the
    eager layout rule its fake implementation states; the values are eager's."""
    torch.compiler.reset()
    torch.manual_seed(0)
    plain = randomize_bn(models.resnet18(num_classes=5)).eval()
    fused = copy.deepcopy(plain)
    resfuse.convert(fused)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref, planned = plain(x), fused(x)
        compiled = torch.compile(fused, fullgraph=True)(x)
    assert torch.allclose(planned, ref, atol=1e-4) and torch.allclose(compiled, ref, atol=1e-4)


@pytest.mark.parametrize("name", ["mobilenet_v2", "densenet121", "resnet18"])
def test_converted_chains_take_the_plan(name):
    """Every post-activation chain the converter fuses (the ResNet stem, MobileNet's depthwise
    and projection convs, DenseNet's stem) runs its eval call through a plan, with eager's
    values; the pre-activation chains (DenseNet's layers) take the checked path."""
    torch.manual_seed(0)
    plain = randomize_bn(getattr(models, name)(num_classes=5)).eval()
    fused = copy.deepcopy(plain)
    report = resfuse.convert(fused)
    post = [r for r in report.chains if r.kind == "conv_bn_act"]
    assert post
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        got, want = fused(x), plain(x)
        want64 = copy.deepcopy(plain).double()(x.double())
    assert_honest(got, want, want64, name)
    slots = {id(m) for n, m in fused.named_modules() if n in {r.name for r in post}}
    assert len(slots) == len(post) and slots <= set(eval_plan._plans)


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_pre_activation_eval_is_eagers_ops(layout, monkeypatch):
    """In eval, a converted pre-activation chain (DenseNet's layers) runs eager's own BN, act
    and conv: bit for bit the unconverted model's values, without the checked path; a
    requested non-eager backend still gets the call."""
    torch.manual_seed(0)
    plain = randomize_bn(models.densenet121(num_classes=5)).eval()
    plain.to(memory_format=_fmt(layout))
    fused = copy.deepcopy(plain)
    resfuse.convert(fused)
    x = torch.randn(2, 3, 48, 48).contiguous(memory_format=_fmt(layout))
    layer = fused.features.denseblock1.denselayer1
    inp = torch.randn(2, layer.norm1.num_features, 12, 12).contiguous(memory_format=_fmt(layout))
    calls = []
    real = RF.bn_act_conv
    monkeypatch.setattr(RF, "bn_act_conv", lambda *a, **k: calls.append(1) or real(*a, **k))
    with torch.no_grad():
        got = layer.conv1(inp)
        want = plain.features.denseblock1.denselayer1.conv1(
            plain.features.denseblock1.denselayer1.relu1(
                plain.features.denseblock1.denselayer1.norm1(inp)))
        assert torch.equal(got, want) and not calls
        with resfuse.use_backend("pieces"):
            forced = layer.conv1(inp)
        assert calls and torch.allclose(forced, want, rtol=1e-4, atol=1e-5)
        got_all, want_all = fused(x), plain(x)
    assert_honest(got_all, want_all, copy.deepcopy(plain).double()(x.double()), layout)


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_residual_is_kept_unless_owned(layout):
    """A residual the caller keeps is left as it was: a channels_last one by the binary-add
    post-op, an NCHW one by summing into its channels_last copy. One the caller owns
    (`owns_residual`, as FusedStage and a block's projection pass) is summed into in place
    and returned, after a first call per shape into a copy; the values are the binary add's
    bit for bit on every path."""
    m, x = _module_case(), torch.randn(2, 4, 5, 5).contiguous(memory_format=_fmt(layout))
    r = torch.randn(2, 6, 5, 5).contiguous(memory_format=_fmt(layout))
    kept = r.clone()
    y = _assert_eager_values(m, x, r)
    assert torch.equal(r, kept) and y.data_ptr() != r.data_ptr()
    plan = eval_plan._plans[id(m.conv)]
    assert plan.runner.sum_into is not None
    assert (x.shape in plan.summed) == (layout == "nchw")  # the NCHW residual's copy
    with torch.no_grad():
        binary = plan.runner(x.contiguous(memory_format=CL), plan.shapes[x.shape][1],
                             r.contiguous(memory_format=CL))
        assert torch.equal(binary, y)
        for call in range(2):
            mine = r.clone(memory_format=CL)
            out = eval_plan.conv_bn_act(x, m.conv, m.bn, m.activation, mine, None, True)
            assert torch.equal(out, y)
            in_place = out.data_ptr() == mine.data_ptr()
            assert in_place == (call == 1 or layout == "nchw"), (call, layout)
    assert torch.equal(r, kept)


@pytest.mark.parametrize("pre_activation", [False, True])
def test_pruned_or_parametrized_modules_take_the_checked_path(pre_activation):
    """A weight computed from other tensors (pruning, parametrizations) is not in the
    module's parameter dict: no plan, the checked path's values."""
    import torch.nn.utils.prune as prune
    from torch.nn.utils import parametrize
    from resfuse.modules import bn_act_conv_modules, conv_bn_act_modules
    torch.manual_seed(0)
    conv, bn = nn.Conv2d(6, 6, 3, padding=1), randomize_bn(nn.BatchNorm2d(6)).eval()
    prune.l1_unstructured(conv, "weight", amount=0.5)

    class Doubled(nn.Module):
        def forward(self, w):
            return 2 * w
    parametrize.register_parametrization(bn, "weight", Doubled())
    act = resfuse.activations.as_activation("relu")
    x = torch.randn(2, 6, 5, 5)
    with torch.no_grad():
        if pre_activation:
            got, want = bn_act_conv_modules(x, bn, conv, act), conv(act.forward(bn(x)))
        else:
            got, want = conv_bn_act_modules(x, conv, bn, act), act.forward(bn(conv(x)))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert not eval_plan._plans
