"""FusedStage: in eval on the CPU a stage's fused blocks sum their last conv into the residual
in place wherever nothing else can see it (the block's own projection output, a stage's
intermediate), with eager's values; never into the caller's tensor, a hooked block's output
or anything a user's own forward keeps."""
import copy

import pytest
import torch
import torch.nn as nn

import resfuse
from resfuse import eval_plan, models, reference
from resfuse.backend import eager
from conftest import assert_honest, randomize_bn, spy_eval_runner

CL = torch.channels_last


pytestmark = pytest.mark.usefixtures("fresh_eval_plans")


@pytest.fixture
def residual_calls(monkeypatch):
    """Counts the eval runner's residual convs: {"into": in place, "fresh": binary add}."""
    counts = {"into": 0, "fresh": 0}

    def counting(runner, x, residual, into, bounded):
        if residual is not None:
            counts["into" if into else "fresh"] += 1
    spy_eval_runner(monkeypatch, counting)
    return counts


def _resnet(name, layout="nchw"):
    torch.manual_seed(0)
    plain = randomize_bn(getattr(models, name)(num_classes=5)).eval()
    plain.to(memory_format=CL if layout == "channels_last" else torch.contiguous_format)
    fused = copy.deepcopy(plain)
    resfuse.convert(fused)
    return plain, fused


def _stages(m):
    return [m.layer1, m.layer2, m.layer3, m.layer4]


def _run_stages(m, x):
    x = m.maxpool(m.relu(m.bn1(m.conv1(x))))
    outs = []
    for stage in _stages(m):
        x = stage(x)
        outs.append(x)
    return outs


def test_converter_gives_stages_the_class_and_revert_takes_it_back():
    plain, fused = _resnet("resnet50")
    before = copy.deepcopy(plain)
    ids = [id(s) for s in _stages(before)]
    resfuse.convert(before)
    assert [id(s) for s in _stages(before)] == ids  # the same objects
    assert all(type(s) is resfuse.FusedStage for s in _stages(before))
    assert isinstance(before.layer1, nn.Sequential) and len(before.layer1) == 3
    assert list(before.state_dict()) == list(plain.state_dict())
    resfuse.revert(before)
    assert all(type(s) is nn.Sequential for s in _stages(before))
    holder = nn.Sequential(copy.deepcopy(plain.layer1[1]))  # the model itself a Sequential
    resfuse.convert(holder)
    assert type(holder) is resfuse.FusedStage
    resfuse.revert(holder)
    assert type(holder) is nn.Sequential


@pytest.mark.parametrize("name,in_place", [("resnet18", 7), ("resnet50", 16)])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_stage_sums_in_place_with_eagers_values(name, in_place, layout, residual_calls):
    """Every residual conv sums in place but ResNet-18's first (its shortcut is the stage's
    input, the caller's); the stage outputs and logits are eager's; the stage inputs are
    left as they were."""
    plain, fused = _resnet(name, layout)
    plain64 = copy.deepcopy(plain).double()
    for batch in (1, 2):
        x = torch.randn(batch, 3, 40, 40).contiguous(
            memory_format=CL if layout == "channels_last" else torch.contiguous_format)
        with torch.no_grad():
            stem = fused.maxpool(fused.relu(fused.bn1(fused.conv1(x))))
            kept = stem.clone()
            fused.layer1(stem)
            assert torch.equal(stem, kept)
            for _ in range(2):  # the first call per shape sums into a copy, then in place
                residual_calls.update(into=0, fresh=0)
                got = _run_stages(fused, x) + [fused(x)]
            want = _run_stages(plain, x) + [plain(x)]
            want64 = _run_stages(plain64, x.double()) + [plain64(x.double())]
        assert residual_calls["into"] == 2 * in_place
        assert residual_calls["fresh"] == 2 * (8 if name == "resnet18" else 16) - 2 * in_place
        for i, (g, w, w64) in enumerate(zip(got, want, want64)):
            assert_honest(g, w, w64, f"{name} {layout} batch {batch} output {i}")


def test_hooked_block_output_is_not_written(residual_calls):
    """A forward hook keeps layer1[0]'s output: layer1[1] must not sum into it (and with the
    hook gone, it does)."""
    plain, fused = _resnet("resnet18")
    x = torch.randn(2, 3, 40, 40)
    kept = {}
    handle = fused.layer1[0].register_forward_hook(lambda m, i, o: kept.update(out=o))
    with torch.no_grad():
        fused(x)
        fused(x)
        want = plain.layer1[0](plain.maxpool(plain.relu(plain.bn1(plain.conv1(x)))))
    assert residual_calls["into"] == 2 * 6  # layer1[1]'s sum is not in place
    assert_honest(kept["out"], want, want.double(), "the hooked output")
    handle.remove()
    residual_calls.update(into=0)
    with torch.no_grad():
        fused(x)
    assert residual_calls["into"] == 7


def test_global_hook_turns_in_place_off(residual_calls):
    plain, fused = _resnet("resnet18")
    x = torch.randn(2, 3, 40, 40)
    outs = []
    handle = nn.modules.module.register_module_forward_hook(
        lambda m, i, o: outs.append(o) if isinstance(m, resfuse.FusedResidualBlock) else None)
    try:
        with torch.no_grad():
            fused(x)
            fused(x)
    finally:
        handle.remove()
    # only the projections' own outputs are summed into (layer2..4's first blocks)
    assert residual_calls["into"] == 2 * 3
    with torch.no_grad():
        want = _run_stages(plain, x)
    assert_honest(outs[-1], want[-1], want[-1].double(), "the last block's output")


