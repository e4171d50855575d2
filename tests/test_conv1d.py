"""1-D data (Conv1d / BatchNorm1d): the functional ops on (N, C, L) input, FusedConvBNAct1d and
the 1-D residual block, against the plain nn.Conv1d -> nn.BatchNorm1d chain; float64 parity in
train and eval, gradcheck, bad input, on every backend the CPU runs."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd import gradcheck

import resfuse
import resfuse.functional as RF
from resfuse import reference
from conftest import assert_exactish, assert_honest, randomize_bn
from harness import backend_variant

BACKENDS = ["eager", "eager-function", "pieces"] + (
    ["triton"] if resfuse.backends()["triton"] == "ok" else [])
D = torch.float64

# (kernel, stride, padding, dilation, groups)
GEOMETRIES = {
    "k3": (3, 1, 1, 1, 1),
    "k5-s2": (5, 2, 2, 1, 1),
    "same-even-dil": (4, 1, "same", 2, 2),  # asymmetric "same", grouped
    "k1-valid": (1, 1, "valid", 1, 1),
}


def _chain(geometry, act, dtype=D, form="post", c_in=4, c_out=6):
    k, s, p, d, g = GEOMETRIES[geometry]
    conv = nn.Conv1d(c_in, c_out, k, s, p, d, g, bias=form == "post").to(dtype)
    bn = nn.BatchNorm1d(c_out if form == "post" else c_in).to(dtype)
    randomize_bn(bn)
    return conv, bn, act


def _run_post(conv, bn, act, x, r, backend):
    with backend_variant(backend) as name:
        return RF.conv_bn_act(x, conv.weight, conv.bias, bn.weight, bn.bias, bn.running_mean,
                              bn.running_var, training=bn.training,
                              num_batches_tracked=bn.num_batches_tracked, momentum=bn.momentum,
                              activation=act, residual=r, stride=conv.stride,
                              padding=conv.padding, dilation=conv.dilation, groups=conv.groups,
                              backend=name)


def _run_pre(conv, bn, act, x, r, backend):
    with backend_variant(backend) as name:
        return RF.bn_act_conv(x, bn.weight, bn.bias, bn.running_mean, bn.running_var,
                              conv.weight, conv.bias, training=bn.training,
                              num_batches_tracked=bn.num_batches_tracked, activation=act,
                              residual=r, stride=conv.stride, padding=conv.padding,
                              dilation=conv.dilation, groups=conv.groups, backend=name)


def _ref(conv, bn, act, x, r, form):
    f = resfuse.Activation(act).forward if isinstance(act, str) else act
    if form == "post":
        u = bn(conv(x))
        return f(u if r is None else u + r)
    y = conv(f(bn(x)))
    return y if r is None else y + r


def _compare(form, geometry, training, backend, act, dtype):
    conv, bn, act = _chain(geometry, act, dtype, form)
    bn.train(training)
    conv_r, bn_r = copy.deepcopy(conv), copy.deepcopy(bn)
    x = torch.randn(2, 4, 11, dtype=dtype)
    with torch.no_grad():
        out_shape = _ref(conv, copy.deepcopy(bn), act, x, None, form).shape
    r = torch.randn(out_shape, dtype=dtype)
    g = torch.randn(out_shape, dtype=dtype)
    xs = [x.clone().requires_grad_() for _ in range(2)]
    rs = [r.clone().requires_grad_() for _ in range(2)]
    run = _run_post if form == "post" else _run_pre
    y = run(conv, bn, act, xs[0], rs[0], backend)
    y_ref = _ref(conv_r, bn_r, act, xs[1], rs[1], form)
    assert y.shape == y_ref.shape and y.stride() == y_ref.stride()
    y.backward(g)
    y_ref.backward(g)
    tol = 1e-10 if dtype == D else 5e-5
    assert_exactish(y, y_ref, tol, "y")
    assert_exactish(xs[0].grad, xs[1].grad, tol, "g_x")
    assert_exactish(rs[0].grad, rs[1].grad, tol, "g_residual")
    for (name, p), p_ref in zip(list(conv.named_parameters()) + list(bn.named_parameters()),
                                list(conv_r.parameters()) + list(bn_r.parameters())):
        assert_exactish(p.grad, p_ref.grad, tol, name)
    for (name, b), b_ref in zip(bn.named_buffers(), bn_r.buffers()):
        assert_exactish(b, b_ref, tol, name)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_conv_bn_act_1d(geometry, training, backend):
    _compare("post", geometry, training, backend, "relu", D)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("geometry", ["k3", "k5-s2"])
def test_bn_act_conv_1d(geometry, training, backend):
    _compare("pre", geometry, training, backend, "silu", D)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_float32_1d(training, backend):
    _compare("post", "k3", training, backend, "hardswish", torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_bn_act_on_3d_input_is_batchnorm1d(training, backend):
    bn = nn.BatchNorm1d(5).double()
    randomize_bn(bn)
    bn.train(training)
    bn_r = copy.deepcopy(bn)
    x = torch.randn(3, 5, 7, dtype=D, requires_grad=True)
    x_r = x.detach().clone().requires_grad_()
    with backend_variant(backend) as name:
        y = RF.bn_act(x, bn.weight, bn.bias, bn.running_mean, bn.running_var,
                      training=training, num_batches_tracked=bn.num_batches_tracked,
                      activation="mish", backend=name)
    y_ref = F.mish(bn_r(x_r))
    g = torch.randn_like(y_ref)
    y.backward(g)
    y_ref.backward(g)
    assert y.shape == (3, 5, 7)
    assert_exactish(y, y_ref, 1e-10, "y")
    assert_exactish(x.grad, x_r.grad, 1e-10, "g_x")
    assert_exactish(bn.weight.grad, bn_r.weight.grad, 1e-10, "g_bn_weight")
    assert_exactish(bn.running_var, bn_r.running_var, 1e-10, "running_var")


@pytest.mark.parametrize("backend", ["eager", "pieces"] + BACKENDS[3:])
def test_gradcheck_1d(backend):
    fast = backend == "triton" and not torch.cuda.is_available()
    x = torch.randn(2, 3, 6, dtype=D, requires_grad=True)
    w = torch.randn(4, 3, 3, dtype=D, requires_grad=True)
    bw = (torch.rand(4, dtype=D) + 0.5).requires_grad_()
    bb = torch.randn(4, dtype=D, requires_grad=True)
    r = torch.randn(2, 4, 3, dtype=D, requires_grad=True)

    def post(x, w, bw, bb, r):
        return RF.conv_bn_act(x, w, None, bw, bb, training=True, activation="relu6",
                              residual=r, stride=(2,), padding=1, backend=backend)
    assert gradcheck(post, (x, w, bw, bb, r), eps=1e-6, atol=1e-6, fast_mode=fast)
    w2 = torch.randn(4, 3, 3, dtype=D, requires_grad=True)
    bw2 = (torch.rand(3, dtype=D) + 0.5).requires_grad_()
    bb2 = torch.randn(3, dtype=D, requires_grad=True)

    def pre(x, bw, bb, w):
        return RF.bn_act_conv(x, bw, bb, None, None, w, None, training=True,
                              activation="gelu", padding=(1,), backend=backend)
    assert gradcheck(pre, (x, bw2, bb2, w2), eps=1e-6, atol=1e-6, fast_mode=fast)


@pytest.mark.parametrize("backend", ["eager", "pieces"] + BACKENDS[3:])
def test_conv_stats_1d(backend):
    x = torch.randn(2, 3, 9, dtype=D)
    w = torch.randn(5, 3, 3, dtype=D)
    z, mean, var = RF.conv_stats(x, w, stride=2, padding=(1,), backend=backend)
    z_ref = F.conv1d(x, w, None, 2, 1)
    v_ref, m_ref = torch.var_mean(z_ref, dim=(0, 2), correction=0)
    assert z.shape == z_ref.shape
    assert_exactish(z, z_ref, 1e-10, "z")
    assert_exactish(mean, m_ref, 1e-10, "mean")
    assert_exactish(var, v_ref, 1e-10, "var")


def test_noncontiguous_input_gives_eagers_layout():
    """x (N, C, L) read through a transpose: the output is contiguous, as F.conv1d's."""
    x = torch.randn(2, 9, 4, dtype=D).transpose(1, 2)
    conv, bn, _ = _chain("k3", "relu")
    bn.eval()
    with torch.no_grad():
        y = _run_post(conv, bn, "relu", x, None, "eager")
        y_ref = _ref(conv, bn, "relu", x, None, "post")
    assert y.stride() == y_ref.stride()
    assert_exactish(y, y_ref, 1e-10, "y")


