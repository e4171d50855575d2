"""What each gloo process runs in the synchronised-BN tests (tests/test_sync_bn.py).

Every worker rebuilds the same full-batch inputs from a seed, takes its own rank's slice, runs
resfuse with the statistics synchronised over the world and returns what the parent compares
with the eager chain on the concatenated batch (the function nn.SyncBatchNorm computes).
"""
from __future__ import annotations

import collections
import dataclasses
from typing import Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import resfuse
import resfuse.functional as RF
from resfuse import reference, sync_ops
from dist_harness import rank_slices


@dataclasses.dataclass(frozen=True)
class SyncCase:
    form: str = "post"                 # "post" conv->bn->act(+r), "bn_act" (no conv), "pre" bn->act->conv(+r)
    sizes: Tuple[int, ...] = (2, 3)    # per-rank batch sizes
    activation: str = "relu"
    residual: bool = True
    momentum: Optional[float] = 0.1
    affine: bool = True
    track: bool = True
    training: bool = True
    dtype: torch.dtype = torch.float64
    channels_last: bool = False
    backend: str = "eager"
    stride: int = 1
    c_in: int = 3
    c: int = 4
    hw: int = 5
    seed: int = 0

    def __str__(self):
        return "-".join(str(v) for v in (self.form, "x".join(map(str, self.sizes)), self.activation,
                                         "res" if self.residual else "nores", self.momentum,
                                         "affine" if self.affine else "noaffine",
                                         "track" if self.track else "notrack",
                                         "train" if self.training else "eval",
                                         str(self.dtype).split(".")[-1],
                                         "cl" if self.channels_last else "nchw", self.backend))


def case_tensors(case: SyncCase) -> dict:
    """Float64 master copies of every input of `case`, the full (concatenated) batch."""
    g = torch.Generator().manual_seed(1000 + case.seed)
    n = sum(case.sizes)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)
    c_bn = case.c_in if case.form == "pre" else case.c
    out_hw = (case.hw - 1) // case.stride + 1
    t = dict(x=r(n, case.c_in if case.form != "bn_act" else case.c, case.hw, case.hw) * 2 + 0.5)
    if case.form != "bn_act":
        t["weight"] = r(case.c, case.c_in, 3, 3) * 0.3
        t["bias"] = r(case.c) * 0.1
    if case.affine:
        t["bn_weight"] = r(c_bn).abs() + 0.5
        t["bn_bias"] = r(c_bn) * 0.2
    if case.track:
        t["running_mean"] = r(c_bn) * 0.2
        t["running_var"] = r(c_bn).abs() + 0.5
        t["num_batches_tracked"] = torch.tensor(3)
    if case.residual:
        t["residual"] = r(n, case.c, out_hw if case.form != "bn_act" else case.hw,
                          out_hw if case.form != "bn_act" else case.hw)
    t["grad"] = r(*(t["residual"].shape if case.residual else (n, case.c, out_hw, out_hw)
                    if case.form != "bn_act" else t["x"].shape))
    return t


def run_case(case: SyncCase, t: dict, sl: slice, process_group=None, reference_chain=False) -> dict:
    """One call of the case's op on rows `sl` of the batch (the reference chain when
    `reference_chain`), its backward with the upstream gradient, and what comes out."""
    def cast(v, batch=False):
        v = v[sl] if batch else v
        v = v.to(case.dtype)
        if case.channels_last and v.dim() == 4:
            v = v.contiguous(memory_format=torch.channels_last)
        return v
    leaves = {}
    for k in ("x", "weight", "bias", "bn_weight", "bn_bias", "residual"):
        if k in t:
            leaves[k] = cast(t[k], batch=k in ("x", "residual")).requires_grad_(case.training)
    buffers = {k: t[k].to(case.dtype) if t[k].is_floating_point() else t[k].clone()
               for k in ("running_mean", "running_var", "num_batches_tracked") if k in t}
    bn = dict(bn_weight=leaves.get("bn_weight"), bn_bias=leaves.get("bn_bias"),
              running_mean=buffers.get("running_mean"), running_var=buffers.get("running_var"))
    common = dict(training=case.training, momentum=case.momentum, eps=1e-5,
                  num_batches_tracked=buffers.get("num_batches_tracked"),
                  activation=case.activation, residual=leaves.get("residual"))
    if reference_chain:
        if case.form == "pre":
            y = reference.bn_act_conv(leaves["x"], bn["bn_weight"], bn["bn_bias"], bn["running_mean"],
                                      bn["running_var"], leaves["weight"], leaves["bias"],
                                      stride=case.stride, padding=1, **common)
        else:
            y = reference.conv_bn_act(leaves["x"], leaves.get("weight"), leaves.get("bias"), **bn,
                                      stride=case.stride, padding=1 if "weight" in leaves else 0,
                                      **common)
    else:
        kw = dict(common, backend=case.backend, process_group=process_group)
        if case.form == "pre":
            y = RF.bn_act_conv(leaves["x"], bn["bn_weight"], bn["bn_bias"], bn["running_mean"],
                               bn["running_var"], leaves["weight"], leaves["bias"],
                               stride=case.stride, padding=1, **kw)
        elif case.form == "bn_act":
            y = RF.bn_act(leaves["x"], **bn, **kw)
        else:
            y = RF.conv_bn_act(leaves["x"], leaves["weight"], leaves["bias"], **bn,
                               stride=case.stride, padding=1, **kw)
    out = {"y": y.detach().double()}
    if case.training:
        (y.double() * t["grad"][sl]).sum().backward()
        for k, v in leaves.items():
            out["grad_" + k] = None if v.grad is None else v.grad.double()
    out.update({k: v.double() if v.is_floating_point() else v for k, v in buffers.items()})
    return out


