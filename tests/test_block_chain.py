"""A residual block in training as the fused chain of docs/design.md: each conv computes its output's
batch statistics in its epilogue (`conv_stats`, `bn_act_conv(return_stats=True)`), the next
conv applies that BN + activation as it loads its input (`bn_act_conv(batch_stats=...)`),
and the last BN, the residual add and the activation are one pass (`bn_act(batch_stats=...)`).

The functional pieces are checked on every backend; the block runs as the chain on a backend
whose convs have a BN prologue (`triton`: on the CPU in Triton's interpreter)."""
import copy

import pytest
import torch
import torch.nn.functional as F

import resfuse
from resfuse import functional as RF, reference
from resfuse.modules import FusedResidualBlock
from conftest import assert_exactish, randomize_bn, to_layout
from test_modules import BLOCKS

D = torch.float64
TRITON = resfuse.backends()["triton"] == "ok"
BACKENDS = ["eager", "pieces"] + (["triton"] if TRITON else [])
needs_triton = pytest.mark.skipif(not TRITON, reason=f"triton: {resfuse.backends()['triton']}")
TOL = {torch.float64: 1e-10, torch.float32: 2e-4}


def _bn_state(c, dtype):
    return dict(bn_weight=torch.rand(c, dtype=dtype) + 0.5, bn_bias=torch.randn(c, dtype=dtype),
                running_mean=torch.randn(c, dtype=dtype) * 0.1,
                running_var=torch.rand(c, dtype=dtype) + 0.5,
                num_batches_tracked=torch.tensor(3))


def _clone_state(st):
    return {k: v.clone() for k, v in st.items()}


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("backend", BACKENDS)
def test_conv_stats(backend, dtype, layout):
    x = to_layout(torch.randn(2, 3, 7, 6, dtype=dtype), layout).requires_grad_()
    w = torch.randn(5, 3, 3, 3, dtype=dtype, requires_grad=True)
    b = torch.randn(5, dtype=dtype, requires_grad=True)
    z, mean, var = RF.conv_stats(x, w, b, stride=2, padding=1, backend=backend)
    zr = F.conv2d(x, w, b, 2, 1)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    vr, mr = torch.var_mean(zr.detach().to(acc), dim=(0, 2, 3), correction=0)
    assert mean.dtype == var.dtype == acc and not mean.requires_grad and not var.requires_grad
    assert_exactish(z, zr, TOL[dtype], "z")
    assert_exactish(mean, mr, TOL[dtype], "mean")
    assert_exactish(var, vr, TOL[dtype], "var")
    g = torch.randn_like(zr)
    grads = torch.autograd.grad(z, (x, w, b), g)
    refs = torch.autograd.grad(zr, (x, w, b), g)
    for name, a, r in zip(("x", "weight", "bias"), grads, refs):
        assert_exactish(a, r, TOL[dtype] * 10, f"grad {name}")


def _chain_functional(x, w1, w2, bn1, bn2, residual, act, backend):
    """conv1 (+stats) -> bn1 + act -> conv2 (+stats) -> bn2 + residual + act, as a chain."""
    z1, m1, v1 = RF.conv_stats(x, w1, padding=1, backend=backend)
    z2, m2, v2 = RF.bn_act_conv(z1, **bn1, weight=w2, padding=1, training=True,
                                activation=act, batch_stats=(m1, v1), return_stats=True,
                                backend=backend)
    y = RF.bn_act(z2, **bn2, training=True, activation=act, residual=residual,
                  batch_stats=(m2, v2), backend=backend)
    return y, (z2, m2, v2)


def _chain_reference(x, w1, w2, bn1, bn2, residual, act):
    z1 = F.conv2d(x, w1, padding=1)
    z2 = reference.bn_act_conv(z1, **bn1, weight=w2, padding=1, training=True, activation=act)
    return reference.conv_bn_act(z2, None, None, **bn2, training=True, activation=act,
                                 residual=residual), z2


