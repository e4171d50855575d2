"""Compiler integration on the CPU: `torch.library.opcheck` of every op (all of its checks,
dynamic shapes included), `torch.compile(fullgraph=True)` of converted models (training
forward + backward, eval) against eager, and autocast behaving as the eager chain does.
The CUDA-graph and GPU-backend versions are in tests/test_gpu_integration.py."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import resfuse
import resfuse.functional as RF
from resfuse import models, reference
from conftest import randomize_bn
from dist_workers import tiny_resnet

OPCHECK_ALL = ("test_schema", "test_autograd_registration", "test_faketensor",
               "test_aot_dispatch_dynamic")
P1, P0 = [1, 1], [0, 0]


def _opcheck(op, args):
    torch.library.opcheck(op, args, test_utils=OPCHECK_ALL)


@pytest.mark.parametrize("save", [True, False])
def test_opcheck_fused_ops_all_checks(save):
    x, w = torch.randn(2, 3, 6, 6), torch.randn(4, 3, 3, 3)
    bw, bb = torch.rand(4) + 0.5, torch.randn(4)
    r = torch.randn(2, 4, 6, 6)
    _opcheck(torch.ops.resfuse.conv_bn_act_fwd.default,
             (x, w, torch.randn(4), bw, bb, torch.zeros(4), torch.ones(4), torch.tensor(0), r,
              P1, P1, P1, 1, True, None, 1e-5, "gelu", 0.01, "pieces", save))
    xa, w2 = torch.randn(2, 4, 6, 6), torch.randn(3, 4, 3, 3)
    _opcheck(torch.ops.resfuse.bn_act_conv_fwd.default,
             (xa, bw, bb, torch.zeros(4), torch.ones(4), torch.tensor(0), w2, None, None, P1, P1,
              P1, 1, True, 0.1, 1e-5, "relu", 0.01, "pieces", save))
    _opcheck(torch.ops.resfuse.conv_bn_act_infer.default,
             (x, w, torch.randn(4), bw, bb, torch.zeros(4), torch.ones(4), r, P1, P1, P1, 1,
              1e-5, "relu", 0.01, "eager"))
    y, z, mean, invstd, u = torch.ops.resfuse.conv_bn_act_fwd(
        x, w, None, bw, bb, None, None, None, None, P1, P1, P1, 1, True, 0.1, 1e-5, "silu", 0.01,
        "pieces", True)
    _opcheck(torch.ops.resfuse.conv_bn_act_bwd.default,
             (torch.randn_like(y), x, w, z, u, mean, invstd, bw, P1, P1, P1, 1, True, "silu",
              0.01, "pieces", False, [True, True, False, True, True, save]))
    y2, a, mean2, invstd2, _, _ = torch.ops.resfuse.bn_act_conv_fwd(
        xa, bw, bb, None, None, None, w2, None, None, P1, P1, P1, 1, True, 0.1, 1e-5, "gelu",
        0.01, "pieces", True)
    _opcheck(torch.ops.resfuse.bn_act_conv_bwd.default,
             (torch.randn_like(y2), xa, a, w2, mean2, invstd2, bw, bb, P1, P1, P1, 1, True, "gelu",
              0.01, "pieces", True, [True, True, True, True, save]))


@pytest.mark.parametrize("save", [True, False])
def test_opcheck_chain_ops_all_checks(save):
    """The ops of a block's chain: the conv with its output's statistics, and the ops given
    their input's statistics (and returning their output's)."""
    x, w = torch.randn(2, 3, 6, 6), torch.randn(4, 3, 3, 3)
    bw, bb = torch.rand(4) + 0.5, torch.randn(4)
    _opcheck(torch.ops.resfuse.conv_stats_fwd.default, (x, w, torch.randn(4), P1, P1, P1, 1,
                                                        "pieces"))
    z, m, v = torch.ops.resfuse.conv_stats_fwd(x, w, None, P1, P1, P1, 1, "pieces")
    _opcheck(torch.ops.resfuse.conv_bwd.default,
             (torch.randn_like(z), x, w, P1, P1, P1, 1, "pieces", True, [True, save, True]))
    w2 = torch.randn(5, 4, 3, 3)
    _opcheck(torch.ops.resfuse.bn_act_conv_fwd.default,
             (z, bw, bb, torch.zeros(4), torch.ones(4), torch.tensor(0), w2, None, None, P1, P1,
              P1, 1, True, 0.1, 1e-5, "relu", 0.01, "pieces", save, m, v, True))
    _opcheck(torch.ops.resfuse.conv_bn_act_fwd.default,
             (z, None, None, bw, bb, torch.zeros(4), torch.ones(4), torch.tensor(0),
              torch.randn_like(z), P1, P0, P1, 1, True, 0.1, 1e-5, "relu", 0.01, "pieces", save,
              m, v))


def test_opcheck_sync_ops_all_checks():
    """The synchronised-BN ops (their collective runs between them, in the autograd Function)."""
    x, w = torch.randn(2, 3, 6, 6), torch.randn(4, 3, 3, 3)
    bw, bb = torch.rand(4) + 0.5, torch.randn(4)
    _opcheck(torch.ops.resfuse.sync_conv_stats.default, (x, w, None, P1, P1, P1, 1, "eager"))
    _opcheck(torch.ops.resfuse.sync_conv_stats.default, (x, None, None, P1, P0, P1, 1, "eager"))
    z, stats = torch.ops.resfuse.sync_conv_stats(x, w, None, P1, P1, P1, 1, "eager")
    r = torch.randn_like(z)
    _opcheck(torch.ops.resfuse.sync_bn_act_fwd.default,
             (z, stats, bw, bb, torch.zeros(4), torch.ones(4), torch.tensor(2), r, None, 1e-5,
              "silu", 0.01, True))
    y, mean, invstd, u = torch.ops.resfuse.sync_bn_act_fwd(
        z, stats, bw, bb, None, None, None, None, 0.1, 1e-5, "silu", 0.01, True)
    _opcheck(torch.ops.resfuse.sync_bn_act_bwd_reduce.default,
             (torch.randn_like(y), u, z, mean, "silu", 0.01))
    g_u, sums = torch.ops.resfuse.sync_bn_act_bwd_reduce(torch.randn_like(y), u, z, mean, "silu", 0.01)
    _opcheck(torch.ops.resfuse.sync_bn_bwd_apply_conv.default,
             (g_u, z, mean, invstd, bw, sums, stats, x, w, P1, P1, P1, 1, "eager", False,
              [True, True, False]))
    _, xstats = torch.ops.resfuse.sync_conv_stats(x, None, None, P1, P0, P1, 1, "eager")
    w2 = torch.randn(4, 3, 3, 3)
    _opcheck(torch.ops.resfuse.sync_bn_act_conv_fwd.default,
             (x, xstats, bw[:3], bb[:3], torch.zeros(3), torch.ones(3), torch.tensor(0), w2,
              torch.randn(4), torch.randn(2, 4, 6, 6), P1, P1, P1, 1, 0.1, 1e-5, "relu", 0.01,
              "eager", True))
    y2, a, m2, i2 = torch.ops.resfuse.sync_bn_act_conv_fwd(
        x, xstats, bw[:3], bb[:3], None, None, None, w2, None, None, P1, P1, P1, 1, 0.1, 1e-5,
        "gelu", 0.01, "eager", True)
    _opcheck(torch.ops.resfuse.sync_bn_act_conv_bwd_reduce.default,
             (torch.randn_like(y2), x, a, w2, m2, i2, bw[:3], bb[:3], P1, P1, P1, 1, "gelu", 0.01,
              "eager", False, [True, True, False]))


def _train_step(model, x, run=None):
    out = (model if run is None else run)(x)
    out.square().sum().backward()
    return (out.detach(), {k: p.grad.clone() for k, p in model.named_parameters()},
            {k: b.clone() for k, b in model.named_buffers()})


def _assert_same(a, b, tol, what):
    assert a.shape == b.shape and a.dtype == b.dtype, what
    err = (a.double() - b.double()).abs().max().item() if a.numel() else 0.0
    assert err <= tol * max(1.0, b.double().abs().max().item()), f"{what}: {err:.3e}"


@pytest.mark.parametrize("backend", ["eager", "pieces"])
def test_compile_fullgraph_training_step(backend):
    """A converted model compiled with fullgraph=True (a graph break would raise) gives the
    eager converted model's output, gradients and running statistics. `eager` runs the
    chain of torch ops; `pieces` the custom autograd Function over torch.library ops (the
    path the kernel backends take)."""
    torch.compiler.reset()
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64)
    results = []
    for compiled in (False, True):
        model = tiny_resnet()
        resfuse.convert(model, backend=backend)
        results.append(_train_step(model, x, torch.compile(model, fullgraph=True) if compiled else None))
    (ye, ge, be), (yc, gc, bc) = results
    _assert_same(yc, ye, 1e-10, "output")
    for k in ge:
        _assert_same(gc[k], ge[k], 1e-10, f"grad {k}")
    for k in be:
        _assert_same(bc[k], be[k], 1e-10, k)


def test_compile_fullgraph_resnet18_training_and_eval():
    """The whole converted ResNet-18 (float64, channels_last), training step and inference,
    against the plain model."""
    torch.compiler.reset()
    torch.manual_seed(0)
    plain = randomize_bn(models.resnet18(num_classes=10)).double().to(memory_format=torch.channels_last)
    model = models.resnet18(num_classes=10).double().to(memory_format=torch.channels_last)
    model.load_state_dict(plain.state_dict())
    resfuse.convert(model)
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    compiled = torch.compile(model, fullgraph=True)
    yc, gc, bc = _train_step(model, x, compiled)
    ye, ge, be = _train_step(plain, x)
    _assert_same(yc, ye, 1e-9, "output")
    for k in ge:
        _assert_same(gc[k], ge[k], 1e-8, f"grad {k}")
    for k in be:
        _assert_same(bc[k], be[k], 1e-9, k)
    model.eval(), plain.eval()
    with torch.no_grad():  # BN folded into the convs, through the inference op
        _assert_same(compiled(x), plain(x), 1e-9, "eval output")


# --------------------------------------------------------------------------------- autocast

def _autocast_case(form, x_dtype, residual):
    g = torch.Generator().manual_seed(3)
    r = lambda *s: torch.randn(*s, generator=g)
    c_in, c = 3, 4
    t = dict(x=r(4, c_in if form != "bn_act" else c, 6, 6).to(x_dtype),
             bn_weight=r(c_in if form == "pre" else c).abs() + 0.5,
             bn_bias=r(c_in if form == "pre" else c) * 0.1,
             running_mean=torch.zeros(c_in if form == "pre" else c),
             running_var=torch.ones(c_in if form == "pre" else c))
    if form != "bn_act":
        t["weight"], t["bias"] = r(c, c_in, 3, 3) * 0.3, r(c) * 0.1
    if residual:
        t["residual"] = r(4, c, 6, 6).to(torch.bfloat16)
    return t


def _call(form, t, fused):
    kw = dict(training=True, momentum=0.1, eps=1e-5, activation="relu",
              residual=t.get("residual"))
    bn = dict(bn_weight=t["bn_weight"], bn_bias=t["bn_bias"], running_mean=t["running_mean"],
              running_var=t["running_var"])
    if form == "pre":
        args = (t["x"], bn["bn_weight"], bn["bn_bias"], bn["running_mean"], bn["running_var"],
                t["weight"], t["bias"])
        return (RF.bn_act_conv(*args, padding=1, **kw) if fused
                else reference.bn_act_conv(*args, padding=1, **kw))
    if form == "bn_act":
        return RF.bn_act(t["x"], **bn, **kw) if fused else reference.conv_bn_act(
            t["x"], None, None, **bn, **kw)
    f = RF.conv_bn_act if fused else reference.conv_bn_act
    return f(t["x"], t["weight"], t["bias"], **bn, padding=1, **kw)


@pytest.mark.parametrize("form,x_dtype", [("post", torch.float32), ("post", torch.bfloat16),
                                          ("bn_act", torch.bfloat16), ("pre", torch.float32),
                                          ("pre", torch.bfloat16)])
@pytest.mark.parametrize("backend", ["eager", "pieces"])
def test_autocast_matches_eager_chain(form, x_dtype, backend):
    """Under torch.autocast(cpu, bfloat16): the conv in bfloat16, BN's statistics in fp32,
    the output dtype and value of the eager chain (residual in bfloat16, as in a network);
    gradients come back in each input's own dtype, running statistics stay fp32."""
    outs = {}
    for fused in (False, True):
        t = {k: v.clone().requires_grad_(v.is_floating_point() and not k.startswith("running"))
             for k, v in _autocast_case(form, x_dtype, residual=form != "bn_act").items()}
        with torch.autocast("cpu", dtype=torch.bfloat16), resfuse.use_backend(backend):
            y = _call(form, t, fused)
        y.float().square().sum().backward()
        outs[fused] = (y, t)
    (ye, te), (yf, tf) = outs[False], outs[True]
    assert yf.dtype == ye.dtype
    _assert_same(yf.float(), ye.float(), 2e-2, "output")
    for k, v in te.items():
        if v.grad is not None:
            assert tf[k].grad.dtype == v.grad.dtype, k
            _assert_same(tf[k].grad.float(), v.grad.float(), 5e-2, f"grad {k}")
        elif k.startswith("running"):
            assert tf[k].dtype == torch.float32
            _assert_same(tf[k], v, 1e-2, k)


def test_autocast_converted_model():
    """A converted model under autocast: the plain model's output dtype, close values."""
    torch.manual_seed(0)
    plain = tiny_resnet(torch.float32)
    model = tiny_resnet(torch.float32)
    resfuse.convert(model)
    x = torch.randn(4, 3, 8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        yp, yf = plain(x), model(x)
    assert yf.dtype == yp.dtype
    _assert_same(yf.float(), yp.float(), 5e-2, "output")


def test_backend_scope_is_fixed_at_trace_time():
    """Under torch.compile the backend is chosen while tracing (documented): a compiled
    function keeps the choice it was traced with."""
    torch.compiler.reset()
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    chosen = []
    real = resfuse.backend.select

    def spy(case, backend=None):
        be = real(case, backend)
        chosen.append(be.name)
        return be
    resfuse.backend.select = spy
    try:
        f = torch.compile(lambda t: RF.bn_act(t, training=True), fullgraph=True)
        with resfuse.use_backend("pieces"):
            y = f(x)
    finally:
        resfuse.backend.select = real
    assert chosen == ["pieces"]
    assert torch.allclose(y, F.relu(F.batch_norm(x, None, None, training=True)))
