"""bench/plots.py: every mode the harness emits (and any a suite adds later) gets its place in
each plot, on a committed result set and on made-up rows; skipped only where matplotlib is
not installed (CI installs it: setup.py's `plots` extra). The quick suite's own plots are
drawn end to end in tests/test_bench.py::test_quick_suite_end_to_end."""
import copy
import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.append(os.path.join(ROOT, "bench"))
import plots  # noqa: E402

PNG = b"\x89PNG\r\n\x1a\n"
# A committed run: ops in every op mode, blocks and models in training step and eval.
REAL = os.path.join(ROOT, "bench", "results", "2026-11-23-cpu-all-13970c2.json")


def _load(train_fwd_blocks=True):
    """The committed run, with its blocks also in training forward as the harness times them
    now (the mode whose block rows made the speed-up plot raise KeyError: 'train_fwd')."""
    with open(REAL) as f:
        run = json.load(f)
    if train_fwd_blocks:
        run["rows"] += [dict(copy.deepcopy(r), mode="train_fwd") for r in run["rows"]
                        if r.get("suite") == "blocks" and r.get("mode") == "train_step"]
    return run


def test_modes_are_ordered_and_none_dropped():
    rows = [dict(mode=m) for m in ("eval", "train_lowmem", "train_fwd", "train_step", "eval")]
    assert plots.ordered_modes(rows) == ["train_fwd", "train_step", "eval", "train_lowmem"]
    modes = {(r["suite"], r["mode"]) for r in _load()["rows"]}
    assert {("ops", "train_bwd"), ("blocks", "train_fwd"), ("models", "eval")} <= modes


def _check(made, tmp_path, stem):
    assert sorted(os.path.basename(p) for p in made) == [f"{stem}-roofline.png",
                                                         f"{stem}-speedup.png"]
    for p in made:
        with open(p, "rb") as f:
            assert f.read(8) == PNG


def test_plots_of_a_committed_run(tmp_path):
    pytest.importorskip("matplotlib")
    _check(plots.make_plots(_load(), str(tmp_path), stem="real"), tmp_path, "real")


def test_plots_take_any_mode_contestant_and_missing_figure(tmp_path):
    pytest.importorskip("matplotlib")
    run = _load()
    extra = []
    for r in run["rows"]:
        if r.get("suite") == "blocks" and r.get("mode") == "train_step":
            # a mode and a contestant the plots have never seen; some figures missing
            extra.append(dict(copy.deepcopy(r), mode="train_step_lowmem",
                              contestant="resfuse[cuda]", speedup_vs_compile=None))
    run["rows"] += extra + [dict(suite="blocks", case="broken", mode="eval", contestant=None,
                                 error="ValueError: x")]
    run["ceilings"].pop("copy_gbs")
    _check(plots.make_plots(run, str(tmp_path), stem="any"), tmp_path, "any")


def test_no_plot_without_rows(tmp_path):
    pytest.importorskip("matplotlib")
    run = dict(_load(), rows=[])
    assert plots.make_plots(run, str(tmp_path), stem="empty") == []