# ----------------------------------------------------------------------------- workers

def functional_cases(rank: int, world_size: int, cases) -> list:
    """Each case's op on this rank's slice, synchronised over the world."""
    results = []
    for case in cases:
        assert len(case.sizes) == world_size
        t = case_tensors(case)
        results.append(run_case(case, t, rank_slices(case.sizes)[rank], dist.group.WORLD))
    return results


class _Counter:
    """Counts the collectives the fused ops issue."""

    def __init__(self):
        self.calls = 0
        self._real = sync_ops.all_reduce_sum

    def __enter__(self):
        def counted(t, group):
            self.calls += 1
            return self._real(t, group)
        sync_ops.all_reduce_sum = counted
        return self

    def __exit__(self, *exc):
        sync_ops.all_reduce_sum = self._real


def block_state(kind: str):
    """A plain reference block of `kind` with random BN state, fp64, built from a fixed seed."""
    torch.manual_seed(7)
    if kind == "bottleneck":
        m = reference.ResidualBlock(8, 4, stride=2, bottleneck=True)
    elif kind == "basic":
        m = reference.ResidualBlock(8, 8, stride=1)
    else:  # pre-activation with a projection
        m = reference.ResidualBlock(8, 4, stride=2, bottleneck=True, preact=True)
    with torch.no_grad():
        for b in m.modules():
            if isinstance(b, nn.BatchNorm2d):
                b.weight.uniform_(0.5, 1.5)
                b.bias.normal_(0, 0.2)
                b.running_mean.normal_(0, 0.2)
                b.running_var.uniform_(0.5, 2.0)
    return m.double()


def block_inputs(sizes, out_channels: int, out_hw: int):
    g = torch.Generator().manual_seed(11)
    n = sum(sizes)
    x = torch.randn(n, 8, 6, 6, generator=g, dtype=torch.float64)
    grad = torch.randn(n, out_channels, out_hw, out_hw, generator=g, dtype=torch.float64)
    return x, grad


def blocks(rank: int, world_size: int, sizes, kinds) -> dict:
    """FusedResidualBlock(sync_bn=True) with the reference block's state, on this rank's
    slice: output, x's gradient, this rank's parameter gradients, buffers, and the number
    of collectives in forward and in backward."""
    out = {}
    sl = rank_slices(sizes)[rank]
    for kind in kinds:
        plain = block_state(kind)
        fused = resfuse.FusedResidualBlock(8, 4 if kind != "basic" else 8,
                                           stride=2 if kind != "basic" else 1,
                                           bottleneck=kind != "basic", preact=kind == "preact",
                                           sync_bn=True).double()
        fused.load_state_dict(plain.state_dict())
        x, grad = block_inputs(sizes, 16 if kind != "basic" else 8, 3 if kind != "basic" else 6)
        xl = x[sl].clone().requires_grad_()
        with _Counter() as fwd:
            y = fused(xl)
        with _Counter() as bwd:
            (y * grad[sl]).sum().backward()
        out[kind] = dict(y=y.detach(), grad_x=xl.grad,
                         grads={k: p.grad for k, p in fused.named_parameters()},
                         buffers={k: b.clone() for k, b in fused.named_buffers()},
                         forward_collectives=fwd.calls, backward_collectives=bwd.calls,
                         norm_types=sorted({type(m).__name__ for m in fused.modules()
                                            if isinstance(m, nn.modules.batchnorm._BatchNorm)}))
    return out


