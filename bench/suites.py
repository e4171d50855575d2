"""What bench/ measures: the cases of each suite and their contestants.

A case is one thing measured in one mode (a conv-bn-act shape in training forward, a ResNet-50
block's training step, ResNet-18 in eval, ...) with its shapes and its byte and FLOP counts
(`counts.py`). `Case.build(settings)` makes its inputs and one zero-argument callable per
contestant, and checks each contestant against eager on the same inputs before anything is
timed: `rel_err` is the norm-wise relative error against eager in the run's dtype, the largest
over outputs, running statistics and gradients; `rel_err_fp64` the same against eager in
float64, judged tensor by tensor by the tolerance rule (docs/design.md: at most twice eager's own error plus a
floor) for ops and blocks; models are judged on the logits (and in training the running
statistics and the loss) against eager; the CUDA-graph step is checked the same way.

Contestants, all from the same run:
- `eager`: the unfused chain — `resfuse.reference` (the project's oracle) for ops and blocks,
  torchvision's model (or `resfuse.models`' torchvision-compatible one) for models;
- `torch.compile` and `torch.compile(max-autotune)`: eager under torch.compile;
- `resfuse[<backend>]`: resfuse with that backend forced (`auto`: resfuse's own choice);
- models only: `resfuse[auto]+compile` (the converted model under torch.compile), on a GPU
  `resfuse[auto]+cuda-graph` (the converted training step replayed from one CUDA graph), and
  `torch.compile(freezing)` (eval only: eager under torch.compile with inductor's freezing,
  `torch._inductor.config.freezing = True` around that contestant's calls alone: weights
  become constants, BN is folded and conv weights are prepacked for oneDNN on a CPU).

Suites: `ops` (conv-bn-act on ResNet-50's conv shapes in eval, training forward and training
forward + backward; scale-bias-add-act forward, backward and eval at each stage's output shape),
`blocks` (every distinct block of ResNet-18 and ResNet-50: training forward, training step and eval;
and lone chains, `chain_case`: training step and eval), `models`
(converted ResNet-18 and ResNet-50: training step — forward, backward, SGD step — and eval),
`quick` (a few of each: the default, about 2 min on 2 CPU cores), `all`. On a CPU the models
suite also measures the Python overhead per fused conv call (`overhead_case`).
"""
from __future__ import annotations

import copy
import dataclasses
import time
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn as nn

import resfuse
import resfuse.functional as RF
from resfuse import reference

import counts
from counts import BlockShape, Chain, Conv

SUITES = ("quick", "ops", "blocks", "models", "all", "memory")
EAGER, COMPILE, AUTOTUNE = "eager", "torch.compile", "torch.compile(max-autotune)"
FREEZING = "torch.compile(freezing)"
BARE_ONEDNN = "oneDNN calls (bare)"
MODELS = ("resnet18", "resnet50", "mobilenet_v2", "densenet121")
# Models: the largest norm-wise relative error against eager in the same dtype of the logits
# (and in training the running statistics and the loss); fp32 on a GPU convolves in TF32.
MODEL_LIMIT = {torch.float64: 1e-10, torch.float32: 5e-3, torch.float16: 2e-2,
               torch.bfloat16: 5e-2}


@dataclasses.dataclass
class Settings:
    device: torch.device
    dtype: torch.dtype
    layout: str  # "channels_last" or "nchw"
    batch: int
    image: int
    contestants: List[str]
    repeats: int
    warmup: int

    @property
    def memory_format(self):
        return torch.channels_last if self.layout == "channels_last" else torch.contiguous_format

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).replace("torch.", "")

    def randn(self, *shape) -> torch.Tensor:
        """A random 4-D tensor in the run's dtype and layout."""
        t = torch.randn(*shape, device=self.device, dtype=self.dtype)
        return t.contiguous(memory_format=self.memory_format)


@dataclasses.dataclass
class Built:
    fns: Dict[str, Callable[[], object]]
    checks: Dict[str, dict]  # per contestant: rel_err, rel_err_fp64, parity_ok (see judge)
    source: Optional[str] = None  # models: where the model definition came from
    # Tensors that are parameters of the case though not nn.Parameters (the op cases'
    # weights): left out of the bytes saved for backward (measure.saved_for_backward).
    params: Optional[list] = None


