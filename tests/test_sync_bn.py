"""Synchronised BatchNorm across processes (gloo on loopback, CPU): the fused ops, blocks,
`resfuse.SyncBatchNorm`, `convert(sync_bn=True)` and DDP training, each against the eager
chain run in one process on the concatenated batch — what `nn.SyncBatchNorm` computes
(torch's own refuses CPU tensors, so it cannot be the oracle here).

Per-rank batches are uneven and some are empty. The BN weight and bias gradients of each
rank are its own share (nn.SyncBatchNorm's convention; DDP averages them), so the ranks'
parameter gradients sum to the one-process gradient.
"""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn

import resfuse
from dist_harness import rank_slices, run_workers
from dist_workers import (SyncCase, block_inputs, block_state, case_tensors, run_case,
                          train_reference)
import dist_workers

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")

TOL = {torch.float64: 1e-9, torch.float32: 2e-4}


def _close(a, b, tol, what):
    if a is None or b is None:
        assert a is None and b is None, f"{what}: one side has no value"
        return
    assert a.shape == b.shape, f"{what}: shape {tuple(a.shape)} != {tuple(b.shape)}"
    if a.numel() == 0:
        return
    scale = max(1.0, b.abs().max().item())
    err = (a.double() - b.double()).abs().max().item()
    assert err <= tol * scale, f"{what}: max abs difference {err:.3e} > {tol * scale:.1e}"


def _check_against_big_batch(case: SyncCase, ranks: list):
    t = case_tensors(case)
    whole = slice(0, sum(case.sizes))
    tol = TOL[case.dtype]
    if not case.training:  # eval: no synchronisation, each rank is its own batch
        for r, sl in enumerate(rank_slices(case.sizes)):
            local = run_case(case, t, sl, reference_chain=True)
            _close(ranks[r]["y"], local["y"], tol, f"{case} rank {r} y")
        return
    ref = run_case(case, t, whole, reference_chain=True)
    for r, sl in enumerate(rank_slices(case.sizes)):
        got = ranks[r]
        _close(got["y"], ref["y"][sl], tol, f"{case} rank {r} y")
        for k in ("grad_x", "grad_residual"):
            if k in ref:
                _close(got[k], ref[k][sl], tol, f"{case} rank {r} {k}")
        for k in ("running_mean", "running_var"):
            if k in ref:
                _close(got[k], ref[k], tol, f"{case} rank {r} {k}")
        if "num_batches_tracked" in ref:
            assert int(got["num_batches_tracked"]) == int(ref["num_batches_tracked"])
    for k in ("grad_weight", "grad_bias", "grad_bn_weight", "grad_bn_bias"):
        if k in ref:
            total = sum(rk[k] for rk in ranks)
            _close(total, ref[k], tol, f"{case} {k} summed over ranks")


CASES_2 = [
    SyncCase("post", (2, 3), "relu"),
    SyncCase("post", (3, 1), "leaky_relu", momentum=None, seed=1),
    SyncCase("post", (0, 3), "silu", seed=2),                          # an empty rank
    SyncCase("post", (1, 1), "relu", residual=False, stride=2, hw=1, seed=3),  # 1 value per channel per rank
    SyncCase("post", (2, 2), "gelu", affine=False, track=False, seed=4),
    SyncCase("post", (2, 3), "relu", dtype=torch.float32, channels_last=True, seed=5),
    SyncCase("post", (2, 3), "gelu_tanh", backend="pieces", seed=6),
    SyncCase("bn_act", (3, 2), "relu", seed=7),
    SyncCase("bn_act", (2, 0), "identity", momentum=None, seed=8),
    SyncCase("pre", (2, 3), "relu", seed=9),
    SyncCase("pre", (1, 3), "leaky_relu", residual=False, stride=2, affine=False, seed=10),
    SyncCase("pre", (2, 2), "silu", dtype=torch.float32, seed=11),
    SyncCase("post", (2, 3), "relu", training=False, seed=12),          # eval: no sync
]
CASES_3 = [
    SyncCase("post", (2, 0, 3), "relu", seed=20),
    SyncCase("post", (1, 2, 4), "leaky_relu", momentum=None, seed=21),
    SyncCase("bn_act", (3, 1, 1), "silu", seed=22),
    SyncCase("pre", (2, 1, 2), "relu", seed=23),
]


@pytest.mark.parametrize("cases", [CASES_2, CASES_3], ids=["2-processes", "3-processes"])
def test_functional_ops_match_one_big_batch(cases, tmp_path):
    """Every fused op, synchronised: output, gradients (x, residual; weight, bias and the BN
    parameters summed over ranks) and running statistics equal the one-process big batch."""
    world = len(cases[0].sizes)
    ranks = run_workers(dist_workers.functional_cases, world, tmp_path, cases)
    for i, case in enumerate(cases):
        _check_against_big_batch(case, [r[i] for r in ranks])