def sync_batch_norm_any_rank(rank: int, world_size: int, sizes) -> dict:
    """resfuse.SyncBatchNorm on 2-D, 3-D and 5-D inputs (as (N, C, L, 1))."""
    out = {}
    sl = rank_slices(sizes)[rank]
    for dims in (2, 3, 5):
        g = torch.Generator().manual_seed(dims)
        shape = (sum(sizes), 4) + (3,) * (dims - 2)
        x = torch.randn(*shape, generator=g, dtype=torch.float64) + 1
        grad = torch.randn(*shape, generator=g, dtype=torch.float64)
        bn = resfuse.SyncBatchNorm(4, momentum=None).double()
        xl = x[sl].clone().requires_grad_()
        y = bn(xl)
        (y * grad[sl]).sum().backward()
        out[dims] = dict(y=y.detach(), grad_x=xl.grad, grad_w=bn.weight.grad,
                         grad_b=bn.bias.grad, running_mean=bn.running_mean.clone(),
                         running_var=bn.running_var.clone())
    return out


# --------------------------------------------------------------------- DDP training

def tiny_resnet(dtype=torch.float64) -> nn.Module:
    """A small ResNet (stem, basic block, bottleneck with projection, pooled linear head) from
    a fixed seed: plain modules, resfuse's torchvision-compatible blocks."""
    torch.manual_seed(0)
    proj = nn.Sequential(reference.conv1x1(8, 16, 2), nn.BatchNorm2d(16))
    model = nn.Sequential(collections.OrderedDict(
        conv1=nn.Conv2d(3, 8, 3, padding=1, bias=False), bn1=nn.BatchNorm2d(8),
        relu=nn.ReLU(inplace=True),
        layer1=nn.Sequential(reference.BasicBlock(8, 8), reference.Bottleneck(8, 4, 2, proj)),
        pool=nn.AdaptiveAvgPool2d(1), flatten=nn.Flatten(), fc=nn.Linear(16, 5)))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.2)
    return model.to(dtype)


def train_batches(steps: int, n: int, dtype=torch.float64):
    g = torch.Generator().manual_seed(5)
    return [(torch.randn(n, 3, 8, 8, generator=g, dtype=torch.float64).to(dtype),
             torch.randint(0, 5, (n,), generator=g)) for _ in range(steps)]


def train_reference(steps: int, sizes, momentum: Optional[float] = 0.1, dtype=torch.float64):
    """One process, the concatenated batch, plain BatchNorm: what DDP + SyncBN must match."""
    model = tiny_resnet(dtype)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = momentum
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    history = []
    for x, target in train_batches(steps, sum(sizes), dtype):
        loss = F.cross_entropy(model(x), target, reduction="sum") / sum(sizes)
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append(dict(loss=loss.detach(), params={k: v.detach().clone() for k, v in model.named_parameters()},
                            buffers={k: v.clone() for k, v in model.named_buffers()}))
    return history


def ddp_train(rank: int, world_size: int, steps: int, sizes, momentum=0.1,
              dtype=torch.float64, compiled: bool = False) -> dict:
    """The same training under DistributedDataParallel with `convert(model, sync_bn=True)`;
    each rank's loss is scaled so that DDP's gradient average is the big batch's gradient."""
    model = tiny_resnet(dtype)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = momentum
    report = resfuse.convert(model, sync_bn=True)
    ddp = nn.parallel.DistributedDataParallel(model)
    step_fn = torch.compile(ddp) if compiled else ddp
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9)
    sl = rank_slices(sizes)[rank]
    history = []
    for x, target in train_batches(steps, sum(sizes), dtype):
        out = step_fn(x[sl])
        loss = F.cross_entropy(out, target[sl], reduction="sum") * world_size / sum(sizes)
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append(dict(loss=loss.detach(),
                            params={k: v.detach().clone() for k, v in model.named_parameters()},
                            buffers={k: v.clone() for k, v in model.named_buffers()}))
    return dict(history=history, swapped=len(report.swapped), synced=len(report.synced))


def compiled_sync_model(rank: int, world_size: int, sizes) -> dict:
    """torch.compile(fullgraph=True) of a converted model with synchronised BN, forward and
    backward, against the same model run eagerly in the same processes."""
    sl = rank_slices(sizes)[rank]
    x, target = train_batches(1, sum(sizes))[0]
    results = {}
    for mode in ("eager", "compiled"):
        model = tiny_resnet()
        resfuse.convert(model, sync_bn=True)
        run = torch.compile(model, fullgraph=True) if mode == "compiled" else model
        out = run(x[sl])
        F.cross_entropy(out, target[sl], reduction="sum").backward()
        results[mode] = dict(out=out.detach(), grads={k: p.grad for k, p in model.named_parameters()},
                             buffers={k: b.clone() for k, b in model.named_buffers()})
    return results
