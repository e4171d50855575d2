"""`auto` from measurement: bench/report.py's table of the fastest backend per GPU kind, mode,
dtype and layout (from the committed result files), resfuse/backend/measured.py kept fresh,
and `select` taking the measured backend where there is one and its fixed order elsewhere."""
import os
import sys

import pytest
import torch

import resfuse
from resfuse import backend as dispatch
from resfuse.backend import auto_table
from resfuse.backend.base import Backend, Case

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.append(os.path.join(ROOT, "bench"))
import report  # noqa: E402

BLOCKS = ("resnet50 layer1 bottleneck 256->64->256 @56 (identity)",
          "resnet50 layer4 bottleneck 2048->512->2048 @7 (identity)")


def _run(times: dict, date="2026-12-01T00:00:00+00:00", device="NVIDIA H100 80GB HBM3",
         device_type="cuda", parity=None, name="bench/results/x.json") -> dict:
    """A made-up result (not a measurement): times[(mode, contestant)] = ms per block."""
    rows = []
    for (mode, contestant), per_block in times.items():
        for case, ms in zip(BLOCKS, per_block):
            ok = (parity or {}).get((mode, contestant, case), True)
            rows.append(dict(suite="blocks", case=case, mode=mode, contestant=contestant,
                             median_ms=ms, dtype="bfloat16", layout="channels_last", batch=256,
                             parity_ok=None if contestant == "eager" else ok))
    return dict(schema=report.SCHEMA, env=dict(date=date, device=device, device_type=device_type),
                rows=rows, _file=name)


def test_the_least_total_time_over_the_blocks_wins():
    run = _run({("train_step", "eager"): (10, 10), ("train_step", "resfuse[cuda]"): (5, 9),
                ("train_step", "resfuse[triton]"): (7, 6),  # 13 < 14: triton
                ("eval", "resfuse[cuda]"): (1, 1), ("eval", "resfuse[triton]"): (0.5, 3)})
    assert report.auto_entries(run) == {("h100", True, "bfloat16", "channels_last"): "triton",
                                        ("h100", False, "bfloat16", "channels_last"): "cuda"}


def test_a_failed_check_or_a_missing_block_disqualifies():
    run = _run({("train_step", "resfuse[cuda]"): (5, 9), ("train_step", "resfuse[triton]"): (1, 1)},
               parity={("train_step", "resfuse[triton]", BLOCKS[1]): False})
    assert report.auto_entries(run) == {("h100", True, "bfloat16", "channels_last"): "cuda"}
    run = _run({("eval", "resfuse[cuda]"): (5, 9), ("eval", "resfuse[triton]"): (1,)})
    assert report.auto_entries(run) == {("h100", False, "bfloat16", "channels_last"): "cuda"}
    # Nothing qualifies: no entry (auto keeps its order there).
    run = _run({("eval", "resfuse[triton]"): (1, 1)},
               parity={("eval", "resfuse[triton]", BLOCKS[0]): False})
    assert report.auto_entries(run) == {}


def test_a_backend_timed_only_as_auto_cannot_be_compared():
    """A suite run times cuda as resfuse[auto]: with cuda available, triton alone decides nothing."""
    run = _run({("eval", "resfuse[auto]"): (1, 1), ("eval", "resfuse[triton]"): (2, 2)})
    run["env"]["backends"] = {"cuda": "ok", "triton": "ok", "eager": "ok"}
    assert report.auto_entries(run) == {}
    run["env"]["backends"]["cuda"] = "not available: resfuse._C not built"
    assert report.auto_entries(run) == {("h100", False, "bfloat16", "channels_last"): "triton"}


def test_cpu_runs_decide_nothing_and_the_newest_gpu_run_wins():
    assert report.auto_entries(_run({("eval", "resfuse[triton]"): (1, 1)}, device="AMD EPYC",
                                    device_type="cpu")) == {}
    old = _run({("eval", "resfuse[triton]"): (1, 1), ("eval", "resfuse[cuda]"): (2, 2)},
               name="bench/results/old.json")
    new = _run({("eval", "resfuse[triton]"): (3, 3), ("eval", "resfuse[cuda]"): (2, 2)},
               date="2026-12-02T00:00:00+00:00", name="bench/results/new.json")
    key = ("h100", False, "bfloat16", "channels_last")
    assert report.auto_table([new, old]) == {key: ("cuda", "bench/results/new.json")}