@pytest.mark.parametrize("act", ["relu", "silu"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("backend", BACKENDS)
def test_functional_chain_matches_the_module_chain(backend, dtype, layout, act):
    """Statistics handed from op to op give the chain's output, every gradient (through the
    statistics too) and the running-statistics updates."""
    x = to_layout(torch.randn(2, 3, 6, 5, dtype=dtype), layout)
    w1 = torch.randn(4, 3, 3, 3, dtype=dtype) * 0.3
    w2 = torch.randn(6, 4, 3, 3, dtype=dtype) * 0.3
    r = to_layout(torch.randn(2, 6, 6, 5, dtype=dtype), layout)
    bn1, bn2 = _bn_state(4, dtype), _bn_state(6, dtype)
    leaves = [x, w1, w2, r, bn1["bn_weight"], bn1["bn_bias"], bn2["bn_weight"], bn2["bn_bias"]]
    ins = [t.detach().clone().requires_grad_() for t in leaves]
    refs = [t.detach().clone().requires_grad_() for t in leaves]
    st_f = [_clone_state(bn1), _clone_state(bn2)]
    st_r = [_clone_state(bn1), _clone_state(bn2)]
    for st, t in ((st_f, ins), (st_r, refs)):
        st[0].update(bn_weight=t[4], bn_bias=t[5])
        st[1].update(bn_weight=t[6], bn_bias=t[7])
    y, (z2, m2, v2) = _chain_functional(ins[0], ins[1], ins[2], st_f[0], st_f[1], ins[3], act,
                                        backend)
    yr, z2r = _chain_reference(refs[0], refs[1], refs[2], st_r[0], st_r[1], refs[3], act)
    tol = TOL[dtype]
    assert_exactish(y, yr, tol, "y")
    vr, mr = torch.var_mean(z2r.detach().to(m2.dtype), dim=(0, 2, 3), correction=0)
    assert_exactish(m2, mr, tol, "returned mean")
    assert_exactish(v2, vr, tol, "returned var")
    for k in ("running_mean", "running_var", "num_batches_tracked"):
        for i in range(2):
            assert_exactish(st_f[i][k], st_r[i][k], tol, f"bn{i + 1}.{k}")
    g = torch.randn_like(yr)
    got = torch.autograd.grad(y, ins, g)
    want = torch.autograd.grad(yr, refs, g)
    names = ("x", "w1", "w2", "residual", "bn1.weight", "bn1.bias", "bn2.weight", "bn2.bias")
    for name, a, b in zip(names, got, want):
        assert_exactish(a, b, tol * 20 * max(1.0, b.abs().max().item()), f"grad {name}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_functional_chain_gradcheck(backend):
    """float64 gradcheck through the statistics handed between ops."""
    x = torch.randn(2, 2, 4, 4, dtype=D, requires_grad=True)
    w1 = torch.randn(3, 2, 3, 3, dtype=D, requires_grad=True)
    w2 = torch.randn(2, 3, 3, 3, dtype=D, requires_grad=True)
    bw = torch.rand(3, dtype=D) + 0.5
    bw.requires_grad_()
    bb = torch.randn(3, dtype=D, requires_grad=True)
    r = torch.randn(2, 2, 4, 4, dtype=D, requires_grad=True)

    def f(x, w1, w2, bw, bb, r):
        bn1 = dict(bn_weight=bw, bn_bias=bb, running_mean=None, running_var=None)
        bn2 = dict(bn_weight=None, bn_bias=None, running_mean=None, running_var=None)
        return _chain_functional(x, w1, w2, bn1, bn2, r, "silu", backend)[0]

    assert torch.autograd.gradcheck(f, (x, w1, w2, bw, bb, r), fast_mode=backend == "triton")


# ------------------------------------------------------------------------------ the block

def _blocks(block, dtype, **bn_changes):
    plain = randomize_bn(reference.ResidualBlock(**BLOCKS[block]).to(dtype))
    for m in plain.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            for k, v in bn_changes.items():
                setattr(m, k, v)
    fused = FusedResidualBlock(**BLOCKS[block], backend="triton").to(dtype)
    fused.load_state_dict(plain.state_dict())
    for a, b in zip(plain.modules(), fused.modules()):
        if isinstance(a, torch.nn.BatchNorm2d):
            for k, v in bn_changes.items():
                setattr(b, k, v)
    return plain, fused


def _step(model, x, g):
    x = x.clone().requires_grad_()
    y = model(x)
    y.backward(g)
    return y.detach(), x.grad, [p.grad for p in model.parameters()], list(model.buffers())


def _assert_steps_agree(plain, fused, x, tol, steps=2):
    with torch.no_grad():
        shape = copy.deepcopy(plain).eval()(x).shape
    for _ in range(steps):
        g = torch.randn(shape, dtype=x.dtype)
        yp, gxp, gp, bp = _step(plain, x, g)
        yf, gxf, gf, bf = _step(fused, x, g)
        scale = lambda t: tol * max(1.0, t.abs().max().item())  # noqa: E731
        assert_exactish(yf, yp, scale(yp), "output")
        assert_exactish(gxf, gxp, 10 * scale(gxp), "grad x")
        for (n, _), a, b in zip(plain.named_parameters(), gf, gp):
            assert_exactish(a, b, 10 * scale(b), f"grad {n}")
        for (n, _), a, b in zip(plain.named_buffers(), bf, bp):
            assert_exactish(a, b, scale(b), n)
        plain.zero_grad()
        fused.zero_grad()


# float64 in every layout; float32 (the same kernels in the interpreter, another tolerance) in
# channels_last only on the CPU, in every layout on a GPU.
_DTYPE_LAYOUTS = [(d, lay) for d in (torch.float64, torch.float32)
                  for lay in ("nchw", "channels_last", "strided")
                  if d == torch.float64 or lay == "channels_last" or torch.cuda.is_available()]


@needs_triton
@pytest.mark.parametrize("dtype,layout", _DTYPE_LAYOUTS,
                         ids=[f"{str(d)[6:]}-{lay}" for d, lay in _DTYPE_LAYOUTS])
@pytest.mark.parametrize("block", [b for b in BLOCKS if b != "wide"])
def test_block_runs_as_the_chain_and_matches_the_module_chain(block, dtype, layout, monkeypatch):
    plain, fused = _blocks(block, dtype)
    calls = []
    chain = FusedResidualBlock._chain_forward
    monkeypatch.setattr(FusedResidualBlock, "_chain_forward",
                        lambda self, x: calls.append(1) or chain(self, x))
    x = to_layout(torch.randn(2, BLOCKS[block]["in_channels"], 6, 6, dtype=dtype), layout)
    _assert_steps_agree(plain, fused, x, TOL[dtype])
    assert calls, "the block did not run as the chain"


@needs_triton
@pytest.mark.parametrize("bn_changes", [dict(momentum=None), dict(affine=False),
                                        dict(track_running_stats=False)],
                         ids=["momentum-none", "affine-false", "no-running-stats"])
def test_block_chain_bn_options(bn_changes):
    plain = randomize_bn(reference.ResidualBlock(16, 8, bottleneck=True).double())
    fused = FusedResidualBlock(16, 8, bottleneck=True, backend="triton").double()
    fused.load_state_dict(plain.state_dict())
    for model in (plain, fused):
        for name in ("bn1", "bn2", "bn3"):
            bn = getattr(model, name)
            if "momentum" in bn_changes:
                bn.momentum = None
            if bn_changes.get("affine") is False:
                bn.weight = bn.bias = None
                bn.affine = False
            if bn_changes.get("track_running_stats") is False:
                bn.track_running_stats = False
                bn.running_mean = bn.running_var = bn.num_batches_tracked = None
    assert fused._runs_chain(torch.randn(2, 16, 6, 6, dtype=D))
    _assert_steps_agree(plain, fused, torch.randn(2, 16, 6, 6, dtype=D), TOL[D])


@needs_triton
def test_block_chain_writes_no_normalized_activation(monkeypatch):
    """In the chain's forward the only BN apply pass is the last one (bn3 + residual + act):
    bn1 and bn2 are applied in the next conv's prologue; and the tensors kept for backward
    are fewer bytes than the per-layer ops keep (no act(bn(z)) and no mask per inner layer)."""
    from resfuse.backend.triton import TritonBackend
    plain, fused = _blocks("bottleneck", torch.float32)
    applies = []
    real = TritonBackend.scale_shift_add_act
    monkeypatch.setattr(TritonBackend, "scale_shift_add_act",
                        lambda self, *a, **k: applies.append(1) or real(self, *a, **k))
    x = torch.randn(2, 32, 6, 6, requires_grad=True)
    saved = {}

    def keep(t):  # bytes per storage: a tensor saved twice is kept once
        if t.numel():
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        fused(x)
    assert len(applies) == 1
    chain_bytes = sum(saved.values())
    saved.clear()
    monkeypatch.setattr(FusedResidualBlock, "_runs_chain", lambda self, x: False)
    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        fused(x)
    # Here the chain keeps x, z1, z2, z3; the per-layer ops also keep act(bn1(z1)),
    # act(bn2(z2)) and two masks.
    assert chain_bytes < sum(saved.values())


@needs_triton
def test_block_chain_is_deterministic():
    _, fused = _blocks("bottleneck-s2-proj", torch.float32)
    x = torch.randn(2, 16, 8, 8)
    g = torch.randn(2, 32, 4, 4)
    state = copy.deepcopy(fused.state_dict())
    runs = []
    for _ in range(2):
        fused.load_state_dict(state)
        fused.zero_grad()
        runs.append(_step(fused, x, g))
    (y1, gx1, gp1, b1), (y2, gx2, gp2, b2) = runs
    for a, b in zip([y1, gx1, *gp1, *b1], [y2, gx2, *gp2, *b2]):
        assert torch.equal(a, b)


@needs_triton
def test_block_chain_not_used_where_it_does_not_apply(monkeypatch):
    """Eval mode (BN folded instead), a frozen BN, another backend, an empty batch: the
    per-layer ops, with the same results."""
    monkeypatch.setattr(FusedResidualBlock, "_chain_forward",
                        lambda self, x: pytest.fail("the chain ran"))
    x = torch.randn(2, 16, 6, 6, dtype=D)
    plain, fused = _blocks("bottleneck-s2-proj", D)
    plain.eval(), fused.eval()
    _assert_steps_agree(plain, fused, x, TOL[D], steps=1)
    plain.train(), fused.train()
    plain.bn2.eval(), fused.bn2.eval()
    _assert_steps_agree(plain, fused, x, TOL[D], steps=1)
    fused.train()
    fused.backend = "eager"
    assert not fused._runs_chain(x)
    fused.backend = "triton"
    assert not fused._runs_chain(x[:0])


# ------------------------------------------------------------------------------ bad input

def test_batch_stats_bad_input():
    x = torch.randn(2, 3, 4, 4)
    w = torch.randn(5, 3, 1, 1)
    bn = _bn_state(3, torch.float32)
    rm = bn["running_mean"].clone()
    good = (torch.zeros(3), torch.ones(3))
    cases = [((torch.zeros(4), torch.ones(4)), r"batch_stats\[0\] \(mean\): expected shape \(3,\)"),
             ((torch.zeros(3, dtype=D), torch.ones(3)), "expected dtype torch.float32"),
             ((torch.zeros(3), torch.ones(3, 1)), r"batch_stats\[1\] \(var\): expected shape"),
             (torch.zeros(3), "expected a pair"),
             ((good[0], None), r"batch_stats\[1\] \(var\): expected a Tensor")]
    for stats, msg in cases:
        with pytest.raises(resfuse.ResfuseInputError, match=msg):
            RF.bn_act(x, **bn, training=True, batch_stats=stats)
        with pytest.raises(resfuse.ResfuseInputError, match=msg):
            RF.bn_act_conv(x, **bn, weight=w, training=True, batch_stats=stats)
    assert torch.equal(bn["running_mean"], rm)  # nothing written
    with pytest.raises(resfuse.ResfuseInputError, match="return_stats: expected a bool"):
        RF.bn_act_conv(x, **bn, weight=w, return_stats=1)
    with pytest.raises(resfuse.ResfuseInputError, match="weight: expected shape"):
        RF.conv_stats(x, torch.randn(5, 2, 1, 1))


@needs_triton
def test_block_chain_compiles_whole():
    """torch.compile(fullgraph=True) keeps the chain's ops (one graph, no break) and gives the
    same step as the module chain."""
    import torch._dynamo.testing
    plain, fused = _blocks("bottleneck-s2-proj", torch.float32)
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    torch._dynamo.reset()
    compiled = torch.compile(fused, backend=counter, fullgraph=True)
    x = torch.randn(2, 16, 8, 8)
    _assert_steps_agree(plain, compiled, x, TOL[torch.float32], steps=1)
    assert counter.frame_count == 1


@needs_triton
@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU: tests/test_triton_gpu.py")
def test_converted_resnet50_training_step_through_the_interpreter(wide_interpreter_tiles):
    """A converted ResNet-50 (torchvision's structure, resfuse.models where torchvision does
    not import) trains one float64 step through the triton backend exactly as eager does: loss,
    every gradient, every running statistic (batch 4, 32x32: every layer of ResNet-50 still
    runs, layer4 at 1x1; tiles up to 256 wide, conftest.wide_interpreter_tiles)."""
    from harness import check_converted_resnet50_step
    check_converted_resnet50_step("triton", torch.float64, "cpu", side=32)


def _cl(t):
    return t.contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("formats", ["x-nchw-w-cl", "x-cl-w-nchw", "both-cl"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_ops_outputs_have_the_fake_layouts(backend, formats):
    """Real and fake outputs agree in strides whatever the mix of memory formats (the conv
    output in x's format, gradients like their inputs): torch.compile (inductor) asserts it."""
    from torch.library import opcheck
    x = torch.randn(2, 4, 6, 6, dtype=D)
    w = torch.randn(5, 4, 3, 3, dtype=D)
    if formats != "x-nchw-w-cl":
        x = _cl(x)
    if formats != "x-cl-w-nchw":
        w = _cl(w)
    utils = ("test_schema", "test_faketensor")
    P1 = [1, 1]
    ops = torch.ops.resfuse
    opcheck(ops.conv_stats_fwd.default, (x, w, None, P1, P1, P1, 1, backend), test_utils=utils)
    z, m, v = ops.conv_stats_fwd(x, w, None, P1, P1, P1, 1, backend)
    g = torch.randn_like(z)
    opcheck(ops.conv_bwd.default, (g, x, w, P1, P1, P1, 1, backend, False, [True, True, False]),
            test_utils=utils)
    bw, bb = torch.rand(4, dtype=D) + 0.5, torch.randn(4, dtype=D)
    w2 = torch.randn(5, 4, 1, 1, dtype=D)
    for save in (True, False):
        opcheck(ops.conv_bn_act_fwd.default,
                (x, w, None, bw[:1].expand(5).contiguous(), None, None, None, None, None, P1, P1,
                 P1, 1, True, 0.1, 1e-5, "relu", 0.01, backend, save), test_utils=utils)
        opcheck(ops.bn_act_conv_fwd.default,
                (x, bw, bb, None, None, None, w2 if formats == "x-cl-w-nchw" else _cl(w2), None,
                 None, P1, [0, 0], P1, 1, True, 0.1, 1e-5, "relu", 0.01, backend, save),
                test_utils=utils)
    y, zz, mean, invstd, u = ops.conv_bn_act_fwd(x, w, None, None, None, None, None, None, None,
                                                 P1, P1, P1, 1, True, 0.1, 1e-5, "silu", 0.01,
                                                 backend, True)
    opcheck(ops.conv_bn_act_bwd.default,
            (torch.randn_like(y), x, w, zz, u, mean, invstd, None, P1, P1, P1, 1, True, "silu",
             0.01, backend, False, [True, True, False, False, False, True]), test_utils=utils)
