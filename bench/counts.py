"""Bytes moved and FLOPs of the benchmarked ops and blocks, computed from their shapes.

A benchmark row is reported against the hardware's limits: achieved bandwidth (bytes / time),
achieved compute (FLOPs / time), and the fraction of the roofline floor
max(bytes / copy bandwidth, FLOPs / matmul peak) that its time reaches. Those counts come from
here, from the shapes alone, and are the same for every contestant of a row.

`Chain` describes what the fused chain fuses (docs/design.md): a sequence of convolutions, each followed by
BatchNorm, with ReLU after every one but the last; the last one's BN output gets the shortcut
(none, identity, a projection conv + BN, or an external residual tensor) added and then ReLU.
One convolution is the op `conv_bn_act`; no convolution at all is `bn_act` (scale-bias-add-act);
two or three are ResNet's basic and bottleneck blocks.

Two schedules of memory passes are written out for each mode, each pass naming the tensors it
reads and writes (each once):
- `fused`: the fused chain of docs/design.md, the floor every contestant is measured against.
  Training forward: each conv writes its raw output z and the BN statistics (epilogue); the next
  conv applies the previous BN + ReLU as it loads (prologue); one scale-bias-add-ReLU pass writes
  y and a 1-bit ReLU mask. Backward: one pass reads the upstream gradient, the mask and z (and
  writes the shortcut's gradient); each data-gradient conv applies BN-backward in its prologue;
  each weight-gradient conv recomputes its input act(bn(z)) on load; the inner BNs' backward
  sums take one pass each. Eval: BN folded, one conv kernel each with the residual and ReLU in
  its epilogue.
- `eager`: what the unfused module chain reads and writes: conv, BN (statistics and normalise:
  z read twice), in-place ReLU, the residual add, and their backward ops (BN backward reads its
  gradient and z twice), and the sum of the two gradients where the shortcut forks.
For a ResNet-50 stage-1 bottleneck (256-64-256 at 56x56, batch 256, bf16) these give 8.3 GB
fused and 14.2 GB eager per training step, the figures of docs/design.md ("Targets").

Counted: activations, their gradients, masks and weights (each read once per pass that needs
them). Not counted: per-channel vectors (BN statistics and parameters: C values, negligible),
elementwise arithmetic as FLOPs (those passes are memory-bound by construction). FLOPs are the
convolutions': 2 x multiply-accumulates forward; backward adds the data gradient (skipped for
the first conv when the input needs no gradient) and the weight gradient.
"""
from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional, Tuple

MODES = ("eval", "train_fwd", "train_bwd", "train_step")
SHORTCUTS = ("none", "identity", "projection", "external")