@dataclasses.dataclass
class Case:
    suite: str
    name: str
    mode: str  # counts.MODES
    shapes: Dict[str, list]
    images: int  # images per call, for img/s
    build: Callable[[Settings], Built]
    chain: Optional[Chain] = None
    flops: Optional[int] = None
    nbytes: Optional[int] = None
    nbytes_eager: Optional[int] = None
    fused_calls: Optional[int] = None  # fused conv calls per timed call (the overhead case)
    clock: Optional[Callable[[], float]] = None  # CPU: timed by this clock, not perf_counter
    min_repeats: int = 0  # timed at least this many times, whatever --repeats asks


# -- helpers -------------------------------------------------------------------------------------
def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| (2-norms, in float64). Norm-wise rather than elementwise: where a
    ReLU's input is within rounding of 0, two correct computations may take different sides,
    and that one element's gradient (and what a conv spreads it to) then differs by its whole
    size. (Observed: fp32 eager against fp64 eager, ResNet-50 bottleneck on the CPU.)"""
    b64 = b.detach().double()
    return ((a.detach().double() - b64).norm() / b64.norm().clamp_min(1e-300)).item()


def max_rel_err(got, want) -> float:
    """The largest `rel_err` over outputs (and running statistics and gradients)."""
    got = got if isinstance(got, (list, tuple)) else [got]
    want = want if isinstance(want, (list, tuple)) else [want]
    return max(rel_err(g, w) for g, w in zip(got, want) if w is not None)


# The tolerance rule (docs/design.md): a contestant's error against the float64 eager
# result may be at most twice eager's own error in the run's dtype, plus this floor.
FLOOR = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}


def judge(results: Dict[str, list], oracle: list, dtype: torch.dtype) -> Dict[str, dict]:
    """{contestant: {rel_err (against eager in the run's dtype), rel_err_fp64 (against the
    float64 eager result), parity_ok}} from each contestant's tensors (outputs, running
    statistics, gradients) on the same inputs. The rule holds tensor by tensor: each tensor's
    error against float64 is bounded by eager's error on that same tensor (a small output error
    is not excused by a large gradient error elsewhere); the largest is recorded."""
    base = [rel_err(e, o) for e, o in zip(results[EAGER], oracle)]
    out = {}
    for name, got in results.items():
        errs = [rel_err(g, o) for g, o in zip(got, oracle)]
        ok = all(e <= 2 * b + FLOOR[dtype] for e, b in zip(errs, base))
        out[name] = dict(rel_err=None if name == EAGER else max_rel_err(got, results[EAGER]),
                         rel_err_fp64=max(errs), parity_ok=None if name == EAGER else bool(ok))
    return out


def resfuse_backend(name: str) -> Optional[str]:
    """'resfuse[cuda]' -> 'cuda'; None for a contestant that is not resfuse's."""
    if name.startswith("resfuse[") and "]" in name:
        return name[len("resfuse["):name.index("]")]
    return None


def own_contestants(s: Settings) -> List[str]:
    """The contestants of an op or block case: the models suite's "+compile" and
    "+cuda-graph" variants and freezing are whole-model ones."""
    return [c for c in s.contestants if "+" not in c and c != FREEZING]


def compile_mode(name: str) -> Optional[str]:
    return {COMPILE: "default", AUTOTUNE: "max-autotune", FREEZING: "default"}.get(name)


