"""Find the conv -> BatchNorm (-> activation) and BatchNorm -> activation -> conv chains among
the children of one module, and prove that swapping them slot by slot is exact.

Why torch.fx, and why per module. A slot swap is exact only when, in the module's real
dataflow, the conv's output feeds only the BN, the BN's output only the activation (or, pre-
activation, only the conv), and each of them is called exactly once: torchvision's BasicBlock
applies its one `relu` twice, DenseNet feeds a BN with a concatenation, a pre-activation block
may send `act(bn(x))` to its shortcut too. Registration order cannot tell these apart; the
call graph can. `torch.fx` symbolic tracing (what `torch.ao`'s fuser traces with) records
exactly that: `call_module` nodes and their users. We trace each module on its own with every
submodule as a leaf, so one forward that does not trace (data-dependent control flow, a
checkpointed DenseNet layer, iteration over a proxy) costs only that module, never the model,
and we trace it in both training modes (a forward may branch on `self.training`) and keep the
chains found in both. Where tracing fails we fall back to the known forwards of a few library
modules (`_DenseLayer`: norm1 -> relu1 -> conv1, norm2 -> relu2 -> conv2); any other
untraceable forward is left alone with the reason, because module order alone proves nothing.
(nn.Sequential, torchvision's Conv2dNormActivation and timm's ConvNormAct always trace.)

A residual add written in a forward cannot be absorbed by a slot swap: only whole known blocks
(`convert.fuse_block`) fuse their residual.
"""
from __future__ import annotations

import dataclasses
import warnings
from collections import Counter
from typing import Dict, List, Optional, Set, Tuple

import torch.fx as fx
import torch.nn as nn

from .activations import Activation, as_activation
from .modules import SyncBatchNorm

POST, PRE = "conv_bn_act", "bn_act_conv"

_NORMS_2D = (nn.BatchNorm2d, nn.SyncBatchNorm, SyncBatchNorm)
_NORMS_1D = (nn.BatchNorm1d, nn.SyncBatchNorm, SyncBatchNorm)


@dataclasses.dataclass
class Chain:
    """One chain among `parent`'s children: `names` are the child slots in dataflow order
    (conv, bn[, act] or bn[, act], conv); `act_name` is None when there is no separate
    activation module (none, or inside a timm BatchNormAct2d)."""
    kind: str
    conv: str
    bn: str
    act_name: Optional[str]
    activation: Activation
    act_inside: bool  # the activation is the BatchNormAct2d's own `act` (fused away)
    note: str = ""

    @property
    def names(self) -> Tuple[str, ...]:
        rest = (self.act_name,) if self.act_name else ()
        return (self.conv, self.bn) + rest if self.kind == POST else (self.bn,) + rest + (self.conv,)


@dataclasses.dataclass
class Found:
    chains: List[Chain]
    skipped: List[Tuple[str, str]]  # (child name or "", reason)
    direct_calls: Set[str]  # children whose own children this forward calls directly
    how: str  # "traced" | "known forward" | "untraced"


# ------------------------------------------------------------------------------- module kinds
def is_batchnorm_act(m) -> bool:
    """timm's BatchNormAct2d: an nn.BatchNorm2d whose forward is batch_norm, then `drop`, then
    `act` (timm/layers/norm_act.py); recognised by name, module and direct base only."""
    t = type(m)
    return (t.__name__ == "BatchNormAct2d" and t.__module__.split(".")[0] == "timm"
            and t.__bases__ == (nn.BatchNorm2d,))


def is_conv(m) -> bool:
    return type(m) in (nn.Conv2d, nn.Conv1d)  # exact: a subclass (Conv2dSame, StdConv2d) may differ


def is_norm(m) -> bool:
    return type(m) in (nn.BatchNorm2d, nn.BatchNorm1d, nn.SyncBatchNorm, SyncBatchNorm) or is_batchnorm_act(m)


def _is_off(m) -> bool:
    """A drop layer that does nothing in either mode."""
    if m is None or type(m) is nn.Identity:
        return True
    p = getattr(m, "drop_prob", getattr(m, "p", None))
    return type(m).__name__ in ("DropPath", "DropBlock2d", "Dropout", "StochasticDepth") and p == 0


def _activation(m) -> Tuple[Optional[Activation], str]:
    try:
        return as_activation(m), ""
    except (TypeError, ValueError) as e:
        return None, str(e)


