"""How bench/ measures: timing, peak memory, the two hardware ceilings, the environment tag,
and a progress display.

Timing: each repetition runs every contestant of a case once, in turn (interleaved, so that
drift of the machine — clocks, other load — hits all alike), after warm-up calls that are not
counted. On a GPU each call is timed with a pair of CUDA events; on a CPU with perf_counter.
Reported: the median with the 20th and 80th percentiles. Inputs are rotated between calls
(`rotation`), enough copies that together they exceed the last-level cache, so that no call
reads its input from a cache the previous one warmed.
"""
from __future__ import annotations

import datetime
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from typing import Callable, Dict, List, Optional

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# -- timing -------------------------------------------------------------------------------------
def _sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_once(fn: Callable[[], object], device: torch.device, clock=None) -> float:
    """Milliseconds of one call (`clock`: on a CPU, another clock than perf_counter, e.g.
    time.thread_time: the calling thread's CPU time, which other load does not stretch)."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    clock = clock or time.perf_counter
    t0 = clock()
    fn()
    return (clock() - t0) * 1e3


def time_interleaved(fns: Dict[str, Callable[[], object]], repeats: int, warmup: int,
                     device: torch.device, clock=None) -> Dict[str, List[float]]:
    """{name: [ms, ...]}: `warmup` uncounted calls of each, then `repeats` rounds of one call of
    each contestant in turn, the order rotating by one each round (no contestant always runs
    right after the same other one)."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    _sync(device)
    names = list(fns)
    times: Dict[str, List[float]] = {k: [] for k in names}
    for r in range(repeats):
        for j in range(len(names)):
            name = names[(r + j) % len(names)]
            times[name].append(time_once(fns[name], device, clock))
    return times


def summarize(ms: List[float]) -> Dict[str, float]:
    """Median with 20th and 80th percentiles (inclusive method: within the observed range)."""
    if not ms:
        raise ValueError("no timings")
    med = statistics.median(ms)
    if len(ms) < 2:
        return dict(median_ms=med, p20_ms=med, p80_ms=med, repeats=len(ms))
    q = statistics.quantiles(ms, n=5, method="inclusive")
    return dict(median_ms=med, p20_ms=q[0], p80_ms=q[3], repeats=len(ms))


def peak_memory(fn: Callable[[], object], device: torch.device) -> Optional[int]:
    """Bytes allocated above what was allocated before one call of `fn`, at its peak (CUDA's
    caching allocator's count); None on a CPU, which keeps no such count."""
    if device.type != "cuda":
        return None
    _sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    _sync(device)
    return torch.cuda.max_memory_allocated(device) - base


def saved_for_backward(fn: Callable[[], object], exclude=()) -> int:
    """Bytes of the tensors autograd saves for backward during one call of `fn` (a training
    forward, or a step whose backward runs inside it), on any device: every tensor a
    `saved_tensors_hooks` pack hook sees, each storage once (by its data pointer: a tensor
    saved twice, or a view of another saved one, counts once), without parameters (the
    storage of every live `nn.Parameter` — a saved `weight.t()` is a view of one — and of
    the tensors in `exclude`). The count is of what the graph holds
    at the end of the forward: storages are alive then, so their pointers are distinct.
    torch.compile's graphs save through AOT autograd's own autograd.Function, whose saves the
    hooks see too (a compiled graph may save copies of the weights in another layout: they
    are counted, being memory the graph holds)."""
    import gc
    # (issubclass of the type: isinstance would run Parameter's instance check on every
    # object, which touches deprecated torch.distributed attributes and warns.)
    params = [o for o in gc.get_objects() if issubclass(type(o), torch.nn.Parameter)]
    skip = {t.untyped_storage().data_ptr() for t in [*params, *exclude]
            if isinstance(t, torch.Tensor)}
    seen: Dict[int, int] = {}

    def pack(t):
        if isinstance(t, torch.nn.Parameter):
            return t
        if t.layout != torch.strided:  # (e.g. a oneDNN tensor of a compiled CPU graph)
            seen[id(t)] = t.numel() * t.element_size()
            return t
        st = t.untyped_storage()
        ptr = st.data_ptr()
        if ptr not in skip and st.nbytes():
            seen[ptr] = st.nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def cache_bytes(device: torch.device) -> int:
    """The last-level cache the rotation must defeat: the GPU's L2, or the CPU's largest
    cache (32 MiB when it cannot be read)."""
    if device.type == "cuda":
        return int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 << 20))
    best = 0
    base = "/sys/devices/system/cpu/cpu0/cache"
    try:
        for idx in os.listdir(base):
            with open(os.path.join(base, idx, "size")) as f:
                text = f.read().strip()
            mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
            best = max(best, int(text.rstrip("KMG")) * mult)
    except (OSError, ValueError):
        pass
    return best or 32 << 20