class FrozenCompiled(nn.Module):
    """`model` under torch.compile with inductor's freezing (inference only: call under
    torch.no_grad()). Freezing is a compile option of this contestant's own, and is also set
    around its calls (inductor reads it at run time too: without, the frozen graph ran
    slower on ResNet-18 in development). The option matters: dynamo shares compiled code between
    torch.compile calls whose backends compare equal, so a freezing contestant compiled as
    mode="default" ran the graph the plain torch.compile contestant of the same model class
    had already compiled, unfrozen (bench runs before 2026-12-04 with both contestants)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.compiled = torch.compile(model, options={"freezing": True}, dynamic=False)

    def forward(self, x):
        import torch._inductor.config as inductor_config
        with inductor_config.patch(freezing=True):  # (also read outside the compile)
            return self.compiled(x)


def compiled(fn, mode: str):
    return torch.compile(fn, mode=mode, dynamic=False)


def stage_sides(image: int) -> List[int]:
    """Feature-map side at each ResNet stage for an image side (stem /4, then /2 per stage)."""
    hw = [-(-image // 4)]
    for _ in range(3):
        hw.append((hw[-1] - 1) // 2 + 1)
    return hw


def _bn_state(s: Settings, c: int):
    g = torch.Generator().manual_seed(c)
    w = (torch.rand(c, generator=g) * 0.5 + 0.75).to(s.device, s.dtype)
    b = (torch.randn(c, generator=g) * 0.1).to(s.device, s.dtype)
    rm = (torch.randn(c, generator=g) * 0.1).to(s.device, s.dtype)
    rv = (torch.rand(c, generator=g) * 0.5 + 0.75).to(s.device, s.dtype)
    return w, b, rm, rv


# -- ops -----------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class ConvOp:
    label: str
    conv: Conv
    stage: int  # its input's ResNet-50 stage (feature-map side)
    residual: bool


def conv_ops() -> List[ConvOp]:
    """ResNet-50 convolutions (each with its BN and ReLU): every kind of layer it has."""
    return [ConvOp("layer1 conv1", Conv(256, 64, 1), 0, False),
            ConvOp("layer1 conv2", Conv(64, 64, 3), 0, False),
            ConvOp("layer1 conv3 + residual", Conv(64, 256, 1), 0, True),
            ConvOp("layer2.0 conv2 (stride 2)", Conv(128, 128, 3, 2), 0, False),
            ConvOp("layer3 conv2", Conv(256, 256, 3), 2, False),
            ConvOp("layer4 conv3 + residual", Conv(512, 2048, 1), 3, True)]


def conv_op_case(op: ConvOp, mode: str, s: Settings) -> Case:
    n, hw = s.batch, stage_sides(s.image)[op.stage]
    conv = op.conv
    chain = Chain((conv,), "external" if op.residual else "none", n, conv.cin, hw, hw,
                  s.dtype.itemsize)
    out = chain.out_shape()

    def build(s: Settings) -> Built:
        w = (s.randn(conv.cout, conv.cin // conv.groups, conv.k, conv.k) * (conv.cin * conv.k**2) ** -0.5)
        bn_w, bn_b, rm0, rv0 = _bn_state(s, conv.cout)
        train = mode != "eval"
        copies = _rotate(s, chain)
        xs = [s.randn(n, conv.cin, hw, hw) for _ in range(copies)]
        rs = [s.randn(*out) if op.residual else None for _ in range(copies)]
        gys = [s.randn(*out) for _ in range(copies)]
        kw = dict(stride=conv.stride, padding=conv.pad, dilation=conv.dilation, groups=conv.groups)

        def eager(x, rm, rv, r, p):
            return reference.conv_bn_act(x, p[0], None, p[1], p[2], rm, rv, training=train,
                                         residual=r, **kw)

        def impl(name):
            be = resfuse_backend(name)
            if be is not None:
                be = None if be == "auto" else be
                return lambda x, rm, rv, r, p: RF.conv_bn_act(x, p[0], None, p[1], p[2], rm, rv,
                                                               training=train, residual=r,
                                                               backend=be, **kw)
            return eager if name == EAGER else compiled(eager, compile_mode(name))

        return _op_built(s, mode, impl, eager, [w, bn_w, bn_b], xs, rs, gys, rm0, rv0)

    return Case("ops", f"conv-bn-act {op.label}: {conv.describe()} @{hw}", mode,
                dict(x=[n, conv.cin, hw, hw], weight=[conv.cout, conv.cin // conv.groups, conv.k,
                                                       conv.k], y=list(out),
                     stride=conv.stride, residual=op.residual),
                n, build, chain)


def bn_act_case(stage: int, mode: str, s: Settings) -> Case:
    c = (256, 512, 1024, 2048)[stage]
    n, hw = s.batch, stage_sides(s.image)[stage]
    chain = Chain((), "external", n, c, hw, hw, s.dtype.itemsize)

    def build(s: Settings) -> Built:
        bn_w, bn_b, rm0, rv0 = _bn_state(s, c)
        train = mode != "eval"
        copies = _rotate(s, chain)
        xs = [s.randn(n, c, hw, hw) for _ in range(copies)]
        rs = [s.randn(n, c, hw, hw) for _ in range(copies)]
        gys = [s.randn(n, c, hw, hw) for _ in range(copies)]

        def eager(x, rm, rv, r, p):
            return reference.conv_bn_act(x, None, None, p[0], p[1], rm, rv, training=train,
                                         residual=r)

        def impl(name):
            be = resfuse_backend(name)
            if be is not None:
                be = None if be == "auto" else be
                return lambda x, rm, rv, r, p: RF.bn_act(x, p[0], p[1], rm, rv, training=train,
                                                         residual=r, backend=be)
            return eager if name == EAGER else compiled(eager, compile_mode(name))

        return _op_built(s, mode, impl, eager, [bn_w, bn_b], xs, rs, gys, rm0, rv0)

    return Case("ops", f"scale-bias-add-relu {c} @{hw}", mode,
                dict(x=[n, c, hw, hw], residual=[n, c, hw, hw]), n, build, chain)


def _rotate(s: Settings, chain: Chain) -> int:
    from measure import rotation
    t = chain.tensor_bytes()
    per_call = t["x"] + t["y"] + (t["r"] if chain.shortcut == "external" else 0)
    return rotation(per_call, s.device)


def _op_built(s: Settings, mode: str, impl, eager, params, xs, rs, gys, rm0, rv0) -> Built:
    """Contestants' callables of an op case, and their check on copy 0 of the inputs against
    eager and against eager in float64. `impl(name)` and `eager` take (x, running_mean,
    running_var, residual, params)."""
    k = len(xs)
    train = mode != "eval"
    if train:
        for t in params + xs + [r for r in rs if r is not None]:
            t.requires_grad_(True)

    def wrt(i, p):
        return [xs[i], *p] + ([rs[i]] if rs[i] is not None else [])

    def make(f) -> Callable[[], object]:
        rm, rv = rm0.clone(), rv0.clone()  # each contestant updates its own running stats
        counter = [0]  # and cycles through all k input copies itself
        if mode == "eval":
            def run():
                counter[0] += 1
                i = counter[0] % k
                with torch.no_grad():
                    return f(xs[i], rm, rv, rs[i], params)
        elif mode == "train_fwd":
            def run():
                counter[0] += 1
                i = counter[0] % k
                return f(xs[i], rm, rv, rs[i], params)
        elif mode == "train_step":
            def run():
                counter[0] += 1
                i = counter[0] % k
                return torch.autograd.grad(f(xs[i], rm, rv, rs[i], params), wrt(i, params), gys[i])
        else:  # train_bwd: backward alone, through k graphs kept from k forwards
            ys = [f(xs[i], rm, rv, rs[i], params) for i in range(k)]

            def run():
                counter[0] += 1
                i = counter[0] % k
                return torch.autograd.grad(ys[i], wrt(i, params), gys[i], retain_graph=True)
        return run

    def check(f, x, r, gy, rm, rv, p):
        inputs = [x, *p] + ([r] if r is not None else [])
        if mode == "eval":
            with torch.no_grad():
                return [f(x, rm, rv, r, p)]
        y = f(x, rm, rv, r, p)
        if mode == "train_fwd":
            return [y, rm, rv]
        return [y, rm, rv, *torch.autograd.grad(y, inputs, gy)]

    def f64(t):
        return None if t is None else t.detach().double().requires_grad_(train)
    oracle = check(eager, f64(xs[0]), f64(rs[0]), gys[0].double(), rm0.double(), rv0.double(),
                   [f64(p) for p in params])
    results, fns = {}, {}
    for name in own_contestants(s):
        f = impl(name)
        results[name] = check(f, xs[0], rs[0], gys[0], rm0.clone(), rv0.clone(), params)
        fns[name] = make(f)
    return Built(fns, judge(results, oracle, s.dtype), params=list(params))


def ops_cases(s: Settings, quick: bool = False) -> List[Case]:
    out = []
    ops = conv_ops()
    if quick:
        ops = [ops[1], ops[2]]
    for op in ops:
        for mode in ("eval", "train_fwd", "train_step"):
            out.append(conv_op_case(op, mode, s))
    for stage in ((0,) if quick else range(4)):
        for mode in ("eval", "train_fwd", "train_bwd"):
            out.append(bn_act_case(stage, mode, s))
    return out


# -- blocks --------------------------------------------------------------------------------------
def _randomize_bn(model: nn.Module, seed: int = 0):
    """Running statistics and affine parameters away from their (1, 0) init, so that folding
    and normalisation are exercised."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.num_features, generator=g) * 0.5 + 0.75)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) * 0.5 + 0.75)


