#!/usr/bin/env python3
"""Converted ResNet against eager PyTorch: a parity check and a timing table.

    python bench/run.py                          # ResNet-50, eval + training, on this device
    python bench/run.py --model resnet18 --batch 8 --size 224 --compile --out bench/results
    python bench/run.py --compile --cuda-graphs                # on a GPU: + compile, + CUDA graphs

What it does, on whatever device there is (CPU unless CUDA is available or --device says so):
1. builds the model (torchvision's when it imports, else `resfuse.models`' torchvision-compatible
   definition), with non-trivial BN statistics, and a copy converted by `resfuse.convert`;
2. parity: eval outputs, and one training step's loss and every parameter gradient, of the
   converted copy against the original (max abs difference relative to the largest value);
3. timing: eval forward and a training step (forward, backward, SGD step) of each contestant
   (eager, resfuse; with --compile both under torch.compile; with --cuda-graphs, on a GPU, the
   converted model's whole training step captured once in a CUDA graph and replayed),
   interleaved repetition by repetition so that drift of the machine hits all alike; median with
   20th/80th percentiles, images per second and the ratio to eager from the same run.
Results go to a JSON file (with device, versions, commit and settings) under --out.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch
import torch.nn as nn

import resfuse

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def build_model(name: str, num_classes: int = 1000) -> tuple[nn.Module, str]:
    try:
        import torchvision
        return getattr(torchvision.models, name)(num_classes=num_classes), "torchvision"
    except Exception:  # torchvision missing or built for another torch
        from resfuse import models
        return getattr(models, name)(num_classes=num_classes), "resfuse.models"


def randomize_bn(model: nn.Module):
    """Running statistics and affine parameters away from their (1, 0) init, so that folding
    and normalisation are actually exercised."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.num_features, generator=g) * 0.5 + 0.75)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) * 0.5 + 0.75)


def sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


def parity(plain: nn.Module, fused: nn.Module, x: torch.Tensor, target: torch.Tensor) -> dict:
    plain, fused = copy.deepcopy(plain), copy.deepcopy(fused)  # timing models stay untouched
    plain.eval(), fused.eval()
    with torch.no_grad():
        eval_diff = rel_diff(fused(x), plain(x))
    plain.train(), fused.train()
    losses = []
    for m in (plain, fused):
        loss = nn.functional.cross_entropy(m(x), target)
        loss.backward()
        losses.append(loss.item())
    fp, fb = dict(fused.named_parameters()), dict(fused.named_buffers())
    grad_diff = max(rel_diff(fp[n].grad, p.grad) for n, p in plain.named_parameters())
    stat_diff = max(rel_diff(fb[n], b) for n, b in plain.named_buffers() if b.is_floating_point())
    return dict(eval_output_rel_diff=eval_diff, train_loss_eager=losses[0],
                train_loss_resfuse=losses[1], train_grad_max_rel_diff=grad_diff,
                running_stats_max_rel_diff=stat_diff)


def contestants(plain: nn.Module, fused: nn.Module, use_compile: bool) -> dict:
    out = {"eager": plain, "resfuse": fused}
    if use_compile:
        out["torch.compile"] = torch.compile(copy.deepcopy(plain))
        out["resfuse+compile"] = torch.compile(copy.deepcopy(fused))
    return out


def graphed_train_step(model: nn.Module, inputs: list, target: torch.Tensor, counter: list):
    """The training step (forward, backward, SGD step) of `model` captured in one CUDA graph,
    after warm-up steps on a side stream; each call copies the next input into the captured
    input buffer and replays the graph."""
    opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    static_x = inputs[0].clone()

    def step():
        nn.functional.cross_entropy(model(static_x), target).backward()
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

    def replay():
        counter[0] += 1
        static_x.copy_(inputs[counter[0] % 2])
        graph.replay()
    return replay


def time_interleaved(fns: dict, repeats: int, warmup: int, device) -> dict:
    """{name: [seconds, ...]}: one repetition of each contestant in turn, `repeats` times."""
    for f in fns.values():
        for _ in range(warmup):
            f()
    sync(device)
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            sync(device)
            t0 = time.perf_counter()
            f()
            sync(device)
            times[k].append(time.perf_counter() - t0)
    return times


def summarize(ts: list, batch: int) -> dict:
    q = statistics.quantiles(ts, n=5) if len(ts) >= 2 else [ts[0]] * 4
    med = statistics.median(ts)
    return dict(median_ms=med * 1e3, p20_ms=q[0] * 1e3, p80_ms=q[3] * 1e3, img_per_s=batch / med,
                repeats=len(ts))