def _pairs(conv, bn) -> bool:
    norms = _NORMS_2D if type(conv) is nn.Conv2d else _NORMS_1D
    return type(bn) in norms or (type(conv) is nn.Conv2d and is_batchnorm_act(bn))


# ----------------------------------------------------------------------------------- tracing
class _ChildrenAsLeaves(fx.Tracer):
    """Trace only the module's own forward: every submodule call is one call_module node."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return True


def _trace(module: nn.Module, training: bool) -> fx.Graph:
    saved = module.training
    module.training = training  # this module only: its children are leaves
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return _ChildrenAsLeaves().trace(module)
    finally:
        module.training = saved


def _linear_graph(names: List[str]) -> fx.Graph:
    g = fx.Graph()
    x = g.placeholder("x")
    for n in names:
        x = g.call_module(n, (x,))
    g.output(x)
    return g


# Library modules whose forward does not always trace, with their dataflow read from the source:
# (module prefix, class name) -> the child call sequences that are straight lines.
_KNOWN_FORWARDS: Dict[Tuple[str, str], List[List[str]]] = {
    # torchvision/models/densenet.py: bn_function (maybe checkpointed) = conv1(relu1(norm1(cat)))
    # then conv2(relu2(norm2(.))), then an optional functional dropout.
    ("torchvision.models.densenet", "_DenseLayer"): [["norm1", "relu1", "conv1", "norm2", "relu2", "conv2"]],
    ("resfuse.models", "_DenseLayer"): [["norm1", "relu1", "conv1", "norm2", "relu2", "conv2"]],
}


def _known_graphs(module: nn.Module) -> Optional[List[fx.Graph]]:
    t = type(module)
    for (prefix, name), lines in _KNOWN_FORWARDS.items():
        if t.__name__ == name and t.__module__.startswith(prefix):
            if all(n in module._modules for line in lines for n in line):
                return [_linear_graph(line) for line in lines]
    return None


# ------------------------------------------------------------------------------ graph analysis
class _Graph:
    def __init__(self, module: nn.Module, graph: fx.Graph):
        self.module = module
        self.nodes = list(graph.nodes)
        self.calls = Counter(n.target for n in self.nodes if n.op == "call_module")
        self.direct = {n.target.split(".")[0] for n in self.nodes
                       if n.op == "call_module" and "." in n.target}

    def child(self, node) -> Optional[nn.Module]:
        if node.op == "call_module" and "." not in node.target:
            return self.module._modules.get(node.target)
        return None

    def single_call(self, node) -> bool:
        """Called once, on one positional tensor, no keywords."""
        return self.calls[node.target] == 1 and len(node.args) == 1 and not node.kwargs

    def next(self, node):
        """The only user of `node`, through plain nn.Identity calls; None when not exactly one."""
        while True:
            users = list(node.users)
            if len(users) != 1:
                return None
            u = users[0]
            m = self.child(u)
            if type(m) is nn.Identity and self.single_call(u) and u.args[0] is node:
                node = u
                continue
            if u.op == "call_module" and (len(u.args) != 1 or u.args[0] is not node or u.kwargs):
                return None
            return u


def _analyse(g: _Graph, claimed: Set[str]) -> Tuple[List[Chain], List[Tuple[str, str]]]:
    chains, skipped = [], []
    for node in g.nodes:
        m = g.child(node)
        if m is None or node.target in claimed:
            continue
        if is_conv(m):
            c = _post_chain(g, node, m, claimed, skipped)
        elif is_norm(m):
            c = _pre_chain(g, node, m, claimed)
        else:
            continue
        if c is not None:
            chains.append(c)
            claimed.update(c.names)
    return chains, skipped


def _post_chain(g: _Graph, cnode, conv, claimed, skipped) -> Optional[Chain]:
    users = list(cnode.users)
    bnode = g.next(cnode)
    bn = g.child(bnode) if bnode is not None else None
    if bn is None or not is_norm(bn):
        if any(is_norm(g.child(u)) for u in users):
            skipped.append((cnode.target, "its output feeds more than the BatchNorm: left as it is"))
        return None
    if bnode.target in claimed or not _pairs(conv, bn):
        return None
    if not (g.single_call(cnode) and g.single_call(bnode)):
        skipped.append((cnode.target, f"{cnode.target} or {bnode.target} is called more than "
                        "once or with extra arguments: left as it is"))
        return None
    if bn.num_features != conv.out_channels:
        return None
    if is_batchnorm_act(bn):
        act, why = _activation(bn.act)
        if not _is_off(bn.drop):
            return Chain(POST, cnode.target, bnode.target, None, Activation("identity"), False,
                         f"{bnode.target}.drop ({type(bn.drop).__name__}) sits between the BN "
                         "and its activation: conv+BN fused, drop and act run as they are")
        if act is None:
            return Chain(POST, cnode.target, bnode.target, None, Activation("identity"), False,
                         f"{why}: conv+BN fused, the activation runs as it is")
        return Chain(POST, cnode.target, bnode.target, None, act, True)
    anode = g.next(bnode)
    am = g.child(anode) if anode is not None else None
    if am is None or anode.target in claimed:
        return Chain(POST, cnode.target, bnode.target, None, Activation("identity"), False)
    act, why = _activation(am)
    if act is None:
        note = f"{why}: conv+BN fused, the activation runs as it is" if _looks_like_act(am) else ""
        return Chain(POST, cnode.target, bnode.target, None, Activation("identity"), False, note)
    if not g.single_call(anode):
        return Chain(POST, cnode.target, bnode.target, None, Activation("identity"), False,
                     f"{anode.target} is applied more than once: conv+BN fused without it")
    return Chain(POST, cnode.target, bnode.target, anode.target, act, False)


def _looks_like_act(m) -> bool:
    mod = type(m).__module__
    return mod.startswith("torch.nn.modules.activation") or "activation" in mod


def _pre_chain(g: _Graph, bnode, bn, claimed) -> Optional[Chain]:
    if not g.single_call(bnode):
        return None
    if is_batchnorm_act(bn):
        act, _ = _activation(bn.act)
        if act is None or not _is_off(bn.drop):
            return None
        anode, am = None, None
        cnode = g.next(bnode)
    else:
        anode = g.next(bnode)
        am = g.child(anode) if anode is not None else None
        if am is None or anode.target in claimed or not g.single_call(anode):
            return None
        act, _ = _activation(am)
        if act is None:
            return None
        cnode = g.next(anode)
    conv = g.child(cnode) if cnode is not None else None
    if conv is None or not is_conv(conv) or cnode.target in claimed or not g.single_call(cnode):
        return None
    if not _pairs(conv, bn) or bn.num_features != conv.in_channels:
        return None
    return Chain(PRE, cnode.target, bnode.target, anode.target if anode is not None else None,
                 act, is_batchnorm_act(bn))


def _common(per_graph: List[List[Chain]]) -> List[Chain]:
    key = lambda c: (c.kind, c.names, c.activation)  # noqa: E731
    others = [{key(c) for c in chains} for chains in per_graph[1:]]
    return [c for c in per_graph[0] if all(key(c) in o for o in others)]


def find(module: nn.Module) -> Found:
    """The chains among `module`'s direct children that a slot swap fuses exactly."""
    if not any(is_conv(m) for m in module._modules.values()):
        return Found([], [], set(), "no conv")
    try:
        graphs = [_trace(module, module.training), _trace(module, not module.training)]
        how = "traced"
    except Exception as e:  # noqa: BLE001 - any forward may fail to trace; never the model's problem
        graphs = _known_graphs(module)
        if graphs is None:
            n = sum(is_conv(m) or is_norm(m) for m in module._modules.values())
            reason = (f"its forward does not trace with torch.fx ({type(e).__name__}: "
                      f"{str(e).splitlines()[0][:120] if str(e) else ''}) and is not a known "
                      f"forward: its {n} conv/BatchNorm layer(s) are left as they are")
            return Found([], [("", reason)], set(), "untraced")
        how = "known forward"
        chains, skipped = [], []
        claimed: Set[str] = set()
        for graph in graphs:
            c, s = _analyse(_Graph(module, graph), claimed)
            chains += c
            skipped += s
        return Found(chains, skipped, set(), how)
    gs = [_Graph(module, g) for g in graphs]
    results = [_analyse(g, set()) for g in gs]
    chains = _common([c for c, _ in results])
    return Found(chains, results[0][1], gs[0].direct | gs[1].direct, how)