@pytest.mark.parametrize("call, name", [
    (lambda x, w3, w4: RF.conv_bn_act(x, w4), "weight: expected a 3-D"),
    (lambda x, w3, w4: RF.conv_bn_act(x.unsqueeze(2), w3), "weight: expected a 4-D"),
    (lambda x, w3, w4: RF.bn_act_conv(x, None, None, None, None, w4), "weight: expected a 3-D"),
    (lambda x, w3, w4: RF.conv_stats(x, w4), "weight: expected a 3-D"),
    (lambda x, w3, w4: RF.conv_bn_act(x, w3, stride=(1, 2)), "stride: expected an int or a 1-tuple"),
    (lambda x, w3, w4: RF.conv_bn_act(x, w3, padding=(1, 1)), "padding: expected an int, a 1-tuple"),
    (lambda x, w3, w4: RF.conv_bn_act(x, w3, padding="full"), "padding"),
    (lambda x, w3, w4: RF.conv_bn_act(x, w3, dilation=0), "dilation: expected values >= 1"),
    (lambda x, w3, w4: RF.conv_bn_act(x, w3, padding=1, residual=torch.randn(2, 6, 9)),
     r"residual: expected shape \(2, 6, 8\)"),
    (lambda x, w3, w4: RF.conv_bn_act(x, w3, padding=1, residual=torch.randn(2, 6, 1, 8)),
     "residual: expected shape"),
    (lambda x, w3, w4: RF.bn_act(x, residual=torch.randn(2, 4)), "residual"),
    (lambda x, w3, w4: RF.conv_bn_act(x, torch.randn(6, 3, 3)), "weight: expected shape"),
], ids=range(12))
def test_bad_1d_input_names_the_argument(call, name):
    x = torch.randn(2, 4, 8)
    with pytest.raises(resfuse.ResfuseInputError, match=name):
        call(x, torch.randn(6, 4, 3), torch.randn(6, 4, 3, 3))


