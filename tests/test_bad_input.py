"""Bad input: a clear error naming the argument, raised before anything is written."""
import pytest
import torch
import torch.nn as nn

import resfuse
import resfuse.functional as RF
from resfuse import ResfuseInputError


def _args(**over):
    a = dict(x=torch.randn(2, 4, 6, 6), weight=torch.randn(8, 4, 3, 3), bias=None,
             bn_weight=torch.rand(8) + 0.5, bn_bias=torch.randn(8), running_mean=torch.randn(8),
             running_var=torch.rand(8) + 0.5, num_batches_tracked=torch.tensor(5),
             residual=torch.randn(2, 8, 6, 6), padding=1, training=True)
    a.update(over)
    return a


def _call(a):
    a = dict(a)
    x, w, b = a.pop("x"), a.pop("weight"), a.pop("bias")
    bw, bb, rm, rv = (a.pop(k) for k in ("bn_weight", "bn_bias", "running_mean", "running_var"))
    return RF.conv_bn_act(x, w, b, bw, bb, rm, rv, **a)


BAD = {
    "x-5d": (dict(x=torch.randn(2, 4, 6, 6, 1)), "x: expected a 4-D"),
    "x-3d-weight-4d": (dict(x=torch.randn(2, 4, 6)), "weight: expected a 3-D"),  # a 1-D call
    "x-int": (dict(x=torch.ones(2, 4, 6, 6, dtype=torch.int64)), "x: expected a floating"),
    "x-not-tensor": (dict(x=[[1.0]]), "x: expected a Tensor"),
    "weight-dtype": (dict(weight=torch.randn(8, 4, 3, 3, dtype=torch.float64)), "weight: expected dtype"),
    "weight-channels": (dict(weight=torch.randn(8, 3, 3, 3)), "weight: expected shape"),
    "weight-3d": (dict(weight=torch.randn(8, 4, 3)), "weight: expected a 4-D"),
    "weight-not-tensor": (dict(weight="w"), "weight: expected a Tensor"),
    "groups-not-dividing": (dict(groups=3, weight=torch.randn(8, 1, 3, 3)), "groups: 3 must divide"),
    "groups-zero": (dict(groups=0), "groups: expected a positive int"),
    "bias-shape": (dict(bias=torch.randn(7)), "bias: expected shape"),
    "bn-weight-shape": (dict(bn_weight=torch.randn(4)), r"bn_weight: expected shape \(8,\)"),
    "running-var-shape": (dict(running_var=torch.rand(9)), "running_var: expected shape"),
    "running-mean-only": (dict(running_var=None), "running_mean and running_var"),
    "residual-shape": (dict(residual=torch.randn(2, 8, 3, 3)), r"residual: expected shape \(2, 8, 6, 6\)"),
    "residual-dtype": (dict(residual=torch.randn(2, 8, 6, 6, dtype=torch.float64)), "residual: expected dtype"),
    "stride-zero": (dict(stride=0), "stride: expected values >= 1"),
    "padding-negative": (dict(padding=-1), "padding: expected values >= 0"),
    "padding-bad-string": (dict(padding="full"), "padding: expected"),
    "same-with-stride": (dict(padding="same", stride=2), "padding='same'"),
    "dilation-tuple3": (dict(dilation=(1, 1, 1)), "dilation: expected an int or a pair"),
    "too-small": (dict(x=torch.randn(2, 4, 1, 1), padding=0, residual=None), "too small"),
    "eps-negative": (dict(eps=-1.0), "eps: expected a non-negative"),
    "momentum-str": (dict(momentum="0.1"), "momentum: expected a float or None"),
    "nbt-shape": (dict(num_batches_tracked=torch.zeros(2)), "num_batches_tracked"),
    "activation-name": (dict(activation="tanhh"), "activation: expected one of"),
    "bias-without-weight": (dict(weight=None, bias=torch.randn(4)), "bias: a conv bias needs"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_argument_is_named_and_nothing_is_written(case):
    over, msg = BAD[case]
    a = _args(**over)
    rm, rv, nbt = (a[k].clone() if isinstance(a[k], torch.Tensor) else a[k]
                   for k in ("running_mean", "running_var", "num_batches_tracked"))
    with pytest.raises((ResfuseInputError, TypeError, ValueError), match=msg):
        _call(a)
    for before, k in ((rm, "running_mean"), (rv, "running_var"), (nbt, "num_batches_tracked")):
        if isinstance(before, torch.Tensor) and isinstance(a[k], torch.Tensor) and a[k].shape == before.shape:
            assert torch.equal(a[k], before), f"{k} was modified by a failing call"


def test_error_is_both_value_and_type_error():
    with pytest.raises(ValueError):
        _call(_args(x=torch.randn(4, 6, 6)))
    with pytest.raises(TypeError):
        _call(_args(x=torch.randn(4, 6, 6)))


def test_unsupported_activation_module():
    with pytest.raises(TypeError, match="cannot fuse a Tanh"):
        _call(_args(activation=nn.Tanh()))


def test_one_value_per_channel_in_training_is_batchnorms_error():
    """Same type and text as nn.BatchNorm2d, and the buffers are left alone."""
    bn = nn.BatchNorm2d(8)
    x = torch.randn(1, 8, 1, 1)
    with pytest.raises(ValueError) as eager_err:
        bn(x)
    rm = torch.zeros(8)
    with pytest.raises(ValueError) as ours:
        RF.bn_act(x, None, None, rm, torch.ones(8), training=True)
    assert str(ours.value) == str(eager_err.value)
    assert torch.equal(rm, torch.zeros(8))
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        RF.conv_bn_act(torch.randn(1, 3, 3, 3), torch.randn(8, 3, 3, 3), training=True)
    # eval mode with running statistics is fine with one value per channel
    RF.bn_act(x, None, None, torch.zeros(8), torch.ones(8), training=False)


def test_preact_bad_input():
    x = torch.randn(2, 4, 6, 6)
    with pytest.raises(ResfuseInputError, match=r"bn_weight: expected shape \(4,\)"):
        RF.bn_act_conv(x, torch.ones(8), None, None, None, torch.randn(8, 4, 3, 3), training=True)
    with pytest.raises(ResfuseInputError, match="residual: expected shape"):
        RF.bn_act_conv(x, None, None, None, None, torch.randn(8, 4, 3, 3), residual=torch.randn(2, 8, 6, 6))


def test_device_mismatch_is_named():
    """A tensor on another device (meta stands in for a GPU here) is refused by name."""
    with pytest.raises(ResfuseInputError, match="weight: expected a tensor on cpu"):
        _call(_args(weight=torch.randn(8, 4, 3, 3, device="meta")))
    with pytest.raises(ResfuseInputError, match="running_mean: expected a tensor on cpu"):
        _call(_args(running_mean=torch.randn(8, device="meta")))


def test_non_contiguous_and_odd_strides_are_handled():
    x = torch.randn(2, 6, 8, 8)[:, ::2, 1:7, ::1]  # channel-strided, offset view
    w = torch.randn(12, 3, 3, 3).transpose(0, 0)[::2]  # every other output channel
    assert not x.is_contiguous() and not w.is_contiguous()
    y = RF.conv_bn_act(x, w, None, None, None, None, None, training=True, padding=1)
    ref = resfuse.reference.conv_bn_act(x.contiguous(), w.contiguous(), None, None, None, None,
                                        None, training=True, padding=1)
    assert torch.allclose(y, ref, atol=1e-5)


def test_forced_unavailable_backend_raises_clearly():
    missing = [b for b in ("cuda", "triton") if resfuse.backends()[b] != "ok"]
    for name in missing:
        with pytest.raises(resfuse.BackendUnavailable, match=name):
            _call(_args(backend=name))
    if resfuse.backends()["triton"] == "ok" and not torch.cuda.is_available():
        with pytest.raises(resfuse.BackendUnavailable, match="float32 and float64"):
            _call({k: (v.bfloat16() if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
                   for k, v in _args(backend="triton").items()})
    with pytest.raises(ValueError, match="backend: expected one of"):
        _call(_args(backend="tpu"))


def test_module_level_errors():
    with pytest.raises(ResfuseInputError, match="bn: expected num_features=8"):
        resfuse.FusedConvBNAct.from_modules(nn.Conv2d(4, 8, 3), nn.BatchNorm2d(6))
    with pytest.raises(ResfuseInputError, match="expected an nn.BatchNorm2d"):
        resfuse.FusedResidualBlock(8, 8, norm_layer=lambda c: nn.GroupNorm(2, c))
