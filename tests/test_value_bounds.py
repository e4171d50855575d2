"""Bounds on activations (resfuse.value_bounds) and the CPU eval path they unlock: oneDNN's
own ReLU (which turns NaN into 0) runs only where a bound shows the pre-activation finite, so
results, NaN and Inf included, stay eager's. Every way a bound could go stale or wrong is
checked: in-place edits, inference tensors, non-finite inputs, weights and residuals, sums
that overflow."""
import copy
import math

import pytest
import torch
import torch.nn as nn

import resfuse
from resfuse import eval_plan, models, reference, value_bounds
from conftest import randomize_bn, spy_eval_runner

CL = torch.channels_last


pytestmark = pytest.mark.usefixtures("fresh_eval_plans")


@pytest.fixture
def runner_calls(monkeypatch):
    """Counts the eval runner's calls by whether oneDNN's own activation ran ("fused": the
    bound allowed it) or torch's pass after it ("torch"), for relu-like activations."""
    counts = {"fused": 0, "torch": 0}

    def counting(runner, x, residual, into, bounded):
        if runner.after is not None:  # an activation oneDNN's own post-op cannot always give
            counts["fused" if runner.own_activation(bounded) else "torch"] += 1
    spy_eval_runner(monkeypatch, counting)
    return counts


# ---- the table and the measure -------------------------------------------------------------

