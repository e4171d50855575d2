"""Parity of the fused functions with the module chain: outputs, every gradient, BN buffers.

Run through the CPU backends: `eager` (the CPU path: the differentiable chain with gradients,
folded BN in inference), `eager-function` (the eager backend through the custom autograd
Function and its pieces on aten's BN kernels), `pieces` (the written-out reference pieces the
kernel backends replace) and `triton` (its kernels; on the CPU in Triton's interpreter).
"""
import pytest
import torch

import resfuse
from harness import OpCase, backend_variant, check

# `triton` where it runs: on a GPU, or here under TRITON_INTERPRET=1 (tests/conftest.py).
BACKENDS = ["eager", "eager-function", "pieces"] + (
    ["triton"] if resfuse.backends()["triton"] == "ok" else [])
DTYPES = [torch.float64, torch.float32]

CONV_CASES = {
    "3x3": dict(),
    "3x3-s2": dict(stride=2),
    "1x1": dict(kernel=(1, 1), padding=0),
    "1x1-s2-bias": dict(kernel=(1, 1), padding=0, stride=2, bias=True),
    "same-dil2": dict(padding="same", dilation=2),
    "same-even-kernel": dict(kernel=(2, 4), padding="same"),  # asymmetric "same"
    "valid": dict(padding="valid"),
    "grouped": dict(c_in=8, c_out=8, groups=4),  # ResNeXt's grouped 3x3
    "depthwise-s2": dict(c_in=6, c_out=6, groups=6, stride=2),
    "pairs": dict(kernel=(5, 3), stride=(2, 1), padding=(2, 0), dilation=(1, 2)),
    "7x7-stem": dict(c_in=3, c_out=4, kernel=(7, 7), stride=2, padding=3, hw=(12, 12), bias=True),
}

BN_MODES = {
    "train": dict(),
    "train-momentum-none": dict(momentum=None),
    "train-momentum-0.3-eps-1e-3": dict(momentum=0.3, eps=1e-3),
    "train-no-affine": dict(affine=False),
    "train-no-running-stats": dict(track=False),
    "eval": dict(training=False),
    "eval-no-affine": dict(training=False, affine=False),
    "eval-no-running-stats": dict(training=False, track=False),  # batch statistics in eval
}