def _converted(model: nn.Module, backend: str) -> nn.Module:
    fused = copy.deepcopy(model)
    holder = nn.Sequential(fused)  # convert swaps children: a lone block needs a parent
    report = resfuse.convert(holder, backend=None if backend == "auto" else backend)
    if not (report.swapped or report.chains):
        raise RuntimeError(f"resfuse.convert fused nothing: {report}")
    return holder


def _module_contestants(s: Settings, plain: nn.Module, train: bool) -> Dict[str, nn.Module]:
    """{contestant: module} of a block or chain case: eager is `plain` itself, resfuse's
    contestants `plain` converted, torch.compile's `plain` compiled (copies)."""
    models = {}
    for name in own_contestants(s):
        be = resfuse_backend(name)
        if name == EAGER:
            m = plain
        elif be is not None:
            m = _converted(plain, be)
        else:
            m = compiled(copy.deepcopy(plain), compile_mode(name))
        models[name] = m.train(train)
    return models


def block_case(block: BlockShape, mode: str, s: Settings) -> Case:
    """`block` with its input side at the run's image size (`counts.resnet_blocks(model, image)`)."""
    chain = block.chain(s.batch, s.dtype.itemsize)
    n, out = s.batch, chain.out_shape()

    def build(s: Settings) -> Built:
        torch.manual_seed(0)
        plain = reference.ResidualBlock(block.inplanes, block.planes, block.stride,
                                        bottleneck=block.bottleneck)
        _randomize_bn(plain)
        plain = plain.to(s.device, s.dtype).to(memory_format=s.memory_format)
        train = mode != "eval"
        copies = _rotate(s, chain)
        xs = [s.randn(n, block.inplanes, block.hw, block.hw).requires_grad_(train)
              for _ in range(copies)]
        gys = [s.randn(*out) for _ in range(copies)]
        return _module_built(s, mode, _module_contestants(s, plain, train), plain, xs, gys)

    return Case("blocks", block.name(), mode,
                dict(x=[n, block.inplanes, block.hw, block.hw], y=list(out)), n, build, chain)


