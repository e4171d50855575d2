"""The CPU inference path: BN folded into the conv (cached per parameter version), residual add
and activation fused through oneDNN where it accepts the case, plain ops where not."""
import copy

import pytest
import torch
import torch.nn as nn

import resfuse
import resfuse.functional as RF
from resfuse import eval_plan, folding, models, reference
from resfuse.backend import eager
from conftest import assert_honest, randomize_bn


@pytest.fixture(params=[True, False], ids=["onednn", "plain"])
def onednn(request):
    old = eager.set_cpu_fused_conv(request.param)
    eager._refused.clear()
    eval_plan.clear_plans()
    yield request.param
    eager.set_cpu_fused_conv(old)
    eval_plan.clear_plans()


def _eval_case(act, residual, layout, dtype=torch.float32, groups=1, stride=1, k=3):
    conv = nn.Conv2d(8, 16, k, stride, k // 2, groups=groups, bias=True)
    bn = nn.BatchNorm2d(16)
    randomize_bn(bn)
    plain = reference.ConvBNAct(conv, bn, act).eval()
    x = torch.randn(2, 8, 10, 10)
    r = torch.randn(2, 16, 10 // stride, 10 // stride) if residual else None
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    x = x.contiguous(memory_format=fmt)
    r = None if r is None else r.contiguous(memory_format=fmt)
    with torch.no_grad():
        ref64 = copy.deepcopy(plain).double()(x.double(), None if r is None else r.double())
        ref_lp = copy.deepcopy(plain).to(dtype)(x.to(dtype), None if r is None else r.to(dtype))
        fused = resfuse.FusedConvBNAct.from_modules(copy.deepcopy(conv).to(dtype),
                                                    copy.deepcopy(bn).to(dtype), act).eval()
        out = fused(x.to(dtype), None if r is None else r.to(dtype))
    return out, ref_lp, ref64


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("residual", [True, False], ids=["residual", "no-residual"])
@pytest.mark.parametrize("act", ["relu", "identity", "leaky_relu", "silu", "gelu", "gelu_tanh",
                                 "relu6", "hardswish", "hardsigmoid", "mish"])
def test_eval_inference_parity(act, residual, layout, onednn):
    activation = nn.LeakyReLU(0.1) if act == "leaky_relu" else act
    out, ref_lp, ref64 = _eval_case(activation, residual, layout)
    assert_honest(out, ref_lp, ref64, f"{act}")
    # A module's oneDNN path answers in channels_last (its eval plan, docs/cpu.md); the plain
    # path in eager's memory format.
    if onednn:
        assert out.is_contiguous(memory_format=torch.channels_last), out.stride()
    else:
        assert out.stride() == ref_lp.stride(), (out.stride(), ref_lp.stride())


@pytest.mark.parametrize("act", ["relu6", "hardswish", "hardsigmoid"])
def test_onednn_post_op_taken_for_the_activations_it_has(act):
    """relu6 (oneDNN's hardtanh on [0, 6]), hardswish and hardsigmoid are oneDNN post-ops here
    (without a residual: its binary add takes only relu after it); mish has none."""
    if eager._onednn_op() is None:
        pytest.skip("this torch has no oneDNN fused convolution")
    eager._refused.clear()
    out, ref_lp, ref64 = _eval_case(act, False, "nchw")
    assert_honest(out, ref_lp, ref64, act)
    assert not any(key[1] == act for key in eager._refused), eager._refused


def test_channels_last_weight_with_nchw_input_gives_eagers_layout(onednn):
    conv, bn = nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16)
    randomize_bn(bn)
    conv.to(memory_format=torch.channels_last)
    m = resfuse.FusedConvBNAct.from_modules(conv, bn, "relu").eval()
    x = torch.randn(2, 8, 6, 6)
    with torch.no_grad():
        out, ref = m(x), reference.ConvBNAct(conv, bn, "relu").eval()(x)
    assert out.stride() == ref.stride() and torch.allclose(out, ref, atol=1e-5)


@pytest.mark.parametrize("shape", ["grouped", "strided-1x1"])
def test_eval_inference_shapes(shape, onednn):
    kw = dict(groups=4) if shape == "grouped" else dict(stride=2, k=1)
    out, ref_lp, ref64 = _eval_case("relu", True, "channels_last", **kw)
    assert_honest(out, ref_lp, ref64, shape)


def test_eval_inference_bf16(onednn):
    out, ref_lp, ref64 = _eval_case("relu", True, "channels_last", dtype=torch.bfloat16)
    assert_honest(out, ref_lp, ref64, "bf16")


def test_eval_fp64_uses_plain_path_exactly():
    """oneDNN has no fp64: the plain folded path runs, to 1e-10 of the chain."""
    out, _, ref64 = _eval_case("relu", True, "nchw", dtype=torch.float64)
    assert (out - ref64).abs().max().item() < 1e-10


def test_onednn_path_is_taken_when_enabled():
    calls = []
    real = eager._onednn_op

    def spy():
        calls.append(1)
        return real()
    eager._onednn_op = spy
    try:
        _eval_case("relu", True, "channels_last")
    finally:
        eager._onednn_op = real
    assert calls, "the oneDNN fused convolution was not tried"


def test_refused_case_falls_back_to_plain_ops(monkeypatch):
    """An internal op that refuses a case: the plain path runs and the refusal is remembered."""
    def refusing():
        def op(*a, **k):
            raise RuntimeError("refused")
        op.binary = op
        return op
    monkeypatch.setattr(eager, "_onednn_op", refusing)
    eager._refused.clear()
    eval_plan.clear_plans()
    out, ref_lp, ref64 = _eval_case("relu", True, "channels_last")
    assert_honest(out, ref_lp, ref64, "fallback")
    assert eager._refused
    eager._refused.clear()


def test_missing_internal_op_falls_back(monkeypatch):
    monkeypatch.setattr(eager, "_onednn_op", lambda: None)
    eval_plan.clear_plans()
    out, ref_lp, ref64 = _eval_case("silu", False, "channels_last")
    assert_honest(out, ref_lp, ref64, "no oneDNN op")


def test_fold_is_cached_and_invalidated_by_parameter_changes():
    folding.clear_cache()
    m = resfuse.FusedConvBNAct(4, 4, 3, padding=1).eval()
    randomize_bn(m)
    x = torch.randn(1, 4, 6, 6)
    n = []
    real = folding.fold

    def counting(*a):
        n.append(1)
        return real(*a)
    folding.fold = counting
    try:
        with torch.no_grad():
            y0 = m(x)
            m(x)
            assert len(n) == 1, "the fold was recomputed for unchanged parameters"
            # an optimizer-style in-place update must be seen
            m.conv.weight.mul_(2)
            y1 = m(x)
            assert len(n) == 2 and not torch.allclose(y0, y1)
            # load_state_dict copies in place into the buffers
            sd = {k: v.clone() for k, v in m.state_dict().items()}
            sd["bn.running_mean"] += 1
            m.load_state_dict(sd)
            y2 = m(x)
            assert len(n) == 3
            ref = reference.ConvBNAct(m.conv, m.bn, "relu").eval()(x)
            assert torch.allclose(y2, ref, atol=1e-5)
    finally:
        folding.fold = real


def test_eval_with_gradients_does_not_fold():
    """Eval mode with gradients (frozen-BN fine-tuning): gradients reach every parameter."""
    m = resfuse.FusedConvBNAct(4, 4, 3, padding=1).double().eval()
    randomize_bn(m)
    plain = reference.ConvBNAct(copy.deepcopy(m.conv), copy.deepcopy(m.bn), "relu").eval()
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    m(x).sum().backward()
    plain(x).sum().backward()
    for p, q in zip(m.parameters(), plain.parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-10)


def test_converted_resnet50_eval_parity():
    plain = models.resnet50(num_classes=10).eval().to(memory_format=torch.channels_last)
    randomize_bn(plain)
    fused = copy.deepcopy(plain)
    resfuse.convert(fused)
    x = torch.randn(2, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        ref64 = copy.deepcopy(plain).double()(x.double())
        assert_honest(fused(x), plain(x), ref64, "resnet50 eval")


def test_inference_mode_tensors():
    """Under torch.inference_mode the fold is computed (no version counters) and correct."""
    m = resfuse.FusedConvBNAct(4, 4, 3, padding=1).eval()
    randomize_bn(m)
    with torch.inference_mode():
        x = torch.randn(1, 4, 6, 6)
        y = m(x)
        ref = reference.ConvBNAct(m.conv, m.bn, "relu").eval()(x)
    assert torch.allclose(y, ref, atol=1e-5)


def test_no_grad_training_updates_running_stats():
    """torch.no_grad() in training mode still updates the running statistics, as eager does."""
    m = resfuse.FusedConvBNAct(4, 4, 3, padding=1)
    before = m.bn.running_mean.clone()
    with torch.no_grad():
        RF.conv_bn_act(torch.randn(2, 4, 5, 5), m.conv.weight, None, m.bn.weight, m.bn.bias,
                       m.bn.running_mean, m.bn.running_var, training=True,
                       num_batches_tracked=m.bn.num_batches_tracked)
    assert not torch.equal(before, m.bn.running_mean) and m.bn.num_batches_tracked.item() == 1
