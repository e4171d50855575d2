"""float64 gradcheck of every functional entry point, through both CPU backends and `triton`
(in Triton's interpreter without a GPU); `pieces` is the written-out reference backward that
the kernel backends replace piece by piece."""
import pytest
import torch
from torch.autograd import gradcheck

import resfuse
import resfuse.functional as RF

# `triton` where it runs: on a GPU, or here under TRITON_INTERPRET=1 (tests/conftest.py).
BACKENDS = ["eager", "pieces"] + (["triton"] if resfuse.backends()["triton"] == "ok" else [])
D = torch.float64


def _fast(backend: str) -> bool:
    """gradcheck's fast mode (random projections of the Jacobian, a few evaluations instead
    of one per input element) for the kernels in Triton's interpreter: the full check of one
    conv op takes about 30 s there."""
    return backend == "triton" and not torch.cuda.is_available()


def _bn(c, affine=True, track=True):
    w = (torch.rand(c, dtype=D) + 0.5).requires_grad_() if affine else None
    b = (torch.randn(c, dtype=D) * 0.2).requires_grad_() if affine else None
    rm = torch.randn(c, dtype=D) * 0.2 if track else None
    rv = torch.rand(c, dtype=D) + 0.5 if track else None
    return w, b, rm, rv


def _fresh(t):
    return None if t is None else t.clone()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("act", ["relu", "leaky_relu", "silu", "gelu", "gelu_tanh", "identity"])
def test_conv_bn_act(act, training, backend):
    x = torch.randn(2, 3, 5, 5, dtype=D, requires_grad=True)
    w = torch.randn(4, 3, 3, 3, dtype=D, requires_grad=True)
    b = torch.randn(4, dtype=D, requires_grad=True)
    bw, bb, rm, rv = _bn(4)
    r = torch.randn(2, 4, 3, 3, dtype=D, requires_grad=True)

    # Running stats are cloned per call so every evaluation sees the same state.
    def f(x, w, b, bw, bb, r):
        return RF.conv_bn_act(x, w, b, bw, bb, _fresh(rm), _fresh(rv), training=training,
                              activation=act, residual=r, stride=1, padding=0, backend=backend)
    assert gradcheck(f, (x, w, b, bw, bb, r), eps=1e-6, atol=1e-6, fast_mode=_fast(backend))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["train-strided-grouped", "no-affine", "no-running-stats",
                                  "eval-no-running-stats"])