def _module_built(s: Settings, mode: str, models: Dict[str, nn.Module], plain: nn.Module,
                  xs, gys) -> Built:
    """Contestants' callables of a block case, and their check on copy 0 of the inputs against
    eager and against eager in float64 (`plain` in float64)."""
    k = len(xs)

    def make(m):
        params = [p for p in m.parameters() if p.requires_grad]
        counter = [0]  # each contestant cycles through all k input copies
        if mode == "eval":
            def run():
                counter[0] += 1
                with torch.no_grad():
                    return m(xs[counter[0] % k])
        elif mode == "train_fwd":  # what a training forward saves for backward included
            def run():
                counter[0] += 1
                return m(xs[counter[0] % k])
        else:
            def run():
                counter[0] += 1
                i = counter[0] % k
                return torch.autograd.grad(m(xs[i]), [xs[i]] + params, gys[i])
        return run

    def check(m, x, gy):
        state = copy.deepcopy(m.state_dict())
        try:
            if mode == "eval":
                with torch.no_grad():
                    return [m(x)]
            y = m(x)
            params = [p for p in m.parameters() if p.requires_grad]
            buffers = [b.detach().clone() for b in m.buffers() if b.is_floating_point()]
            if mode == "train_fwd":
                return [y.detach(), *buffers]
            return [y, *buffers, *torch.autograd.grad(y, [x] + params, gy)]
        finally:
            m.load_state_dict(state)  # the running statistics as they were

    m64 = copy.deepcopy(plain).double()
    oracle = check(m64, xs[0].detach().double().requires_grad_(mode != "eval"), gys[0].double())
    del m64
    results, fns = {}, {}
    for name, m in models.items():
        results[name] = check(m, xs[0], gys[0])
        fns[name] = make(m)
    return Built(fns, judge(results, oracle, s.dtype))


# Chains as the converter fuses them outside whole blocks: a lone conv -> BN (a ResNet
# downsample, a MobileNet projection), conv -> BN -> ReLU, and pre-activation BN -> ReLU -> conv
# (DenseNet, ResNet v2), on two ResNet-50 layer-1 convolutions at the image's quarter size.
# Part of the blocks suite; their rows are suite "chains" (auto's table reads blocks alone).
CHAIN_KINDS = ("conv-bn", "conv-bn-relu", "bn-relu-conv")
CHAIN_CONVS = ((256, 64, 1), (64, 64, 3))  # (c_in, c_out, kernel)