def test_blocks_called_by_a_users_forward_keep_their_outputs(residual_calls):
    """Blocks called one by one (not through a FusedStage): each output is the caller's.
    (x is channels_last: an NCHW residual is converted into a copy, which is summed into.)"""
    torch.manual_seed(0)
    a, b = (randomize_bn(reference.BasicBlock(8, 8)).eval() for _ in range(2))
    fa, fb = (resfuse.fuse_block(m).eval() for m in (a, b))
    x = torch.randn(2, 8, 9, 9).contiguous(memory_format=CL)
    with torch.no_grad():
        for _ in range(2):
            ya = fa(x)
            kept = ya.clone()
            yb = fb(ya)
        assert torch.equal(ya, kept) and yb.data_ptr() != ya.data_ptr()
        want64 = copy.deepcopy(b).double()(copy.deepcopy(a).double()(x.double()))
        assert_honest(yb, b(a(x)), want64, "two blocks")
    assert residual_calls["into"] == 0


@pytest.mark.parametrize("pool", [False, True])
def test_a_projection_block_sums_its_projection_into_the_main_path(pool, monkeypatch):
    """In eval on the CPU, a projection block runs its main path first (the last conv
    without activation) and then the projection conv summed into that in place, with the
    activation (as torch.compile's frozen graphs order it); values are eager's, the input is
    kept. With an avg-pool downsample (ResNet-D) too."""
    torch.manual_seed(0)
    layers = [reference.conv1x1(8, 16, 1 if pool else 2), nn.BatchNorm2d(16)]
    ds = nn.Sequential(nn.AvgPool2d(2, 2, ceil_mode=True), *layers) if pool else nn.Sequential(*layers)
    plain = randomize_bn(reference.Bottleneck(8, 4, 2, ds)).eval()
    fused = resfuse.fuse_block(plain).eval()
    calls = []
    spy_eval_runner(monkeypatch, lambda runner, x, residual, into, bounded: calls.append(
        (x.shape[1], residual is not None, into)))
    x = torch.randn(2, 8, 9, 9)
    kept = x.clone()
    with torch.no_grad():
        for _ in range(2):
            out = fused(x)
        assert_honest(out, plain(x), copy.deepcopy(plain).double()(x.double()), "projection")
    assert torch.equal(x, kept)
    # per call: conv1 (8 in), conv2 (4), conv3 (4) alone, then the projection (8) summed in
    assert calls == [(8, False, False), (4, False, False), (4, False, False), (8, True, True)] * 2


def test_a_module_between_blocks_ends_the_hand_on(residual_calls):
    torch.manual_seed(0)
    blocks = [randomize_bn(reference.BasicBlock(8, 8)).eval() for _ in range(3)]
    plain = nn.Sequential(blocks[0], nn.Identity(), blocks[1], blocks[2])
    fused = copy.deepcopy(plain)
    resfuse.convert(fused)
    assert type(fused) is resfuse.FusedStage
    x = torch.randn(2, 8, 9, 9).contiguous(memory_format=CL)  # (NCHW: summed into a copy)
    with torch.no_grad():
        for _ in range(2):
            residual_calls.update(into=0, fresh=0)
            out = fused(x)
        assert_honest(out, plain(x), copy.deepcopy(plain).double()(x.double()), "stage")
    assert residual_calls == {"into": 1, "fresh": 2}  # blocks[2] only


def test_first_sum_per_shape_goes_into_a_copy(monkeypatch):
    """oneDNN refusing the in-place sum: the refusal costs that shape its plan, the stage's
    intermediate is not left half-written (the first sum per shape goes into a copy)."""
    def refusing(*a, **k):
        raise RuntimeError("refused")
    monkeypatch.setattr(eager, "_onednn_sum_op", lambda: refusing)
    plain, fused = _resnet("resnet18")
    x = torch.randn(2, 3, 40, 40)
    with torch.no_grad():
        for _ in range(2):
            got = _run_stages(fused, x)
        want = _run_stages(plain, x)
    for g, w in zip(got, want):
        assert_honest(g, w, w.double(), "after refusals")
    refused = [p for p in eval_plan._plans.values() if eval_plan._REFUSED in p.shapes.values()]
    assert len(refused) == 7 and all(not p.summed for p in refused)


def test_training_and_gradients_run_as_sequential():
    plain, fused = _resnet("resnet18")
    fused.train()
    plain.train()
    x = torch.randn(2, 3, 40, 40)
    out = fused(x)
    out.sum().backward()
    assert_honest(out, plain(x), copy.deepcopy(plain).double()(x.double()), "training")
    assert fused.layer1[0].conv1.weight.grad is not None


def test_projection_block_keeps_its_memory_mode_where_gradients_are_needed(monkeypatch):
    """Eval-mode BN with gradients needed (fine-tuning a frozen-BN model): the projection
    block's convs take the checked path, each with the block's `memory` mode."""
    import resfuse.functional as RF
    torch.manual_seed(0)
    plain = randomize_bn(reference.Bottleneck(
        8, 4, 2, nn.Sequential(reference.conv1x1(8, 16, 2), nn.BatchNorm2d(16)))).eval()
    fused = resfuse.fuse_block(copy.deepcopy(plain)).eval()
    fused.memory = "low"
    seen = []
    real = RF.conv_bn_act

    def spying(*args, **kwargs):
        seen.append(kwargs.get("memory"))
        return real(*args, **kwargs)
    monkeypatch.setattr(RF, "conv_bn_act", spying)
    x = torch.randn(2, 8, 9, 9, requires_grad=True)
    out = fused(x)
    out.sum().backward()
    assert seen == ["low"] * 4
    want = plain(x)
    assert (out - want).abs().max().item() <= 1e-5 * want.abs().max().item()