@dataclasses.dataclass(frozen=True)
class Conv:
    """A 2-D convolution's shape: channels, square kernel, stride, groups, padding (default
    k // 2 * dilation, ResNet's)."""
    cin: int
    cout: int
    k: int = 1
    stride: int = 1
    groups: int = 1
    padding: Optional[int] = None
    dilation: int = 1

    @property
    def pad(self) -> int:
        return self.k // 2 * self.dilation if self.padding is None else self.padding

    def out_hw(self, h: int, w: int) -> Tuple[int, int]:
        span = self.dilation * (self.k - 1) + 1
        return ((h + 2 * self.pad - span) // self.stride + 1,
                (w + 2 * self.pad - span) // self.stride + 1)

    def weight_numel(self) -> int:
        return self.cout * (self.cin // self.groups) * self.k * self.k

    def macs(self, n: int, h: int, w: int) -> int:
        ho, wo = self.out_hw(h, w)
        return n * ho * wo * self.weight_numel()

    def describe(self) -> str:
        s = f"{self.k}x{self.k} {self.cin}->{self.cout}"
        if self.stride != 1:
            s += f" /{self.stride}"
        if self.groups != 1:
            s += f" g{self.groups}"
        return s


@dataclasses.dataclass(frozen=True)
class Chain:
    """convs (main path, in order), the shortcut, its projection conv, the input (n, c, h, w),
    the element size in bytes, and whether the input needs a gradient. With no convs, `c` is
    the BN's channel count (the op `bn_act`)."""
    convs: Tuple[Conv, ...]
    shortcut: str
    n: int
    c: int
    h: int
    w: int
    elem_bytes: int
    projection: Optional[Conv] = None
    input_grad: bool = True

    def __post_init__(self):
        if self.shortcut not in SHORTCUTS:
            raise ValueError(f"shortcut: one of {SHORTCUTS}, got {self.shortcut!r}")
        if (self.shortcut == "projection") != (self.projection is not None):
            raise ValueError("a projection conv goes with shortcut='projection' only")
        if self.convs and self.convs[0].cin != self.c:
            raise ValueError(f"first conv takes {self.convs[0].cin} channels, input has {self.c}")

    # -- shapes -------------------------------------------------------------------------------
    def conv_shapes(self) -> List[Tuple[Conv, Tuple[int, int, int, int], Tuple[int, int, int, int]]]:
        """(conv, input shape, output shape) along the main path."""
        out, shape = [], (self.n, self.c, self.h, self.w)
        for conv in self.convs:
            ho, wo = conv.out_hw(shape[2], shape[3])
            nxt = (self.n, conv.cout, ho, wo)
            out.append((conv, shape, nxt))
            shape = nxt
        return out

    def out_shape(self) -> Tuple[int, int, int, int]:
        cs = self.conv_shapes()
        return cs[-1][2] if cs else (self.n, self.c, self.h, self.w)

    def tensor_bytes(self) -> Dict[str, int]:
        """Every tensor a schedule names, in bytes."""
        e = self.elem_bytes
        numel = lambda s: s[0] * s[1] * s[2] * s[3]  # noqa: E731
        x = numel((self.n, self.c, self.h, self.w))
        y = numel(self.out_shape())
        t = {"x": x * e, "gx": x * e, "y": y * e, "gy": y * e, "mask": (y + 7) // 8,
             "r": y * e, "gr": y * e, "u": y * e, "gu": y * e, "s": y * e}
        for i, (conv, _, o) in enumerate(self.conv_shapes(), 1):
            t[f"w{i}"] = t[f"gw{i}"] = conv.weight_numel() * e
            t[f"z{i}"] = t[f"u{i}"] = t[f"gz{i}"] = t[f"ga{i}"] = t[f"gu{i}"] = numel(o) * e
        if self.projection is not None:
            t["wd"] = t["gwd"] = self.projection.weight_numel() * e
            t["zd"] = t["ud"] = t["gzd"] = y * e
            t["gxd"] = x * e
        return t

    # -- counts -------------------------------------------------------------------------------
    def flops(self, mode: str) -> int:
        """The convolutions' FLOPs in `mode` (2 per multiply-accumulate)."""
        _check_mode(mode)
        fwd = bwd = 0
        for i, (conv, s, _) in enumerate(self.conv_shapes()):
            m = 2 * conv.macs(s[0], s[2], s[3])
            fwd += m
            bwd += m + (m if (i > 0 or self.input_grad) else 0)  # wgrad + dgrad
        if self.projection is not None:
            m = 2 * self.projection.macs(self.n, self.h, self.w)
            fwd += m
            bwd += m + (m if self.input_grad else 0)
        return {"eval": fwd, "train_fwd": fwd, "train_bwd": bwd, "train_step": fwd + bwd}[mode]

    def passes(self, mode: str, schedule: str = "fused") -> List["Pass"]:
        """The memory passes of `mode` under `schedule` ("fused" or "eager")."""
        _check_mode(mode)
        if schedule not in ("fused", "eager"):
            raise ValueError(f"schedule: 'fused' or 'eager', got {schedule!r}")
        fused = schedule == "fused"
        if mode == "eval":
            return _fused_eval(self) if fused else _eager_fwd(self, training=False)
        fwd = _fused_train_fwd(self) if fused else _eager_fwd(self, training=True)
        bwd = _fused_train_bwd(self) if fused else _eager_train_bwd(self)
        return {"train_fwd": fwd, "train_bwd": bwd, "train_step": fwd + bwd}[mode]

    def bytes(self, mode: str, schedule: str = "fused") -> int:
        size = self.tensor_bytes()
        return sum(p.bytes(size) for p in self.passes(mode, schedule))


@dataclasses.dataclass(frozen=True)
class Pass:
    name: str
    reads: Tuple[str, ...]
    writes: Tuple[str, ...] = ()

    def bytes(self, size: Dict[str, int]) -> int:
        return sum(size[t] for t in self.reads + self.writes)


def _check_mode(mode: str):
    if mode not in MODES:
        raise ValueError(f"mode: one of {MODES}, got {mode!r}")


def _residual_source(c: Chain) -> Tuple[str, ...]:
    return {"none": (), "identity": ("x",), "projection": ("zd",), "external": ("r",)}[c.shortcut]


# -- the fused design (docs/design.md) --------------------------------------------------------
def _fused_train_fwd(c: Chain) -> List[Pass]:
    ps, inp = [], "x"
    for i, _ in enumerate(c.convs, 1):
        how = f"conv{i} + stats" + (f" (prologue: bn{i - 1}+relu)" if i > 1 else "")
        ps.append(Pass(how, (inp, f"w{i}"), (f"z{i}",)))
        inp = f"z{i}"
    if c.projection is not None:
        ps.append(Pass("downsample conv + stats", ("x", "wd"), ("zd",)))
    if not c.convs:
        ps.append(Pass("bn stats", ("x",)))
    ps.append(Pass("scale-bias-add-relu", (inp,) + _residual_source(c), ("y", "mask")))
    return ps


def _fused_train_bwd(c: Chain) -> List[Pass]:
    L = len(c.convs)
    last = f"z{L}" if L else "x"
    g_last = ("gy", "mask", last)  # the last BN's input gradient, recomputed on load
    writes = ("gr",) if c.shortcut in ("identity", "external") else ()
    reads = g_last + (("zd",) if c.projection is not None else ())
    ps = [Pass("bwd reduce (relu mask, BN sums, shortcut grad)", reads, writes)]
    if c.projection is not None:
        g_d = ("gy", "mask", "zd")
        if c.input_grad:
            ps.append(Pass("downsample dgrad (prologue: bn backward)", g_d + ("wd",), ("gxd",)))
        ps.append(Pass("downsample wgrad", g_d + ("x",), ("gwd",)))
    for i in range(L, 0, -1):
        g = g_last if i == L else (f"ga{i}", f"z{i}")
        inp = "x" if i == 1 else f"z{i - 1}"
        if i > 1 or c.input_grad:
            extra = ({"identity": ("gr",), "projection": ("gxd",)}.get(c.shortcut, ())
                     if i == 1 else ())
            ps.append(Pass(f"conv{i} dgrad (prologue: bn{i} backward)", g + (f"w{i}",) + extra,
                           (f"ga{i - 1}" if i > 1 else "gx",)))
        ps.append(Pass(f"conv{i} wgrad" + (f" (recompute relu(bn{i - 1}))" if i > 1 else ""),
                       g + (inp,), (f"gw{i}",)))
        if i > 1:
            ps.append(Pass(f"bn{i - 1} bwd reduce", (f"ga{i - 1}", f"z{i - 1}")))
    if not L:
        ps.append(Pass("bn backward apply", g_last, ("gx",)))
    return ps


def _fused_eval(c: Chain) -> List[Pass]:
    ps, inp = [], "x"
    if c.projection is not None:
        ps.append(Pass("downsample conv (bn folded)", ("x", "wd"), ("zd",)))
    for i, _ in enumerate(c.convs, 1):
        last = i == len(c.convs)
        ps.append(Pass(f"conv{i} (bn folded, epilogue: " + ("add + relu)" if last else "relu)"),
                       (inp, f"w{i}") + (_residual_source(c) if last else ()),
                       ("y",) if last else (f"z{i}",)))
        inp = f"z{i}"
    if not c.convs:
        ps.append(Pass("scale-bias-add-relu", ("x",) + _residual_source(c), ("y",)))
    return ps


# -- the unfused module chain -------------------------------------------------------------------
def _eager_fwd(c: Chain, training: bool) -> List[Pass]:
    """The module chain forward: a training BN reads its input twice (statistics, then
    normalise), an eval BN once."""
    ps, inp = [], "x"
    bn = "bn (stats + normalise)" if training else "bn"
    reads = 2 if training else 1
    for i, _ in enumerate(c.convs, 1):
        ps.append(Pass(f"conv{i}", (inp, f"w{i}"), (f"z{i}",)))
        ps.append(Pass(bn.replace("bn", f"bn{i}", 1), (f"z{i}",) * reads, (f"u{i}",)))
        if i < len(c.convs):
            ps.append(Pass(f"relu{i} (in place)", (f"u{i}",), (f"u{i}",)))
        inp = f"u{i}"
    if c.projection is not None:
        ps.append(Pass("downsample conv", ("x", "wd"), ("zd",)))
        ps.append(Pass("downsample " + bn, ("zd",) * reads, ("ud",)))
    if not c.convs:
        ps.append(Pass(bn, ("x",) * reads, ("u",)))
        inp = "u"
    res = {"none": (), "identity": ("x",), "projection": ("ud",), "external": ("r",)}[c.shortcut]
    if res:
        ps.append(Pass("add (in place)", (inp,) + res, ("s",)))
    ps.append(Pass("relu (in place)", ("s" if res else inp,), ("y",)))
    return ps


def _eager_train_bwd(c: Chain) -> List[Pass]:
    L = len(c.convs)
    last = f"z{L}" if L else "x"
    ps = [Pass("relu backward", ("gy", "y"), ("gu",)),
          Pass("bn backward", ("gu", last, "gu", last), (f"gz{L}" if L else "gx",))]
    if c.projection is not None:
        ps.append(Pass("downsample bn backward", ("gu", "zd", "gu", "zd"), ("gzd",)))
        if c.input_grad:
            ps.append(Pass("downsample dgrad", ("gzd", "wd"), ("gxd",)))
        ps.append(Pass("downsample wgrad", ("gzd", "x"), ("gwd",)))
    for i in range(L, 0, -1):
        inp = "x" if i == 1 else f"u{i - 1}"
        if i > 1 or c.input_grad:
            ps.append(Pass(f"conv{i} dgrad", (f"gz{i}", f"w{i}"), (f"ga{i - 1}" if i > 1 else "gx",)))
        ps.append(Pass(f"conv{i} wgrad", (f"gz{i}", inp), (f"gw{i}",)))
        if i > 1:
            ps.append(Pass(f"relu{i - 1} backward", (f"ga{i - 1}", f"u{i - 1}"), (f"gu{i - 1}",)))
            ps.append(Pass(f"bn{i - 1} backward", (f"gu{i - 1}", f"z{i - 1}") * 2, (f"gz{i - 1}",)))
    if c.input_grad and c.shortcut in ("identity", "projection") and L:
        ps.append(Pass("sum of the input's two gradients", ("gx", "gx"), ("gx",)))
    return ps


# -- ResNet shapes ------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class BlockShape:
    """One ResNet block as torchvision builds it (v1.5: a bottleneck's stride on conv2)."""
    model: str
    stage: int
    inplanes: int
    planes: int
    stride: int
    bottleneck: bool
    hw: int  # input side at image side `image`

    @property
    def expansion(self) -> int:
        return 4 if self.bottleneck else 1

    @property
    def projection(self) -> bool:
        return self.stride != 1 or self.inplanes != self.planes * self.expansion

    def name(self) -> str:
        kind = "bottleneck" if self.bottleneck else "basic"
        sc = f"projection /{self.stride}" if self.projection else "identity"
        return (f"{self.model} layer{self.stage} {kind} {self.inplanes}->{self.planes}->"
                f"{self.planes * self.expansion} @{self.hw} ({sc})")

    def chain(self, n: int, elem_bytes: int) -> Chain:
        p, e, s = self.planes, self.planes * self.expansion, self.stride
        if self.bottleneck:
            convs = (Conv(self.inplanes, p, 1), Conv(p, p, 3, s), Conv(p, e, 1))
        else:
            convs = (Conv(self.inplanes, p, 3, s), Conv(p, p, 3))
        proj = Conv(self.inplanes, e, 1, s) if self.projection else None
        return Chain(convs, "projection" if proj else "identity", n, self.inplanes, self.hw,
                     self.hw, elem_bytes, projection=proj)


_LAYERS = {"resnet18": (False, (2, 2, 2, 2)), "resnet34": (False, (3, 4, 6, 3)),
           "resnet50": (True, (3, 4, 6, 3)), "resnet101": (True, (3, 4, 23, 3))}


def resnet_blocks(model: str, image: int = 224) -> List[Tuple[BlockShape, int]]:
    """The distinct block shapes of a torchvision ResNet, each with how many times it occurs."""
    bottleneck, layers = _LAYERS[model]
    expansion = 4 if bottleneck else 1
    hw = -(-image // 4)  # stem: /2 conv (pad 3), /2 max-pool (pad 1)
    inplanes, out = 64, []
    for stage, (count, planes) in enumerate(zip(layers, (64, 128, 256, 512)), 1):
        stride = 1 if stage == 1 else 2
        first = BlockShape(model, stage, inplanes, planes, stride, bottleneck, hw)
        hw = (hw - 1) // stride + 1
        inplanes = planes * expansion
        rest = BlockShape(model, stage, inplanes, planes, 1, bottleneck, hw)
        if rest == first:  # ResNet-18/34's layer1: every block the same
            out.append((first, count))
        else:
            out.append((first, 1))
            if count > 1:
                out.append((rest, count - 1))
    return out


def resnet_stem_macs(image: int = 224) -> int:
    """Multiply-accumulates of one image through a ResNet's 7x7 stride-2 stem conv."""
    stem_hw = (image + 2 * 3 - 7) // 2 + 1
    return stem_hw * stem_hw * 64 * 3 * 49


def resnet_conv_macs(model: str, image: int = 224, num_classes: int = 1000) -> int:
    """Multiply-accumulates of one image through a torchvision ResNet (convs and the fc layer)."""
    macs = resnet_stem_macs(image)
    for block, times in resnet_blocks(model, image):
        c = block.chain(1, 1)
        macs += times * c.flops("eval") // 2
    bottleneck, _ = _LAYERS[model]
    return macs + 512 * (4 if bottleneck else 1) * num_classes
