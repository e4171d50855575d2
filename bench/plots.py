"""PNG plots of a bench/run.py result (optional: needs matplotlib, `pip install 'resfuse[plots]'`).

- `<stem>-speedup.png`: one panel per mode the blocks and models rows have (training forward,
  training step, eval, and any mode a suite adds), each resfuse contestant's speed-up per block
  and model against eager and against torch.compile from the same run;
- `<stem>-roofline.png`: every timed row with convolutions as achieved TFLOP/s against
  arithmetic intensity (FLOPs per byte of the fused schedule, bench/counts.py) under the
  measured ceilings; the rows without (scale-bias-add-act) as GB/s against the measured copy
  bandwidth;
- `<stem>-memory.png`: every training row's bytes saved for backward against eager's.

The plots take whatever rows a result has: a mode, contestant or suite they have not met gets
a panel, a bar or a point of its own, a missing figure is left out, never a KeyError at the end
of a long run (tests/test_plots.py draws them from a real quick-suite result).
"""
from __future__ import annotations

import os
from typing import List, Optional

# Known modes first, in this order, with their titles; any other mode follows, titled by name.
MODE_ORDER = ("train_fwd", "train_bwd", "train_step", "eval")
MODE_TITLES = {"train_fwd": "training forward", "train_bwd": "training backward",
               "train_step": "training step (forward + backward)", "eval": "eval"}


def _pyplot():
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        return plt
    except Exception:  # noqa: BLE001 - the plots are optional
        return None


def _title(result: dict) -> str:
    e = result.get("env", {})
    return (f"{e.get('device', '?')} · torch {e.get('torch', '?')} · resfuse @ "
            f"{e.get('commit', '?')} · {str(e.get('date', ''))[:10]}")


def ordered_modes(rows: list) -> list:
    """The modes of `rows`: the known ones in MODE_ORDER, then the others as they come."""
    seen = list(dict.fromkeys(str(r.get("mode")) for r in rows))
    return [m for m in MODE_ORDER if m in seen] + [m for m in seen if m not in MODE_ORDER]


def _multi(result: dict) -> bool:
    s = result.get("settings", {})
    return len(s.get("dtypes", [1])) * len(s.get("layouts", [1])) * len(s.get("batches", [1])) > 1