@pytest.mark.parametrize("layout", ["nchw", "channels_last", "strided"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_measure_is_max_abs(layout, dtype):
    x = torch.randn(2, 5, 4, 6, dtype=dtype)
    x[1, 3, 2, 1] = -7.5
    if layout == "channels_last":
        x = x.contiguous(memory_format=CL)
    elif layout == "strided":
        x = x[:, :, :, ::2]
    assert value_bounds.measure(x) == x.abs().max().item()
    assert value_bounds.measure(torch.empty(0, 3, 2, 2)) == 0.0


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_measure_of_non_finite_is_inf(bad):
    x = torch.randn(1, 3, 4, 4).contiguous(memory_format=CL)
    x[0, 2, 3, 1] = bad
    assert value_bounds.measure(x) == math.inf


def test_a_bound_goes_with_an_in_place_change_and_with_its_tensor():
    t = torch.randn(2, 3)
    value_bounds.record(t, 5.0)
    assert value_bounds.known(t) == 5.0
    assert value_bounds.known(t.clone()) is None  # another tensor
    t[0].mul_(10)  # through a view: the shared version counter moves
    assert value_bounds.known(t) is None
    value_bounds.record(t, 50.0)
    eval_plan.clear_plans()  # forgets bounds too
    assert value_bounds.known(t) is None


def test_inference_tensors_keep_a_bound_only_where_the_caller_vouches():
    with torch.inference_mode():
        t = torch.randn(2, 3)
        value_bounds.record(t, 5.0)
    assert value_bounds.known(t) is None
    assert value_bounds.known(t, private=True) == 5.0


def test_conv_gain_bounds_the_conv_and_sees_non_finite_weights():
    conv = nn.Conv2d(3, 4, 3, padding=1)
    g, o = value_bounds.conv_gain(conv.weight, conv.bias)
    x = torch.empty(1, 3, 6, 6).uniform_(-2, 2)
    x[0, :, 2, 2] = 2.0 * torch.sign(conv.weight[0, :, 1, 1]).detach()  # near the worst case
    with torch.no_grad():
        assert conv(x).abs().max().item() <= g * 2.0 + o
        conv.weight[1, 2, 0, 0] = float("nan")
    assert value_bounds.conv_gain(conv.weight, conv.bias) == (math.inf, math.inf)


# ---- the eval path ---------------------------------------------------------------------------

def _conv_bn(cin=4, cout=6):
    return nn.Conv2d(cin, cout, 3, padding=1), randomize_bn(nn.BatchNorm2d(cout)).eval()


def _ref(conv, bn, act, x, r=None):
    return reference.ConvBNAct(conv, bn, act).eval()(x, r)


@pytest.mark.parametrize("act", ["relu", "relu6", "leaky0"])
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_activation_runs_where_bounded_with_eager_values(act, residual, dtype,
                                                               runner_calls):
    conv, bn = _conv_bn()
    activation = nn.LeakyReLU(0.0) if act == "leaky0" else act
    m = resfuse.FusedConvBNAct.from_modules(conv, bn, activation).eval().to(dtype)
    x = torch.randn(2, 4, 7, 7, dtype=dtype) * 3
    r = torch.randn(2, 6, 7, 7, dtype=dtype) if residual else None
    with torch.no_grad():
        if residual:  # a residual's bound is carried, never measured: give it one
            r = resfuse.FusedConvBNAct.from_modules(*_conv_bn(6, 6), "relu").eval().to(dtype)(r)
        out = m(x, r)
        ref = _ref(conv, bn, activation, x, r).to(dtype)
    fused = not (act == "relu6" and residual)  # oneDNN has no clip after its residual add
    assert runner_calls["fused" if fused else "torch"] >= (2 if residual and fused else 1)
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
    assert (out.double() - ref.double()).abs().max().item() <= tol * ref.abs().max().item()
    assert (out >= 0).all()
    if act == "relu6":
        assert (out <= 6).all()


def test_nan_in_a_weight_runs_torch_activation(runner_calls):
    conv, bn = _conv_bn()
    m = resfuse.FusedConvBNAct.from_modules(conv, bn, "relu").eval()
    x = torch.randn(1, 4, 5, 5)
    with torch.no_grad():
        m(x)
        conv.weight[2, 1, 1, 1] = float("nan")  # (an in-place edit: the plan is made again)
        out, ref = m(x), _ref(conv, bn, "relu", x)
    assert ref.isnan().any() and torch.equal(out.isnan(), ref.isnan())
    assert runner_calls["torch"] >= 1


def test_finite_input_whose_sums_overflow_runs_torch_activation(runner_calls):
    """Finite values whose products overflow: whether the sum comes out Inf or NaN depends
    on the order of the sums, so only torch's activation gives eager's answer for certain.
    The measured bound is far past the limit: torch's relu runs, with eager's non-finite
    values."""
    conv, bn = nn.Conv2d(2, 1, 1, bias=False), nn.BatchNorm2d(1).eval()
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([2.0, 2.0]).view(1, 2, 1, 1))
    m = resfuse.FusedConvBNAct.from_modules(conv, bn, "relu").eval()
    x = torch.randn(1, 2, 3, 3)
    x[0, :, 1, 1] = torch.tensor([3e38, 3e38])
    with torch.no_grad():
        out, ref = m(x), _ref(conv, bn, "relu", x)
    assert not ref[0, 0, 1, 1].isfinite()
    assert torch.equal(out.isnan(), ref.isnan()) and torch.equal(out.isinf(), ref.isinf())
    assert runner_calls["torch"] == 1 and runner_calls["fused"] == 0


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_an_output_edited_in_place_is_measured_again(mode):
    """A fused output carries its bound to the next fused conv; writing NaN into it in place
    must not let that stale bound through (eager keeps the NaN)."""
    m1 = resfuse.FusedConvBNAct.from_modules(*_conv_bn(4, 6), "relu").eval()
    m2 = resfuse.FusedConvBNAct.from_modules(*_conv_bn(6, 6), "relu").eval()
    x = torch.randn(1, 4, 5, 5)
    ctx = torch.no_grad() if mode == "no_grad" else torch.inference_mode()
    with ctx:
        y = m1(x)
        y[0, 1, 2, 2] = float("nan")
        out = m2(y)
        ref = _ref(m2.conv, m2.bn, "relu", y)
    assert ref.isnan().any() and torch.equal(out.isnan(), ref.isnan())


def test_a_nan_residual_is_not_bounded():
    conv, bn = _conv_bn(4, 6)
    m = resfuse.FusedConvBNAct.from_modules(conv, bn, "relu").eval()
    x, r = torch.randn(1, 4, 5, 5), torch.randn(1, 6, 5, 5)
    with torch.no_grad():
        r = resfuse.FusedConvBNAct.from_modules(*_conv_bn(6, 6), "relu").eval()(r)
        r[0, 3, 1, 1] = float("nan")  # after its bound was recorded
        out, ref = m(x, r), _ref(conv, bn, "relu", x, r)
    assert ref.isnan().any() and torch.equal(out.isnan(), ref.isnan())


def _resnet(name, layout):
    torch.manual_seed(0)
    plain = randomize_bn(getattr(models, name)(num_classes=5)).eval()
    plain.to(memory_format=CL if layout == "channels_last" else torch.contiguous_format)
    fused = copy.deepcopy(plain)
    resfuse.convert(fused)
    return plain, fused


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_resnet_runs_every_relu_fused_with_eager_values(name, mode, runner_calls):
    plain, fused = _resnet(name, "nchw")
    x = torch.randn(2, 3, 64, 64)
    ctx = torch.no_grad() if mode == "no_grad" else torch.inference_mode()
    with ctx:
        want = plain(x)
        fused(x)
        runner_calls.update(fused=0, torch=0)
        got = fused(x)
    assert (got - want).abs().max().item() <= 1e-4 * want.abs().max().item()
    # Under inference_mode a stage's input has no version counter, so its bound is not
    # trusted as a residual: ResNet-18's first block (identity shortcut) runs torch's relu.
    assert runner_calls["torch"] == (1 if mode == "inference_mode" and name == "resnet18" else 0)
    assert runner_calls["fused"] > 0


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_resnet_nan_pixel_poisons_its_image_as_in_eager(name):
    plain, fused = _resnet(name, "channels_last")
    x = torch.randn(2, 3, 64, 64).contiguous(memory_format=CL)
    x[0, :, 10, 20] = float("nan")
    with torch.no_grad():
        want, got = plain(x), fused(x)
    assert want[0].isnan().all() and torch.equal(got.isnan(), want.isnan())
    assert not got[1].isnan().any()


def _stage(blocks):
    """A FusedStage of the given reference blocks, converted."""
    holder = nn.Sequential(nn.Sequential(*blocks))
    resfuse.convert(holder)
    assert type(holder[0]) is resfuse.FusedStage
    return holder[0].eval()


def _basic(cin, cout, stride=1, activation="relu"):
    ds = None
    if stride != 1 or cin != cout:
        ds = nn.Sequential(reference.conv1x1(cin, cout, stride), nn.BatchNorm2d(cout))
    b = reference.ResidualBlock(cin, cout, stride, downsample=ds, activation=activation)
    return randomize_bn(b).eval()


def _poison(module, what):
    with torch.no_grad():
        if what == "weight":
            module.weight[0, 0].fill_(float("nan"))
        else:  # a negative running variance: sqrt of it is NaN in eager's BN and in the fold
            module.running_var[0] = -1.0


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
@pytest.mark.parametrize("where", ["conv1 weight", "bn2 running_var", "projection weight"])
def test_a_nan_inside_a_stage_reaches_the_output_as_in_eager(mode, where):
    """A non-finite folded weight in one block: its convs run torch's activation, and the
    stage's residual buffer it summed into must lose the bound it carried from before (the
    in-place sum bumps no version), so the next block does not run oneDNN's ReLU on NaN."""
    torch.manual_seed(0)
    blocks = [_basic(8, 8), _basic(8, 16, 2) if where == "projection weight" else _basic(8, 8),
              _basic(16 if where == "projection weight" else 8, 16 if where == "projection weight" else 8)]
    plain = copy.deepcopy(blocks)
    if where == "conv1 weight":
        _poison(blocks[1].conv1, "weight")
    elif where == "bn2 running_var":
        _poison(blocks[1].bn2, "running_var")
    else:
        _poison(blocks[1].downsample[0], "weight")
    ref_stage = nn.Sequential(*copy.deepcopy(blocks)).eval()
    stage = _stage(blocks)
    x = torch.randn(2, 8, 8, 8)
    ctx = torch.no_grad() if mode == "no_grad" else torch.inference_mode()
    with ctx:
        stage(x)  # plans made, bounds recorded
        want, got = ref_stage(x), stage(x)
    assert want.isnan().any() and torch.equal(got.isnan(), want.isnan())
    with ctx:  # and the healthy stage still runs every relu fused, with eager's values
        healthy = _stage(plain)
        ref = nn.Sequential(*copy.deepcopy(plain)).eval()(x)
        assert (healthy(x) - ref).abs().max().item() <= 1e-4 * ref.abs().max().item()


def test_an_identity_activation_block_with_nan_weights_keeps_eager_nan():
    """relu block -> a block with no activation (nothing in place after its oneDNN sum, so no
    version bump) and a NaN weight -> relu block: eager's NaN comes through (no_grad)."""
    torch.manual_seed(0)
    blocks = [_basic(8, 8), _basic(8, 8, activation="identity"), _basic(8, 8)]
    _poison(blocks[1].conv2, "weight")
    ref_stage = nn.Sequential(*copy.deepcopy(blocks)).eval()
    stage = _stage(blocks)
    x = torch.randn(2, 8, 8, 8)
    with torch.no_grad():
        stage(x)
        want, got = ref_stage(x), stage(x)
    assert want.isnan().any() and torch.equal(got.isnan(), want.isnan())


def test_a_full_table_drops_the_dead_and_keeps_the_live():
    value_bounds.clear()
    live = torch.randn(3)
    value_bounds.record(live, 2.0)
    for _ in range(value_bounds._MAX_ENTRIES + 10):
        value_bounds.record(torch.randn(1), 1.0)  # each dead at once
    assert value_bounds.known(live) == 2.0
    assert len(value_bounds._table) < value_bounds._MAX_ENTRIES