def test_measured_module_round_trips():
    table = {("h100", True, "bfloat16", "channels_last"): ("triton", "bench/results/a.json")}
    scope = {}
    exec(report.render_measured_py(table), scope)
    assert scope["TABLE"] == table
    scope = {}
    exec(report.render_measured_py({}), scope)
    assert scope["TABLE"] == {}


def test_committed_measured_table_is_fresh():
    """resfuse/backend/measured.py is what bench/report.py makes of the committed results."""
    want = report.render_measured_py(report.auto_table(report.read_all(
        os.path.join(ROOT, "bench", "results"))))
    with open(os.path.join(ROOT, "resfuse", "backend", "measured.py")) as f:
        assert f.read() == want, "resfuse/backend/measured.py is stale: run python bench/report.py"


def test_gpu_kind_names():
    assert auto_table.gpu_kind("NVIDIA H100 80GB HBM3") == "h100"
    assert auto_table.gpu_kind("NVIDIA H200") == "h200"
    assert auto_table.gpu_kind("NVIDIA A100-SXM4-80GB") == "a100"


class _StubTriton(Backend):
    """Stands for a triton backend that can run here but is not auto-eligible by itself."""
    name = "triton"

    def unavailable_reason(self):
        return None

    def unsupported_reason(self, case):
        return None

    def auto_eligible(self, case):
        return False


@pytest.fixture
def gpu_case(monkeypatch):
    monkeypatch.delenv("RESFUSE_BACKEND", raising=False)
    monkeypatch.setitem(dispatch._registry, "triton", _StubTriton())
    monkeypatch.setattr(auto_table, "current_kind", lambda: "h100")
    return Case("conv_bn_act", "cuda", torch.bfloat16, True, 1, True)


def test_auto_takes_the_measured_backend(monkeypatch, gpu_case):
    # Nothing measured: today's order (cuda is not built here, the stub triton is not
    # auto-eligible): eager.
    monkeypatch.setattr(auto_table, "TABLE", {})
    assert dispatch.select(gpu_case).name == "eager"
    monkeypatch.setattr(auto_table, "TABLE", {
        ("h100", True, "bfloat16", "channels_last"): ("triton", "bench/results/x.json")})
    assert dispatch.select(gpu_case).name == "triton"
    assert "bench/results/x.json" in resfuse.backends()["auto"]
    # Another mode, layout or GPU kind: not measured, today's order.
    assert dispatch.select(gpu_case._replace(training=False)).name == "eager"
    assert dispatch.select(gpu_case._replace(channels_last=False)).name == "eager"
    monkeypatch.setattr(auto_table, "current_kind", lambda: "a100")
    assert dispatch.select(gpu_case).name == "eager"
    # A forced backend is still the one forced.
    assert dispatch.select(gpu_case, "eager").name == "eager"


def test_a_measured_backend_that_cannot_run_falls_through(monkeypatch, gpu_case):
    monkeypatch.setattr(auto_table, "TABLE", {
        ("h100", True, "bfloat16", "channels_last"): ("cuda", "bench/results/x.json")})
    assert dispatch.select(gpu_case).name == "eager"  # cuda is not built here
    # A CPU tensor never consults the table.
    cpu = gpu_case._replace(device_type="cpu")
    monkeypatch.setattr(auto_table, "TABLE", {
        ("h100", True, "bfloat16", "channels_last"): ("triton", "bench/results/x.json")})
    assert dispatch.select(cpu).name == "eager"


def test_backends_says_which_table():
    text = resfuse.backends()["auto"]
    assert "cuda > triton > eager" in text
    assert ("no measured table" in text) == (not auto_table.TABLE)