def rotation(nbytes: int, device: torch.device, most: int = 8) -> int:
    """How many copies of a call's inputs (of `nbytes` together) to cycle through so that they
    exceed twice the last-level cache: at least 2, at most `most`."""
    need = math.ceil(2 * cache_bytes(device) / max(nbytes, 1)) + 1
    return max(2, min(most, need))


# -- ceilings -----------------------------------------------------------------------------------
def ceilings(device: torch.device, dtypes: List[torch.dtype], repeats: int = 10) -> dict:
    """The two limits every row is measured against, measured now on this device (each the
    fastest of `repeats` calls after warm-up):
    - device-to-device copy bandwidth (GB/s, bytes read + written), of a tensor far larger
      than the last-level cache;
    - compute (TFLOP/s): a large matmul in bf16 (on a GPU) and in each dtype of the run (TF32
      as torch's settings say), and a large 1x1 convolution (the same GEMM through the
      convolution library: on a CPU, oneDNN's convolutions outrun the BLAS matmul, so the
      matmul alone is not the peak there). A row's compute ceiling is the larger of the two.
    """
    on_gpu = device.type == "cuda"
    best = min  # a ceiling is the best the device did: the fastest of the repetitions
    n = (1 << 30 if on_gpu else 1 << 28) // 4  # 1 GiB on a GPU, 256 MiB on a CPU, of float32
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    ms = best(time_interleaved({"copy": lambda: dst.copy_(src)}, repeats, 2, device)["copy"])
    copy_gbs = 2 * src.numel() * 4 / (ms * 1e-3) / 1e9
    del src, dst
    side = 8192 if on_gpu else 2048
    batch = 64 if on_gpu else 8  # the 1x1 conv: batch x 1024 x 32 x 32 -> 1024 channels
    matmul, conv = {}, {}
    wanted = ([torch.bfloat16] if on_gpu else []) + list(dtypes)
    for dt in dict.fromkeys(wanted):
        key = str(dt).replace("torch.", "")
        a = torch.randn(side, side, device=device, dtype=dt)
        b = torch.randn_like(a)
        ms = best(time_interleaved({"mm": lambda: a @ b}, repeats, 2, device)["mm"])
        matmul[key] = 2 * side**3 / (ms * 1e-3) / 1e12
        del a, b
        x = torch.randn(batch, 1024, 32, 32, device=device, dtype=dt)
        x = x.contiguous(memory_format=torch.channels_last)
        w = torch.randn(1024, 1024, 1, 1, device=device, dtype=dt)
        w = w.contiguous(memory_format=torch.channels_last)
        ms = best(time_interleaved({"conv": lambda: torch.nn.functional.conv2d(x, w)}, repeats,
                                   2, device)["conv"])
        conv[key] = 2 * batch * 32 * 32 * 1024 * 1024 / (ms * 1e-3) / 1e12
        del x, w
    if on_gpu:
        torch.cuda.empty_cache()
    return dict(copy_gbs=copy_gbs, matmul_tflops=matmul, conv1x1_tflops=conv,
                compute_tflops={k: max(matmul[k], conv[k]) for k in matmul},
                copy_bytes=n * 4, matmul_side=side, conv1x1_shape=[batch, 1024, 32, 32],
                **tf32_settings())


def tf32_settings() -> dict:
    """Whether fp32 matmuls and convolutions may use TF32 (what fp32 rows on a GPU measure).
    Torch's newer `fp32_precision` settings make the old flags raise when read: both kinds are
    tried."""
    out = {}
    for key, read in (("matmul_allow_tf32", lambda: torch.backends.cuda.matmul.allow_tf32),
                      ("cudnn_allow_tf32", lambda: torch.backends.cudnn.allow_tf32),
                      ("matmul_fp32_precision",
                       lambda: torch.backends.cuda.matmul.fp32_precision),
                      ("cudnn_conv_fp32_precision",
                       lambda: torch.backends.cudnn.conv.fp32_precision)):
        try:
            out[key] = read()
        except Exception:  # noqa: BLE001 - absent in this torch, or refused
            pass
    return out


