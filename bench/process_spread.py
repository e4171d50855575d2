"""How much a CPU comparison moves from one process to the next.

    python bench/process_spread.py [--model resnet18] [--batch 8] [--image 160]
                                   [--layout nchw] [--mode eval] [--processes 6]
                                   [--repeats 20] [--out DIR]

Runs `--processes` fresh Python processes one after another; each builds the model
(`resfuse.models`) and a converted copy, checks resfuse's logits against eager's, and takes
interleaved medians of `--repeats` calls of three contestants: in eval (`--mode eval`) eager,
resfuse and bench's `torch.compile(freezing)`; in training (`--mode train_step`: forward,
cross-entropy, backward and an SGD step, as bench's models suite times it) eager, resfuse,
and resfuse with its training plans off (`resfuse.train_plan.disabled()`, the same converted
model). Writes one row per process and the spread to a Markdown file
`<date>-cpu-spread-[train-]<model>-...-<commit>.md`.

What this answers: whether a ratio in one bench run is resfuse's or its baseline's doing. The
ratio to eager moves with eager's own time, which on some CPUs differs by 10 % and more from
one process to the next; a ratio of two contestants that share a model (resfuse with and
without training plans) or are both measured beside it (freezing) moves less.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))


_THIRD = {"eval": "freezing", "train_step": "resfuse, training plans off"}


def one_process(model: str, batch: int, image: int, layout: str, repeats: int,
                mode: str = "eval") -> dict:
    """{eager, resfuse, and `_THIRD[mode]`: median ms} measured in this process."""
    import copy

    import torch

    sys.path.insert(0, _HERE)
    import suites
    from profile_cpu_eval import _interleaved_medians_ms

    import resfuse
    from resfuse import models, train_plan

    torch.manual_seed(0)
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    train = mode == "train_step"
    # (MobileNetV2's dropout off, as bench's suite has it: a training check must agree)
    plain = getattr(models, model)(**suites._MODEL_KWARGS.get(model, {}))
    plain = plain.train(train).to(memory_format=fmt)
    fused = copy.deepcopy(plain)
    resfuse.convert(fused)
    x = torch.randn(batch, 3, image, image).contiguous(memory_format=fmt)
    with torch.set_grad_enabled(train):
        want = plain(x)
        err = suites.rel_err(fused(x), want)
    if err > suites.MODEL_LIMIT[torch.float32]:
        raise SystemExit(f"resfuse: relative error {err:.2e} against eager")
    if not train:
        frozen = suites.FrozenCompiled(copy.deepcopy(plain))
        fns = {"eager": lambda: plain(x), "resfuse": lambda: fused(x),
               "freezing": lambda: frozen(x)}
        with torch.no_grad():
            for _ in range(2):
                for f in fns.values():
                    f()
            return _interleaved_medians_ms(fns, repeats)
    target = torch.randint(0, 1000, (batch,))

    def step(m, plans=True):
        opt = torch.optim.SGD(m.parameters(), lr=1e-4, momentum=0.9)

        def run():
            old = train_plan.set_enabled(plans)
            try:
                opt.zero_grad(set_to_none=True)
                torch.nn.functional.cross_entropy(m(x), target).backward()
                opt.step()
            finally:
                train_plan.set_enabled(old)
        return run
    fns = {"eager": step(plain), "resfuse": step(fused),
           _THIRD[mode]: step(fused, plans=False)}
    for _ in range(2):
        for f in fns.values():
            f()
    return _interleaved_medians_ms(fns, repeats)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="resnet18",  # (bench/suites.py's MODELS)
                   choices=["resnet18", "resnet50", "mobilenet_v2", "densenet121"])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--image", type=int, default=160)
    p.add_argument("--layout", default="nchw", choices=["nchw", "channels_last"])
    p.add_argument("--mode", default="eval", choices=sorted(_THIRD))
    p.add_argument("--processes", type=int, default=6)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--out", default="bench/out")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        print(json.dumps(one_process(a.model, a.batch, a.image, a.layout, a.repeats, a.mode)))
        return 0
    args = [sys.executable, os.path.abspath(__file__), "--child", "--model", a.model,
            "--batch", str(a.batch), "--image", str(a.image), "--layout", a.layout,
            "--repeats", str(a.repeats), "--mode", a.mode]
    third = _THIRD[a.mode]
    rows = []
    for i in range(a.processes):
        done = subprocess.run(args, capture_output=True, text=True, check=True)
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        r = rows[-1]
        print(f"process {i + 1}: eager {r['eager']:.2f} ms, resfuse {r['resfuse']:.2f} ms, "
              f"{third} {r[third]:.2f} ms", flush=True)
    sys.path.insert(0, _HERE)
    import measure
    import torch
    env = measure.environment(torch.device("cpu"))
    vs_eager = [r["eager"] / r["resfuse"] for r in rows]
    vs_third = [r[third] / r["resfuse"] for r in rows]
    against = "freezing" if a.mode == "eval" else "training plans off"
    what = "eval" if a.mode == "eval" else "training step"
    lines = [f"# Process to process: {a.model} {what}, batch {a.batch}, {a.image}×{a.image}, "
             f"{a.layout}", "", f"{env['device']} ({env['threads']} threads); torch "
             f"{env['torch']}; resfuse {env['resfuse']} @ `{env['commit']}`, {env['date'][:10]}; "
             f"`python bench/process_spread.py --model {a.model} --batch {a.batch} --image "
             f"{a.image} --layout {a.layout} --mode {a.mode} --processes {a.processes} "
             f"--repeats {a.repeats}`",
             "", __doc__.split("\n\n")[3].replace("\n", " "), "",
             f"| process | eager ms | resfuse ms | {third} ms | resfuse vs eager | "
             f"resfuse vs {against} |", "| ---: | ---: | ---: | ---: | ---: | ---: |"]
    for i, (r, e, f) in enumerate(zip(rows, vs_eager, vs_third), 1):
        lines.append(f"| {i} | {r['eager']:.2f} | {r['resfuse']:.2f} | {r[third]:.2f} | "
                     f"{e:.2f}× | {f:.3f}× |")
    span = lambda k: (min(r[k] for r in rows), max(r[k] for r in rows))  # noqa: E731
    lines += ["", "Spread over the processes: " + ", ".join(
        f"{k} {lo:.2f}–{hi:.2f} ms" for k, (lo, hi) in ((k, span(k)) for k in
                                                   ("eager", "resfuse", third))) +
              f"; resfuse vs eager {min(vs_eager):.2f}–{max(vs_eager):.2f}×, vs {against} "
              f"{min(vs_third):.3f}–{max(vs_third):.3f}×.", ""]
    from profile_cpu_eval import write_markdown
    kind = "" if a.mode == "eval" else "train-"
    write_markdown(a.out, f"{env['date'][:10]}-cpu-spread-{kind}{a.model}-b{a.batch}-"
                          f"{a.image}-{a.layout}-{env['commit']}", lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