def test_blocks_and_collective_count(tmp_path):
    """FusedResidualBlock(sync_bn=True): basic, bottleneck with projection, pre-activation;
    one all-reduce per BN in forward and one in backward."""
    sizes = (3, 2)
    kinds = ("basic", "bottleneck", "preact")
    ranks = run_workers(dist_workers.blocks, 2, tmp_path, sizes, kinds)
    for kind in kinds:
        plain = block_state(kind)
        n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in plain.modules())
        out_c, out_hw = (8, 6) if kind == "basic" else (16, 3)
        x, grad = block_inputs(sizes, out_c, out_hw)
        x = x.clone().requires_grad_()
        y = plain(x)
        (y * grad).sum().backward()
        for r, sl in enumerate(rank_slices(sizes)):
            got = ranks[r][kind]
            assert got["norm_types"] == ["SyncBatchNorm"]
            assert got["forward_collectives"] == n_bn, kind
            assert got["backward_collectives"] == n_bn, kind
            _close(got["y"], y.detach()[sl], 1e-9, f"{kind} rank {r} y")
            _close(got["grad_x"], x.grad[sl], 1e-9, f"{kind} rank {r} grad x")
            for k, b in plain.named_buffers():
                _close(got["buffers"][k].double(), b.double(), 1e-9, f"{kind} rank {r} {k}")
        for k, p in plain.named_parameters():
            _close(sum(rk[kind]["grads"][k] for rk in ranks), p.grad, 1e-9, f"{kind} grad {k}")


def test_sync_batch_norm_module_any_rank(tmp_path):
    """resfuse.SyncBatchNorm on (N, C), (N, C, L) and (N, C, D, H, W) inputs, momentum=None."""
    sizes = (2, 3)
    ranks = run_workers(dist_workers.sync_batch_norm_any_rank, 2, tmp_path, sizes)
    for dims in (2, 3, 5):
        g = torch.Generator().manual_seed(dims)
        shape = (sum(sizes), 4) + (3,) * (dims - 2)
        x = (torch.randn(*shape, generator=g, dtype=torch.float64) + 1).requires_grad_()
        grad = torch.randn(*shape, generator=g, dtype=torch.float64)
        bn = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 5: nn.BatchNorm3d}[dims](4, momentum=None).double()
        y = bn(x)
        (y * grad).sum().backward()
        for r, sl in enumerate(rank_slices(sizes)):
            got = ranks[r][dims]
            _close(got["y"], y.detach()[sl], 1e-9, f"{dims}-D y")
            _close(got["grad_x"], x.grad[sl], 1e-9, f"{dims}-D grad x")
            _close(got["running_mean"], bn.running_mean, 1e-9, f"{dims}-D running_mean")
            _close(got["running_var"], bn.running_var, 1e-9, f"{dims}-D running_var")
        _close(ranks[0][dims]["grad_w"] + ranks[1][dims]["grad_w"], bn.weight.grad, 1e-9, "grad w")
        _close(ranks[0][dims]["grad_b"] + ranks[1][dims]["grad_b"], bn.bias.grad, 1e-9, "grad b")


def _check_training(history, reference, tol):
    for step, (got, ref) in enumerate(zip(history, reference)):
        for k, v in ref["params"].items():
            _close(got["params"][k], v, tol, f"step {step} parameter {k}")
        for k, v in ref["buffers"].items():
            if v.is_floating_point():
                _close(got["buffers"][k], v, tol, f"step {step} buffer {k}")
            else:
                assert torch.equal(got["buffers"][k], v), f"step {step} buffer {k}"


@pytest.mark.parametrize("sizes,momentum", [((2, 2), 0.1), ((3, 0, 2), None)],
                         ids=["2-processes", "3-processes-uneven-empty"])
def test_ddp_training_matches_one_process(sizes, momentum, tmp_path):
    """convert(model, sync_bn=True) + DistributedDataParallel, SGD with momentum, 3 steps:
    every parameter and buffer after every step equals one process on the whole batch, and the
    ranks' losses add up to its loss."""
    steps = 3
    ranks = run_workers(dist_workers.ddp_train, len(sizes), tmp_path, steps, sizes, momentum)
    reference = train_reference(steps, sizes, momentum)
    for r, got in enumerate(ranks):
        assert got["swapped"] == 2 and got["synced"] == 7, got
        _check_training(got["history"], reference, 1e-8)
    for step in range(steps):
        total = sum(rk["history"][step]["loss"] for rk in ranks) / len(sizes)
        _close(total, reference[step]["loss"], 1e-9, f"step {step} loss")


def test_ddp_training_float32(tmp_path):
    """The same in float32 (statistics exchanged as float64 sums), 2 processes, uneven."""
    sizes, steps = (3, 2), 2
    ranks = run_workers(dist_workers.ddp_train, 2, tmp_path, steps, sizes, 0.1, torch.float32)
    reference = train_reference(steps, sizes, dtype=torch.float32)
    for got in ranks:
        _check_training(got["history"], reference, 2e-4)