def roofline(nbytes: int, flops: int, ms: float, ceil: dict, dtype: str) -> dict:
    """Achieved GB/s and TFLOP/s, the bound (memory or compute: whichever floor is longer) and
    the fraction of that floor the measured time reaches. (It can pass 100 %: a 3x3 conv may
    run Winograd, fewer multiplies than counted; a ceiling is measured, not the data sheet's.)"""
    peak = ceil["compute_tflops"].get(dtype) or max(ceil["compute_tflops"].values())
    t_mem = nbytes / (ceil["copy_gbs"] * 1e9)
    t_cmp = flops / (peak * 1e12)
    sec = ms * 1e-3
    return dict(gbs=nbytes / sec / 1e9, tflops=flops / sec / 1e12,
                bound="compute" if t_cmp > t_mem else "memory",
                floor_ms=max(t_mem, t_cmp) * 1e3, frac_of_roofline=max(t_mem, t_cmp) / sec)


# -- environment --------------------------------------------------------------------------------
def _run(cmd: List[str]) -> str:
    try:
        return subprocess.run(cmd, cwd=ROOT, text=True, capture_output=True, timeout=20,
                              check=True).stdout.strip()
    except Exception:  # noqa: BLE001 - a missing tool only leaves the field empty
        return ""


def commit() -> str:
    c = os.environ.get("RESFUSE_COMMIT") or _run(["git", "rev-parse", "--short", "HEAD"]) or "unknown"
    dirty = _run(["git", "status", "--porcelain", "--untracked-files=no"])
    return c + ("-dirty" if dirty else "")


def environment(device: torch.device) -> dict:
    """What every row is tagged with: device, driver, versions, commit, date."""
    import resfuse
    driver = None
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        smi = _run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
        driver = smi.splitlines()[0].strip() if smi else None
    else:
        name = platform.processor() or platform.machine()
        try:
            with open("/proc/cpuinfo") as f:
                name = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
        except (OSError, StopIteration):
            pass
    try:
        import triton
        triton_version = triton.__version__
    except Exception:  # noqa: BLE001
        triton_version = None
    return dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                device=name, device_type=device.type, driver=driver,
                threads=torch.get_num_threads(), cpu_count=os.cpu_count(),
                torch=torch.__version__, cuda=torch.version.cuda, triton=triton_version,
                python=platform.python_version(), resfuse=resfuse.__version__, commit=commit(),
                backends=resfuse.backends(),
                # the Triton backend's tiles: fixed (default) or timed per shape (tiles.py)
                triton_autotune=os.environ.get("RESFUSE_TRITON_AUTOTUNE", "0").strip().lower()
                in ("1", "true", "yes", "on"))


def device_slug(env: dict) -> str:
    """'h100' for an NVIDIA H100 ..., 'cpu' on a CPU: the result files' device name."""
    if env["device_type"] != "cuda":
        return "cpu"
    m = re.search(r"\b([A-Z]{1,2}\d{2,4}[A-Za-z]?)\b", env["device"])
    return m.group(1).lower() if m else "gpu"


def result_stem(result: dict) -> str:
    """<date>-<device>-<suite>-<commit>: the name of a run's files (JSON, CSV, plots)."""
    env = result["env"]
    return "{}-{}-{}-{}".format(env["date"][:10], device_slug(env), result["settings"]["suite"],
                                env["commit"])


# -- progress -----------------------------------------------------------------------------------
class Progress:
    """`[12/48] 1m03s, about 2m10s left · blocks · resnet50 layer1 … · train_step` on stderr:
    rewritten in place on a terminal, one line per step otherwise (logs)."""

    def __init__(self, total: int, stream=None, enabled: bool = True):
        self.total, self.done, self.start = total, 0, time.monotonic()
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()

    @staticmethod
    def _fmt(sec: float) -> str:
        sec = int(round(sec))
        return f"{sec // 60}m{sec % 60:02d}s" if sec >= 60 else f"{sec}s"

    def line(self, label: str) -> str:
        elapsed = time.monotonic() - self.start
        left = ""
        if self.done:
            left = f", about {self._fmt(elapsed / self.done * (self.total - self.done))} left"
        return f"[{self.done + 1}/{self.total}] {self._fmt(elapsed)}{left} · {label}"

    def step(self, label: str):
        if self.enabled:
            text = self.line(label)
            if self.tty:
                self.stream.write("\r\033[K" + text[:150])
            else:
                self.stream.write(text + "\n")
            self.stream.flush()
        self.done += 1

    def close(self):
        if self.enabled and self.tty:
            self.stream.write("\r\033[K")
            self.stream.flush()
