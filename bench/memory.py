"""The memory suite: what a ResNet-18/50 training step keeps for backward, per contestant, and
the largest batch that fits a memory budget (`bench/run.py --suite memory [--memory-budget GB]`).

Contestants: eager (the model as built), torch.compile where the run compiles, and for each
resfuse backend of the run the converted model two ways: `resfuse[b]` (default mode) and
`resfuse[b]:low` (`convert(model, memory="low")`: the blocks and the stem's conv1 -> bn1 ->
relu chain in low mode). Every row is a training step (forward,
backward, SGD step) timed like the models suite's, checked against eager on the logits, the
loss and the running statistics, with the bytes saved for backward (`measure.saved_for_backward`)
and, on a GPU, the peak.

The budget search (`largest_batches`): per contestant, the largest batch whose measured memory
fits — on a CPU the bytes saved for backward plus the parameters and their gradients; on a
GPU the peak of one training step above what was allocated before it, plus the parameters —
found by doubling the batch from 2 until a batch does not fit, then bisecting between the last
batch that fit and the first that did not; every point is a measurement, none extrapolated.
"""
from __future__ import annotations

import copy
from typing import Callable, Dict, List

import torch
import torch.nn as nn

import measure
import resfuse
import suites

LOW = ":low"
MOST_BATCH = 4096  # the search stops doubling here


def contestant_names(s: "suites.Settings") -> List[str]:
    """The memory suite's contestants for a run's (eager, torch.compile, resfuse[b]...)."""
    out = []
    for name in s.contestants:
        if "+" in name:  # the models suite's +compile / +cuda-graph variants
            continue
        out.append(name)
        if suites.resfuse_backend(name) is not None:
            out.append(name + LOW)
    return out


def build_contestant(plain: nn.Module, name: str) -> nn.Module:
    be = suites.resfuse_backend(name)
    if name == suites.EAGER:
        return plain
    if be is None:
        return suites.compiled(copy.deepcopy(plain), suites.compile_mode(name))
    m = copy.deepcopy(plain)
    backend = None if be == "auto" else be
    report = resfuse.convert(m, backend=backend, memory="low" if name.endswith(LOW) else "default")
    if not report.swapped:
        raise RuntimeError(f"resfuse.convert fused nothing: {report}")
    return m


def _step_fn(m: nn.Module, xs: list, target: torch.Tensor) -> Callable[[], None]:
    opt = torch.optim.SGD(m.parameters(), lr=1e-4, momentum=0.9)
    counter = [0]

    def run():
        counter[0] += 1
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(m(xs[counter[0] % len(xs)]), target).backward()
        opt.step()
    return run


def _check(m: nn.Module, x: torch.Tensor, target: torch.Tensor) -> list:
    """[logits, running statistics..., loss] of one step from the model's current state
    (restored after)."""
    state = copy.deepcopy(m.state_dict())
    try:
        m.zero_grad(set_to_none=True)
        logits = m(x)
        loss = nn.functional.cross_entropy(logits, target)
        loss.backward()
        m.zero_grad(set_to_none=True)
        return [logits.detach(), *suites._model_state(m), loss.detach()]
    finally:
        m.load_state_dict(state)


def memory_case(model_name: str, s: "suites.Settings") -> "suites.Case":
    n = s.batch

    def build(s: "suites.Settings") -> "suites.Built":
        torch.manual_seed(0)
        plain, source = suites.build_model(model_name)
        suites._randomize_bn(plain)
        plain = plain.to(s.device, s.dtype).to(memory_format=s.memory_format).train()
        xs = [s.randn(n, 3, s.image, s.image) for _ in range(2)]
        target = torch.randint(0, 1000, (n,), device=s.device)
        fns, results = {}, {}
        for name in contestant_names(s):
            m = build_contestant(plain, name).train()
            results[name] = _check(m, xs[0], target)
            fns[name] = _step_fn(m, xs, target)
        eager, limit = results[suites.EAGER], suites.MODEL_LIMIT[s.dtype]
        checks = {suites.EAGER: dict(rel_err=None, parity_ok=None)}
        for name, got in results.items():
            if name != suites.EAGER:
                err = suites.max_rel_err(got, eager)
                checks[name] = dict(rel_err=err, judged_rel_err=err, parity_ok=bool(err <= limit))
        return suites.Built(fns, checks, source)

    return suites.Case("memory", model_name, "train_step", dict(x=[n, 3, s.image, s.image]), n,
                       build)


