#!/usr/bin/env python3
"""Render the README's results section from the committed result files.

    python bench/report.py            # rewrites README.md between the results markers
    python bench/report.py --print    # prints the section instead

Every row comes from a JSON file under bench/results/ written by bench/run.py; the newest file
per (device type, model, dtype, layout) is shown, with its date, device, commit and settings.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
START, END = "<!-- results:start -->", "<!-- results:end -->"


def load(results_dir: str) -> list:
    runs = []
    for path in sorted(glob.glob(os.path.join(results_dir, "*.json"))):
        with open(path) as f:
            r = json.load(f)
        r["_file"] = os.path.relpath(path, ROOT)
        runs.append(r)
    newest = {}
    for r in runs:
        if r.get("kind") == "cuda-kernels":  # bench/cuda_kernels.py: its own table
            key = ("cuda-kernels", r["env"]["device"], r["dtype"], r["layout"])
            if key not in newest or r["env"]["date"] > newest[key]["env"]["date"]:
                newest[key] = r
            continue
        s = r["settings"]
        key = (r["env"]["device_type"], s["model"], s["dtype"], s["layout"])
        if key not in newest or r["env"]["date"] > newest[key]["env"]["date"]:
            newest[key] = r
    return sorted(newest.values(), key=lambda r: r["env"]["date"], reverse=True)


def render(runs: list) -> str:
    if not runs:
        return "No results recorded yet."
    out = []
    for r in runs:
        if r.get("kind") == "cuda-kernels":
            out += render_kernels(r)
            continue
        e, s, p = r["env"], r["settings"], r["parity"]
        out.append(f"**{s['model']}** ({s['model_source']}), batch {s['batch']}, {s['size']}×{s['size']}, "
                   f"{s['dtype']}, {s['layout']} — {e['device']} ({e['threads']} threads), "
                   f"torch {e['torch']}, resfuse {e['resfuse']} @ `{e['commit']}`, {e['date'][:10]}; "
                   f"median of {s['repeats']} interleaved repetitions "
                   f"([`{r['_file']}`]({r['_file']})):")
        out.append("")
        out.append("| mode | contestant | median ms | p20–p80 ms | img/s | vs eager |")
        out.append("| --- | --- | ---: | ---: | ---: | ---: |")
        for row in r["rows"]:
            mode = {"eval": "eval (inference)", "train": "training step"}.get(row["mode"], row["mode"])
            out.append(f"| {mode} | {row['contestant']} | {row['median_ms']:.1f} | "
                       f"{row['p20_ms']:.1f}–{row['p80_ms']:.1f} | {row['img_per_s']:.1f} | "
                       f"{row['speedup_vs_eager']:.3f}× |")
        out.append("")
        out.append(f"Parity in the same run: eval output max relative difference "
                   f"{p['eval_output_rel_diff']:.1e}; training-step loss {p['train_loss_resfuse']:.6f} "
                   f"vs {p['train_loss_eager']:.6f} eager, largest parameter-gradient relative "
                   f"difference {p['train_grad_max_rel_diff']:.1e}, running statistics "
                   f"{p['running_stats_max_rel_diff']:.1e}.")
        out.append("")
    return "\n".join(out).rstrip()


def render_kernels(r: dict) -> list:
    """A bench/cuda_kernels.py run: kernels against the copy ceiling, blocks against eager and
    torch.compile."""
    e, c = r["env"], r["ceilings"]
    out = [f"**CUDA backend, kernels and a bottleneck block** — {e['device']}, {r['dtype']}, "
           f"{r['layout']}, batch {r['batch']}, torch {e['torch']} (CUDA {e['cuda']}), "
           f"resfuse @ `{e['commit']}`, {e['date'][:10]}; CUDA-event medians "
           f"([`{r['_file']}`]({r['_file']})). Ceilings measured in the same run: copy "
           f"{c['copy_gbs']:.0f} GB/s (read + write), bf16 matmul {c['matmul_bf16_tflops']:.0f} TFLOP/s.", "",
           "| kernel (N×256×56×56) | median ms | GB/s | of copy |", "| --- | ---: | ---: | ---: |"]
    for row in r["rows"]:
        if row["kind"] == "kernel":
            out.append(f"| {row['name']} | {row['ms']:.3f} | {row['gbs']:.0f} | {row['frac_copy']:.0%} |")
    out += ["", "| BN + add + ReLU, training forward + backward | median ms |", "| --- | ---: |"]
    for row in r["rows"]:
        if row["kind"] == "bn_act_train":
            out.append(f"| {row['name'].split(': ', 1)[-1]} | {row['ms']:.3f} |")
    out += ["", "| bottleneck 256-64-256, 56×56 | contestant | median ms | p20–p80 ms | vs eager | "
            "vs torch.compile | peak memory above inputs |",
            "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for row in r["rows"]:
        if row["kind"].startswith("block_"):
            mode = "training step" if row["kind"] == "block_train" else "eval"
            out.append(f"| {mode} | {row['name']} | {row['ms']:.3f} | {row['p20']:.3f}–{row['p80']:.3f} | "
                       f"{row['speedup_vs_eager']:.2f}× | {row['speedup_vs_compile']:.2f}× | "
                       f"{row['peak_bytes'] / 2**30:.2f} GiB |")
    out.append("")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--results", default=os.path.join(ROOT, "bench", "results"))
    ap.add_argument("--readme", default=os.path.join(ROOT, "README.md"))
    ap.add_argument("--print", action="store_true", dest="print_only")
    args = ap.parse_args(argv)
    section = render(load(args.results))
    if args.print_only:
        print(section)
        return 0
    with open(args.readme) as f:
        text = f.read()
    if START not in text or END not in text:
        print(f"{args.readme}: no {START} ... {END} markers", file=sys.stderr)
        return 1
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    with open(args.readme, "w") as f:
        f.write(f"{head}{START}\n{section}\n{END}{tail}")
    print(f"updated {os.path.relpath(args.readme)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
