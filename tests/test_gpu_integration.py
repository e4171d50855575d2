"""On a GPU (skipped without one): no host synchronisation in a fused training step, a whole
training step captured and replayed in a CUDA graph, and torch.compile(fullgraph=True), each
on every GPU backend available, against eager steps on the same model."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import resfuse
from dist_workers import tiny_resnet, train_batches

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
BACKENDS = [b for b in ("eager", "pieces", "cuda", "triton")
            if resfuse.backends()[b] == "ok"] or ["eager"]


def _model(backend, momentum=0.1):
    model = tiny_resnet(torch.float32).cuda().to(memory_format=torch.channels_last)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = momentum
    resfuse.convert(model, backend=backend)
    return model


def _batches(steps):
    return [(x.cuda().contiguous(memory_format=torch.channels_last), t.cuda())
            for x, t in train_batches(steps, 8, torch.float32)]


def _step(model, opt, x, t):
    loss = F.cross_entropy(model(x), t)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=False)
    return loss


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("momentum", [0.1, None])
def test_training_step_never_syncs_with_the_host(backend, momentum):
    model = _model(backend, momentum)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    (x, t), = _batches(1)
    _step(model, opt, x, t)  # first call: lazy initialisation may sync
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = model(x)
        out.float().sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("backend", BACKENDS)
def test_training_step_in_a_cuda_graph(backend):
    """Capture forward, backward and the SGD step once; replaying it with new inputs trains
    the model exactly as eager steps do (parameters and running statistics)."""
    warmup, steps = 3, 4
    batches = _batches(warmup + steps)
    eager, graphed = _model(backend), _model(backend)
    opt_e = torch.optim.SGD(eager.parameters(), lr=0.05, momentum=0.9)
    opt_g = torch.optim.SGD(graphed.parameters(), lr=0.05, momentum=0.9)
    for x, t in batches:
        _step(eager, opt_e, x, t)
    static_x, static_t = batches[0][0].clone(), batches[0][1].clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the graph (allocations, lazy state)
        for x, t in batches[:warmup]:
            static_x.copy_(x), static_t.copy_(t)
            _step(graphed, opt_g, static_x, static_t)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_loss = _step(graphed, opt_g, static_x, static_t)
    # Capturing ran nothing; the captured step is replayed once per remaining batch.
    for x, t in batches[warmup:]:
        static_x.copy_(x), static_t.copy_(t)
        graph.replay()
    torch.cuda.synchronize()
    assert torch.isfinite(static_loss).all()
    for (k, a), b in zip(graphed.named_parameters(), eager.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=k)
    for (k, a), b in zip(graphed.named_buffers(), eager.buffers()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=k)


@pytest.mark.parametrize("backend", BACKENDS)
def test_compile_fullgraph_on_gpu(backend):
    torch.compiler.reset()
    (x, t), = _batches(1)
    outs = []
    for compiled in (False, True):
        model = _model(backend)
        run = torch.compile(model, fullgraph=True) if compiled else model
        loss = F.cross_entropy(run(x), t)
        loss.backward()
        outs.append((loss.detach(), [p.grad for p in model.parameters()], list(model.buffers())))
    (le, ge, be), (lc, gc, bc) = outs
    torch.testing.assert_close(lc, le, rtol=1e-4, atol=1e-5)
    for a, b in zip(gc + bc, ge + be):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)