def chain_case(kind: str, conv: Tuple[int, int, int], mode: str, s: Settings) -> Case:
    """One chain `kind` as an nn.Sequential, converted with `resfuse.convert` (what a model's
    chains become), against the same Sequential in eager."""
    c_in, c_out, k = conv
    n, hw = s.batch, max(1, s.image // 4)

    def build(s: Settings) -> Built:
        torch.manual_seed(0)
        conv_m = nn.Conv2d(c_in, c_out, k, padding=k // 2, bias=False)
        if kind == "bn-relu-conv":
            plain = nn.Sequential(nn.BatchNorm2d(c_in), nn.ReLU(), conv_m)
        else:
            plain = nn.Sequential(conv_m, nn.BatchNorm2d(c_out),
                                  *([nn.ReLU()] if kind == "conv-bn-relu" else []))
        _randomize_bn(plain)
        plain = plain.to(s.device, s.dtype).to(memory_format=s.memory_format)
        train = mode != "eval"
        xs = [s.randn(n, c_in, hw, hw).requires_grad_(train) for _ in range(2)]
        gys = [s.randn(n, c_out, hw, hw) for _ in range(2)]
        return _module_built(s, mode, _module_contestants(s, plain, train), plain, xs, gys)

    return Case("chains", f"chain {kind} {c_in}->{c_out} {k}x{k}", mode,
                dict(x=[n, c_in, hw, hw], y=[n, c_out, hw, hw]), n, build)


def blocks_cases(s: Settings, quick: bool = False) -> List[Case]:
    out = []
    if not quick:
        out += [chain_case(kind, conv, mode, s) for kind in CHAIN_KINDS for conv in CHAIN_CONVS
                for mode in ("train_step", "eval")]
    for model in ("resnet18", "resnet50"):
        blocks = [b for b, _ in counts.resnet_blocks(model, s.image)]
        if quick:
            blocks = [blocks[2]] if model == "resnet18" else [blocks[1]]
        for b in blocks:
            for mode in ("train_fwd", "train_step", "eval"):
                out.append(block_case(b, mode, s))
    return out


# -- models --------------------------------------------------------------------------------------
# MobileNetV2's classifier dropout off: the training step's check against eager must be
# deterministic (the timed work is the same).
_MODEL_KWARGS = {"mobilenet_v2": dict(dropout=0.0)}


def build_model(name: str, num_classes: int = 1000) -> Tuple[nn.Module, str]:
    kw = dict(_MODEL_KWARGS.get(name, {}), num_classes=num_classes)
    try:
        import torchvision
        return getattr(torchvision.models, name)(**kw), "torchvision"
    except Exception:  # noqa: BLE001 - torchvision missing or built for another torch
        from resfuse import models
        return getattr(models, name)(**kw), "resfuse.models"


def _model_state(m: nn.Module) -> list:
    """The tensors a training step's check compares besides the gradients: the floating-point
    buffers (BN running statistics)."""
    return [b.detach().clone() for b in m.buffers() if b.is_floating_point()]


def graphed_train_step(model: nn.Module, inputs: list, target: torch.Tensor):
    """The training step (forward, backward, SGD step) of `model` captured in one CUDA graph,
    after warm-up steps on a side stream. Returns (replay, probe): `replay` copies the next
    input into the captured input buffer and replays the graph; `probe` puts the model back in
    its state from before the warm-up (in place: the graph keeps its addresses), replays once on
    inputs[0] and returns [logits, running statistics..., loss] for the check against eager."""
    opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    static_x = inputs[0].clone()
    start = {k: v.detach().clone() for k, v in model.state_dict().items()}
    out = {}

    def step():
        out["logits"] = model(static_x)
        out["loss"] = nn.functional.cross_entropy(out["logits"], target)
        out["loss"].backward()
        opt.step()
        opt.zero_grad(set_to_none=False)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    counter = [0]

    def replay():
        counter[0] += 1
        static_x.copy_(inputs[counter[0] % len(inputs)])
        graph.replay()

    def probe():
        with torch.no_grad():
            for k, v in model.state_dict().items():
                v.copy_(start[k])
        static_x.copy_(inputs[0])
        graph.replay()
        return [out["logits"].detach().clone(), *_model_state(model), out["loss"].detach().clone()]
    return replay, probe


def model_case(model_name: str, mode: str, s: Settings) -> Case:
    n = s.batch
    train = mode == "train_step"
    flops = nbytes = nbytes_eager = None  # counted for the ResNets only
    if model_name.startswith("resnet"):
        macs = counts.resnet_conv_macs(model_name, s.image)
        # Training: forward, weight gradients, and data gradients of all but the stem's conv.
        flops = 2 * n * (3 * macs - counts.resnet_stem_macs(s.image) if train else macs)
        # (Bytes: the blocks' only; the stem, pooling and classifier are not counted.)
        nbytes = sum(t * b.chain(n, s.dtype.itemsize).bytes(mode)
                     for b, t in counts.resnet_blocks(model_name, s.image))
        nbytes_eager = sum(t * b.chain(n, s.dtype.itemsize).bytes(mode, "eager")
                           for b, t in counts.resnet_blocks(model_name, s.image))

    def build(s: Settings) -> Built:
        torch.manual_seed(0)
        plain, source = build_model(model_name)
        _randomize_bn(plain)
        plain = plain.to(s.device, s.dtype).to(memory_format=s.memory_format)
        from measure import rotation
        xs = [s.randn(n, 3, s.image, s.image)
              for _ in range(rotation(n * 3 * s.image**2 * s.dtype.itemsize, s.device))]
        target = torch.randint(0, 1000, (n,), device=s.device)
        models, graphed = {}, {}
        for name in s.contestants:
            be = resfuse_backend(name)
            if name == EAGER:
                m = plain
            elif name == FREEZING:
                if train:
                    continue  # freezing is for inference
                m = FrozenCompiled(copy.deepcopy(plain))
            elif name.endswith("+compile"):
                m = compiled(_converted(plain, be), "default")
            elif name.endswith("+cuda-graph"):
                if train and s.device.type == "cuda":
                    graphed[name] = _converted(plain, be).train()
                continue
            elif be is not None:
                m = _converted(plain, be)
            else:
                m = compiled(copy.deepcopy(plain), compile_mode(name))
            models[name] = m.train(train)

        def make(m):
            counter = [0]  # each contestant cycles through all the input copies
            if not train:
                def run():
                    counter[0] += 1
                    with torch.no_grad():
                        return m(xs[counter[0] % len(xs)])
                return run
            opt = torch.optim.SGD(m.parameters(), lr=1e-4, momentum=0.9)

            def run():
                counter[0] += 1
                opt.zero_grad(set_to_none=True)
                nn.functional.cross_entropy(m(xs[counter[0] % len(xs)]), target).backward()
                opt.step()
            return run

        def check(m):
            """eval: [logits]; training: [logits, running statistics..., loss, gradients...]."""
            state = copy.deepcopy(m.state_dict())
            try:
                if not train:
                    with torch.no_grad():
                        return [m(xs[0])]
                m.zero_grad(set_to_none=True)
                logits = m(xs[0])
                loss = nn.functional.cross_entropy(logits, target)
                loss.backward()
                grads = [p.grad for p in m.parameters()]
                m.zero_grad(set_to_none=True)
                return [logits.detach(), *_model_state(m), loss.detach()] + grads
            finally:
                m.load_state_dict(state)

        # Whole-model checks against eager in the run's dtype (a float64 ResNet-50 at the
        # timed batch does not fit beside the contestants on a GPU). Judged, tensor by tensor
        # against MODEL_LIMIT: the logits, and in training also the running statistics after
        # the step and the loss. The gradients' error is recorded, not judged: over 16 blocks,
        # ReLUs whose inputs are within rounding of 0 decide differently in two correct
        # computations (fp32 torch.compile against fp32 eager: a few percent, norm-wise, on the
        # CPU at batch 8); the ops and blocks checks judge gradients one block at a time
        # against float64.
        results, fns = {}, {}
        for name, m in models.items():
            results[name] = check(m)
            fns[name] = make(m)
        for name, m in graphed.items():
            fns[name], probe = graphed_train_step(m, xs, target)
            results[name] = probe()
        eager = results[EAGER]
        judged_n = 1 if not train else 2 + len(_model_state(plain))
        limit = MODEL_LIMIT[s.dtype]
        checks = {EAGER: dict(rel_err=None, parity_ok=None)}
        for name, got in results.items():
            if name != EAGER:
                judged = max_rel_err(got[:judged_n], eager[:judged_n])
                checks[name] = dict(rel_err=max_rel_err(got, eager[:len(got)]),
                                    judged_rel_err=judged, parity_ok=bool(judged <= limit))
        return Built(fns, checks, source)

    return Case("models", model_name, mode, dict(x=[n, 3, s.image, s.image]), n, build, None,
                flops=flops, nbytes=nbytes, nbytes_eager=nbytes_eager)


def models_cases(s: Settings, quick: bool = False) -> List[Case]:
    out = [model_case(m, mode, s) for m in (("resnet50",) if quick else MODELS)
           for mode in ("train_step", "eval")]
    if s.device.type == "cpu" and not quick:
        out.append(overhead_case(s))
    return out


# -- Python overhead per fused call (CPU) --------------------------------------------------------
OVERHEAD_CONVS, OVERHEAD_REPS = 16, 10
# Its timed calls are short (about 5 ms), and on a shared 2-core host their median over the
# default 10 repeats moved from 4.4 to 14.9 us of overhead between runs a minute apart (the
# 2026-12-04 `...-overhead-0df8460*` files); over 60 it held within 0.3 us. 60 cost a second.
OVERHEAD_MIN_REPEATS = 60


def overhead_case(s: Settings) -> Case:
    """The Python overhead of one fused eval conv call on the CPU: a chain of 16 fused
    conv(1x1) -> BN -> ReLU modules (`FusedConvBNAct`, what `convert` puts in place), 8 channels, on a batch-1 1x1 input (oneDNN's own work is
    then near nothing), against the same 16 oneDNN calls made bare — torch's fused conv op
    (`torch.ops.mkldnn._convolution_pointwise`) on the BN-folded weights prepacked by torch,
    then ReLU in place, as resfuse does — and against the eager chain. Each timed call runs
    the chain 10 times; the rows give microseconds per fused conv (`us_per_fused_call`), and
    resfuse's row `python_overhead_us`: (resfuse - bare) per fused call. Run on one thread and
    timed by that thread's CPU time (`time.thread_time`), so that other load on the machine
    (which deschedules the thread) does not count, at least `OVERHEAD_MIN_REPEATS` times."""
    n_calls = OVERHEAD_CONVS * OVERHEAD_REPS
    c = 8

    def build(s: Settings) -> Built:
        torch.manual_seed(0)
        layers = []
        for _ in range(OVERHEAD_CONVS):
            layers += [nn.Conv2d(c, c, 1, bias=False), nn.BatchNorm2d(c), nn.ReLU(inplace=True)]
        plain = nn.Sequential(*layers)
        _randomize_bn(plain)
        plain = plain.to(s.device, s.dtype).eval()
        fused = nn.Sequential(*[resfuse.FusedConvBNAct.from_modules(conv, bn, "relu")
                                for conv, bn in zip(plain[0::3], plain[1::3])]).eval()
        x = s.randn(1, c, 1, 1)
        op = torch.ops.mkldnn._convolution_pointwise.default
        args = ([0, 0], [1, 1], [1, 1], 1)
        bare_layers = []
        with torch.no_grad():
            for conv, bn in zip(plain[0::3], plain[1::3]):
                scale = bn.weight * torch.rsqrt(bn.running_var + bn.eps)
                w = conv.weight * scale.view(-1, 1, 1, 1)
                b = bn.bias - bn.running_mean * scale
                packed = torch._C._nn.mkldnn_reorder_conv2d_weight(w.to_mkldnn(), *args,
                                                                    list(x.shape))
                bare_layers.append((packed, b))

        def bare(t):
            for w, b in bare_layers:
                t = op(t, w, b, *args, "none", [], None).relu_()
            return t

        def reps(f):
            def run():
                # One thread: oneDNN's parallel regions on a 1x1 image are all
                # synchronisation, which other load on the machine stretches unevenly.
                threads = torch.get_num_threads()
                torch.set_num_threads(1)
                try:
                    with torch.no_grad():
                        for _ in range(OVERHEAD_REPS):
                            y = f(x)
                finally:
                    torch.set_num_threads(threads)
                return y
            return run
        fns = {EAGER: reps(plain), "resfuse[auto]": reps(fused), BARE_ONEDNN: reps(bare)}
        with torch.no_grad():
            want = plain(x)
            checks = {EAGER: dict(rel_err=None, parity_ok=None)}
            for name in ("resfuse[auto]", BARE_ONEDNN):
                err = rel_err(fns[name](), want)
                checks[name] = dict(rel_err=err, judged_rel_err=err,
                                    parity_ok=bool(err <= MODEL_LIMIT[s.dtype]))
        return Built(fns, checks)

    return Case("models", f"python overhead: {OVERHEAD_CONVS} fused conv1x1 {c}ch @1x1, "
                f"x{OVERHEAD_REPS}", "eval", dict(x=[1, c, 1, 1]), OVERHEAD_REPS, build,
                fused_calls=n_calls, clock=time.thread_time, min_repeats=OVERHEAD_MIN_REPEATS)


def cases(suite: str, s: Settings) -> List[Case]:
    if suite not in SUITES:
        raise ValueError(f"suite: one of {SUITES}, got {suite!r}")
    quick = suite == "quick"
    out = []
    if suite in ("quick", "ops", "all"):
        out += ops_cases(s, quick)
    if suite in ("quick", "blocks", "all"):
        out += blocks_cases(s, quick)
    if suite in ("quick", "models", "all"):
        out += models_cases(s, quick)
    if suite == "memory":
        import memory
        out += memory.memory_cases(s)
    for c in out:
        if c.chain is not None:
            c.flops = c.chain.flops(c.mode)
            c.nbytes = c.chain.bytes(c.mode)
            c.nbytes_eager = c.chain.bytes(c.mode, "eager")
    return out