# The memory suite's networks (the models suite also has MobileNetV2 and DenseNet-121).
MEMORY_MODELS = ("resnet18", "resnet50")


def memory_cases(s: "suites.Settings", quick: bool = False) -> List["suites.Case"]:
    return [memory_case(m, s) for m in (("resnet50",) if quick else MEMORY_MODELS)]


# -- the budget search ---------------------------------------------------------------------------
def _param_bytes(m: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in m.parameters())


def memory_at(m: nn.Module, batch: int, s: "suites.Settings") -> int:
    """The memory one training step of `m` takes at `batch` (see the module's doc); raises
    torch.cuda.OutOfMemoryError where it does not fit on the GPU."""
    x = s.randn(batch, 3, s.image, s.image)
    target = torch.randint(0, 1000, (batch,), device=s.device)
    params = _param_bytes(m)
    if s.device.type != "cuda":
        def forward():  # what the forward saves is what the backward will need
            return nn.functional.cross_entropy(m(x), target)
        return measure.saved_for_backward(forward) + 2 * params
    step = _step_fn(m, [x], target)
    return measure.peak_memory(step, s.device) + params


def largest_batch(m: nn.Module, budget: int, s: "suites.Settings") -> dict:
    """{batch, points: [[batch, bytes or None (did not fit)], ...]} by doubling, then
    bisection on measured points."""
    points = []
    state = copy.deepcopy(m.state_dict())

    def fits(b: int) -> bool:
        try:
            used = memory_at(m, b, s)
        except torch.cuda.OutOfMemoryError:
            used = None
        finally:
            m.load_state_dict(state)
            m.zero_grad(set_to_none=True)
            if s.device.type == "cuda":
                torch.cuda.empty_cache()
        points.append([b, used])
        return used is not None and used <= budget

    lo, hi = 0, None
    b = 2  # (a batch of 1 is no BN training batch where the last stage is 1x1)
    while b <= MOST_BATCH:
        if not fits(b):
            hi = b
            break
        lo, b = b, b * 2
    if hi is not None:
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if fits(mid):
                lo = mid
            else:
                hi = mid
    return dict(batch=lo, points=points, capped=hi is None)


def budget_rows(budget_gb: float, s: "suites.Settings", env: dict, models=MEMORY_MODELS,
                tags=(), rows=None) -> List[dict]:
    """One row per model and contestant: the largest batch under `budget_gb` GB (1e9 bytes),
    appended to `rows` (a new list by default) as each is found, so that a run cut short
    keeps those it found."""
    budget = int(budget_gb * 1e9)
    rows = [] if rows is None else rows
    for model_name in models:
        torch.manual_seed(0)
        plain, source = suites.build_model(model_name)
        suites._randomize_bn(plain)
        plain = plain.to(s.device, s.dtype).to(memory_format=s.memory_format).train()
        for name in contestant_names(s):
            base = dict(suite="memory", case=f"{model_name} largest batch in {budget_gb:g} GB",
                        mode="budget", contestant=name, backend=suites.resfuse_backend(name),
                        dtype=s.dtype_name, layout=s.layout, image=s.image,
                        mem_budget_bytes=budget, model_source=source,
                        **{k: env[k] for k in tags})
            try:
                found = largest_batch(build_contestant(plain, name).train(), budget, s)
            except Exception as e:  # noqa: BLE001 - one contestant's failure is its row
                rows.append(dict(base, batch=None, error=f"{type(e).__name__}: {e}"))
                continue
            rows.append(dict(base, batch=found["batch"], mem_budget_batch=found["batch"],
                             mem_budget_points=found["points"],
                             mem_budget_capped=found["capped"]))
        for r in rows:
            if (r.get("mode") == "budget" and r["case"].startswith(model_name)
                    and r.get("mem_budget_batch") is not None):
                ref = next((q.get("mem_budget_batch") for q in rows
                            if q["case"] == r["case"] and q["contestant"] == suites.EAGER), None)
                r["mem_budget_batch_vs_eager"] = (r["mem_budget_batch"] / ref) if ref else None
    return rows