def test_compile_fullgraph_with_sync_bn(tmp_path):
    """torch.compile(fullgraph=True) of a converted model with synchronised BN: no graph
    break (the all-reduce is a functional collective in the graph), same results as eager."""
    ranks = run_workers(dist_workers.compiled_sync_model, 2, tmp_path, (2, 3))
    for r, got in enumerate(ranks):
        e, c = got["eager"], got["compiled"]
        _close(c["out"], e["out"], 1e-9, f"rank {r} output")
        for k in e["grads"]:
            _close(c["grads"][k], e["grads"][k], 1e-9, f"rank {r} grad {k}")
        for k in e["buffers"]:
            _close(c["buffers"][k].double(), e["buffers"][k].double(), 1e-9, f"rank {r} {k}")


# ----------------------------------------------------------- one process: convert and checks

def _bn_layers(model):
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def test_convert_sync_bn_swaps_every_batch_norm_keeping_state():
    """convert(sync_bn=True): every BatchNorm becomes resfuse.SyncBatchNorm sharing the very
    same Parameters and buffers; state-dict keys unchanged; with torch.distributed not
    initialised it computes plain BN (as nn.SyncBatchNorm does)."""
    plain, model = dist_workers.tiny_resnet(), dist_workers.tiny_resnet()
    params = [id(p) for p in model.parameters()]
    buffers = [id(b) for b in model.buffers()]
    keys = list(model.state_dict())
    report = resfuse.convert(model, sync_bn=True)
    assert len(report.swapped) == 2 and len(report.synced) == 7 and not report.skipped
    assert "7 BatchNorm layer(s) synchronised" in str(report)
    # (the stem's BN sits in a fused chain: its slot is a resfuse.SyncBatchNorm too)
    assert all(isinstance(m, resfuse.SyncBatchNorm) for m in _bn_layers(model))
    assert [id(p) for p in model.parameters()] == params
    assert [id(b) for b in model.buffers()] == buffers
    assert list(model.state_dict()) == keys
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64)
    torch.testing.assert_close(model(x), plain(x), rtol=0, atol=1e-12)
    for (k, a), b in zip(model.named_buffers(), plain.buffers()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12, msg=k)


def test_convert_fuses_a_model_holding_torch_sync_batch_norm():
    """A model already holding nn.SyncBatchNorm (which DDP refuses in a CPU model and which
    refuses CPU tensors under torch.distributed) is fused, its layers made resfuse's."""
    model = nn.SyncBatchNorm.convert_sync_batchnorm(dist_workers.tiny_resnet())
    report = resfuse.convert(model)
    assert len(report.swapped) == 2 and len(report.synced) == 7
    assert not any(type(m) is nn.SyncBatchNorm for m in model.modules())
    assert isinstance(model.layer1[1], resfuse.FusedBottleneck)


def test_convert_sync_bn_is_all_or_nothing(monkeypatch):
    import importlib
    mod = importlib.import_module("resfuse.convert")
    model = dist_workers.tiny_resnet()
    before = [type(m) for m in model.modules()]
    with pytest.raises(ValueError, match="process_group"):
        resfuse.convert(model, process_group=object())

    def broken(*args):
        raise RuntimeError("planning failed")
    monkeypatch.setattr(mod, "_block_plan", broken)
    with pytest.raises(RuntimeError, match="planning failed"):
        resfuse.convert(model, sync_bn=True)
    assert [type(m) for m in model.modules()] == before


def test_convert_sync_bn_reports_batch_norm_subclasses():
    class MyBN(nn.BatchNorm2d):
        pass
    model = nn.Sequential(nn.Conv2d(3, 4, 3), MyBN(4), nn.BatchNorm2d(4))
    report = resfuse.convert(model, sync_bn=True)
    assert type(model[1]) is MyBN and type(model[2]) is resfuse.SyncBatchNorm
    assert report.skipped and "BatchNorm subclass" in report.skipped[0][2]


def test_process_group_bad_input_and_module_options():
    x = torch.randn(2, 4, 3, 3)
    with pytest.raises(resfuse.ResfuseInputError, match="process_group"):
        resfuse.functional.bn_act(x, training=True, process_group="world")
    m = resfuse.FusedConvBNAct(3, 4, 3, sync_bn=True)
    assert type(m.bn) is resfuse.SyncBatchNorm and m.bn.process_group is None
    with pytest.raises(resfuse.ResfuseInputError, match="sync_bn"):
        resfuse.FusedConvBNAct(3, 4, 3, process_group=object())
    block = resfuse.FusedResidualBlock(8, 4, bottleneck=True, sync_bn=True)
    assert {type(b) for b in _bn_layers(block)} == {resfuse.SyncBatchNorm}
    with pytest.raises(ValueError, match="at least 2D"):
        resfuse.SyncBatchNorm(4)(torch.randn(4))