def test_conv_bn_act_modes(mode, backend):
    affine = mode != "no-affine"
    track = "no-running-stats" not in mode
    training = not mode.startswith("eval")
    groups = 2 if "grouped" in mode else 1
    x = torch.randn(3, 4, 6, 5, dtype=D, requires_grad=True)
    w = torch.randn(4, 4 // groups, 3, 3, dtype=D, requires_grad=True)
    bw, bb, rm, rv = _bn(4, affine, track)
    stride = 2 if "strided" in mode else 1
    params = [p for p in (x, w, bw, bb) if p is not None]

    def f(*ps):
        x, w, *rest = ps
        bw_, bb_ = (rest if affine else (None, None))
        return RF.conv_bn_act(x, w, None, bw_, bb_, _fresh(rm), _fresh(rv), training=training,
                              activation="silu", stride=stride, padding=1, groups=groups,
                              backend=backend)
    assert gradcheck(f, tuple(params), eps=1e-6, atol=1e-6, fast_mode=_fast(backend))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("act", ["relu", "silu", "gelu"])
def test_bn_act(act, training, backend):
    x = torch.randn(3, 4, 3, 3, dtype=D, requires_grad=True)
    bw, bb, rm, rv = _bn(4)
    r = torch.randn(3, 4, 3, 3, dtype=D, requires_grad=True)

    def f(x, bw, bb, r):
        return RF.bn_act(x, bw, bb, _fresh(rm), _fresh(rv), training=training, activation=act,
                         residual=r, backend=backend)
    assert gradcheck(f, (x, bw, bb, r), eps=1e-6, atol=1e-6, fast_mode=_fast(backend))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("act", ["relu", "leaky_relu", "silu", "gelu", "identity"])
def test_bn_act_conv(act, training, backend):
    x = torch.randn(2, 4, 5, 5, dtype=D, requires_grad=True)
    bw, bb, rm, rv = _bn(4)
    w = torch.randn(3, 4, 3, 3, dtype=D, requires_grad=True)
    b = torch.randn(3, dtype=D, requires_grad=True)
    r = torch.randn(2, 3, 3, 3, dtype=D, requires_grad=True)

    def f(x, bw, bb, w, b, r):
        return RF.bn_act_conv(x, bw, bb, _fresh(rm), _fresh(rv), w, b, training=training,
                              activation=act, residual=r, stride=1, padding=0, backend=backend)
    assert gradcheck(f, (x, bw, bb, w, b, r), eps=1e-6, atol=1e-6, fast_mode=_fast(backend))


@pytest.mark.parametrize("backend", BACKENDS)
def test_function_apply_directly(backend):
    """The public autograd.Function, called with .apply, as a user of gradcheck would."""
    x = torch.randn(2, 3, 4, 4, dtype=D, requires_grad=True)
    w = torch.randn(5, 3, 1, 1, dtype=D, requires_grad=True)
    bw, bb, _, _ = _bn(5)

    def f(x, w, bw, bb):
        return resfuse.ConvBNActFunction.apply(x, w, None, bw, bb, None, None, None, None,
                                               resfuse.OpConfig(backend=backend))
    assert gradcheck(f, (x, w, bw, bb), eps=1e-6, atol=1e-6, fast_mode=_fast(backend))

    def g(x, bw, bb, w):
        return resfuse.BNActConvFunction.apply(x, bw, bb, None, None, None, w, None, None,
                                               resfuse.OpConfig(activation="gelu", backend=backend))
    assert gradcheck(g, (x[:, :3], bw[:3].detach().requires_grad_(),
                         bb[:3].detach().requires_grad_(), w.detach()[:, :3].requires_grad_()),
                     eps=1e-6, atol=1e-6, fast_mode=_fast(backend))


def test_partial_requires_grad():
    """Only some inputs need gradients (frozen conv, frozen BN, input without grad)."""
    x = torch.randn(2, 3, 4, 4, dtype=D)
    w = torch.randn(4, 3, 3, 3, dtype=D)
    bw, bb, rm, rv = _bn(4)
    bw.requires_grad_(False)
    r = torch.randn(2, 4, 4, 4, dtype=D, requires_grad=True)
    y = RF.conv_bn_act(x, w, None, bw, bb, rm, rv, training=True, residual=r, padding=1)
    y.sum().backward()
    assert bb.grad is not None and r.grad is not None and bw.grad is None


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("form", ["post-train", "bn_act-eval", "pre-train"])
@pytest.mark.parametrize("act", ["relu6", "hardswish", "hardsigmoid", "mish"])
def test_more_activations(act, form, backend):
    """The activations added for the mobile / timm models, with BN's weight scaled up so the
    pre-activations spread past their kinks (-3, 0, 3, 6)."""
    form, mode = form.split("-")
    training = mode == "train"
    bw, bb, rm, rv = _bn(4)
    bw = (bw * 4).detach().requires_grad_()
    if form == "post":
        x = torch.randn(2, 3, 3, 3, dtype=D, requires_grad=True)
        w = torch.randn(4, 3, 2, 2, dtype=D, requires_grad=True)
        r = torch.randn(2, 4, 2, 2, dtype=D, requires_grad=True)

        def f(x, w, bw, bb, r):
            return RF.conv_bn_act(x, w, None, bw, bb, _fresh(rm), _fresh(rv), training=training,
                                  activation=act, residual=r, backend=backend)
        args = (x, w, bw, bb, r)
    elif form == "bn_act":
        x = torch.randn(3, 4, 3, 3, dtype=D, requires_grad=True)
        r = torch.randn(3, 4, 3, 3, dtype=D, requires_grad=True)

        def f(x, bw, bb, r):
            return RF.bn_act(x, bw, bb, _fresh(rm), _fresh(rv), training=training,
                             activation=act, residual=r, backend=backend)
        args = (x, bw, bb, r)
    else:
        x = torch.randn(2, 4, 3, 3, dtype=D, requires_grad=True)
        w = torch.randn(3, 4, 2, 2, dtype=D, requires_grad=True)

        def f(x, bw, bb, w):
            return RF.bn_act_conv(x, bw, bb, _fresh(rm), _fresh(rv), w, None, training=training,
                                  activation=act, backend=backend)
        args = (x, bw, bb, w)
    assert gradcheck(f, args, eps=1e-6, atol=1e-6, fast_mode=_fast(backend))
