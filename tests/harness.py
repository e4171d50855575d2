"""One fused-op call and its module-chain reference on the same random inputs.

`OpCase` holds float64 master copies of every input; `run(impl, dtype, layout)` casts them,
calls either the fused function or `resfuse.reference`, back-propagates a fixed random
upstream gradient and returns the output, every input gradient and the BN buffers after the
call. `check(case, backend, dtype, layout)` compares the fused op with the reference: float64
to 1e-10, lower precisions by the honest-tolerance rule; buffers likewise.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
from typing import Optional

import torch
import torch.nn.functional as F

import resfuse.functional as RF
from resfuse import backend as dispatch
from resfuse import reference
import resfuse
from conftest import FLOOR, assert_exactish, assert_honest, randomize_bn, to_layout

GRAD_NAMES = ("x", "weight", "bias", "bn_weight", "bn_bias", "residual")


@dataclasses.dataclass
class OpCase:
    form: str = "post"            # "post": act(bn(conv(x)) + r); "bn_act": no conv; "pre": conv(act(bn(x))) + r
    n: int = 2
    c_in: int = 4
    c_out: int = 6
    hw: tuple = (7, 6)
    kernel: tuple = (3, 3)
    stride: object = 1
    padding: object = 1
    dilation: object = 1
    groups: int = 1
    bias: bool = False
    training: bool = True
    momentum: Optional[float] = 0.1
    eps: float = 1e-5
    affine: bool = True
    track: bool = True
    activation: str = "relu"
    negative_slope: Optional[float] = None
    residual: bool = True
    nbt: int = 3

    def __post_init__(self):
        g = torch.Generator().manual_seed(1234)
        d = torch.float64
        c_conv_in = self.c_in
        c_bn = self.c_out if self.form != "pre" else self.c_in
        if self.form == "bn_act":
            self.c_out = self.c_in
            c_bn = self.c_in
        self.x = torch.randn(self.n, self.c_in, *self.hw, generator=g, dtype=d)
        if self.form != "bn_act":
            fan_in = c_conv_in // self.groups * self.kernel[0] * self.kernel[1]
            self.weight = torch.randn(self.c_out, c_conv_in // self.groups, *self.kernel,
                                      generator=g, dtype=d) / fan_in ** 0.5
            self.bias_t = torch.randn(self.c_out, generator=g, dtype=d) if self.bias else None
        else:
            self.weight = self.bias_t = None
        self.bn_weight = (torch.rand(c_bn, generator=g, dtype=d) + 0.5) if self.affine else None
        self.bn_bias = (torch.randn(c_bn, generator=g, dtype=d) * 0.2) if self.affine else None
        self.rm = torch.randn(c_bn, generator=g, dtype=d) * 0.2 if self.track else None
        self.rv = torch.rand(c_bn, generator=g, dtype=d) + 0.5 if self.track else None
        out = self._out_shape()
        self.res = torch.randn(out, generator=g, dtype=d) if self.residual else None
        self.grad = torch.randn(out, generator=g, dtype=d)

    def _out_shape(self):
        if self.form == "bn_act":
            return tuple(self.x.shape)
        return tuple(F.conv2d(self.x, self.weight, None, self.stride, self.padding, self.dilation,
                              self.groups).shape)

    def kwargs(self):
        kw = dict(training=self.training, momentum=self.momentum, eps=self.eps,
                  activation=self.activation)
        if self.negative_slope is not None:
            kw["activation"] = torch.nn.LeakyReLU(self.negative_slope)
        if self.form != "bn_act":
            kw.update(stride=self.stride, padding=self.padding, dilation=self.dilation,
                      groups=self.groups)
        return kw

    def run(self, impl: str, dtype: torch.dtype, layout: str = "nchw", backend: Optional[str] = None,
            device: str = "cpu"):
        def cast(t, grad=True, lay=False):
            if t is None:
                return None
            t = t.to(device=device, dtype=dtype)
            if lay:
                t = to_layout(t, layout)
            return t.detach().requires_grad_(grad)
        x, res = cast(self.x, lay=True), cast(self.res, lay=True)
        w, b = cast(self.weight), cast(self.bias_t)
        bw, bb = cast(self.bn_weight), cast(self.bn_bias)
        rm, rv = cast(self.rm, False), cast(self.rv, False)
        nbt = torch.tensor(self.nbt, device=device) if self.track else None
        kw = self.kwargs()
        kw["num_batches_tracked"] = nbt
        kw["residual"] = res
        if impl == "ref":
            if self.form == "pre":
                y = reference.bn_act_conv(x, bw, bb, rm, rv, w, b, **kw)
            else:
                y = reference.conv_bn_act(x, w, b, bw, bb, rm, rv, **kw)
        else:
            kw["backend"] = backend
            if self.form == "pre":
                y = RF.bn_act_conv(x, bw, bb, rm, rv, w, b, **kw)
            elif self.form == "bn_act":
                kw.pop("stride", None)
                y = RF.bn_act(x, bw, bb, rm, rv, **kw)
            else:
                y = RF.conv_bn_act(x, w, b, bw, bb, rm, rv, **kw)
        y.backward(self.grad.to(device=device, dtype=dtype))
        inputs = dict(zip(GRAD_NAMES, (x, w, b, bw, bb, res)))
        grads = {k: v.grad for k, v in inputs.items() if v is not None}
        return y.detach(), grads, dict(running_mean=rm, running_var=rv, num_batches_tracked=nbt)


@contextlib.contextmanager
def backend_variant(name: str):
    """'eager-function': the eager backend through `ConvBNActFunction` (its pieces on aten's
    batch-norm kernels) instead of its differentiable chain. Yields the backend name to use."""
    if name != "eager-function":
        yield name
        return
    eager = dispatch.get("eager")
    eager.autograd_chain = False
    try:
        yield "eager"
    finally:
        del eager.autograd_chain


def _cpu(t):
    return None if t is None else t.cpu()


def check(case: OpCase, backend: str, dtype: torch.dtype = torch.float64, layout: str = "nchw",
          device: str = "cpu"):
    """The fused op on `device` against the float64 reference on the CPU (and, below float64,
    the same-dtype eager chain on `device`)."""
    with backend_variant(backend) as name:
        y, grads, bufs = case.run("fused", dtype, layout, name, device)
    y, grads, bufs = _cpu(y), {k: _cpu(v) for k, v in grads.items()}, {k: _cpu(v) for k, v in bufs.items()}
    y64, g64, b64 = case.run("ref", torch.float64, "nchw")
    if dtype == torch.float64:
        assert_exactish(y, y64, 1e-10, "output")
        for k in g64:
            assert_exactish(grads[k], g64[k], 1e-10, f"grad {k}")
    else:
        yl, gl, bl = case.run("ref", dtype, layout, None, device)
        assert_honest(y, yl.cpu(), y64, "output")
        for k in g64:
            assert_honest(grads[k], gl[k].cpu(), g64[k], f"grad {k}")
    for k, v in b64.items():
        if v is None:
            assert bufs[k] is None
        elif k == "num_batches_tracked":
            assert bufs[k].item() == v.item(), f"{k}: {bufs[k].item()} != {v.item()}"
        elif dtype == torch.float64:
            assert_exactish(bufs[k], v, 1e-10, k)
        elif device == "cpu":
            assert_exactish(bufs[k], v, FLOOR[dtype] * 4, k)
        else:  # running stats stored in fp16/bf16 (or after a TF32-free GPU conv): honest rule
            assert_honest(bufs[k], bl[k].cpu(), v, k)
    return y


# ------------------------------------------------------------------ a converted ResNet-50

def _resnet50():
    try:
        import torchvision
        return torchvision.models.resnet50(num_classes=100)
    except Exception:  # noqa: BLE001 - torchvision missing or built for another torch
        from resfuse.models import resnet50
        return resnet50(num_classes=100)


def _step(model, x, t):
    model.train()
    loss = F.cross_entropy(model(x).float(), t)
    loss.backward()
    return loss.detach().double(), {n: p.grad.double() for n, p in model.named_parameters()}


def check_converted_resnet50_step(backend: str, dtype: torch.dtype, device: str, side: int = 64):
    """One training step of a converted ResNet-50 against the same eager model: in float64 to
    1e-9; in bf16 every gradient at most twice as far from the float64 step as eager bf16's is,
    plus a floor (relative L2 norms)."""
    torch.manual_seed(0)
    master = randomize_bn(_resnet50()).to(device, torch.float64).to(memory_format=torch.channels_last)
    x64 = torch.randn(4, 3, side, side, device=device, dtype=torch.float64).to(memory_format=torch.channels_last)
    t = torch.randint(0, 100, (4,), device=device)
    step64 = copy.deepcopy(master)
    loss64, g64 = _step(step64, x64, t)
    plain = copy.deepcopy(master).to(dtype)
    fused = copy.deepcopy(plain)
    report = resfuse.convert(fused, backend=backend)
    assert len(report.swapped) == 16, report
    x = x64.to(dtype)
    loss_e, g_e = _step(plain, x, t)
    loss_f, g_f = _step(fused, x, t)
    if dtype == torch.float64:
        assert abs(loss_f.item() - loss64.item()) < 1e-9
        for name, g in g64.items():
            assert (g_f[name] - g).abs().max().item() <= 1e-8 * max(1.0, g.abs().max().item()), name
        for (name, b), c in zip(plain.named_buffers(), fused.buffers()):
            assert torch.allclose(b.double(), c.double(), rtol=0, atol=1e-9), name
        return
    floor = 2e-2
    assert abs(loss_f - loss64) <= 2 * abs(loss_e - loss64) + floor * max(1.0, abs(loss64.item()))
    for name, g in g64.items():
        norm = g.norm().clamp_min(1e-30)
        err_f = ((g_f[name] - g).norm() / norm).item()
        err_e = ((g_e[name] - g).norm() / norm).item()
        assert err_f <= 2 * err_e + floor, f"{name}: fused {err_f:.3e} vs eager {err_e:.3e} from float64"
    b64 = dict(step64.named_buffers())  # the float64 step's running statistics
    for (name, b_e), b_f in zip(plain.named_buffers(), fused.buffers()):
        if not b_e.is_floating_point():
            assert torch.equal(b_e, b_f), name
            continue
        ref = b64[name].double()
        norm = ref.norm().clamp_min(1e-30)
        err_f = ((b_f.double() - ref).norm() / norm).item()
        err_e = ((b_e.double() - ref).norm() / norm).item()
        assert err_f <= 2 * err_e + floor, f"{name}: fused {err_f:.3e} vs eager {err_e:.3e} from float64"