def speedup_plot(result: dict, path: str, plt) -> Optional[str]:
    """One panel per mode: per block and model, each resfuse contestant's speed-up against
    eager and against torch.compile."""
    rows = [r for r in result.get("rows", []) if r.get("suite") in ("blocks", "models")
            and r.get("median_ms") and str(r.get("contestant") or "").startswith("resfuse")]
    series = []  # (contestant, baseline key, baseline label)
    for r in rows:
        for base, label in (("eager", "eager"), ("compile", "torch.compile")):
            key = (r["contestant"], base, label)
            if r.get(f"speedup_vs_{base}") is not None and key not in series:
                series.append(key)
    if not series:
        return None
    multi = _multi(result)
    modes = ordered_modes(rows)
    labels = {m: [] for m in modes}
    value = {}
    for r in rows:
        mode = str(r.get("mode"))
        label = str(r.get("case")) + (f" · {r.get('dtype')} {r.get('layout')} b{r.get('batch')}"
                                      if multi else "")
        if label not in labels[mode]:
            labels[mode].append(label)
        for base in ("eager", "compile"):
            if r.get(f"speedup_vs_{base}") is not None:
                value[(mode, label, r["contestant"], base)] = r[f"speedup_vs_{base}"]
    n = max(len(v) for v in labels.values())
    fig, axes = plt.subplots(1, len(modes), figsize=(7 * len(modes), 0.11 * n * len(series) + 2.2),
                             squeeze=False)
    height = 0.8 / len(series)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, mode in zip(axes[0], modes):
        ls = labels[mode]
        for j, (contestant, base, blabel) in enumerate(series):
            ax.barh([i + j * height for i in range(len(ls))],
                    [value.get((mode, l, contestant, base), 0.0) for l in ls], height=height,
                    color=colors[j % len(colors)], label=f"{contestant} vs {blabel}")
        ax.axvline(1.0, color="black", linewidth=0.8)
        ax.set_yticks([i + 0.4 - height / 2 for i in range(len(ls))])
        ax.set_yticklabels(ls, fontsize=6)
        ax.set_ylim(len(ls), -0.2)
        ax.set_title(MODE_TITLES.get(mode, mode), fontsize=9)
        ax.set_xlabel("speed-up (> 1: resfuse is faster)", fontsize=8)
        ax.grid(axis="x", linewidth=0.3)
    axes[0][0].legend(fontsize=6, loc="lower right")
    fig.suptitle(_title(result), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def roofline_plot(result: dict, path: str, plt) -> Optional[str]:
    """Left: every timed row with convolutions as achieved TFLOP/s against arithmetic
    intensity, under the measured ceilings. Right: the rows without (scale-bias-add-act) as
    achieved GB/s against the measured copy bandwidth."""
    timed = [r for r in result.get("rows", []) if r.get("median_ms") and r.get("bytes")]
    convs = [r for r in timed if r.get("flops")]
    flat = [r for r in timed if r.get("flops") == 0]
    if not convs and not flat:
        return None
    ceil = result.get("ceilings") or {}
    copy_gbs = ceil.get("copy_gbs")
    panels = (1 if convs else 0) + (1 if flat else 0)
    fig, axes = plt.subplots(1, panels, figsize=(7 * panels, 5.5), squeeze=False)
    markers = {"eager": "o", "torch.compile": "s", "torch.compile(max-autotune)": "D"}
    ax_i = 0
    if convs:
        ax = axes[0][ax_i]
        ax_i += 1
        for name in dict.fromkeys(str(r.get("contestant")) for r in convs):
            pts = [(r["flops"] / r["bytes"], r["flops"] / (r["median_ms"] * 1e-3) / 1e12)
                   for r in convs if str(r.get("contestant")) == name]
            ax.scatter([p[0] for p in pts], [p[1] for p in pts], s=14, label=name,
                       marker=markers.get(name, "^"), alpha=0.75)
        lo = min(r["flops"] / r["bytes"] for r in convs) / 2
        hi = max(r["flops"] / r["bytes"] for r in convs) * 2
        if copy_gbs:
            bw = copy_gbs * 1e9
            for dtype, peak in (ceil.get("compute_tflops") or {}).items():
                knee = peak * 1e12 / bw
                a, b = min(lo, knee / 4), max(hi, knee * 4)
                ax.plot([a, knee, b], [a * bw / 1e12, peak, peak], linewidth=1,
                        label=f"roof: copy {copy_gbs:.0f} GB/s, {dtype} {peak:.3g} TFLOP/s")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("arithmetic intensity (conv FLOPs / bytes of the fused schedule)", fontsize=8)
        ax.set_ylabel("achieved TFLOP/s", fontsize=8)
        ax.set_title("ops, blocks and models with convolutions", fontsize=9)
        ax.legend(fontsize=6)
    if flat:
        ax = axes[0][ax_i]
        label = lambda r: f"{r.get('case')} · {r.get('mode')}"  # noqa: E731
        labels = list(dict.fromkeys(label(r) for r in flat))
        names = list(dict.fromkeys(str(r.get("contestant")) for r in flat))
        height = 0.8 / len(names)
        for j, name in enumerate(names):
            got = {label(r): r["bytes"] / r["median_ms"] / 1e6 for r in flat
                   if str(r.get("contestant")) == name}
            ax.barh([i + j * height for i in range(len(labels))],
                    [got.get(l, 0.0) for l in labels], height=height, label=name)
        if copy_gbs:
            ax.axvline(copy_gbs, color="black", linewidth=1, label="copy (measured)")
            ax.axvline(0.85 * copy_gbs, color="black", linewidth=0.8, linestyle=":",
                       label="85 % of copy")
        ax.set_yticks([i + 0.4 - height / 2 for i in range(len(labels))])
        ax.set_yticklabels(labels, fontsize=6)
        ax.set_ylim(len(labels), -0.2)
        ax.set_xlabel("achieved GB/s (bytes of the fused schedule / time)", fontsize=8)
        ax.set_title("scale-bias-add-act (memory-bound)", fontsize=9)
        ax.legend(fontsize=6, loc="lower right")
    fig.suptitle(_title(result), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def memory_plot(result: dict, path: str, plt) -> Optional[str]:
    """Per training row with a saved-bytes count: each contestant's bytes saved for backward
    as a fraction of eager's in the same case (bench/measure.py `saved_for_backward`)."""
    rows = [r for r in result["rows"] if r.get("mem_saved_vs_eager") is not None
            and r.get("contestant") != "eager"]
    if not rows:
        return None
    cases = list(dict.fromkeys(f"{r['case']} · {r['mode']}" for r in rows))
    names = list(dict.fromkeys(r["contestant"] for r in rows))
    fig, ax = plt.subplots(figsize=(10, max(3, 0.35 * len(cases) * max(1, len(names)) / 2)))
    height = 0.8 / len(names)
    for j, name in enumerate(names):
        ys, xs = [], []
        for r in rows:
            if r["contestant"] == name:
                ys.append(cases.index(f"{r['case']} · {r['mode']}") + j * height)
                xs.append(r["mem_saved_vs_eager"])
        ax.barh(ys, xs, height=height, label=name)
    ax.axvline(1.0, color="k", lw=0.8)
    ax.set_yticks([i + 0.4 - height / 2 for i in range(len(cases))])
    ax.set_yticklabels(cases, fontsize=7)
    ax.set_xlabel("bytes saved for backward / eager's (same case)")
    ax.set_title(_title(result), fontsize=8)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def make_plots(result: dict, out_dir: str, stem: Optional[str] = None) -> Optional[List[str]]:
    """The plots' paths (`<stem>-speedup.png`, `<stem>-roofline.png` in `out_dir`; the stem of
    the result's own file names by default), or None when matplotlib is not installed."""
    plt = _pyplot()
    if plt is None:
        return None
    if stem is None:
        from measure import result_stem
        stem = result_stem(result)
    stem = os.path.join(out_dir, stem)
    made = [speedup_plot(result, stem + "-speedup.png", plt),
            roofline_plot(result, stem + "-roofline.png", plt),
            memory_plot(result, stem + "-memory.png", plt)]
    return [p for p in made if p]