ACTIVATIONS = {
    "identity": dict(activation="identity"),
    "relu": dict(activation="relu"),
    "leaky_relu": dict(activation="leaky_relu", negative_slope=0.2),
    "silu": dict(activation="silu"),
    "gelu": dict(activation="gelu"),
    "gelu_tanh": dict(activation="gelu_tanh"),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("conv", CONV_CASES, ids=str)
def test_conv_settings(conv, training, dtype, backend):
    check(OpCase(training=training, **CONV_CASES[conv]), backend, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("residual", [True, False], ids=["residual", "no-residual"])
@pytest.mark.parametrize("mode", BN_MODES, ids=str)
def test_bn_modes(mode, residual, dtype, backend):
    check(OpCase(residual=residual, **BN_MODES[mode]), backend, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("residual", [True, False], ids=["residual", "no-residual"])
@pytest.mark.parametrize("act", ACTIVATIONS, ids=str)
def test_activations(act, residual, training, dtype, backend):
    check(OpCase(residual=residual, training=training, **ACTIVATIONS[act]), backend, dtype)


# The activations added for the mobile / timm models (MobileNetV3, EfficientNet-lite,
# YOLO-style mish): one grid over the three forms, BN's weight scaled up so the
# pre-activations spread past their kinks (-3, 0, 3, 6).
MORE_ACTIVATIONS = {"relu6": dict(activation="relu6"), "hardswish": dict(activation="hardswish"),
                    "hardsigmoid": dict(activation="hardsigmoid"), "mish": dict(activation="mish")}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("form", ["post-train", "post-eval", "pre-train", "bn_act-train"])
@pytest.mark.parametrize("act", MORE_ACTIVATIONS, ids=str)
def test_more_activations(act, form, backend):
    form, mode = form.split("-")
    case = OpCase(form=form, c_in=6, training=mode == "train", **MORE_ACTIVATIONS[act])
    case.bn_weight = case.bn_weight * 4
    for dtype in DTYPES:
        check(case, backend, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "strided"])
def test_layouts(layout, training, backend):
    y = check(OpCase(training=training), backend, torch.float32, layout)
    if layout == "channels_last":  # the output keeps the input's memory format, as eager does
        assert y.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mode", BN_MODES, ids=str)
@pytest.mark.parametrize("act", ["relu", "silu", "identity"])
def test_bn_act(act, mode, dtype, backend):
    check(OpCase(form="bn_act", activation=act, **BN_MODES[mode]), backend, dtype)


PREACT_CONVS = ["3x3", "3x3-s2", "1x1-s2-bias", "grouped", "same-even-kernel"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mode", ["train", "train-momentum-none", "train-no-affine", "eval",
                                  "eval-no-running-stats"])
@pytest.mark.parametrize("conv", PREACT_CONVS)
def test_preact_conv_and_bn(conv, mode, dtype, backend):
    kw = dict(CONV_CASES[conv])
    if "c_in" not in kw:
        kw["c_in"] = 6
    check(OpCase(form="pre", **kw, **BN_MODES[mode]), backend, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("residual", [True, False], ids=["residual", "no-residual"])
@pytest.mark.parametrize("act", ACTIVATIONS, ids=str)
def test_preact_activations(act, residual, backend):
    check(OpCase(form="pre", c_in=6, residual=residual, **ACTIVATIONS[act]), backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch_matches_module_chain(backend):
    """An empty batch gives an empty output; like nn.BatchNorm2d, the running statistics stay
    as they were and num_batches_tracked still counts the call."""
    check(OpCase(n=0), backend)
    check(OpCase(n=0, form="pre", c_in=6), backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("form", ["post", "pre", "bn_act"])
def test_deterministic(form, backend):
    """Two runs on the same input give the same bits (output, gradients, buffers)."""
    case = OpCase(form=form, c_in=6, hw=(9, 9))
    with backend_variant(backend) as name:
        a = case.run("fused", torch.float32, backend=name)
        b = case.run("fused", torch.float32, backend=name)
    assert torch.equal(a[0], b[0])
    for k in a[1]:
        assert torch.equal(a[1][k], b[1][k]), k
    for k in a[2]:
        assert torch.equal(a[2][k], b[2][k]), k


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_and_inf_propagate_as_in_eager(backend):
    case = OpCase(training=False, activation="relu")
    case.x[0, 0, 0, 0] = float("nan")
    case.x[1, 1, 2, 2] = float("inf")
    with backend_variant(backend) as name:
        y, grads, _ = case.run("fused", torch.float64, backend=name)
    yr, gr, _ = case.run("ref", torch.float64)
    assert torch.equal(torch.isnan(y), torch.isnan(yr))
    assert torch.equal(torch.isinf(y), torch.isinf(yr))
    fin = torch.isfinite(yr)
    assert torch.allclose(y[fin], yr[fin], atol=1e-10)
    for k in gr:
        assert torch.equal(torch.isnan(grads[k]), torch.isnan(gr[k])), k


@pytest.mark.parametrize("backend", [b for b in BACKENDS  # (the interpreter: fp32, fp64)
                                     if b != "triton" or torch.cuda.is_available()])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("act", ["relu", "silu"])
@pytest.mark.parametrize("form", ["post", "pre", "bn_act"])
def test_bfloat16(form, act, training, backend):
    """bf16 on the CPU by the honest-tolerance rule (BN statistics and math in fp32)."""
    check(OpCase(form=form, c_in=6, activation=act, training=training, hw=(8, 8)), backend,
          torch.bfloat16)