def environment(device: torch.device) -> dict:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True,
                                capture_output=True, check=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                                    cwd=ROOT, text=True, capture_output=True).stdout.strip())
    except Exception:
        commit, dirty = "unknown", False
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = platform.processor() or platform.machine()
        try:
            with open("/proc/cpuinfo") as f:
                name = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
        except Exception:
            pass
    try:
        import triton
        triton_version = triton.__version__
    except Exception:
        triton_version = None
    return dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                device=name, device_type=device.type, threads=torch.get_num_threads(),
                cpu_count=os.cpu_count(), torch=torch.__version__, cuda=torch.version.cuda,
                triton=triton_version, python=platform.python_version(),
                resfuse=resfuse.__version__, commit=commit + ("-dirty" if dirty else ""),
                backends=resfuse.backends())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="resnet50", choices=["resnet18", "resnet34", "resnet50",
                                                           "resnet101", "resnext50_32x4d",
                                                           "wide_resnet50_2"])
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--batch", type=int, default=None, help="default: 4 on CPU, 256 on CUDA")
    p.add_argument("--size", type=int, default=None, help="image side; default 160 on CPU, 224 on CUDA")
    p.add_argument("--layout", default="channels_last", choices=["channels_last", "nchw"])
    p.add_argument("--modes", default="eval,train", help="comma list of eval, train")
    p.add_argument("--repeats", type=int, default=None, help="default: 15 on CPU, 50 on CUDA")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--compile", action="store_true", help="add torch.compile contestants")
    p.add_argument("--cuda-graphs", action="store_true",
                   help="on CUDA: add the converted model's training step replayed from a CUDA graph")
    p.add_argument("--out", default=os.path.join(ROOT, "bench", "out"),
                   help="folder for the JSON result file")
    args = p.parse_args(argv)

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    on_gpu = device.type == "cuda"
    if args.threads:
        torch.set_num_threads(args.threads)
    batch = args.batch or (256 if on_gpu else 4)
    size = args.size or (224 if on_gpu else 160)
    repeats = args.repeats or (50 if on_gpu else 15)
    dtype = getattr(torch, args.dtype)
    fmt = torch.channels_last if args.layout == "channels_last" else torch.contiguous_format

    torch.manual_seed(0)
    plain, source = build_model(args.model)
    randomize_bn(plain)
    plain = plain.to(device=device, dtype=dtype, memory_format=fmt)
    fused = copy.deepcopy(plain)
    report = resfuse.convert(fused)
    env = environment(device)
    print(f"resfuse {env['resfuse']} ({env['commit']}) on {env['device']}, torch {env['torch']}, "
          f"{env['threads']} threads")
    print(f"{args.model} from {source}: {report.__str__().splitlines()[0]}; batch {batch}, "
          f"{size}x{size}, {args.dtype}, {args.layout}")

    x = torch.randn(batch, 3, size, size, device=device, dtype=dtype).contiguous(memory_format=fmt)
    target = torch.randint(0, 1000, (batch,), device=device)
    par = parity(plain, fused, x, target)
    print("parity: eval output rel diff {eval_output_rel_diff:.2e}; train loss {train_loss_eager:.6f} "
          "vs {train_loss_resfuse:.6f}; max grad rel diff {train_grad_max_rel_diff:.2e}; "
          "running stats rel diff {running_stats_max_rel_diff:.2e}".format(**par))

    rows = []
    models = contestants(plain, fused, args.compile)
    inputs = [x, x.flip(0).contiguous(memory_format=fmt)]  # rotate two batches
    for mode in [m.strip() for m in args.modes.split(",") if m.strip()]:
        fns, counter = {}, [0]
        for name, m in models.items():
            if mode == "eval":
                m.eval()

                def f(m=m):
                    counter[0] += 1
                    with torch.no_grad():
                        m(inputs[counter[0] % 2])
            else:
                m.train()
                opt = torch.optim.SGD(m.parameters(), lr=1e-4, momentum=0.9)

                def f(m=m, opt=opt):
                    counter[0] += 1
                    opt.zero_grad(set_to_none=True)
                    nn.functional.cross_entropy(m(inputs[counter[0] % 2]), target).backward()
                    opt.step()
            fns[name] = f
        if mode == "train" and args.cuda_graphs and on_gpu:
            fns["resfuse+cuda-graph"] = graphed_train_step(copy.deepcopy(fused).train(), inputs,
                                                           target, counter)
        times = time_interleaved(fns, repeats, args.warmup, device)
        base = statistics.median(times["eager"])
        for name, ts in times.items():
            s = summarize(ts, batch)
            rows.append(dict(mode=mode, contestant=name, speedup_vs_eager=base / statistics.median(ts), **s))

    print(f"\n{'mode':6} {'contestant':20} {'median ms':>10} {'p20':>9} {'p80':>9} {'img/s':>9} {'vs eager':>9}")
    for r in rows:
        print(f"{r['mode']:6} {r['contestant']:20} {r['median_ms']:10.1f} {r['p20_ms']:9.1f} "
              f"{r['p80_ms']:9.1f} {r['img_per_s']:9.1f} {r['speedup_vs_eager']:8.3f}x")

    result = dict(env=env, settings=dict(model=args.model, model_source=source, batch=batch,
                                         size=size, dtype=args.dtype, layout=args.layout,
                                         repeats=repeats, warmup=args.warmup,
                                         compile=args.compile,
                                         cuda_graphs=args.cuda_graphs and on_gpu),
                  convert=dict(swapped=len(report.swapped), skipped=report.skipped),
                  parity=par, rows=rows)
    os.makedirs(args.out, exist_ok=True)
    tag = "{}-{}-{}-{}".format(env["date"][:10], device.type, args.model, env["commit"])
    path = os.path.join(args.out, f"{tag}.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    print(f"\nwrote {os.path.relpath(path, os.getcwd())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