# ------------------------------------------------------------------ modules

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_fused_conv_bn_act_1d_module(training, backend):
    torch.manual_seed(0)
    with backend_variant(backend) as name:
        m = resfuse.FusedConvBNAct1d(4, 6, 5, stride=2, padding=2, activation=nn.Hardswish(),
                                     backend=name).double()
        randomize_bn(m)
        plain = reference.ConvBNAct(copy.deepcopy(m.conv), copy.deepcopy(m.bn), "hardswish")
        m.train(training)
        plain.train(training)
        x = torch.randn(2, 4, 13, dtype=D, requires_grad=True)
        x_r = x.detach().clone().requires_grad_()
        y, y_ref = m(x), plain(x_r)
        g = torch.randn_like(y_ref)
        y.backward(g)
        y_ref.backward(g)
    assert_exactish(y, y_ref, 1e-10, "y")
    assert_exactish(x.grad, x_r.grad, 1e-10, "g_x")
    assert_exactish(m.conv.weight.grad, plain.conv.weight.grad, 1e-10, "g_w")
    for k, v in plain.state_dict().items():
        assert_exactish(m.state_dict()[k], v, 1e-10, k)


def test_fused_conv_bn_act_1d_state_dict_and_from_modules():
    conv = nn.Conv1d(3, 5, 3, padding=1, padding_mode="reflect", bias=False)
    bn = nn.BatchNorm1d(5)
    randomize_bn(bn)
    plain = nn.Sequential()
    plain.conv, plain.bn = conv, bn
    m = resfuse.FusedConvBNAct1d.from_modules(conv, bn, nn.ReLU6())
    assert m.conv is conv and m.bn is bn and m.activation.kind == "relu6"
    assert list(m.state_dict()) == list(plain.state_dict())
    fresh = resfuse.FusedConvBNAct1d(3, 5, 3, padding=1, padding_mode="reflect")
    fresh.load_state_dict(plain.state_dict())  # loads both ways, keys unchanged
    plain.load_state_dict(fresh.state_dict())
    m.eval()
    x = torch.randn(2, 3, 10)
    with torch.no_grad():
        assert_honest(m(x), F.relu6(bn(conv(x))), F.relu6(bn.double()(conv.double()(x.double()))),
                      "reflect padding")
    with pytest.raises(resfuse.ResfuseInputError, match="conv: expected an nn.Conv1d"):
        resfuse.FusedConvBNAct1d.from_modules(nn.Conv2d(3, 5, 3), bn)
    with pytest.raises(resfuse.ResfuseInputError, match="bn: expected an nn.BatchNorm1d"):
        resfuse.FusedConvBNAct1d.from_modules(conv, nn.BatchNorm2d(5))
    with pytest.raises(resfuse.ResfuseInputError, match="num_features=5"):
        resfuse.FusedConvBNAct1d.from_modules(conv, nn.BatchNorm1d(4))
    with pytest.raises(resfuse.ResfuseInputError, match="x: expected a 3-D"):
        m(torch.randn(2, 3, 4, 4))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["basic", "bottleneck-s2", "preact-s2", "avg-down"])
