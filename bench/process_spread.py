"""How much a CPU eval comparison moves from one process to the next.

    python bench/process_spread.py [--model resnet18] [--batch 8] [--image 160]
                                   [--layout nchw] [--processes 6] [--repeats 20] [--out DIR]

Runs `--processes` fresh Python processes one after another; each builds the model
(`resfuse.models`), a converted copy and bench's `torch.compile(freezing)` contestant, checks
resfuse's logits against eager's, and takes interleaved medians of `--repeats` calls of all
three. Writes one row per process (eager, resfuse and freezing ms, resfuse against eager and
against freezing) and the spread to a Markdown file `<date>-cpu-spread-<model>-...-<commit>.md`.
What this answers: whether a ratio in one bench run is resfuse's or its baseline's doing. The
ratio to eager moves with eager's own time, which on some CPUs differs by 10 % and more from
one process to the next; the ratio to freezing, both measured in the same process, moves less.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))


def one_process(model: str, batch: int, image: int, layout: str, repeats: int) -> dict:
    """{eager, resfuse, freezing: median ms} measured in this process."""
    import copy

    import torch

    sys.path.insert(0, _HERE)
    import suites
    from profile_cpu_eval import _interleaved_medians_ms

    import resfuse
    from resfuse import models

    torch.manual_seed(0)
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    plain = getattr(models, model)().eval().to(memory_format=fmt)
    fused = copy.deepcopy(plain)
    resfuse.convert(fused)
    frozen = suites.FrozenCompiled(copy.deepcopy(plain))
    x = torch.randn(batch, 3, image, image).contiguous(memory_format=fmt)
    with torch.no_grad():
        want = plain(x)
        err = suites.rel_err(fused(x), want)
        if err > suites.MODEL_LIMIT[torch.float32]:
            raise SystemExit(f"resfuse: relative error {err:.2e} against eager")
        for _ in range(2):
            plain(x), fused(x), frozen(x)
        return _interleaved_medians_ms({"eager": lambda: plain(x), "resfuse": lambda: fused(x),
                                        "freezing": lambda: frozen(x)}, repeats)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="resnet18", choices=["resnet18", "resnet50"])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--image", type=int, default=160)
    p.add_argument("--layout", default="nchw", choices=["nchw", "channels_last"])
    p.add_argument("--processes", type=int, default=6)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--out", default="bench/out")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        print(json.dumps(one_process(a.model, a.batch, a.image, a.layout, a.repeats)))
        return 0
    args = [sys.executable, os.path.abspath(__file__), "--child", "--model", a.model,
            "--batch", str(a.batch), "--image", str(a.image), "--layout", a.layout,
            "--repeats", str(a.repeats)]
    rows = []
    for i in range(a.processes):
        done = subprocess.run(args, capture_output=True, text=True, check=True)
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        r = rows[-1]
        print(f"process {i + 1}: eager {r['eager']:.2f} ms, resfuse {r['resfuse']:.2f} ms, "
              f"freezing {r['freezing']:.2f} ms", flush=True)
    sys.path.insert(0, _HERE)
    import measure
    import torch
    env = measure.environment(torch.device("cpu"))
    vs_eager = [r["eager"] / r["resfuse"] for r in rows]
    vs_frozen = [r["freezing"] / r["resfuse"] for r in rows]
    lines = [f"# Process to process: {a.model}, batch {a.batch}, {a.image}×{a.image}, {a.layout}",
             "", f"{env['device']} ({env['threads']} threads); torch {env['torch']}; resfuse "
             f"{env['resfuse']} @ `{env['commit']}`, {env['date'][:10]}; "
             f"`python bench/process_spread.py --model {a.model} --batch {a.batch} --image "
             f"{a.image} --layout {a.layout} --processes {a.processes} --repeats {a.repeats}`",
             "", __doc__.split("\n\n")[2].replace("\n", " "), "",
             "| process | eager ms | resfuse ms | freezing ms | resfuse vs eager | "
             "resfuse vs freezing |", "| ---: | ---: | ---: | ---: | ---: | ---: |"]
    for i, (r, e, f) in enumerate(zip(rows, vs_eager, vs_frozen), 1):
        lines.append(f"| {i} | {r['eager']:.2f} | {r['resfuse']:.2f} | {r['freezing']:.2f} | "
                     f"{e:.2f}× | {f:.3f}× |")
    span = lambda k: (min(r[k] for r in rows), max(r[k] for r in rows))  # noqa: E731
    lines += ["", "Spread over the processes: " + ", ".join(
        f"{k} {lo:.2f}–{hi:.2f} ms" for k, (lo, hi) in ((k, span(k)) for k in
                                                   ("eager", "resfuse", "freezing"))) +
              f"; resfuse vs eager {min(vs_eager):.2f}–{max(vs_eager):.2f}×, vs freezing "
              f"{min(vs_frozen):.3f}–{max(vs_frozen):.3f}×.", ""]
    from profile_cpu_eval import write_markdown
    write_markdown(a.out, f"{env['date'][:10]}-cpu-spread-{a.model}-b{a.batch}-{a.image}-"
                          f"{a.layout}-{env['commit']}", lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