def test_residual_block_1d(kind, backend):
    kw = {"basic": dict(), "bottleneck-s2": dict(bottleneck=True, stride=2),
          "preact-s2": dict(preact=True, stride=2),
          "avg-down": dict(bottleneck=True, avg_down=True, stride=2)}[kind]
    ch = 2 if kw.get("bottleneck") else 8
    torch.manual_seed(0)
    ref = reference.ResidualBlock(8, ch, dim=1, **kw).double()
    randomize_bn(ref)
    with backend_variant(backend) as name:
        fused = resfuse.FusedResidualBlock(8, ch, dim=1, backend=name, **kw).double()
        fused.load_state_dict(ref.state_dict())
        assert list(fused.state_dict()) == list(ref.state_dict())
        assert all(not isinstance(m, (nn.Conv2d, nn.BatchNorm2d)) for m in fused.modules())
        for training in (True, False):
            ref.train(training)
            fused.train(training)
            x = torch.randn(2, 8, 11, dtype=D, requires_grad=True)
            x_r = x.detach().clone().requires_grad_()
            y, y_ref = fused(x), ref(x_r)
            g = torch.randn_like(y_ref)
            y.backward(g)
            y_ref.backward(g)
            assert_exactish(y, y_ref, 1e-10, "y")
            assert_exactish(x.grad, x_r.grad, 1e-10, "g_x")
            for (k, p), q in zip(fused.named_parameters(), ref.parameters()):
                assert_exactish(p.grad, q.grad, 1e-10, k)
                p.grad = q.grad = None
            for k, v in ref.state_dict().items():
                assert_exactish(fused.state_dict()[k], v, 1e-10, k)


def test_residual_block_1d_checks_its_modules():
    block = reference.ResidualBlock(4, 4, dim=1)
    with pytest.raises(resfuse.ResfuseInputError, match="bn2: expected an nn.BatchNorm1d"):
        resfuse.FusedResidualBlock.from_modules(block.conv1, block.bn1, block.conv2,
                                                nn.BatchNorm2d(4))
    with pytest.raises(resfuse.ResfuseInputError, match="conv2: expected an nn.Conv1d"):
        resfuse.FusedResidualBlock.from_modules(block.conv1, block.bn1, nn.Conv2d(4, 4, 3),
                                                block.bn2)
    with pytest.raises(ValueError, match="dim"):
        reference.ResidualBlock(4, 4, dim=3)


@pytest.mark.parametrize("backend", ["eager", "pieces"] + BACKENDS[3:])
def test_convert_fuses_1d_blocks_whole(backend):
    """convert() swaps resfuse's own 1-D residual blocks (Conv1d / BatchNorm1d) whole, as it
    does 2-D ones: the same Parameters and state_dict keys, two float64 SGD steps and eval as
    the plain model's, and revert gives the blocks back."""
    from test_convert import assert_same_training
    torch.manual_seed(0)
    plain = nn.Sequential(reference.ResidualBlock(8, 8, dim=1),
                          reference.ResidualBlock(8, 4, bottleneck=True, stride=2, dim=1),
                          reference.ResidualBlock(16, 4, bottleneck=True, stride=2, dim=1,
                                                  preact=True)).double()
    randomize_bn(plain)
    fused = copy.deepcopy(plain)
    blocks, params = list(fused), dict(fused.named_parameters())
    report = resfuse.convert(fused, backend=backend)
    assert [new for _, _, new in report.swapped] == ["FusedResidualBlock"] * 3, str(report)
    assert not report.chains and not report.skipped
    assert list(fused.state_dict()) == list(plain.state_dict())
    assert all(p is params[n] for n, p in fused.named_parameters())
    x = torch.randn(2, 8, 12, dtype=D)
    assert_same_training(plain, fused, x, steps=2)
    plain.eval(), fused.eval()
    with torch.no_grad():
        assert_exactish(fused(x), plain(x), 1e-10, "eval")
    resfuse.revert(fused)
    assert list(fused) == blocks
